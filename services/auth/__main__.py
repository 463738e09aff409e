"""``python -m services.auth [serve | rotate-key | retire-key | delete-client | create-client]``."""

from __future__ import annotations

import asyncio
import json
import logging
import sys

from services.auth.app import build
from services.auth.ops import parser, run
from services.auth.settings import AuthSettings
from services.auth.store import StoreError
from services.kit.logs import configure_logging
from services.kit.server import StartupRefused, run_service


def main() -> None:
    args = parser().parse_args()
    settings = AuthSettings()
    if args.command in (None, "serve"):
        try:
            run_service(settings, build)
        except StartupRefused as refused:
            # The kit refuses unsafe settings before serving; these are auth's own refusals.
            logging.getLogger("toolmesh.auth").critical("refusing to start: %s", refused)
            sys.exit(2)
        return
    configure_logging(settings.service_name, settings.log_level)
    try:
        result = asyncio.run(run(settings, args))
    except (StoreError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
