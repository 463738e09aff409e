"""``python -m gateway``."""

from gateway.app import build
from gateway.settings import GatewaySettings
from services.kit.server import run_service

if __name__ == "__main__":
    run_service(GatewaySettings, build)
