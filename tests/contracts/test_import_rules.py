"""The import gate (`make check` runs lint-imports): the code keeps the house rules on imports,
and each contract in pyproject.toml catches the violation it exists for."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
PACKAGES = ("services", "gateway", "mcpface", "cli", "bench", "tests", "testing", "toolmesh")

# One forbidden import per contract, each in a module of its own, and the contract it breaks.
VIOLATIONS = {
    "services/memory/violation.py": (
        "import services.router.settings",
        "No service imports another service",
    ),
    "services/kit/violation.py": ("import services.auth.settings", "The kit imports no service"),
    "gateway/violation.py": (
        "import services.memory.store",
        "The gateway imports only the contracts and the kit",
    ),
    "services/telemetry/violation.py": (
        "import testing.mesh",
        "Services import neither the CLI, the benchmarks nor the tests and their harness",
    ),
    "toolmesh/violation.py": (
        "import services.kit.errors",
        "Generated contract code imports no hand-written code",
    ),
    "bench/violation.py": (
        "import tests.pgutil",
        "The benchmarks do not import the tests (the process harness they share is testing/)",
    ),
    "cli/violation.py": (
        "import services.router.app",
        "The CLI imports the contracts and the kit; of a service only what `toolmesh migrate` runs",
    ),
}


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    if not (REPO / "toolmesh").is_dir():
        pytest.fail("the generated contracts are missing: run `make gen`")
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        # The copy's packages, not the repository's (which the virtualenv's .pth would give).
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root), "COLUMNS": "400"},
    )


# "<contract name> BROKEN", or "... BROKEN (3 ignored imports)" for a contract with exceptions.
_VERDICT = re.compile(r"^(.+?) BROKEN(?: \(\d+ ignored imports?\))?$", re.M)


def _broken(output: str) -> set[str]:
    return {match.group(1).strip() for match in _VERDICT.finditer(output)}


def test_the_code_keeps_every_import_contract() -> None:
    result = _lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_each_contract_catches_its_violation(tmp_path: Path) -> None:
    for package in PACKAGES:
        shutil.copytree(
            REPO / package,
            tmp_path / package,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "mcp_servers"),
        )
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    for path, (line, _) in VIOLATIONS.items():
        (tmp_path / path).write_text(f'"""A deliberate violation."""\n\n{line}\n')
    result = _lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert _broken(result.stdout) == {contract for _, contract in VIOLATIONS.values()}, (
        result.stdout
    )
    for path, (line, _) in VIOLATIONS.items():
        module = path.removesuffix(".py").replace("/", ".")
        assert f"{module} -> {line.removeprefix('import ')}" in result.stdout, module
