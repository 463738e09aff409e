"""Start-up errors: one CRITICAL line naming the setting and the fix, exit code 2, no traceback.

A process that cannot start because of its configuration is an operator's problem, not a bug:
the operator needs the environment variable to change and how, not a Python traceback. Service
code raises ``StartupRefused(message, setting=..., fix=...)`` (or wraps a loader in
``setting_guard``); ``describe`` turns anything else raised at start-up into the same shape,
naming the setting where it can be told from the error. ``run_service`` (services.kit.server)
logs the result and exits 2.

``check_private`` is the production check that secrets and data are not readable by others,
for the data directory, TLS keys and any key file a service knows about.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import stat
import sys
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar

from pydantic import ValidationError

if TYPE_CHECKING:
    from services.kit.settings import ServiceSettings

log = logging.getLogger("toolmesh.startup")

EXIT_STARTUP = 2
# Files and directories a service creates are its own: 0600 and 0700.
PRIVATE_UMASK = 0o077


class StartupRefused(RuntimeError):
    """The process must not start; ``setting`` names the environment variable(s) to change and
    ``fix`` says how. Both may be empty when the message says it all."""

    def __init__(self, message: str, *, setting: str = "", fix: str = "") -> None:
        super().__init__(message)
        self.setting = setting
        self.fix = fix


@dataclass(frozen=True)
class Refusal:
    """What one CRITICAL start-up line says."""

    message: str
    setting: str = ""
    fix: str = ""
    error_type: str = ""


def env_name(settings_cls: type[ServiceSettings], field: str) -> str:
    """The variable that sets ``field``: the one set in the environment (the service's own
    prefix wins over the shared one, as in the settings), else the service's own."""
    own = f"TOOLMESH_{settings_cls.service_name.upper()}_{field.upper()}"
    shared = f"TOOLMESH_{field.upper()}"
    present = {key.upper() for key in os.environ}
    if own not in present and shared in present:
        return shared
    return own


def refusal_from_validation(
    settings_cls: type[ServiceSettings], error: ValidationError
) -> StartupRefused:
    """A settings validation error as a refusal naming the variables, not the field names."""
    problems: list[str] = []
    names: list[str] = []
    fields = list(settings_cls.model_fields)
    for item in error.errors(include_url=False, include_input=False):
        loc = [str(part) for part in item["loc"]]
        message = str(item["msg"]).removeprefix("Value error, ")
        if loc:
            name = env_name(settings_cls, loc[0])
            names.append(name)
            problems.append(f"{name}: {message}")
            continue
        # A check across fields: name every field its message mentions.
        mentioned = [f for f in fields if re.search(rf"\b{f}\b", message)]
        for field in mentioned:
            message = re.sub(rf"\b{field}\b", env_name(settings_cls, field), message)
        names.extend(env_name(settings_cls, f) for f in mentioned)
        problems.append(message)
    unique = list(dict.fromkeys(names))
    return StartupRefused(
        "invalid setting: " + "; ".join(problems),
        setting=", ".join(unique),
        fix=f"correct {' and '.join(unique) or 'the settings'} (or unset to use the default; "
        "see the configuration table in README.md)",
    )


SettingsT = TypeVar("SettingsT", bound="ServiceSettings")


def load_settings(settings_cls: type[SettingsT]) -> SettingsT:
    """Build the settings from the environment; a bad value is a ``StartupRefused``."""
    try:
        return settings_cls()
    except ValidationError as error:
        raise refusal_from_validation(settings_cls, error) from None


@contextmanager
def setting_guard(settings: ServiceSettings, field: str, fix: str) -> Iterator[None]:
    """Whatever fails inside is refused as a problem of setting ``field`` (a file to load, a
    module to import) with ``fix``."""
    try:
        yield
    except StartupRefused:
        raise
    except Exception as error:
        name = env_name(type(settings), field)
        raise StartupRefused(
            f"{name}: {_text(error)}", setting=name, fix=fix.replace("{setting}", name)
        ) from None


def _text(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    first = text.splitlines()[0]
    return first if len(first) <= 400 else first[:400] + "..."


def _path_field(settings: ServiceSettings, filename: str) -> str:
    """The settings field a path came from: equal to it, or the directory holding it."""
    target = Path(filename).absolute()
    best, best_depth = "", -1
    for field, value in settings:
        if not isinstance(value, Path):
            continue
        root = value.absolute()
        if target == root or root in target.parents:
            depth = len(root.parts)
            if depth > best_depth:
                best, best_depth = field, depth
    return best


def _is_database_error(error: BaseException) -> bool:
    module = type(error).__module__
    return (
        module.startswith(("sqlalchemy", "psycopg", "aiosqlite"))
        or isinstance(error, sqlite3.Error)
        or "unsupported database driver" in str(error)
    )


def describe(error: BaseException, settings: ServiceSettings | None) -> Refusal:
    """What to tell the operator about ``error`` raised while starting."""
    if isinstance(error, StartupRefused):
        return Refusal(str(error), error.setting, error.fix)
    if isinstance(error, ValidationError) and settings is not None:
        refused = refusal_from_validation(type(settings), error)
        return Refusal(str(refused), refused.setting, refused.fix)
    kind = type(error).__name__
    if settings is not None and isinstance(error, OSError) and error.filename:
        field = _path_field(settings, str(error.filename))
        if field:
            name = env_name(type(settings), field)
            reason = error.strerror or _text(error)
            if isinstance(error, FileExistsError | NotADirectoryError):
                reason = "a file is in the way of a directory"
            return Refusal(
                f"{name}: cannot use {error.filename}: {reason}",
                name,
                f"point {name} at a path this process's user can read and write (a directory "
                "it may create, or an existing file it may read)",
                kind,
            )
    if settings is not None and _is_database_error(error):
        has_url = bool(getattr(settings, "database_url", ""))
        name = env_name(type(settings), "database_url" if has_url else "data_dir")
        fix = (
            f"check that {name} is a postgresql:// or sqlite:/// URL and that the database "
            "is up and reachable from here"
            if has_url
            else f"make {name} a writable directory, or set a database URL"
        )
        return Refusal(f"database unusable: {_text(error)}", name, fix, kind)
    if isinstance(error, tomllib.TOMLDecodeError | UnicodeDecodeError):
        return Refusal(f"a configuration file does not parse: {_text(error)}", "", "", kind)
    return Refusal(
        f"start-up failed: {kind}: {_text(error)}",
        "",
        "run with TOOLMESH_LOG_LEVEL=DEBUG for the traceback; a start-up failure that names "
        "no setting is a bug worth reporting",
        kind,
    )


def refuse(error: BaseException, settings: ServiceSettings | None) -> NoReturn:
    """Log one CRITICAL line for ``error`` and exit with code 2."""
    refusal = describe(error, settings)
    extra: dict[str, str] = {"setting": refusal.setting, "fix": refusal.fix}
    if refusal.error_type:
        extra["error_type"] = refusal.error_type
    if not logging.getLogger().handlers:
        from services.kit.logs import configure_logging

        configure_logging(getattr(settings, "service_name", "toolmesh"))
    message = refusal.message
    first = refusal.setting.split(",")[0]
    if first and first not in message:
        message = f"{refusal.setting}: {message}"
    log.critical("refusing to start: %s", message, extra=extra)
    if refusal.error_type and log.isEnabledFor(logging.DEBUG):
        log.debug("start-up failure", exc_info=error)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.exit(EXIT_STARTUP)


# --- file permissions -------------------------------------------------------------------------


def private_process() -> None:
    """From now on, every file this process creates is 0600 and every directory 0700."""
    os.umask(PRIVATE_UMASK)


def _own_groups() -> set[int]:
    return {os.getgid(), os.getegid(), *os.getgroups()}


def exposure(path: Path) -> str:
    """Why ``path`` is readable by others than this service, or "" when it is not.

    Access for other users is refused; access for a group only when the group is not one of
    this process's own (Kubernetes mounts secrets 0440 with the pod's fsGroup, which only the
    pod's processes have).
    """
    info = path.stat()
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o007:
        return f"mode {mode:04o} lets every user of the host in"
    if mode & 0o070 and info.st_gid not in _own_groups():
        return f"mode {mode:04o} lets group {info.st_gid} in, which this process is not in"
    return ""


def check_private(paths: Mapping[str, Path | None]) -> None:
    """Refuse when a file or directory named by a setting is open to others.

    ``paths`` maps an environment variable to the path it names; paths that do not exist yet
    are skipped (this process will create them private). Nothing is chmod-ed here: a data
    directory may be a shared one (/tmp, a volume's root), which must not change under others.
    """
    for name, path in paths.items():
        if path is None or not path.exists():
            continue
        problem = exposure(path)
        if problem:
            wanted = "0700" if path.is_dir() else "0600 (or 0400)"
            raise StartupRefused(
                f"{name}: {path} is open to others ({problem})",
                setting=name,
                fix=f"chmod {wanted} {path} and make this service's user its owner; in "
                f"Kubernetes point {name} at a path the service creates itself (a directory "
                "inside the volume) or mount secrets with defaultMode 0400/0440 and fsGroup",
            )
