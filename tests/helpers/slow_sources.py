"""Projections over sources rehydrate did not write, slowed as `slow_domain`'s, for the worker processes of the
fault tests: `legacy.accounts` (the team's table, in the database REHYDRATE_SOURCE_LEGACY_URL names; or, when
REHYDRATE_TEST_TEAM_STORE names one, the same projection over message-db's table or an outbox) and, when
REHYDRATE_TEST_BANK_URL names the database of the py-eventsourcing application, `es_bank`'s projection (the
application, and so its mapper, made as the library's users make it). When REHYDRATE_TEST_KAFKA_TOPIC names a topic,
`accounts` reads it instead (its brokers: REHYDRATE_SOURCE_LEDGER_BOOTSTRAP_SERVERS); when REHYDRATE_TEST_KINESIS_STREAM
names a Kinesis stream, it reads that (its endpoint: REHYDRATE_SOURCE_LEDGER_ENDPOINT_URL)."""

from __future__ import annotations

import os

from tests.helpers import es_bank, kafka, kinesis, legacy, team_stores
from tests.helpers.slow_domain import slowed

kind = team_stores.from_environment()
if "REHYDRATE_TEST_KINESIS_STREAM" in os.environ:
    accounts = slowed(kinesis.accounts(None, os.environ["REHYDRATE_TEST_KINESIS_STREAM"]))
elif "REHYDRATE_TEST_KAFKA_TOPIC" in os.environ:
    accounts = slowed(kafka.accounts(None, os.environ["REHYDRATE_TEST_KAFKA_TOPIC"]))
else:
    accounts = slowed(legacy.accounts("transaction") if kind is None else team_stores.accounts(kind))

if "REHYDRATE_TEST_BANK_URL" in os.environ:
    bank = es_bank.bank(os.environ["REHYDRATE_TEST_BANK_URL"], compress=True)
    bank_accounts = slowed(es_bank.projection(bank))
