"""The bearer token of a call's ``authorization`` metadata: one parser for every service."""

from __future__ import annotations

from collections.abc import Iterable

AUTHORIZATION = "authorization"


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The token of ``authorization: Bearer <token>``, or "" when there is none.

    A value that is not valid UTF-8 (possible as binary metadata) yields "" rather than an
    exception: the caller then answers UNAUTHENTICATED like any missing token.
    """
    for key, value in metadata or ():
        if key != AUTHORIZATION:
            continue
        try:
            text = value.decode() if isinstance(value, bytes) else value
        except UnicodeDecodeError:
            return ""
        scheme, _, token = text.partition(" ")
        return token.strip() if scheme.lower() == "bearer" else ""
    return ""
