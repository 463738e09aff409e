"""The README's configuration table, generated from the settings classes themselves.

`make docs` rewrites the table; tests/docs/test_readme.py fails when it is out of date, so the
README can never describe a setting that does not exist or miss one that does.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import sys
import textwrap
from pathlib import Path

from pydantic_settings import BaseSettings

from gateway.settings import GatewaySettings
from mcpface.settings import McpFaceSettings
from services.auth.settings import AuthSettings
from services.kit.settings import ServiceSettings
from services.memory.settings import MemorySettings
from services.router.settings import RouterSettings
from services.telemetry.settings import TelemetrySettings

README = Path(__file__).resolve().parents[2] / "README.md"
BEGIN = "<!-- config:begin -->"
END = "<!-- config:end -->"
SERVICES: list[type[ServiceSettings]] = [
    GatewaySettings,
    AuthSettings,
    RouterSettings,
    MemorySettings,
    TelemetrySettings,
    McpFaceSettings,
]


def _default(cls: type[BaseSettings], name: str) -> str:
    field = cls.model_fields[name]
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "(unset)"
    if isinstance(value, Path):
        repo = README.parent
        with contextlib.suppress(ValueError):
            value = value.resolve().relative_to(repo)
    text = str(value.value if hasattr(value, "value") else value)
    return f"`{text}`" if text else '`""`'


def _comments(cls: type) -> dict[str, str]:
    """Each field's meaning, from the comment lines just above it in its class body."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not (isinstance(klass, type) and issubclass(klass, BaseSettings)):
            continue
        try:
            lines, _first = inspect.getsourcelines(klass)
        except (OSError, TypeError):
            continue
        tree = ast.parse(textwrap.dedent("".join(lines)))
        for node in tree.body[0].body:  # type: ignore[attr-defined]
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                above: list[str] = []
                index = node.lineno - 2
                while index >= 0 and lines[index].strip().startswith("#"):
                    above.insert(0, lines[index].strip().lstrip("#").strip())
                    index -= 1
                if above:
                    found[node.target.id] = " ".join(above)
    return found


def _describe(cls: type[BaseSettings], name: str) -> str:
    text = cls.model_fields[name].description or _comments(cls).get(name, "")
    return text.replace("|", "\\|")


def table() -> str:
    shared = list(ServiceSettings.model_fields)
    lines = [
        BEGIN,
        "Every service reads `TOOLMESH_<SERVICE>_<NAME>`, falling back to `TOOLMESH_<NAME>` "
        "(so `TOOLMESH_DATA_DIR=/srv/toolmesh` configures all five, and "
        "`TOOLMESH_MEMORY_DATA_DIR` only memory). Generated from the settings classes by "
        "`make docs`.",
        "",
        "**Shared by every service**",
        "",
        "| name | default | meaning |",
        "|---|---|---|",
    ]
    for name in shared:
        lines.append(
            f"| `TOOLMESH_<SERVICE>_{name.upper()}` | {_default(ServiceSettings, name)} "
            f"| {_describe(ServiceSettings, name)} |"
        )
    for cls in SERVICES:
        own = [n for n in cls.model_fields if n not in shared or n == "port"]
        lines += [
            "",
            f"**{cls.service_name}**",
            "",
            "| name | default | meaning |",
            "|---|---|---|",
        ]
        for name in own:
            env = f"TOOLMESH_{cls.service_name.upper()}_{name.upper()}"
            lines.append(f"| `{env}` | {_default(cls, name)} | {_describe(cls, name)} |")
    lines.append(END)
    return "\n".join(lines)


def rewrite(readme: Path = README) -> None:
    text = readme.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    readme.write_text(text[:start] + table() + text[end:])


if __name__ == "__main__":
    rewrite(Path(sys.argv[1]) if len(sys.argv) > 1 else README)
