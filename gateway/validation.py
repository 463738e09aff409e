"""Request validation, so bad input is refused with the field named before any other hop."""

from __future__ import annotations

import json
import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

SessionId = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")
]

_ALLOWED_CONTROL = {"\n", "\t"}


def _is_control(char: str) -> bool:
    code = ord(char)
    return code < 0x20 or 0x7F <= code <= 0x9F


class RunInput(BaseModel):
    model_config = ConfigDict(frozen=True)

    session_id: SessionId
    prompt: str = Field(min_length=1, max_length=4000)
    idempotency_key: str = Field(default="", max_length=128)

    @field_validator("prompt")
    @classmethod
    def _prompt_text(cls, value: str) -> str:
        if any(_is_control(c) and c not in _ALLOWED_CONTROL for c in value):
            raise ValueError("must not contain control characters other than newline and tab")
        if not value.strip():
            raise ValueError("must not be only whitespace")
        return value

    @field_validator("idempotency_key")
    @classmethod
    def _key_text(cls, value: str) -> str:
        if any(_is_control(c) for c in value):
            raise ValueError("must not contain control characters")
        return value


_TOOL_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,129}$"
_SEMVER = r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?$"
MAX_ARGUMENTS_BYTES = 64 * 1024


def _no_constant(name: str) -> object:
    """NaN and Infinity are not JSON, though Python's parser accepts them."""
    raise ValueError(f"{name} is not JSON")


class CallToolInput(BaseModel):
    model_config = ConfigDict(frozen=True)

    tool: str = Field(pattern=_TOOL_NAME)
    version: str = Field(default="", max_length=64)
    arguments_json: str = "{}"
    # Empty: the call is not remembered in a session.
    session_id: Annotated[str, StringConstraints(max_length=128, pattern=r"^[A-Za-z0-9._:-]*$")]
    idempotency_key: str = Field(default="", max_length=128)

    @field_validator("version")
    @classmethod
    def _semver(cls, value: str) -> str:
        if value and not re.fullmatch(_SEMVER, value):
            raise ValueError("a semantic version such as 1.2.0, or empty for the latest")
        return value

    @field_validator("arguments_json")
    @classmethod
    def _json_object(cls, value: str) -> str:
        value = value or "{}"
        if len(value.encode()) > MAX_ARGUMENTS_BYTES:
            raise ValueError(f"at most {MAX_ARGUMENTS_BYTES} bytes")
        try:
            parsed = json.loads(value, parse_constant=_no_constant)
        except ValueError:
            raise ValueError("must be a JSON object") from None
        if not isinstance(parsed, dict):
            raise ValueError("must be a JSON object")
        return value

    @field_validator("idempotency_key")
    @classmethod
    def _key_text(cls, value: str) -> str:
        if any(_is_control(c) for c in value):
            raise ValueError("must not contain control characters")
        return value

    def canonical_arguments(self) -> str:
        """The arguments in one canonical form, for the idempotency fingerprint."""
        return json.dumps(json.loads(self.arguments_json), sort_keys=True, separators=(",", ":"))


class HistoryInput(BaseModel):
    model_config = ConfigDict(frozen=True)

    session_id: SessionId
    limit: int = Field(default=0, ge=0, le=1000)


class StatsInput(BaseModel):
    model_config = ConfigDict(frozen=True)

    # 0 means the telemetry default (one hour); at most 30 days.
    window_seconds: int = Field(default=0, ge=0, le=30 * 24 * 3600)
    service: str = Field(default="", max_length=64)
