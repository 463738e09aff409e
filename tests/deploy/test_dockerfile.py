"""The image build, read as a reviewer reads it: pinned bases, non-root, no secrets, small."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from tests.deploy.kube import REPO

DOCKERFILE = REPO / "Dockerfile"


@dataclass
class Instruction:
    op: str
    args: str
    line: int


def parse(text: str) -> list[Instruction]:
    """Dockerfile instructions with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    buffer, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if buffer and line.startswith("#"):
            continue
        if not buffer:
            start = number
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        buffer += line
        op, _, args = buffer.partition(" ")
        out.append(Instruction(op.upper(), " ".join(args.split()), start))
        buffer = ""
    assert not buffer, "dangling line continuation"
    return out


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    result: list[list[Instruction]] = []
    for ins in instructions:
        if ins.op == "FROM":
            result.append([])
        assert result, "instruction before the first FROM"
        result[-1].append(ins)
    return result


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse(DOCKERFILE.read_text())


def test_parser_joins_continuations() -> None:
    parsed = parse("FROM a:1\n# c\nRUN x \\\n  # inner\n  && y\nUSER 1\n")
    assert [(i.op, i.args) for i in parsed] == [("FROM", "a:1"), ("RUN", "x && y"), ("USER", "1")]


def test_every_base_image_is_pinned_to_one_exact_python(instructions: list[Instruction]) -> None:
    bases = [i.args.split()[0] for i in instructions if i.op == "FROM"]
    assert len(bases) >= 2, "multi-stage build expected"
    for base in bases:
        assert "$" not in base, f"{base}: pin literally, not through an ARG"
        name, _, tag = base.partition("@")[0].rpartition(":")
        assert name == "python", base
        assert tag != "latest"
        # Exact patch release: python:3.11.<patch>-slim[-<debian>]
        assert re.fullmatch(r"3\.11\.\d+-slim(-\w+)?", tag), base
    assert len(set(bases)) == 1, f"builder and final must use the same pin: {bases}"


def test_final_stage_runs_as_a_fixed_non_root_uid(instructions: list[Instruction]) -> None:
    final = stages(instructions)[-1]
    users = [i.args for i in final if i.op == "USER"]
    assert users, "final stage has no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) == 10001, users[-1]
    assert not gid or (gid.isdigit() and int(gid) == 10001)
    # Nothing after USER may need root.
    after = final[[i.op for i in final].index("USER") :]
    assert not [i for i in after if i.op == "RUN"], "RUN after USER"


def test_no_add_of_urls_nor_secrets(instructions: list[Instruction]) -> None:
    for ins in instructions:
        if ins.op == "ADD":
            assert not re.search(r"(https?|git)://|git@", ins.args), f"line {ins.line}: ADD URL"
        if ins.op in ("ARG", "ENV"):
            assert not re.search(r"(PASSWORD|SECRET|TOKEN|PRIVATE_KEY|API_KEY)", ins.args, re.I), (
                f"line {ins.line}: secret-looking {ins.op}"
            )
        if ins.op in ("COPY", "ADD"):
            assert not re.search(r"\.(pem|key|db)\b|\bcerts?\b|\.env\b", ins.args), ins.args


def test_final_stage_has_no_compilers_and_no_pip_cache(instructions: list[Instruction]) -> None:
    builder, *_, final = stages(instructions)
    final_runs = " ".join(i.args for i in final if i.op == "RUN")
    assert not re.search(r"apt-get install|build-essential|gcc|\bmake\b", final_runs)
    assert "build-essential" in " ".join(i.args for i in builder if i.op == "RUN")
    # The final stage copies only the virtualenv from the builder, never the build context.
    copies = [i.args for i in final if i.op == "COPY"]
    assert copies == [
        "--from=builder /opt/venv /opt/venv",
        "deploy/docker/grpc_health_tls.py /app/grpc_health_tls.py",
    ]
    env = " ".join(i.args for i in builder if i.op == "ENV")
    assert "PIP_NO_CACHE_DIR=1" in env


def test_builder_generates_contracts_and_installs_from_the_locks(
    instructions: list[Instruction],
) -> None:
    runs = " ".join(i.args for i in stages(instructions)[0] if i.op == "RUN")
    # The code generator runs from the build virtualenv, which the final stage never copies.
    assert (
        "/opt/build/bin/python -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. "
        "--grpc_python_out=. $(find protos -name '*.proto')"
    ) in runs
    assert "/opt/build/bin/pip install --require-hashes --requirement /tmp/locks/build.txt" in runs
    # The runtime virtualenv gets the runtime lock (no grpcio-tools, no build backend) and the
    # project's wheel with nothing left to resolve.
    assert (
        "/opt/build/bin/pip --python /opt/venv/bin/python install --require-hashes "
        "--requirement /tmp/locks/runtime.txt"
    ) in runs
    assert "/opt/build/bin/pip --python /opt/venv/bin/python install --no-deps /tmp/dist/" in runs
    assert '! /opt/venv/bin/python -c "import grpc_tools"' in runs
    copies = [i.args for i in stages(instructions)[0] if i.op == "COPY"]
    assert "locks/build.txt locks/runtime.txt /tmp/locks/" in copies


def test_runtime_contract(instructions: list[Instruction]) -> None:
    final = stages(instructions)[-1]
    assert [i.args for i in final if i.op == "WORKDIR"] == ["/app"]
    assert [i.args for i in final if i.op == "ENTRYPOINT"][-1] == '["python", "-m"]'
    assert [i.args for i in final if i.op == "CMD"][-1] == '["gateway"]'
    env = " ".join(i.args for i in final if i.op == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "TOOLMESH_DATA_DIR=/var/lib/toolmesh" in env
    assert [i.args for i in final if i.op == "VOLUME"] == ['["/var/lib/toolmesh"]']
    # Kubernetes gRPC probes replace a HEALTHCHECK (and the Dockerfile says why).
    assert not [i for i in instructions if i.op == "HEALTHCHECK"]
    assert "No HEALTHCHECK" in DOCKERFILE.read_text()


def test_dockerignore_keeps_local_state_and_secrets_out() -> None:
    entries = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for required in (
        ".venv",
        "node_modules",
        "var",
        ".git",
        ".pytest_cache",
        ".mypy_cache",
        ".ruff_cache",
        "certs",
        "*.db",
        "keys",
        "*.pem",
        "*.key",
        "toolmesh",
    ):
        assert required in entries, required


def test_every_copied_path_exists_and_is_in_the_build_context(
    instructions: list[Instruction],
) -> None:
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for ins in instructions:
        if ins.op != "COPY" or ins.args.startswith("--from="):
            continue
        *sources, _dest = [a for a in ins.args.split() if not a.startswith("--")]
        for source in sources:
            assert (REPO / source).exists(), f"line {ins.line}: {source} does not exist"
            parts = source.split("/")
            prefixes = {"/".join(parts[: i + 1]) for i in range(len(parts))}
            assert not prefixes & ignored, f"line {ins.line}: {source} is in .dockerignore"
