"""Entry point: ``python -m services.telemetry`` serves; ``python -m services.telemetry
verify-checkpoints --keyring DIR FILE...`` checks copies of the audit checkpoint log (every
link and signature, from the start) and exits 1 when one does not verify."""

import argparse
import sys
from pathlib import Path

from services.kit.server import build_from, run_service
from services.telemetry.settings import TelemetrySettings


def verify_checkpoints(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.telemetry verify-checkpoints")
    parser.add_argument("--keyring", type=Path, required=True, help="directory of PEM public keys")
    parser.add_argument("files", type=Path, nargs="+", help="checkpoint log files (*.jsonl)")
    args = parser.parse_args(argv)
    from services.telemetry.checkpoints import CheckpointSetupError, Keyring, verify_log_file

    try:
        keyring = Keyring.load(None, args.keyring)
        problems = [problem for path in args.files for problem in verify_log_file(path, keyring)]
    except (CheckpointSetupError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for problem in problems:
        print(problem)
    if not problems:
        print(f"{len(args.files)} checkpoint log(s) verify with {len(keyring.key_ids)} key(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["verify-checkpoints"]:
        sys.exit(verify_checkpoints(sys.argv[2:]))
    run_service(TelemetrySettings, build_from("services.telemetry.app"))
