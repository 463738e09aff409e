"""Current time in an IANA zone, accepting common city names and any-case zone keys."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import cache
from zoneinfo import ZoneInfo, available_timezones

# Cities people ask about whose zone key differs from the city name (Tokyo -> Asia/Tokyo is
# found by the city part of the key; these are the ones that would not be).
ALIASES: dict[str, str] = {
    "utc": "UTC",
    "gmt": "UTC",
    "nyc": "America/New_York",
    "new york city": "America/New_York",
    "la": "America/Los_Angeles",
    "san francisco": "America/Los_Angeles",
    "seattle": "America/Los_Angeles",
    "washington": "America/New_York",
    "boston": "America/New_York",
    "miami": "America/New_York",
    "beijing": "Asia/Shanghai",
    "mumbai": "Asia/Kolkata",
    "delhi": "Asia/Kolkata",
    "new delhi": "Asia/Kolkata",
    "bangalore": "Asia/Kolkata",
    "munich": "Europe/Berlin",
    "frankfurt": "Europe/Berlin",
    "barcelona": "Europe/Madrid",
    "milan": "Europe/Rome",
    "osaka": "Asia/Tokyo",
    "kyoto": "Asia/Tokyo",
}


# Words that may trail a zone in a question ("tokyo right now please") and are dropped. Any
# other trailing word makes the name unknown: "Paris Texas" must not become Europe/Paris.
FILLER_WORDS = frozenset(
    {"right", "now", "please", "today", "currently", "exactly", "there", "at", "the", "moment"}
)


OFFSET_PREFIXES = frozenset(
    f"{base}{sign}" for base in ("utc", "gmt") for sign in ("+", "-", "\u2212")
)


class ZoneError(ValueError):
    """No IANA zone matches the name."""


@cache
def _zone_index() -> dict[str, str]:
    """Lower-cased zone keys and city parts ("tokyo", "new york") to canonical keys."""
    index: dict[str, str] = {}
    for key in sorted(available_timezones()):
        if key.startswith(("Etc/", "SystemV/", "posix/", "right/")):
            continue
        index.setdefault(key.lower(), key)
        city = key.rsplit("/", 1)[-1].replace("_", " ").lower()
        index.setdefault(city, key)
    return index


def _lookup(words: list[str]) -> str | None:
    wanted = " ".join(words).replace("_", " ").lower()
    wanted_key = "_".join(words).lower()
    return ALIASES.get(wanted) or _zone_index().get(wanted_key) or _zone_index().get(wanted)


def resolve_zone(name: str) -> str:
    """The canonical IANA key for a zone key or city name, in any case.

    Trailing filler words are dropped ("tokyo right now" is Asia/Tokyo); any other word that
    is not part of a zone's name makes the whole name unknown, never a shorter guess.
    """
    words = name.replace(",", " , ").split()
    end = len(words)
    while end > 1 and words[end - 1].lower() in FILLER_WORDS:
        end -= 1
    zone = _lookup(words[:end]) if end else None
    if zone is None and name.strip().lower()[:4] in OFFSET_PREFIXES:
        raise ZoneError(
            f"UTC offsets such as {name[:64]!r} are not supported: name an IANA zone "
            "(Asia/Tokyo) or a large city"
        )
    if zone is None:
        raise ZoneError(
            f"unknown time zone {name[:64]!r}: name an IANA zone (Asia/Tokyo) or a large city"
        )
    return zone


def now_in(zone: str, at: datetime | None = None) -> datetime:
    """``at`` (default now) in the zone named by ``zone``."""
    return (at or datetime.now(UTC)).astimezone(ZoneInfo(resolve_zone(zone)))
