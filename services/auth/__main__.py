"""``python -m services.auth``: run the auth server."""

from __future__ import annotations

import logging
import sys

from services.auth.app import StartupRefused, build
from services.auth.settings import AuthSettings
from services.kit.server import run_service


def main() -> None:
    try:
        run_service(AuthSettings(), build)
    except StartupRefused as refused:
        logging.getLogger("toolmesh.auth").error("refusing to start: %s", refused)
        sys.exit(2)


if __name__ == "__main__":
    main()
