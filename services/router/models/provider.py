"""Model providers: OpenAI-compatible Chat Completions endpoints, each behind its own breaker.

Any server that speaks the Chat Completions API works (vLLM, llama.cpp's server, Ollama,
LiteLLM, a hosted API): the official ``openai`` SDK talks to it through ``base_url``. The SDK's
own retries are off (``max_retries=0``); ours retry only where it is safe:

- a connection that could not be made (nothing reached the server), with a short backoff;
- 429 and 503 whose ``Retry-After`` (seconds or an HTTP date) still fits in the call's time.

Every call carries the caller's remaining time as its timeout and is also bounded on our side.
A breaker per provider (services.kit.breaker) counts connection failures, timeouts and 5xx
answers; a 4xx says nothing of the server's health (429 is the server protecting itself). When
the primary provider cannot answer (breaker open, unreachable, failing), the fallback provider,
if configured, gets the call with whatever time is left. API keys come from a file or the
environment and are never logged (they live only inside the SDK client).

The SDK (about 13 MB of a process's memory) is imported when the first provider is built: a
router without a model configured never loads it.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx2
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from services.kit.breaker import BreakerConfig, BreakerOpen, BreakerRegistry

if TYPE_CHECKING:
    import openai
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

log = logging.getLogger("toolmesh.router.models")

PRIMARY = "primary"
FALLBACK = "fallback"
# Backoff before retrying a connection that could not be made.
_CONNECT_BACKOFF_S = 0.1
# A Retry-After wait must leave at least this much of the call's time for the retry itself.
_RETRY_MARGIN_S = 0.25
# Statuses retried when their Retry-After fits in the time left.
_RETRY_AFTER_STATUSES = frozenset({429, 503})


class ModelUnavailableError(Exception):
    """No provider could answer: down, breaker open, failing, rate limited or out of time."""

    def __init__(self, reason: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


class ModelRefusedError(Exception):
    """The provider refused the request itself (a 4xx other than 429): retrying cannot help."""


@dataclass(frozen=True)
class ProviderConfig:
    """Where a provider is and how to reach it; ``api_key`` never leaves the SDK client."""

    name: str
    base_url: str
    model: str
    api_key: str


def read_api_key(key_file: Path | None, key: str) -> str:
    """The key from ``key_file`` (whitespace stripped) or else ``key``; an unreadable or empty
    file fails start-up rather than send requests without a key."""
    if key_file is None:
        return key
    try:
        text = key_file.read_text(encoding="utf-8").strip()
    except OSError as error:
        raise ValueError(
            f"cannot read the model API key file {key_file}: {error.strerror}"
        ) from None
    if not text:
        raise ValueError(f"the model API key file {key_file} is empty")
    return text


@dataclass(frozen=True)
class Completion:
    """One answered call: the response and which provider gave it. ``model`` is the model
    asked for (what prices and budgets key on), ``response_model`` what the server reported."""

    response: ChatCompletion
    provider: str
    model: str
    response_model: str
    duration_s: float


def retry_after_s(headers: Mapping[str, str], now: Callable[[], datetime]) -> float | None:
    """Seconds the server asked us to wait (Retry-After as seconds or an HTTP date), or None."""
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return max(0.0, (moment - now()).total_seconds())
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _connect_failed(error: Exception) -> bool:
    """True only when no connection was made: nothing reached the server, retrying is safe."""
    import openai

    if isinstance(error, openai.APITimeoutError):
        return False
    cause = error.__cause__
    return isinstance(error, openai.APIConnectionError) and isinstance(cause, httpx2.ConnectError)


class Provider:
    """One endpoint: its SDK client (no SDK retries) and its breaker."""

    def __init__(
        self,
        config: ProviderConfig,
        breakers: BreakerRegistry,
        *,
        max_attempts: int,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.name = config.name
        self.model = config.model
        self.base_url = config.base_url
        # The SDK and its chat types load here, at start-up, not inside a first call's deadline.
        import openai.types.chat  # noqa: F401
        from openai import AsyncOpenAI

        self._client = AsyncOpenAI(
            base_url=config.base_url,
            # Servers without authentication still get a (meaningless) key: the SDK needs one.
            api_key=config.api_key or "unused",
            max_retries=0,
        )
        self.breaker = breakers.get(f"model:{config.name}")
        self._max_attempts = max_attempts
        self._clock = clock
        self._wall = wall

    async def close(self) -> None:
        await self._client.close()

    def _left(self, deadline: float) -> float:
        return deadline - self._clock()

    async def _attempts(self, deadline: float, start: Callable[[float], Any]) -> Any:
        """``start(timeout_s)`` under the breaker, retried where safe, until ``deadline``."""
        import openai

        for attempt in range(1, self._max_attempts + 1):
            left = self._left(deadline)
            if left <= 0:
                raise ModelUnavailableError(f"{self.name}: no time left for the model call")
            try:
                permit = self.breaker.acquire()
            except BreakerOpen as exc:
                raise ModelUnavailableError(
                    f"{self.name}: circuit breaker open", retry_after_s=exc.retry_after_s
                ) from None
            started = self._clock()
            try:
                async with asyncio.timeout(left):
                    result = await start(left)
            except (TimeoutError, openai.APITimeoutError):
                self.breaker.record(False, self._clock() - started, permit)
                raise ModelUnavailableError(f"{self.name}: no answer in time") from None
            except openai.APIStatusError as error:
                status = error.status_code
                if status >= 500:
                    self.breaker.record(False, self._clock() - started, permit)
                else:
                    self.breaker.release(permit)
                wait = retry_after_s(error.response.headers, self._wall)
                if status in _RETRY_AFTER_STATUSES and wait is not None:
                    fits = wait + _RETRY_MARGIN_S < self._left(deadline)
                    if fits and attempt < self._max_attempts:
                        log.info(
                            "model provider asked to retry later",
                            extra={"provider": self.name, "status": status, "wait_s": wait},
                        )
                        await asyncio.sleep(wait)
                        continue
                if status in _RETRY_AFTER_STATUSES or status >= 500:
                    raise ModelUnavailableError(
                        f"{self.name}: HTTP {status}", retry_after_s=wait
                    ) from None
                raise ModelRefusedError(f"{self.name}: HTTP {status}: {_short(error)}") from None
            except openai.APIConnectionError as error:
                self.breaker.record(False, self._clock() - started, permit)
                if _connect_failed(error) and attempt < self._max_attempts:
                    backoff = _CONNECT_BACKOFF_S * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
                    if backoff < self._left(deadline):
                        await asyncio.sleep(backoff)
                        continue
                raise ModelUnavailableError(f"{self.name}: cannot connect") from None
            except asyncio.CancelledError:
                self.breaker.release(permit)
                raise
            except openai.OpenAIError as error:
                # A response the SDK could not make sense of: the server misbehaved.
                self.breaker.record(False, self._clock() - started, permit)
                raise ModelUnavailableError(f"{self.name}: {type(error).__name__}") from None
            self.breaker.record(True, self._clock() - started, permit)
            return result
        raise ModelUnavailableError(f"{self.name}: gave up after {self._max_attempts} attempts")

    async def complete(self, body: Mapping[str, Any], deadline: float) -> ChatCompletion:
        async def start(timeout_s: float) -> ChatCompletion:
            response: ChatCompletion = await self._client.chat.completions.create(
                model=self.model, timeout=timeout_s, **body
            )
            return response

        result: ChatCompletion = await self._attempts(deadline, start)
        return result

    async def stream(
        self, body: Mapping[str, Any], deadline: float
    ) -> AsyncGenerator[ChatCompletionChunk, None]:
        """The chunks of a streamed completion. Opening the stream is retried like a call;
        closing the iterator early (the caller went away) closes the connection, which stops
        the server's generation."""

        async def start(timeout_s: float) -> Any:
            return await self._client.chat.completions.create(
                model=self.model,
                timeout=timeout_s,
                stream=True,
                stream_options={"include_usage": True},
                **body,
            )

        import openai

        stream = await self._attempts(deadline, start)
        try:
            async with asyncio.timeout(max(self._left(deadline), 0.001)):
                async for chunk in stream:
                    yield chunk
        except (TimeoutError, openai.APITimeoutError):
            raise ModelUnavailableError(f"{self.name}: the answer did not finish in time") from None
        except openai.APIError as error:
            raise ModelUnavailableError(
                f"{self.name}: the stream broke ({type(error).__name__})"
            ) from None
        finally:
            await stream.close()


def _short(error: openai.APIStatusError) -> str:
    body = error.body
    if isinstance(body, dict):
        message = body.get("message") or body.get("error")
        if isinstance(message, dict):
            message = message.get("message")
        if isinstance(message, str):
            return message[:200]
    return error.message[:200]


# The API every provider speaks, as the OpenTelemetry GenAI conventions name it.
GENAI_PROVIDER = "openai"


def _start_span(tracer: trace.Tracer, provider: Provider, body: Mapping[str, Any]) -> Span:
    """A model call's span as the OpenTelemetry GenAI conventions describe it."""
    address = urlsplit(provider.base_url)
    span = tracer.start_span(f"chat {provider.model}", kind=SpanKind.CLIENT)
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.system": GENAI_PROVIDER,
        "gen_ai.provider.name": GENAI_PROVIDER,
        "gen_ai.request.model": provider.model,
        "gen_ai.request.max_tokens": int(body.get("max_tokens", 0)),
        "gen_ai.request.temperature": float(body.get("temperature", 0.0)),
        "server.address": address.hostname or "",
        "toolmesh.model.provider": provider.name,
    }
    if address.port:
        attributes["server.port"] = address.port
    span.set_attributes(attributes)
    return span


def _end_span(span: Span, model: str, tokens_in: int, tokens_out: int, finish: list[str]) -> None:
    span.set_attributes(
        {
            "gen_ai.response.model": model,
            "gen_ai.usage.input_tokens": tokens_in,
            "gen_ai.usage.output_tokens": tokens_out,
            "gen_ai.response.finish_reasons": finish,
        }
    )
    span.end()


def _fail_span(span: Span, error: BaseException) -> None:
    span.set_attribute("error.type", type(error).__name__)
    span.set_status(Status(StatusCode.ERROR, str(error)[:200]))
    span.end()


class Providers:
    """The primary provider and an optional fallback, tried in that order."""

    def __init__(
        self,
        providers: Sequence[Provider],
        tracer: trace.Tracer,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not providers:
            raise ValueError("at least one model provider is needed")
        self.all = list(providers)
        self._tracer = tracer
        self._clock = clock

    @property
    def primary(self) -> Provider:
        return self.all[0]

    @property
    def fallback(self) -> Provider | None:
        return self.all[1] if len(self.all) > 1 else None

    def pinned(self, model: str) -> list[Provider]:
        """The providers a request's later call may use: the one serving ``model`` when the
        request already used one (a request's calls stay with one model), else all in order."""
        if model:
            same = [p for p in self.all if p.model == model]
            if same:
                return same[:1]
        return list(self.all)

    async def complete(
        self, body: Mapping[str, Any], deadline: float, model: str = ""
    ) -> Completion:
        """The first provider's answer; on ModelUnavailableError the next one's."""
        failures = []
        for provider in self.pinned(model):
            started = self._clock()
            span = _start_span(self._tracer, provider, body)
            try:
                with trace.use_span(span, end_on_exit=False):
                    response = await provider.complete(body, deadline)
            except ModelUnavailableError as error:
                _fail_span(span, error)
                log.warning(
                    "model provider unavailable",
                    extra={"provider": provider.name, "error": str(error)},
                )
                failures.append(error)
                continue
            except BaseException as error:
                _fail_span(span, error)
                raise
            usage = response.usage
            _end_span(
                span,
                response.model or provider.model,
                usage.prompt_tokens if usage else 0,
                usage.completion_tokens if usage else 0,
                [str(c.finish_reason) for c in response.choices],
            )
            return Completion(
                response,
                provider.name,
                provider.model,
                response.model or provider.model,
                self._clock() - started,
            )
        raise ModelUnavailableError(
            "; ".join(f.reason for f in failures),
            retry_after_s=failures[-1].retry_after_s if failures else None,
        )

    async def stream(
        self, body: Mapping[str, Any], deadline: float, model: str = ""
    ) -> AsyncIterator[tuple[Provider, ChatCompletionChunk]]:
        """Chunks of the first provider that opens a stream (the next one when a provider is
        unavailable before its first chunk); a stream that breaks later is not resumed."""
        failures = []
        for provider in self.pinned(model):
            span = _start_span(self._tracer, provider, body)
            chunks = provider.stream(body, deadline)
            seen = _StreamTally(provider.model)
            try:
                try:
                    with trace.use_span(span, end_on_exit=False):
                        first = await anext(chunks)
                except ModelUnavailableError as error:
                    _fail_span(span, error)
                    log.warning(
                        "model provider unavailable",
                        extra={"provider": provider.name, "error": str(error)},
                    )
                    failures.append(error)
                    continue
                except StopAsyncIteration:
                    seen.end(span)
                    return
                seen.add(first)
                yield provider, first
                async for chunk in chunks:
                    seen.add(chunk)
                    yield provider, chunk
                seen.end(span)
                return
            except BaseException as error:
                if span.is_recording() and not seen.ended:
                    _fail_span(span, error)
                raise
            finally:
                await chunks.aclose()
        raise ModelUnavailableError("; ".join(f.reason for f in failures))

    async def close(self) -> None:
        await asyncio.gather(*(p.close() for p in self.all))


class _StreamTally:
    """What a stream's span reports at its end: the model, usage (or pieces) and finish."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.tokens_in = 0
        self.tokens_out = 0
        self.pieces = 0
        self.finish: list[str] = []
        self.ended = False

    def add(self, chunk: ChatCompletionChunk) -> None:
        self.model = chunk.model or self.model
        if chunk.usage is not None:
            self.tokens_in, self.tokens_out = (
                chunk.usage.prompt_tokens,
                chunk.usage.completion_tokens,
            )
        for choice in chunk.choices:
            if choice.delta is not None and choice.delta.content:
                self.pieces += 1
            if choice.finish_reason:
                self.finish.append(str(choice.finish_reason))

    def end(self, span: Span) -> None:
        self.ended = True
        _end_span(span, self.model, self.tokens_in, self.tokens_out or self.pieces, self.finish)


def build_providers(
    configs: Sequence[ProviderConfig],
    breaker: BreakerConfig,
    tracer: trace.Tracer,
    *,
    max_attempts: int,
) -> Providers:
    registry = BreakerRegistry(breaker)
    return Providers([Provider(c, registry, max_attempts=max_attempts) for c in configs], tracer)
