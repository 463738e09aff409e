"""The contract gate: buf lint is clean and a breaking edit to a v1 file fails `make check`."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUF = REPO / "node_modules" / ".bin" / "buf"
BASELINE = REPO / "protos" / "baseline" / "toolmesh-v1.binpb"


def _buf(*args: str) -> subprocess.CompletedProcess[str]:
    if not BUF.exists():
        pytest.fail("buf is missing: `make install` installs it from package.json")
    return subprocess.run(
        [str(BUF), *args], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )


def _copy_protos(tmp_path: Path) -> Path:
    target = tmp_path / "protos"
    shutil.copytree(REPO / "protos", target, ignore=shutil.ignore_patterns("baseline"))
    return target


def test_lint_is_clean() -> None:
    result = _buf("lint", "protos")
    assert result.returncode == 0, result.stdout + result.stderr


def test_current_contracts_are_compatible_with_the_baseline() -> None:
    result = _buf("breaking", "protos", "--against", str(BASELINE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_removing_a_field_breaks_the_gate(tmp_path: Path) -> None:
    protos = _copy_protos(tmp_path)
    gateway = protos / "toolmesh" / "gateway" / "v1" / "gateway.proto"
    text = gateway.read_text()
    edited = re.sub(r"\n\s*string answer = 3;", "", text, count=1)
    assert edited != text, "the field to remove was not found"
    gateway.write_text(edited)
    result = _buf("breaking", str(protos), "--against", str(BASELINE))
    assert result.returncode != 0
    assert "RunResponse" in result.stdout and "answer" in result.stdout, result.stdout


def test_adding_a_field_passes_the_gate(tmp_path: Path) -> None:
    protos = _copy_protos(tmp_path)
    gateway = protos / "toolmesh" / "gateway" / "v1" / "gateway.proto"
    text = gateway.read_text()
    gateway.write_text(
        text.replace(
            "message ListToolsRequest {}", "message ListToolsRequest {\n  string filter = 1;\n}"
        )
    )
    result = _buf("breaking", str(protos), "--against", str(BASELINE))
    assert result.returncode == 0, result.stdout + result.stderr
