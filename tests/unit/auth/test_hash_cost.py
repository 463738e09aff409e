"""Client secrets are hashed at argon2id's RFC 9106 low-memory cost (the suite's in-process
auth servers hash at a lower cost: tests/conftest.py)."""

from __future__ import annotations

import argon2
import pytest
from pydantic import SecretStr

from services.auth import credentials
from services.auth.credentials import SecretHasher


async def test_the_service_hashes_at_the_production_cost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(credentials, "PasswordHasher", argon2.PasswordHasher)
    hashed = await SecretHasher().hash(SecretStr("a secret"))
    params = argon2.extract_parameters(hashed)
    assert hashed.startswith("$argon2id$")
    assert (params.time_cost, params.memory_cost, params.parallelism) == (3, 64 * 1024, 4)
