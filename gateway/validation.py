"""Request validation, so bad input is refused with the field named before any other hop."""

from __future__ import annotations

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


class HistoryInput(BaseModel):
    model_config = ConfigDict(frozen=True)

    session_id: SessionId
    limit: int = Field(default=0, ge=0, le=1000)


class StatsInput(BaseModel):
    model_config = ConfigDict(frozen=True)

    # 0 means the telemetry default (one hour); at most 30 days.
    window_seconds: int = Field(default=0, ge=0, le=30 * 24 * 3600)
    service: str = Field(default="", max_length=64)
