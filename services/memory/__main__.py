"""Entry point: ``python -m services.memory``."""

from services.kit.server import build_from, run_service
from services.memory.settings import MemorySettings

if __name__ == "__main__":
    run_service(MemorySettings, build_from("services.memory.app"))
