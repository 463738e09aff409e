"""Router settings (env TOOLMESH_ROUTER_<FIELD>, falling back to TOOLMESH_<FIELD>)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, SecretStr, model_validator

from services.kit.breaker import BreakerConfig
from services.kit.settings import DEFAULT_PORTS, DatabaseSettings

DEFAULT_RULES_FILE = Path(__file__).with_name("routing.toml")


class RouterSettings(DatabaseSettings):
    service_name: ClassVar[str] = "router"

    port: int = Field(default=DEFAULT_PORTS["router"], ge=0, le=65535)
    # Empty means the SQLite file <data_dir>/router.db.
    database_url: str = ""
    # Versioned routing rules (intent patterns, argument extraction, weights, threshold): the
    # seed version, stable on a fresh install.
    rules_file: Path = DEFAULT_RULES_FILE
    # A directory of further rules versions (*.toml, each with its own `version`), served side
    # by side with the seed: a new version reaches callers only through a release
    # (docs/releases.md). Every replica needs the same files. Empty: the seed alone.
    rules_dir: Path | None = None
    # Seconds between checks of rules_file and rules_dir for changes (also on SIGHUP): a new
    # version found there is loaded, checked and offered to `toolmesh release start routing`
    # without a restart; what serves callers changes only through a release. A bad file is
    # refused with one ERROR line and the versions loaded stay. 0: only on SIGHUP.
    config_reload_s: float = Field(default=10.0, ge=0)
    # Where GetToolHealth is asked for each tool's recent success rate (the H of the confidence).
    telemetry_target: str = "127.0.0.1:50055"
    # Seconds between background refreshes of tool health; never refreshed per request.
    health_refresh_s: float = Field(default=15.0, gt=0)
    # Window of telemetry's per-request records that counts as "recent" for tool health.
    health_window_s: int = Field(default=900, ge=60, le=86400)
    # Extra tool modules to load (comma-separated import paths). Each module defines
    # TOOLS = [(ToolSpec, implementation), ...]; their routing rules go in rules_file. This is
    # how a team adds its own tools without forking the router (and how the fault suite
    # brings in tools that hang or fail).
    plugin_modules: str = ""
    # Largest answer plus result a tool may return, in bytes of UTF-8 JSON.
    max_result_bytes: int = Field(default=65536, ge=1024)
    # Per-tool circuit breaker (services.kit.breaker): over the last breaker_window calls (at
    # least breaker_min_calls), a failure rate of breaker_failure_rate opens it for
    # breaker_open_s seconds, then breaker_half_open_calls trial calls decide if it closes.
    breaker_window: int = Field(default=20, ge=1)
    breaker_min_calls: int = Field(default=10, ge=1)
    breaker_failure_rate: float = Field(default=0.5, gt=0, le=1)
    breaker_open_s: float = Field(default=10.0, gt=0)
    breaker_half_open_calls: int = Field(default=3, ge=1)
    # Calls that find a tool at its concurrency limit wait this long for a slot (never past
    # their deadline) before RESOURCE_EXHAUSTED with a retry hint.
    concurrency_wait_ms: int = Field(default=250, ge=0, le=5000)

    # Tool backends (docs/tools.md). Every replica re-reads the backend table this often (and
    # at once after a change it made itself): a backend registered or removed through one
    # replica is served or stopped by every replica within this bound.
    backend_sync_s: float = Field(default=3.0, gt=0, le=300)
    # Seconds between two discoveries (tools/list, ListTools) of a connected backend; each
    # also checks that the backend is alive.
    backend_discovery_s: float = Field(default=60.0, ge=1)
    # Per-call timeout of a backend tool when its registration sets none.
    backend_timeout_ms: int = Field(default=10_000, ge=100, le=300_000)
    # Calls in flight at once per backend tool when its registration sets none.
    backend_max_concurrency: int = Field(default=16, ge=1, le=1024)
    # Longest a registration waits for the first connection and discovery before answering
    # with state CONNECTING (never past the caller's deadline).
    backend_register_wait_s: float = Field(default=8.0, ge=0, le=60)
    # Reconnecting a failed backend (or restarting a crashed stdio server) backs off
    # exponentially from backend_backoff_min_s to backend_backoff_max_s, with jitter.
    backend_backoff_min_s: float = Field(default=0.2, gt=0)
    backend_backoff_max_s: float = Field(default=30.0, gt=0)
    # Hosts an MCP HTTP or gRPC backend may be reached at: host names (exact, or ".suffix" for
    # a domain and its subdomains) and IP networks in CIDR notation, comma-separated. A name
    # not listed must resolve only to listed networks, checked at registration and again at
    # every connection (DNS rebinding). Link-local (169.254.0.0/16, fe80::/10) and cloud
    # metadata addresses are refused unless a listed network lies inside those ranges. The
    # default allows loopback only; add your service networks, e.g. "10.0.0.0/8,.svc.cluster.local".
    backend_allowed_hosts: str = "localhost,127.0.0.0/8,::1/128"
    # Executables an MCP stdio backend may start, comma-separated: a program name found on
    # the router's PATH, an absolute path, or a directory ending in "/" (anything inside).
    # Empty: any program on PATH in dev; in production, no stdio backend at all. Never list a
    # shell or an interpreter (sh, python, node, npx, uvx): its arguments would run any code.
    backend_stdio_commands: str = ""
    # Directories a backend's bearer_file may be in, comma-separated. Empty: any absolute path
    # in dev; in production, no bearer_file at all. (bearer_env names must start with
    # TOOLMESH_SECRET_, so a registration can never send the router's own settings.)
    backend_secret_dirs: str = ""
    # Lines per second of a stdio server's stderr copied to the router's log (per backend);
    # the rest are counted and dropped.
    backend_stderr_lines_per_s: float = Field(default=20.0, gt=0)
    # The router's audit events (tool.drift, release transitions) wait for telemetry in the
    # router_outbox table of its own database. This is only the outbox file of releases before
    # that (unset: <data_dir>/router/audit-outbox.db): what it still holds is moved into the
    # table at start, and the file renamed *.adopted.
    audit_outbox_file: Path | None = None

    # -- models (docs/models.md). Without a base URL the router routes by its rules alone. -----
    # An OpenAI-compatible Chat Completions endpoint, e.g. http://127.0.0.1:8080/v1 (llama.cpp,
    # vLLM, Ollama's /v1, LiteLLM or a hosted API), and the model name to ask it for.
    model_base_url: str = ""
    model_name: str = ""
    # The API key: read from this file (preferred), else TOOLMESH_ROUTER_MODEL_API_KEY. Never
    # logged; empty for servers without authentication.
    model_api_key_file: Path | None = None
    model_api_key: SecretStr = SecretStr("")
    # An optional second provider, asked when the first is down, failing or its breaker open.
    model_fallback_base_url: str = ""
    model_fallback_name: str = ""
    model_fallback_api_key_file: Path | None = None
    model_fallback_api_key: SecretStr = SecretStr("")
    # How the model is asked to choose a tool: "tools" (native function calling), or a
    # JSON-schema-constrained answer for servers without it: "json_schema" (OpenAI's
    # response_format, vLLM) or "json_object" (llama.cpp's {"type": "json_object", "schema"}).
    # The JSON modes also ask for token log-probabilities (the I of the confidence).
    model_tool_choice: Literal["tools", "json_schema", "json_object"] = "tools"
    # Longest a model call may take (never past the caller's deadline).
    model_timeout_s: float = Field(default=20.0, gt=0, le=300)
    # Attempts per provider: retries only for connections never made and 429/503 whose
    # Retry-After fits in the time left.
    model_max_attempts: int = Field(default=3, ge=1, le=5)
    # Output tokens asked for: a routing answer, a phrased answer.
    model_route_max_tokens: int = Field(default=128, ge=8, le=4096)
    model_answer_max_tokens: int = Field(default=256, ge=8, le=8192)
    # Bound on the recent history sent to the model (oldest turns are left out to fit).
    model_max_history_tokens: int = Field(default=1024, ge=0, le=65536)
    # Bytes of a tool's result shown to the answer model (the tool's answer text when larger).
    model_max_result_bytes: int = Field(default=4096, ge=256, le=65536)
    # Tools offered to the model at most (the caller's allowed ones, by name).
    model_max_tools: int = Field(default=32, ge=1, le=128)
    # Alternatives per token asked for with log-probabilities (0: do not ask).
    model_top_logprobs: int = Field(default=5, ge=0, le=20)
    model_temperature: float = Field(default=0.0, ge=0, le=2)
    # Tenants (comma-separated, "*" for all) whose Runs ask the model before the rules (the
    # rules then answer only when the model finds nothing), and whose answers the model
    # phrases from the tool's result.
    model_first_tenants: str = ""
    model_answer_tenants: str = ""
    # Seconds a replica keeps a tenant's selected prompt versions before reading them again:
    # the bound on how long a publication or selection takes to reach every replica.
    prompt_cache_s: float = Field(default=2.0, ge=0, le=60)

    # -- releases (docs/releases.md) -----------------------------------------------------------

    # Every replica re-reads the stable versions and the releases in progress this often: a
    # step, rollback or promotion decided by any replica is applied by all within this bound
    # (plus one database read; prompts within prompt_cache_s).
    release_sync_s: float = Field(default=1.0, gt=0, le=30)
    # How often each replica's analyzer renews its release leases and judges the releases due.
    release_tick_s: float = Field(default=1.0, gt=0, le=30)
    # How long a release's analyzer lease lasts unless renewed: when a replica dies, another
    # takes its releases over within this bound (a replica stopping cleanly lets go at once).
    release_lease_s: float = Field(default=10.0, gt=0, le=300)
    # Shadow copies of live calls in flight at once per replica; more are skipped (counted).
    release_shadow_inflight: int = Field(default=8, ge=1, le=256)

    @model_validator(mode="after")
    def _model_named(self) -> RouterSettings:
        """A provider needs the model to ask for; half a fallback is a mistake, not a choice."""
        if self.model_base_url and not self.model_name:
            raise ValueError("model_base_url needs model_name")
        if bool(self.model_fallback_base_url) != bool(self.model_fallback_name):
            raise ValueError("set model_fallback_base_url and model_fallback_name together")
        if self.model_fallback_base_url and not self.model_base_url:
            raise ValueError("a fallback model needs a primary (model_base_url)")
        return self

    @model_validator(mode="after")
    def _lease_outlives_ticks(self) -> RouterSettings:
        """A lease renewed every tick must outlive a tick, or replicas would take turns."""
        if self.release_lease_s <= 2 * self.release_tick_s:
            raise ValueError("release_lease_s must be more than twice release_tick_s")
        return self

    @property
    def model_enabled(self) -> bool:
        return bool(self.model_base_url)

    def resolved_audit_outbox_file(self) -> Path:
        return self.audit_outbox_file or self.data_dir / "router" / "audit-outbox.db"

    def breaker_config(self) -> BreakerConfig:
        return BreakerConfig(
            window_size=self.breaker_window,
            minimum_calls=self.breaker_min_calls,
            failure_rate_threshold=self.breaker_failure_rate,
            open_wait_s=self.breaker_open_s,
            half_open_calls=self.breaker_half_open_calls,
        )
