"""``python -m services.auth [serve | rotate-key | retire-key | delete-client | create-client]``."""

from __future__ import annotations

import asyncio
import json
import sys

from services.auth.settings import AuthSettings
from services.kit.logs import configure_logging
from services.kit.server import build_from, run_service
from services.kit.startup import StartupRefused, load_settings, private_process


def main() -> None:
    if sys.argv[1:] in ([], ["serve"]):
        # The server needs neither the operator commands nor their imports (the store, the
        # audit trail): a refused start exits before loading them.
        run_service(AuthSettings, build_from("services.auth.app"))
        return
    from services.auth.ops import parser, run
    from services.auth.store import StoreError

    args = parser().parse_args()
    if args.command in (None, "serve"):
        # Settings, the kit's checks and auth's own refusals: one CRITICAL line, exit 2.
        run_service(AuthSettings, build_from("services.auth.app"))
        return
    private_process()  # keys and the dev client's file are the operator's alone
    try:
        settings = load_settings(AuthSettings)
    except StartupRefused as refused:
        print(f"error: {refused}; {refused.fix}", file=sys.stderr)
        sys.exit(2)
    configure_logging(settings.service_name, settings.log_level)
    try:
        result = asyncio.run(run(settings, args))
    except (StoreError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except StartupRefused as refused:
        print(f"error: {refused}; {refused.fix}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
