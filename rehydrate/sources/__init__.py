"""Event access: what an event is, and where a projection reads its events from (rehydrate's own event store)."""
