"""The foundation every layer stands on: settings, errors, identifiers, limits, connections to Postgres and Temporal,
and observability (logs, metrics, traces). It imports nothing else of rehydrate."""
