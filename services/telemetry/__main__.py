"""Entry point: ``python -m services.telemetry``."""

from services.kit.server import run_service
from services.telemetry.service import build
from services.telemetry.settings import TelemetrySettings

if __name__ == "__main__":
    run_service(TelemetrySettings, build)
