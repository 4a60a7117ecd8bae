"""The fault suite: worker kills, Postgres and Temporal restarts, backends terminated mid-transaction."""
