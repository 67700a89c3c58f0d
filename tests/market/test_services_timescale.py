"""Migration 0002: the TimescaleDB hypertable SQL (TimescaleDB itself cannot be installed here)."""
from __future__ import annotations

import importlib

import pytest
from django.db import connection

hypertable = importlib.import_module("market.migrations.0002_candle_hypertable")


def test_it_emits_extension_primary_key_drop_and_create_hypertable_in_order() -> None:
    assert hypertable.hypertable_statements(extension_available=True, pk_constraint="market_candle_pkey") == [
        "CREATE EXTENSION IF NOT EXISTS timescaledb",
        'ALTER TABLE "market_candle" DROP CONSTRAINT "market_candle_pkey"',
        "SELECT create_hypertable('market_candle', 'ts', migrate_data => true, if_not_exists => true)",
    ]


def test_a_rerun_without_a_primary_key_only_ensures_the_hypertable() -> None:
    statements = hypertable.hypertable_statements(extension_available=True, pk_constraint=None)
    assert not any("DROP CONSTRAINT" in s for s in statements) and len(statements) == 2


def test_a_missing_extension_is_a_clear_error_naming_timescaledb() -> None:
    with pytest.raises(hypertable.TimescaleUnavailable, match="TimescaleDB"):
        hypertable.hypertable_statements(extension_available=False, pk_constraint="market_candle_pkey")


@pytest.mark.django_db(transaction=True)
def test_it_does_nothing_without_timescaledb_in_settings(settings) -> None:
    settings.TIMESCALEDB = False
    with connection.schema_editor() as editor:
        hypertable.forward(None, editor)  # no error, no statement, on SQLite and plain PostgreSQL


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_on_postgresql_without_the_extension_migrate_stops_with_the_reason(settings) -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'")
        if cursor.fetchone() is not None:
            pytest.skip("this PostgreSQL has TimescaleDB available; the missing-extension path cannot be shown")
    settings.TIMESCALEDB = True
    with pytest.raises(hypertable.TimescaleUnavailable, match="pg_available_extensions"):
        with connection.schema_editor() as editor:
            hypertable.forward(None, editor)
