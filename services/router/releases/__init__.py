"""Releases: a tool version, the routing rules or a prompt selection goes out through gates,
shadow traffic and weighted canary steps, judged against the stable version on per-version
figures, and is promoted or rolled back automatically (docs/releases.md).

- ``model``: units, plans, states and the sticky assignment of a (tenant, session) to a version
- ``store``: releases, their events, the units' stable versions and shadow tallies (the
  router's database, shared by every replica)
- ``view``: each replica's copy of what to serve, re-read every ``release_sync_s``
- ``gates``: contract compatibility, examples and drift, before any traffic
- ``shadow``: copies of live calls sent to the candidate after the answer, compared
- ``analysis``: the judgement of one interval (pure)
- ``analyzer``: one replica per release (a lease row) applies it every interval
- ``admin``: the RPCs
"""
