"""The small runtime kit every toolmesh server shares: start-up, settings, logs, tracing, errors."""
