"""Bulk journal writes for the replay: rows built cheaply, ids reserved up front, rows inserted once.

A replay writes a Cycle row per cycle (a year of 5-minute cycles is 105,120).
Django's `bulk_create` compiles every value through the query compiler, which
measured ~40% of a replay's time when each cycle was written twice (a
placeholder for its id, then the finished row). Here a batch reserves its ids
first (`ids_reserve`), the rows that point to a cycle use those ids while the
batch runs, and the finished rows go out in one statement (`rows_insert`:
COPY on PostgreSQL, executemany on SQLite).

Both need the caller's transaction: the rows that point to a reserved id are
written before the cycle row exists, which the foreign keys allow because
Django creates them DEFERRABLE INITIALLY DEFERRED (checked at commit), on
PostgreSQL and SQLite alike. On SQLite the reservation is safe because the
transaction holds the database's write lock (settings: IMMEDIATE transactions);
on PostgreSQL ids come from the table's sequence.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from functools import cache
from operator import attrgetter
from typing import Any, TypeVar

import orjson
from django.db import connection, models, transaction
from django.db.models.base import ModelState

M = TypeVar("M", bound=models.Model)
_PASSTHROUGH = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_SUBCLASS


class BulkWriteError(Exception):
    """A bulk write was asked for outside a transaction (the reserved ids would not be safe)."""


@cache
def _row_plan(model: type[models.Model]) -> tuple[dict[str, Any], tuple[tuple[str, Any], ...], dict[str, str], frozenset[str]]:
    """(constant defaults by attname, (attname, default factory) pairs, relation name -> attname, attnames)."""
    constants: dict[str, Any] = {}
    factories: list[tuple[str, Any]] = []
    relations: dict[str, str] = {}
    for field in model._meta.concrete_fields:
        if field.is_relation:
            relations[field.name] = field.attname
        if field.has_default() and callable(field.default):
            factories.append((field.attname, field.default))
        else:
            constants[field.attname] = field.get_default()
    return constants, tuple(factories), relations, frozenset(constants) | {a for a, _ in factories}


def row_new(model: type[M], /, **values: Any) -> M:
    """`model(**values)` for a row that goes to `rows_insert`, without Model.__init__'s per-field work.

    A replay builds two journal rows per cycle; `Cycle(...)` measured ~9 us a row, most of
    it the generic keyword handling. Fields not given get their defaults (a callable
    default is called for each row, so no two rows share a dict). A foreign key may be
    given as the object (its id is set and the object cached, as the descriptor does) or
    by its attname (`instrument_id`). No signals are sent (the journal has no receivers).
    """
    constants, factories, relations, attnames = _row_plan(model)
    obj = model.__new__(model)
    data = obj.__dict__
    data.update(constants)
    for attname, factory in factories:
        data[attname] = factory()
    state = data["_state"] = ModelState()
    for key, value in values.items():
        attname = relations.get(key)
        if attname is not None:
            data[attname] = None if value is None else value.pk
            state.fields_cache[key] = value
        elif key in attnames:
            data[key] = value
        else:
            raise TypeError(f"{model.__name__} has no field {key!r}")
    return obj


def ids_reserve(*, model: type[models.Model], count: int) -> list[int]:
    """`count` new primary keys for `model`, unused by anyone else; needs an open transaction."""
    if count <= 0:
        return []
    if not transaction.get_connection().in_atomic_block:
        raise BulkWriteError("ids_reserve needs a transaction (transaction.atomic)")
    table = model._meta.db_table
    pk = model._meta.pk.column
    with connection.cursor() as cur:
        if connection.vendor == "postgresql":
            cur.execute("SELECT nextval(pg_get_serial_sequence(%s, %s)) FROM generate_series(1, %s)",
                        [table, pk, count])
            return [int(row[0]) for row in cur.fetchall()]
        if connection.vendor == "sqlite":
            # AUTOINCREMENT never reuses an id: start above both the largest row and the sequence.
            cur.execute(f'SELECT MAX("{pk}") FROM "{table}"')  # noqa: S608 - names from the model, not input
            top = cur.fetchone()[0] or 0
            cur.execute("SELECT seq FROM sqlite_sequence WHERE name = %s", [table])
            row = cur.fetchone()
            top = max(int(top), int(row[0]) if row else 0)
            # Written now, so a second reservation in this transaction does not hand out the same ids.
            cur.execute("UPDATE sqlite_sequence SET seq = %s WHERE name = %s", [top + count, table])
            if cur.rowcount == 0:
                cur.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (%s, %s)", [table, top + count])
            return list(range(top + 1, top + count + 1))
    raise BulkWriteError(f"ids_reserve does not support the {connection.vendor} backend")


def _json_text(value: Any) -> str | None:
    """A JSON column's value as text: what COPY sends (PostgreSQL parses it into jsonb) and what
    SQLite stores (compact; a save() stores the same value with spaces after separators).

    orjson: the stdlib encoder was about a tenth of a replay's time (several JSON
    columns per cycle row). Datetimes and dataclasses are passed through to its
    refusal, and what it refuses (those, a non-string key, an integer beyond 64
    bits) goes through the stdlib encoder as a save() would send it, which
    encodes it or raises as before. One difference: a NaN or an infinity becomes
    null (the stdlib writes NaN, which PostgreSQL refuses, losing the batch).
    """
    if value is None:
        return None
    try:
        return orjson.dumps(value, option=_PASSTHROUGH).decode()
    except TypeError:
        return json.dumps(value)


def _converter(field: models.Field) -> Callable[[Any], Any] | None:
    """How a value of `field` goes to the database; None where it goes as it is.

    The common journal types get the backend's own adapter directly (what
    `get_db_prep_save` ends in, without its layers); anything else goes
    through `get_db_prep_save`.
    """
    ops = connection.ops
    if isinstance(field, (models.CharField, models.TextField, models.IntegerField, models.BooleanField,
                          models.ForeignKey)):
        return None  # the id (a BigAutoField is an IntegerField) included
    if isinstance(field, models.JSONField):
        encoder = field.encoder
        if encoder is None:
            # COPY takes the JSON as text; SQLite stores the text (json.dumps here was ~5% of a replay).
            return _json_text
        return lambda value: None if value is None else ops.adapt_json_value(value, encoder)
    if isinstance(field, models.DateTimeField):
        if connection.vendor == "sqlite" and getattr(connection, "timezone_name", None) == "UTC":
            return _sqlite_utc_text
        return ops.adapt_datetimefield_value
    return lambda value, f=field: f.get_db_prep_save(value, connection)


_NO_OFFSET = timedelta(0)


def _sqlite_utc_text(value: Any) -> Any:
    """What Django's SQLite adapter stores for a datetime (the naive UTC time as text), with the
    usual case first: an aware time already in UTC needs only its zone dropped (the adapter's
    make_naive through the connection's time zone was ~5% of a replay). Anything else (naive,
    another offset, an expression) goes through the adapter itself.
    """
    if type(value) is datetime and value.tzinfo is not None and value.utcoffset() == _NO_OFFSET:
        return value.replace(tzinfo=None).isoformat(" ")
    return connection.ops.adapt_datetimefield_value(value)


def rows_insert(*, model: type[models.Model], objs: Sequence[models.Model]) -> int:
    """INSERT `objs` (their primary keys set) in one executemany; returns the number of rows.

    auto_now fields are filled as `save()` would, and auto_now_add fields too
    unless the row already holds a time (a replay stamps each cycle's start
    when it runs it, before the batch is written); no signals are sent (the
    journal has no receivers). Needs a transaction when the rows' ids came
    from `ids_reserve`.
    """
    if not objs:
        return 0
    fields = [f for f in model._meta.concrete_fields]
    for obj in objs:
        if obj.pk is None:
            raise BulkWriteError(f"{model.__name__} row without a primary key (use ids_reserve)")
    stamped = [f for f in fields if getattr(f, "auto_now", False) or getattr(f, "auto_now_add", False)]
    for obj in objs:
        for f in stamped:
            if f.auto_now or getattr(obj, f.attname) is None:
                f.pre_save(obj, add=True)
    # Every column's value in one C call per row (attrgetter), then only the columns that need it converted:
    # a getattr per column per row in a comprehension was half of this function's time in a replay.
    values = attrgetter(*(f.attname for f in fields))
    converted = [(i, conv) for i, f in enumerate(fields) if (conv := _converter(f)) is not None]
    quote = connection.ops.quote_name
    sql = (f"INSERT INTO {quote(model._meta.db_table)} ({', '.join(quote(f.column) for f in fields)}) "
           f"VALUES ({', '.join(['%s'] * len(fields))})")
    params = []
    for obj in objs:
        row = list(values(obj)) if len(fields) > 1 else [values(obj)]
        for i, conv in converted:
            row[i] = conv(row[i])
        params.append(row)
    with connection.cursor() as cur:
        if connection.vendor == "postgresql":
            # COPY: one stream for the whole batch (executemany measured ~15x slower here).
            columns = ", ".join(quote(f.column) for f in fields)
            with cur.cursor.copy(f"COPY {quote(model._meta.db_table)} ({columns}) FROM STDIN") as copy:
                for row in params:
                    copy.write_row(row)
        else:
            cur.executemany(sql, params)
    return len(objs)
