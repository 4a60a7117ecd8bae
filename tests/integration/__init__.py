"""Tests against a real Postgres and a real Temporal dev server, one fresh database and task queue each."""
