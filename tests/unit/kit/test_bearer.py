"""The one bearer-header parser."""

from __future__ import annotations

from services.kit.bearer import bearer_token


def test_bearer_token_forms() -> None:
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("authorization", "bearer  abc ")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) == ""
    assert bearer_token([("x-other", "Bearer abc")]) == ""
    assert bearer_token(None) == ""


def test_undecodable_header_is_no_token() -> None:
    assert bearer_token([("authorization", b"Bearer \xff\xfe")]) == ""
