"""``python -m gateway``."""

from gateway.settings import GatewaySettings
from services.kit.server import build_from, run_service

if __name__ == "__main__":
    run_service(GatewaySettings, build_from("gateway.app"))
