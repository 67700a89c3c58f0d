"""The watchlist: which instruments the bot trades (`Instrument.trading_enabled`).

A person manages it with a CSV file (`manage.py watchlist import|export`, or
Import/Export in the admin's instrument list; django-import-export does the
file formats and the admin screens, `WatchlistResource` the rules), or lets
the daily top-N selection enable the USDT swaps with the largest 24-hour
volume on OKX (`watchlist_top_n`, WATCHLIST_TOP_N > 0).

The file has a header line and an `inst_id` column (OKX's `instId` is
accepted too) and optionally `enabled` (true/false, 1/0, yes/no; empty means
true). Each bad row is reported with its line and reason and changes nothing;
the good rows are imported:
- empty: no instrument id on the line;
- unknown: not a swap OKX lists (instruments are synced from OKX by `make run`,
  `backfill` or the top-N selection; never invented from a file);
- duplicate: the id came earlier in the same file;
- not live: OKX lists it suspended or not yet trading;
- over the limit: enabling it would pass WATCHLIST_MAX_ENABLED.

An instrument a person enabled or disabled is theirs: the top-N selection
turns off only instruments it turned on itself (`auto_selected`), and never
one with a position open. Every change sends `watchlist_changed` inside the
change's transaction, on which the bot re-syncs its beat entries (a cycle
entry per enabled instrument): a change rolled back takes its entries with it.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import structlog
import tablib
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.dispatch import Signal
from import_export import fields, resources, widgets
from import_export.results import RowResult

from market.feeds.base import MarketFeed
from market.models import Instrument

log = structlog.get_logger(__name__)

# Sent (sender=Instrument, inst_ids=[...]) after the set of enabled instruments changed.
watchlist_changed = Signal()

_TRUE = {"", "1", "true", "yes", "y", "on"}
_FALSE = {"0", "false", "no", "n", "off"}
_ID_HEADERS = ("inst_id", "instid", "instrument", "inst")


def _bool_cell(value: Any) -> bool:
    text = "" if value is None else str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValidationError(f"enabled must be true or false (1/0, yes/no), not {str(value)[:40]!r}")


class WatchlistResource(resources.ModelResource):
    """CSV rows `inst_id,enabled` onto existing instruments: updates only, each bad row a ValidationError."""

    inst_id = fields.Field(attribute="inst_id", column_name="inst_id")
    enabled = fields.Field(attribute="trading_enabled", column_name="enabled", widget=widgets.BooleanWidget())

    class Meta:
        model = Instrument
        fields = ("inst_id", "enabled")
        export_order = ("inst_id", "enabled")
        import_id_fields = ("inst_id",)
        skip_unchanged = True
        report_skipped = True
        use_transactions = True
        # The row loop saves as it goes, so the enabled count the limit check reads includes earlier rows.
        use_bulk = False
        skip_html_diff = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seen: dict[str, int] = {}
        self.changed: list[str] = []

    # -- the rules ------------------------------------------------------------
    def before_import(self, dataset: tablib.Dataset, **kwargs: Any) -> None:
        self.seen, self.changed = {}, []
        headers = [str(h or "").strip() for h in (dataset.headers or [])]
        lowered = [h.lower() for h in headers]
        if "inst_id" not in lowered:
            found = next((i for i, h in enumerate(lowered) if h in _ID_HEADERS), None)
            if found is None:
                raise ValueError(f"the first line must be a header with an inst_id column (got {headers[:5]})")
            lowered[found] = "inst_id"
        dataset.headers = lowered

    def before_import_row(self, row: dict[str, Any], **kwargs: Any) -> None:
        line = int(kwargs.get("row_number") or 0) + 1  # the header is line 1
        inst_id = str(row.get("inst_id") or "").strip().upper()
        if not inst_id:
            raise ValidationError("empty: no instrument id on this line")
        row["inst_id"] = inst_id
        if inst_id in self.seen:
            raise ValidationError(f"duplicate: {inst_id} is already on line {self.seen[inst_id]}")
        self.seen[inst_id] = line
        row["enabled"] = "1" if _bool_cell(row.get("enabled")) else "0"

    def get_or_init_instance(self, instance_loader: Any, row: dict[str, Any]) -> tuple[Instrument, bool]:
        instance = self.get_instance(instance_loader, row)
        if instance is None:
            raise ValidationError(f"unknown instrument {row['inst_id']}: not a swap OKX lists (the instruments are "
                                  "synced from OKX by `make run`, `backfill` or `watchlist top`)")
        return instance, False

    def import_instance(self, instance: Instrument, row: dict[str, Any], **kwargs: Any) -> None:
        was_enabled = instance.trading_enabled
        super().import_instance(instance, row, **kwargs)
        if instance.trading_enabled and not was_enabled:
            if instance.state != "live":
                raise ValidationError(f"not live: OKX lists {instance.inst_id} as {instance.state!r}")
            limit = settings.WATCHLIST_MAX_ENABLED
            if Instrument.objects.filter(trading_enabled=True).count() >= limit:
                raise ValidationError(f"over the limit: {limit} instruments already trade (WATCHLIST_MAX_ENABLED)")

    def skip_row(self, instance: Instrument, original: Any, row: dict[str, Any],
                 import_validation_errors: Any = None) -> bool:
        # A listed instrument the selection had turned on becomes a person's: not skipped, so auto_selected clears.
        if original is not None and original.auto_selected and instance.trading_enabled:
            return False
        return super().skip_row(instance, original, row, import_validation_errors)

    def save_instance(self, instance: Instrument, is_create: bool, row: dict[str, Any], **kwargs: Any) -> None:
        instance.auto_selected = False  # a person's choice from now on
        super().save_instance(instance, is_create, row, **kwargs)
        self.changed.append(instance.inst_id)

    def after_import(self, dataset: tablib.Dataset, result: Any, **kwargs: Any) -> None:
        if self.changed and not kwargs.get("dry_run") and not result.has_errors():
            inst_ids = list(self.changed)
            watchlist_changed.send(sender=Instrument, inst_ids=inst_ids)


@dataclass
class RowProblem:
    line: int
    inst_id: str
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.inst_id or '(empty)'}: {self.reason}"


@dataclass
class ImportReport:
    enabled: list[str] = field(default_factory=list)
    disabled: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    problems: list[RowProblem] = field(default_factory=list)
    error: str = ""  # the file as a whole could not be read: nothing imported
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        return not self.error and not self.problems


def _problems(result: Any) -> list[RowProblem]:
    problems = []
    for invalid in result.invalid_rows:
        values = invalid.values if isinstance(invalid.values, (list, tuple)) else list(invalid.values or [])
        messages = [m for msgs in invalid.error_dict.values() for m in msgs]
        problems.append(RowProblem(line=invalid.number + 1, inst_id=str(values[0] if values else "").strip(),
                                   reason="; ".join(messages)))
    for number, errors in result.row_errors():
        problems.append(RowProblem(line=number + 1, inst_id="", reason="; ".join(str(e.error) for e in errors)))
    return sorted(problems, key=lambda p: p.line)


def watchlist_import(*, data: str, replace: bool = False, dry_run: bool = False) -> ImportReport:
    """Import a CSV watchlist; each bad row is reported, the good ones applied (unless `dry_run`).

    `replace` also turns off every enabled instrument the file does not name
    at all (a listed but invalid row keeps its instrument as it is). A file
    without a single good row changes nothing.
    """
    report = ImportReport(dry_run=dry_run)
    try:
        dataset = tablib.Dataset().load(data.lstrip("\ufeff"), format="csv")
    except Exception as exc:  # noqa: BLE001 - tablib raises several kinds for a file that is not CSV
        report.error = f"not a CSV file: {exc}"
        return report
    resource = WatchlistResource()
    with transaction.atomic():
        dropped: list[str] = []
        if replace:
            # Turned off first, so the instruments the file replaces do not count against WATCHLIST_MAX_ENABLED.
            column = next((h for h in (dataset.headers or []) if str(h or "").strip().lower() in _ID_HEADERS), None)
            named = {str(v or "").strip().upper() for v in dataset[column]} if column is not None else set()
            dropped = list(Instrument.objects.filter(trading_enabled=True).exclude(inst_id__in=named)
                           .values_list("inst_id", flat=True))
            Instrument.objects.filter(inst_id__in=dropped).update(trading_enabled=False, auto_selected=False)
        result = resource.import_data(dataset, dry_run=dry_run, raise_errors=False, use_transactions=True,
                                      retain_instance_in_row_result=True)
        if result.base_errors:
            report.error = "; ".join(str(e.error) for e in result.base_errors)
            transaction.set_rollback(True)
            return report
        report.problems = _problems(result)
        for row in result.rows:
            if row.import_type == RowResult.IMPORT_TYPE_UPDATE:
                instrument = row.instance
                (report.enabled if instrument.trading_enabled else report.disabled).append(instrument.inst_id)
            elif row.import_type == RowResult.IMPORT_TYPE_SKIP:
                report.unchanged.append(str(row.object_repr or ""))
        if replace and not (report.enabled or report.unchanged or report.disabled):
            report.error = "no good row in the file: --replace would turn every instrument off; nothing changed"
            transaction.set_rollback(True)
            return report
        report.disabled += dropped
        if dry_run:
            transaction.set_rollback(True)
        elif dropped:
            watchlist_changed.send(sender=Instrument, inst_ids=report.enabled + report.disabled)
    log.info("watchlist.imported", enabled=len(report.enabled), disabled=len(report.disabled),
             problems=len(report.problems), dry_run=dry_run)
    return report


def watchlist_export(*, only_enabled: bool = True) -> str:
    """The watchlist as CSV (`inst_id,enabled`): the enabled instruments, or every stored one."""
    queryset = Instrument.objects.order_by("inst_id")
    if only_enabled:
        queryset = queryset.filter(trading_enabled=True)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["inst_id", "enabled"])
    for inst_id, enabled in queryset.values_list("inst_id", "trading_enabled"):
        writer.writerow([inst_id, "true" if enabled else "false"])
    return out.getvalue()


def watchlist_enable(*, inst_ids: Iterable[str], enabled: bool) -> tuple[list[str], str]:
    """Turn instruments on or off by hand (the admin's actions): (changed ids, a refusal or "")."""
    ids = list(inst_ids)
    with transaction.atomic():
        rows = Instrument.objects.select_for_update().filter(inst_id__in=ids).exclude(trading_enabled=enabled)
        changed = list(rows.values_list("inst_id", flat=True))
        if enabled:
            not_live = sorted(Instrument.objects.filter(inst_id__in=changed).exclude(state="live")
                              .values_list("inst_id", flat=True))
            if not_live:
                return [], f"not live on OKX: {', '.join(not_live)}"
            count = Instrument.objects.filter(trading_enabled=True).count()
            if count + len(changed) > settings.WATCHLIST_MAX_ENABLED:
                return [], (f"over the limit: {count} trade now, {len(changed)} more would pass "
                            f"WATCHLIST_MAX_ENABLED={settings.WATCHLIST_MAX_ENABLED}")
        Instrument.objects.filter(inst_id__in=changed).update(trading_enabled=enabled, auto_selected=False)
        if changed:
            watchlist_changed.send(sender=Instrument, inst_ids=changed)
    return changed, ""


@dataclass
class TopNReport:
    ranked: list[tuple[str, Decimal]] = field(default_factory=list)  # the top N by 24-hour USDT volume
    enabled: list[str] = field(default_factory=list)  # newly turned on by the selection
    kept: list[str] = field(default_factory=list)  # out of the top N but a position is open: left on
    dropped: list[str] = field(default_factory=list)  # the selection's own, out of the top N: turned off
    over_limit: list[str] = field(default_factory=list)  # in the top N, not enabled: WATCHLIST_MAX_ENABLED


def watchlist_top_n(*, feed: MarketFeed, n: int, keep: Iterable[str] = ()) -> TopNReport:
    """Enable the `n` live USDT-settled swaps with the largest 24-hour volume (in USDT) on the feed's tickers.

    One /public/instruments call (specs synced, as `make run` does) and one
    /market/tickers?instType=SWAP call. OKX's volCcy24h is in the base
    currency for swaps, so the volume in USDT is volCcy24h x last. The
    selection's own instruments that left the top N are turned off unless in
    `keep` (an open position); instruments a person enabled are never touched
    and count toward WATCHLIST_MAX_ENABLED first.
    """
    from market.services import instruments_sync

    tickers_of = getattr(feed, "tickers", None)
    if tickers_of is None:
        raise ValueError(f"the {feed.name} feed has no 24-hour tickers: the top-N selection needs OKX data")
    instruments_sync(feed=feed)
    tickers = tickers_of("SWAP")
    eligible = set(Instrument.objects.filter(settle_ccy="USDT", state="live", inst_type="SWAP")
                   .values_list("inst_id", flat=True))
    volumes = {t.inst_id: (t.volume_24h or Decimal(0)) * t.last for t in tickers if t.inst_id in eligible}
    ranked = sorted(volumes.items(), key=lambda kv: (-kv[1], kv[0]))[:max(0, n)]
    top = [inst_id for inst_id, _ in ranked]
    keep = set(keep)
    report = TopNReport(ranked=ranked)
    with transaction.atomic():
        current = {i.inst_id: i for i in Instrument.objects.select_for_update().filter(trading_enabled=True)}
        for inst_id, inst in current.items():
            if inst.auto_selected and inst_id not in top:
                (report.kept if inst_id in keep else report.dropped).append(inst_id)
        if report.dropped:
            Instrument.objects.filter(inst_id__in=report.dropped).update(trading_enabled=False, auto_selected=False)
        room = settings.WATCHLIST_MAX_ENABLED - (len(current) - len(report.dropped))
        wanted = [inst_id for inst_id in top if inst_id not in current]
        report.enabled, report.over_limit = wanted[:max(0, room)], wanted[max(0, room):]
        if report.enabled:
            Instrument.objects.filter(inst_id__in=report.enabled).update(trading_enabled=True, auto_selected=True)
        changed = report.enabled + report.dropped
        if changed:
            watchlist_changed.send(sender=Instrument, inst_ids=changed)
    log.info("watchlist.top_n", n=n, enabled=report.enabled, dropped=report.dropped, kept=report.kept,
             over_limit=len(report.over_limit))
    return report
