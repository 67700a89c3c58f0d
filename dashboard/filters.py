"""The filter every page takes: mode (live, the demo's, or one replay run), a date range and an instrument.

A bad value (an unknown instrument or run id, a malformed or reversed date range) is a `FilterError`,
which the views answer with HTTP 400 and the message in the page, never a 500.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from urllib.parse import urlencode

from django.db.models import Q, QuerySet
from django.http import QueryDict

from journal.models import Cycle, Mode
from market.models import Instrument


class FilterError(ValueError):
    """A filter value the page cannot use; its message is shown to the user."""


@dataclass(frozen=True)
class Filters:
    run_id: str = ""  # "" = the live bot (or the demo's, with demo)
    demo: bool = False  # `make demo`'s rows (mode demo, its own paper account and bot state)
    inst_id: str = ""  # "" = every instrument
    instrument_pk: int | None = None
    start: datetime | None = None  # inclusive
    end: datetime | None = None  # exclusive
    start_text: str = ""
    end_text: str = ""

    @property
    def mode(self) -> str:
        return Mode.REPLAY if self.run_id else Mode.DEMO if self.demo else Mode.LIVE

    @property
    def label(self) -> str:
        return f"replay {self.run_id}" if self.run_id else "demo" if self.demo else "live"

    @property
    def virtual_clock(self) -> bool:
        """A replay and the demo run on a virtual clock: their times are the cycles' `as_of`, not the wall clock."""
        return bool(self.run_id or self.demo)

    @property
    def paper_account(self) -> str:
        """The paper account the rows traded (a replay's is named after its run; the demo's is "demo")."""
        return self.run_id[:40] if self.run_id else "demo" if self.demo else "default"

    def query(self, **extra: str) -> str:
        """The filter as a query string (for links between pages), with `extra` parameters added."""
        run = self.run_id or ("demo" if self.demo else "")
        params = {"run": run, "inst": self.inst_id, "from": self.start_text, "to": self.end_text, **extra}
        return urlencode({k: v for k, v in params.items() if v})

    # --- applying the filter: each table's own columns ---------------------------
    def _range(self, field: str) -> Q:
        q = Q()
        if self.start is not None:
            q &= Q(**{f"{field}__gte": self.start})
        if self.end is not None:
            q &= Q(**{f"{field}__lt": self.end})
        return q

    def cycles(self, qs: QuerySet | None = None) -> QuerySet:
        qs = Cycle.objects.all() if qs is None else qs
        qs = qs.filter(mode=self.mode, run_id=self.run_id).filter(self._range("as_of"))
        return qs.filter(instrument_id=self.instrument_pk) if self.instrument_pk else qs

    def trades(self, qs: QuerySet, *, time_field: str = "opened_at") -> QuerySet:
        qs = qs.filter(mode=self.mode, run_id=self.run_id).filter(self._range(time_field))
        return qs.filter(instrument_id=self.instrument_pk) if self.instrument_pk else qs

    def cycle_rows(self, qs: QuerySet, *, instrument_field: str = "instrument_id") -> QuerySet:
        """Rows that hang off a cycle (screener logs, LLM calls, rejections): a replay's are found through
        their cycle (run id, virtual time); the live bot's by mode and their own creation time."""
        # The cycle's own mode and run id as well: the join then starts from the cycles' (run_id, mode, as_of) index.
        if self.run_id:
            qs = qs.filter(mode=Mode.REPLAY, cycle__run_id=self.run_id, cycle__mode=Mode.REPLAY)
            qs = qs.filter(self._range("cycle__as_of"))
        elif self.demo:
            qs = qs.filter(mode=Mode.DEMO, cycle__run_id="", cycle__mode=Mode.DEMO).filter(self._range("cycle__as_of"))
        else:
            qs = qs.filter(mode=Mode.LIVE).filter(self._range("created_at"))
        if self.instrument_pk:
            qs = qs.filter(**{instrument_field: self.instrument_pk})
        return qs

    def time_field(self, live_field: str = "created_at") -> str:
        """The time a cycle-hanging row is bucketed by (virtual time in a replay or the demo)."""
        return "cycle__as_of" if self.virtual_clock else live_field


def _parse_day(text: str, name: str) -> datetime:
    try:
        if "T" in text or " " in text:
            value = datetime.fromisoformat(text)
            return value if value.tzinfo else value.replace(tzinfo=UTC)
        return datetime.combine(date.fromisoformat(text), time.min, tzinfo=UTC)
    except ValueError:
        raise FilterError(f"{name}={text!r} is not a date: use YYYY-MM-DD (UTC) or an ISO time") from None


def filters_parse(params: QueryDict) -> Filters:
    """Read and check the filter parameters: `run` (a replay run id; empty or 'live' = live; 'demo' = the demo's rows),
    `inst` (an instrument id), `from` and `to` (UTC dates, both inclusive, or ISO times)."""
    run_id = (params.get("run") or "").strip()
    mode = (params.get("mode") or "").strip()
    if run_id in ("live", "demo"):
        mode, run_id = mode or run_id, ""
    if mode and mode not in ("live", "demo", "replay"):
        raise FilterError(f"mode={mode!r}: use live, demo, or replay with run=<run id>")
    if mode == "replay" and not run_id:
        raise FilterError("mode=replay needs run=<run id>: which replay run?")
    if mode in ("live", "demo") and run_id:
        raise FilterError(f"mode={mode} with run={run_id!r}: a run id is a replay")
    if run_id and not Cycle.objects.filter(mode=Mode.REPLAY, run_id=run_id).exists():
        raise FilterError(f"unknown replay run {run_id!r}: no cycle in the journal has that run id")
    inst_id = (params.get("inst") or "").strip()
    instrument_pk = None
    if inst_id:
        instrument_pk = Instrument.objects.filter(inst_id=inst_id).values_list("pk", flat=True).first()
        if instrument_pk is None:
            raise FilterError(f"unknown instrument {inst_id!r}")
    start_text = (params.get("from") or "").strip()
    end_text = (params.get("to") or "").strip()
    start = _parse_day(start_text, "from") if start_text else None
    end = None
    if end_text:
        end = _parse_day(end_text, "to")
        if "T" not in end_text and " " not in end_text:
            end += timedelta(days=1)  # a date as `to` includes that whole day
    if start is not None and end is not None and end <= start:
        raise FilterError(f"the date range is empty: from {start_text} is not before to {end_text}")
    return Filters(run_id=run_id, demo=mode == "demo", inst_id=inst_id,
                   instrument_pk=instrument_pk, start=start, end=end,
                   start_text=start_text, end_text=end_text)
