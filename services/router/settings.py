"""Router settings (env TOOLMESH_ROUTER_<FIELD>, falling back to TOOLMESH_<FIELD>)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field

from services.kit.breaker import BreakerConfig
from services.kit.settings import DEFAULT_PORTS, ServiceSettings

DEFAULT_RULES_FILE = Path(__file__).with_name("routing.toml")


class RouterSettings(ServiceSettings):
    service_name: ClassVar[str] = "router"

    port: int = Field(default=DEFAULT_PORTS["router"], ge=0, le=65535)
    # Empty means the SQLite file <data_dir>/router.db.
    database_url: str = ""
    # Versioned routing rules (intent patterns, argument extraction, weights, threshold).
    rules_file: Path = DEFAULT_RULES_FILE
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

    def breaker_config(self) -> BreakerConfig:
        return BreakerConfig(
            window_size=self.breaker_window,
            minimum_calls=self.breaker_min_calls,
            failure_rate_threshold=self.breaker_failure_rate,
            open_wait_s=self.breaker_open_s,
            half_open_calls=self.breaker_half_open_calls,
        )
