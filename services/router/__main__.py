"""Entry point: ``python -m services.router``."""

from services.kit.server import build_from, run_service
from services.router.settings import RouterSettings

if __name__ == "__main__":
    run_service(RouterSettings, build_from("services.router.app"))
