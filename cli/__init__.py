"""The ``toolmesh`` command: talk to the gateway, or run the whole mesh locally with ``up``."""
