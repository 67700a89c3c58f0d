"""TimescaleDB: turn market_candle into a hypertable on `ts`, only when settings.TIMESCALEDB.

On SQLite and plain PostgreSQL this migration does nothing. With a
`timescale://` DATABASE_URL (settings.TIMESCALEDB = True) it checks that the
extension is available, creates it, drops the surrogate primary key
(TimescaleDB requires every unique index to include the partitioning column;
the unique (instrument, timeframe, ts) constraint stays, and upserts use it)
and calls create_hypertable. `hypertable_statements` returns the SQL so a test
can check it without TimescaleDB.
"""
from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import migrations

TABLE = "market_candle"


class TimescaleUnavailable(RuntimeError):
    pass


def hypertable_statements(*, extension_available: bool, pk_constraint: str | None, table: str = TABLE) -> list[str]:
    """The SQL to run, in order. Raises TimescaleUnavailable when the extension is not installable."""
    if not extension_available:
        raise TimescaleUnavailable(
            "DATABASE_URL asks for TimescaleDB (timescale://) but the PostgreSQL server has no 'timescaledb' "
            "extension available (pg_available_extensions). Install TimescaleDB (e.g. the timescale/timescaledb "
            "image from docker-compose.yml) or use a postgres:// URL for plain PostgreSQL."
        )
    statements = ["CREATE EXTENSION IF NOT EXISTS timescaledb"]
    if pk_constraint:
        statements.append(f'ALTER TABLE "{table}" DROP CONSTRAINT "{pk_constraint}"')
    statements.append(f"SELECT create_hypertable('{table}', 'ts', migrate_data => true, if_not_exists => true)")
    return statements


def forward(apps: Any, schema_editor: Any) -> None:
    connection = schema_editor.connection
    if connection.vendor != "postgresql" or not getattr(settings, "TIMESCALEDB", False):
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'")
        available = cursor.fetchone() is not None
        cursor.execute(
            "SELECT conname FROM pg_constraint WHERE conrelid = %s::regclass AND contype = 'p'", [TABLE]
        )
        row = cursor.fetchone()
        for sql in hypertable_statements(extension_available=available, pk_constraint=row[0] if row else None):
            cursor.execute(sql)


class Migration(migrations.Migration):
    dependencies = [("market", "0001_initial")]

    # Reversing leaves the hypertable in place: 0001's reversal drops the table anyway.
    operations = [migrations.RunPython(forward, reverse_code=migrations.RunPython.noop)]
