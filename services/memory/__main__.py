"""Entry point: ``python -m services.memory``."""

from services.kit.server import run_service
from services.memory.app import build
from services.memory.settings import MemorySettings

if __name__ == "__main__":
    run_service(MemorySettings, build)
