"""The type gate (`make check` runs mypy strict on the hand-written code): message types come
from the generated stubs, so a misspelled field of a request is an error, not an ``Any``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MYPY = Path(sys.executable).parent / "mypy"

PLANTED = """\
from toolmesh.memory.v1 import memory_pb2


def turns(request: memory_pb2.AppendTurnsRequest) -> int:
    return len(request.turnz)
"""


def _mypy(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MYPY), "--config-file", str(REPO / "pyproject.toml"), str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_misspelled_message_field_fails_the_type_gate(tmp_path: Path) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text(PLANTED)
    result = _mypy(planted)
    assert result.returncode == 1, result.stdout + result.stderr
    assert '"AppendTurnsRequest" has no attribute "turnz"' in result.stdout


def test_an_untyped_function_fails_the_type_gate(tmp_path: Path) -> None:
    planted = tmp_path / "untyped.py"
    planted.write_text("def add(a, b):\n    return a + b\n")
    result = _mypy(planted)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "[no-untyped-def]" in result.stdout
