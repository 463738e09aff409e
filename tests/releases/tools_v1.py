"""The first build of the release test tools: only the 1.0.0 versions (so they are stable on
the first boot; tests.releases.tools is the later build with the candidates)."""

from __future__ import annotations

from tests.releases.tools import STABLE_ONLY

TOOLS = STABLE_ONLY
