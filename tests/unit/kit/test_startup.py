"""Start-up refusals name the environment variable and the fix; files stay private."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.kit.startup import (
    StartupRefused,
    check_private,
    describe,
    env_name,
    exposure,
    load_settings,
    private_process,
    refusal_from_validation,
    setting_guard,
)
from services.memory.settings import MemorySettings


def test_the_variable_named_is_the_one_that_was_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOOLMESH_MEMORY_PORT", raising=False)
    monkeypatch.delenv("TOOLMESH_PORT", raising=False)
    assert env_name(MemorySettings, "port") == "TOOLMESH_MEMORY_PORT"
    monkeypatch.setenv("TOOLMESH_PORT", "x")
    assert env_name(MemorySettings, "port") == "TOOLMESH_PORT"
    monkeypatch.setenv("TOOLMESH_MEMORY_PORT", "x")
    assert env_name(MemorySettings, "port") == "TOOLMESH_MEMORY_PORT"


def test_validation_errors_name_variables_not_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOOLMESH_ENV", "prod")
    monkeypatch.setenv("TOOLMESH_MEMORY_PORT", "70000")
    with pytest.raises(StartupRefused) as refused:
        load_settings(MemorySettings)
    assert refused.value.setting == "TOOLMESH_ENV, TOOLMESH_MEMORY_PORT"
    assert "TOOLMESH_ENV: Input should be 'dev' or 'production'" in str(refused.value)
    assert "TOOLMESH_MEMORY_PORT: Input should be less than or equal to 65535" in str(refused.value)
    assert "prod" not in str(refused.value).replace("production", "")  # values are not echoed


def test_a_check_across_fields_names_every_field_it_mentions() -> None:
    with pytest.raises(ValidationError) as error:
        MemorySettings(default_history_limit=50, max_history_limit=10)
    refused = refusal_from_validation(MemorySettings, error.value)
    assert refused.setting == (
        "TOOLMESH_MEMORY_DEFAULT_HISTORY_LIMIT, TOOLMESH_MEMORY_MAX_HISTORY_LIMIT"
    )
    assert "default_history_limit" not in str(refused)


def test_setting_guard_turns_a_loader_error_into_a_refusal(tmp_path: Path) -> None:
    settings = MemorySettings(data_dir=tmp_path)
    with (
        pytest.raises(StartupRefused) as refused,
        setting_guard(settings, "data_dir", "make {setting} writable"),
    ):
        raise ValueError("boom")
    assert refused.value.setting == "TOOLMESH_MEMORY_DATA_DIR"
    assert refused.value.fix == "make TOOLMESH_MEMORY_DATA_DIR writable"
    assert str(refused.value) == "TOOLMESH_MEMORY_DATA_DIR: boom"


def test_an_os_error_on_a_configured_path_names_its_setting(tmp_path: Path) -> None:
    settings = MemorySettings(data_dir=tmp_path / "data")
    error = PermissionError(13, "Permission denied", str(tmp_path / "data" / "memory.db"))
    refusal = describe(error, settings)
    assert refusal.setting == "TOOLMESH_MEMORY_DATA_DIR"
    assert "Permission denied" in refusal.message


def test_an_unknown_error_is_still_one_refusal_that_says_it_is_unexpected() -> None:
    refusal = describe(KeyError("x"), None)
    assert refusal.setting == "" and refusal.error_type == "KeyError"
    assert "TOOLMESH_LOG_LEVEL=DEBUG" in refusal.fix


def test_files_created_after_private_process_are_the_owners_alone(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        private_process()
        (tmp_path / "dir").mkdir()
        (tmp_path / "file").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "dir").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "file").stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("mode", "refused"),
    [(0o600, False), (0o400, False), (0o640, False), (0o644, True), (0o606, True)],
)
def test_a_key_readable_by_others_is_refused(tmp_path: Path, mode: int, refused: bool) -> None:
    """Group access is allowed for a group of this process (Kubernetes' fsGroup, 0440)."""
    key = tmp_path / "tls.key"
    key.write_text("k")
    key.chmod(mode)
    if refused:
        with pytest.raises(StartupRefused) as error:
            check_private({"TOOLMESH_TLS_KEY_FILE": key})
        assert error.value.setting == "TOOLMESH_TLS_KEY_FILE"
        assert str(key) in str(error.value) and f"chmod 0600 (or 0400) {key}" in error.value.fix
    else:
        check_private({"TOOLMESH_TLS_KEY_FILE": key})


def test_group_access_for_a_foreign_group_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "tls.key"
    key.write_text("k")
    key.chmod(0o640)
    foreign = max({os.getgid(), *os.getgroups()}) + 1
    try:
        os.chown(key, -1, foreign)
    except PermissionError:
        pytest.skip("changing a file's group needs root")
    assert "which this process is not in" in exposure(key)


def test_an_open_data_directory_is_refused_and_never_changed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o755)
    with pytest.raises(StartupRefused, match="open to others"):
        check_private({"TOOLMESH_DATA_DIR": data, "TOOLMESH_TLS_KEY_FILE": None})
    assert stat.S_IMODE(data.stat().st_mode) == 0o755
    check_private({"TOOLMESH_DATA_DIR": tmp_path / "not-yet"})  # created private later
