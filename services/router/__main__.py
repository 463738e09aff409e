"""Entry point: ``python -m services.router``."""

from services.kit.server import run_service
from services.router.app import build
from services.router.settings import RouterSettings

if __name__ == "__main__":
    run_service(RouterSettings, build)
