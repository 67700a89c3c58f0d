"""Replay: the same stage functions, cycle by cycle, on a virtual clock, with no broker.

For every cycle time t (every `cycle` from `start` to `end`):
1. the paper exchange is walked through every base bar that closed since the
   last cycle (SL/TP, funding, liquidation happen where the market says);
2. the snapshot at t is built by `market.snapshot.snapshot_from_frames` from
   candle frames and indicators computed ONCE over the whole history; it only
   uses bars closed by t (no lookahead), and equals what a live cycle at t
   computes from the same candles (the indicators engineer's equivalence rule;
   `tests/tradebot/test_pipeline_workers.py` checks replay == live);
3. the cycle runs through `tradebot.stages` exactly as a worker runs it, unless its result is
   already determined (rules brain: flat with no bypass and no setup, or holding with no exit rule
   firing): `tradebot.replay_bulk` then writes the row the stages would write, without them
   (`per_cycle=True`, `manage.py replay --per-cycle`: every cycle through the stages).
The journal is written with mode=replay and the run id. When the brain makes
no network call (rules brain + paper exchange) each batch of cycles runs in one
transaction: it reserves the batch's cycle ids first (the rows other rows point
to use them) and inserts the finished cycle and screener log rows once at the
end (`journal.bulk`). With a network brain no transaction may be open across a
call, so the batch inserts placeholders for the ids first and upserts them at
the end.

Ctrl-C stops a replay cleanly: the journal keeps whole batches (a rules batch
stopped half-way rolls back with its transaction; a network brain's batch keeps
the cycles that ran and marks the one in flight INTERRUPTED) and the summary,
flagged `interrupted`, counts exactly what the journal kept.

To keep a year's journal small, a cycle keeps its FULL snapshot JSON only when
its decision went to the risk gate (not HOLD: traded, rejected, halted), or with
`full_snapshots="analyzed"` whenever it reached ANALYZING (with a position open
the analyst sees every cycle, so that is about half of them, ~6 KB each: ~330 MB
for a year); the other cycles keep a compact one (`{"compact": true, ts, price, regime, 1H change, funding, anomaly
reasons}`). A replay's ScreenerLog rows always hold the compact one: their
cycle (screener_log.cycle) holds the full snapshot when there is one.

Each run has its own paper account (named after the run id) and its own bot
state (scope "replay:<run_id>"); the paper exchange runs `exclusive` (its book
in memory between its own writes, see execution/exchanges/paper.py). Funding:
the feed's rate is given to the paper exchange as it settles, so positions
held across 00/08/16 UTC pay or receive it. The risk gate's day starts at
00:00 UTC as live (`risk_daily_reset` at each UTC midnight of the replay).
"""
from __future__ import annotations

import gc
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Sum
from django.utils import timezone

from journal.bulk import ids_reserve, row_new, rows_insert
from journal.models import Cycle, CycleOutcome, CycleState, LlmCall, Mode, RiskRejection, ScreenerLog, Trade, TradeStatus
from market.feeds.base import MarketFeed
from market.models import TIMEFRAME_SECONDS, Instrument
from tradebot.cycle import cycle_end, stage_started
from tradebot.logging import get_logger, redact
from tradebot.replay_frames import FrameSnapshots
from tradebot.replay_state import BarWalker, RunState, compact_snapshot, new_day, sync_if_needed
from tradebot.stages import CYCLE_FIELDS, STAGES, CycleWork, StageEnv

log = get_logger(__name__)
S = CycleState
BATCH = 500


class ReplayError(Exception):
    """The replay cannot start: no data for the range, unknown instrument, bad arguments."""


@dataclass
class ReplaySummary:
    run_id: str
    inst_id: str
    start: datetime
    end: datetime
    brain: str
    source: str
    cycles: int = 0
    outcomes: Counter = field(default_factory=Counter)
    decisions: list[tuple[str, str]] = field(default_factory=list)  # (as_of, action) of analysed cycles
    elapsed_seconds: float = 0.0
    full_snapshots: str = "acted"  # which cycles kept the full snapshot JSON (see replay_run)
    interrupted: bool = False  # stopped by Ctrl-C: the figures are those of the cycles the journal kept
    bulk_cycles: int | None = None  # cycles the bulk path wrote (tradebot.replay_bulk); None: --per-cycle

    def mark(self) -> tuple[int, Counter, int, int | None]:
        """Where the counts stand before a batch (see `rewind`)."""
        return self.cycles, Counter(self.outcomes), len(self.decisions), self.bulk_cycles

    def rewind(self, mark: tuple[int, Counter, int, int | None]) -> None:
        """Back to `mark`: a batch whose transaction rolled back left nothing in the journal to count."""
        self.cycles, self.outcomes, kept, self.bulk_cycles = mark[0], Counter(mark[1]), mark[2], mark[3]
        del self.decisions[kept:]

    def count(self, cycle: Cycle) -> None:
        """One more finished cycle in the figures."""
        self.cycles += 1
        self.outcomes[cycle.outcome] += 1
        if cycle.decision:
            self.decisions.append((cycle.as_of.isoformat(), cycle.decision["decision"]["action"]))

    def as_dict(self) -> dict[str, Any]:
        """The figures the command prints (and `--json` prints as one object)."""
        trades = Trade.objects.filter(mode=Mode.REPLAY, run_id=self.run_id)
        closed = list(trades.filter(status=TradeStatus.CLOSED, pnl_usd__isnull=False).order_by("closed_at", "id"))
        pnls = [t.pnl_usd for t in closed]
        wins = [p for p in pnls if p > 0]
        losses = [p for p in pnls if p < 0]
        gross_loss = -sum(losses, Decimal(0))
        equity = peak = Decimal(settings.PAPER_START_BALANCE)
        max_dd = Decimal(0)
        for p in pnls:
            equity += p
            peak = max(peak, equity)
            max_dd = max(max_dd, (peak - equity) / peak if peak else Decimal(0))
        screens = ScreenerLog.objects.filter(mode=Mode.REPLAY, cycle__run_id=self.run_id)
        llm = LlmCall.objects.filter(mode=Mode.REPLAY, cycle__run_id=self.run_id)
        rejections: Counter = Counter()
        for row in RiskRejection.objects.filter(mode=Mode.REPLAY, cycle__run_id=self.run_id).values_list("failed_rules", flat=True):
            for failure in row or []:
                rejections[str(failure.get("rule", "?"))] += 1
        return {
            "run_id": self.run_id,
            "inst_id": self.inst_id,
            "from": self.start.isoformat(),
            "to": self.end.isoformat(),
            "brain": self.brain,
            "source": self.source,
            "cycles": self.cycles,
            "screened": screens.filter(bypassed=False).count(),
            "bypassed": screens.filter(bypassed=True).count(),
            "analyzed": self.outcomes[CycleOutcome.HOLD] + self.outcomes[CycleOutcome.REJECTED]
            + self.outcomes[CycleOutcome.TRADED] + self.outcomes[CycleOutcome.HALTED],
            # Plain names ("hold"), not the enum's repr (CycleOutcome.HOLD), in the printed summary.
            "outcomes": {str(outcome): count for outcome, count in self.outcomes.items()},
            "trades": trades.count(),
            "closed_trades": len(closed),
            "win_rate": round(len(wins) / len(pnls), 4) if pnls else None,
            "profit_factor": (round(float(sum(wins, Decimal(0)) / gross_loss), 4) if gross_loss else None),
            "pnl_usd": str(sum(pnls, Decimal(0)).quantize(Decimal("0.01"))),
            "max_drawdown_pct": round(float(max_dd), 6),
            "fees_usd": str((trades.aggregate(v=Sum("fees_usd"))["v"] or Decimal(0)).quantize(Decimal("0.01"))),
            "funding_usd": str((trades.aggregate(v=Sum("funding_usd"))["v"] or Decimal(0)).quantize(Decimal("0.01"))),
            "llm_calls": llm.exclude(status="skipped").count(),
            "llm_cost_usd": str((llm.aggregate(v=Sum("cost_usd"))["v"] or Decimal(0)).quantize(Decimal("0.0001"))),
            "risk_rejections": dict(rejections),
            "journal_snapshots": f"full for {self.full_snapshots} cycles, compact for the others",
            "interrupted": self.interrupted,
            "elapsed_seconds": round(self.elapsed_seconds, 3),
            "cycles_per_second": round(self.cycles / self.elapsed_seconds, 1) if self.elapsed_seconds else None,
            "bulk_cycles": self.bulk_cycles,
        }


def parse_cycle(text: str) -> timedelta:
    if text not in TIMEFRAME_SECONDS:
        raise ReplayError(f"--cycle must be one of {', '.join(TIMEFRAME_SECONDS)}, got {text!r}")
    return timedelta(seconds=TIMEFRAME_SECONDS[text])


def replay_feed(*, inst_id: str, csv_path: str | None = None) -> MarketFeed:
    """`--csv PATH`: that file; otherwise the synthetic market the live bot sees with the same seed."""
    if csv_path:
        from market.feeds.replay import ReplayFeed
        from market.feeds.synthetic import SPECS

        # A CSV holds candles only: the contract specs come from the database (an earlier
        # instruments sync) or, for the instruments we know, from the venue's specs.
        return ReplayFeed.from_csv(csv_path, inst_id=inst_id, instrument=_stored_spec(inst_id) or SPECS.get(inst_id))
    from market.feeds import synthetic_feed_from_settings

    return synthetic_feed_from_settings()


def _stored_spec(inst_id: str) -> Any:
    from market.feeds.base import InstrumentSpec

    row = Instrument.objects.filter(inst_id=inst_id).first()
    if row is None:
        return None
    return InstrumentSpec(row.inst_id, row.inst_type, row.ct_val, row.lot_sz, row.min_sz, row.tick_sz, row.max_lever,
                          row.settle_ccy, row.state)


def replay_run(
    *,
    inst_id: str,
    start: datetime,
    end: datetime,
    feed: MarketFeed,
    brain: str = "rules",
    cycle: timedelta = timedelta(minutes=5),
    run_id: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    playbook_version: int | None = None,
    full_snapshots: str = "acted",
    learn: Any = None,
    playbook: dict | None = None,
    per_cycle: bool = False,
) -> ReplaySummary:
    """Run every cycle in [start, end) and return the summary (the journal holds the rest).

    `playbook_version` replays with that stored version (any status: candidates
    are validated this way) instead of the active one. `full_snapshots`: which
    cycles keep the full snapshot JSON — "acted" (default: the decision was not
    HOLD, so it went to the risk gate) or "analyzed" (every cycle that reached
    ANALYZING; with a position open that is every cycle, ~6 KB each); the others
    keep the compact one. `learn`: a `tradebot.replay_learn.ReplayLearner`, told after each cycle
    (reviews, deep reflections and validated promotion on the replay's clock: `replay --learn`).
    `playbook` replays with a playbook that is not stored
    (a parameter-search trial's, labelled `playbook_version`: the version it changes).
    `per_cycle=True` runs every cycle through the stages; by default the cycles whose result is
    determined (flat with no signal, holding with no exit: `tradebot.replay_bulk`) are written
    without them, with the same rows.
    """
    if full_snapshots not in ("acted", "analyzed"):
        raise ReplayError(f"full_snapshots must be 'acted' or 'analyzed', got {full_snapshots!r}")
    from brain.news import calendar_preloaded
    from execution.exchanges.paper import PaperExchange
    from market.services import instruments_sync

    if end <= start:
        raise ReplayError("--to must be after --from")
    if brain not in ("rules", "claude"):
        raise ReplayError(f"--brain must be rules or claude, got {brain!r}")
    if brain == "claude" and not settings.ANTHROPIC_API_KEY:
        # Live falls back to the rules brain with a warning; a replay asked for Claude's decisions,
        # and a rules run labelled "claude" would be a wrong answer, not a degraded one.
        raise ReplayError("--brain claude needs ANTHROPIC_API_KEY (a replay never stands in the rules brain for it)")
    run_id = run_id or f"replay-{uuid.uuid4().hex[:12]}"
    instrument = Instrument.objects.filter(inst_id=inst_id).first()
    if instrument is None:
        instruments_sync(feed=feed)
        instrument = Instrument.objects.filter(inst_id=inst_id).first()
        if instrument is None:
            raise ReplayError(f"{inst_id} is not an instrument the feed knows")
    data_start, data_end = feed.data_range(inst_id)  # type: ignore[attr-defined]
    start, end = max(start, data_start), min(end, data_end)
    if end <= start:
        raise ReplayError(f"no {inst_id} data between the dates asked for (data covers {data_start} to {data_end})")
    snapshots = FrameSnapshots(feed, inst_id, end)
    # Its own account: two runs in one database never share a balance (exclusive: see the docstring).
    exchange = PaperExchange(account_name=run_id[:40], exclusive=True)
    run = RunState(run_id=run_id, exchange=exchange)
    if not per_cycle:
        from tradebot.replay_bulk import BulkCycles

        run.bulk = BulkCycles(snapshots=snapshots, full_snapshots=full_snapshots)
    env = StageEnv(feed=feed, exchange=exchange, mode=Mode.REPLAY, run_id=run_id, brain_name=brain,
                   snapshot_provider=snapshots, sync_candles=False, recent_trades_provider=run.recent_trades,
                   account_provider=run.account, bot_provider=run.bot_view, defer_journal=True)
    run.scope = env.scope
    if playbook is not None:
        from brain.base import brain_for_settings

        env.brain = brain_for_settings(brain, playbook=playbook, playbook_version=playbook_version)
    elif playbook_version is not None:
        from brain.base import brain_for_settings
        from brain.models import PlaybookVersion

        pinned = PlaybookVersion.objects.filter(version=playbook_version).first()
        if pinned is None:
            raise ReplayError(f"playbook version {playbook_version} does not exist")
        env.brain = brain_for_settings(brain, playbook=pinned.playbook, playbook_version=pinned.version)
    summary = ReplaySummary(run_id=run_id, inst_id=inst_id, start=start, end=end, brain=brain,
                            source=getattr(feed, "name", "replay"), full_snapshots=full_snapshots,
                            bulk_cycles=None if per_cycle else 0)
    if learn is not None:
        learn.begin(run_id=run_id, inst_id=inst_id, env=env, start=start)
        run.learn = learn
    times: list[datetime] = []
    t = start + cycle  # the first cycle sees the first full cycle of bars
    while t <= end:
        times.append(t)
        t += cycle
    base_tf = feed.timeframes(inst_id)[0]  # type: ignore[attr-defined]  # the finest bars the data has
    walker = BarWalker(feed, inst_id, base_tf, exchange, start)
    # Network brains must not run inside a database transaction (house rule); the rules brain may.
    atomic = brain == "rules"
    began = time.perf_counter()
    with calendar_preloaded(), _collector_between_batches() as collect_garbage:
        for offset in range(0, len(times), BATCH):
            batch = times[offset:offset + BATCH]
            mark, written = summary.mark(), False
            try:
                if atomic:
                    with transaction.atomic():
                        _run_batch(batch, instrument, env, walker, summary, run, full_snapshots, reserved_ids=True)
                else:
                    _run_batch(batch, instrument, env, walker, summary, run, full_snapshots, reserved_ids=False)
                written = True
                collect_garbage()
                if progress:
                    progress(min(offset + BATCH, len(times)), len(times))
            except KeyboardInterrupt:
                # Ctrl-C: the journal keeps whole batches (a rules batch stopped half-way rolls back with
                # its transaction; a network brain's batch writes what it ran, see _run_batch), and the
                # summary counts what it kept instead of ending in a traceback.
                if atomic and not written:
                    summary.rewind(mark)
                summary.interrupted = True
                log.warning("replay_interrupted", run_id=run_id, cycles_kept=summary.cycles, cycles_planned=len(times))
                break
    summary.elapsed_seconds = time.perf_counter() - began
    return summary


@contextmanager
def _collector_between_batches() -> Iterator[Callable[[], None]]:
    """Python's cyclic garbage collector runs when the loop calls the yielded function (after each
    batch), not inside a batch.

    A replay allocates millions of short-lived objects (model rows, pydantic views,
    Decimals), which triggered ~1,000 automatic collections a month of cycles, each full
    one scanning everything held in memory (the history's frames, indicators, views):
    ~10% of a replay's time. What exists when the loop starts, and what survives each
    batch's collection, is frozen (not scanned again); a batch's collection then only
    looks at what that batch left behind. Restored on the way out, error or not: the
    collector is enabled again if it was, and every frozen object goes back to it.
    """
    enabled = gc.isenabled()

    def collect() -> None:
        gc.collect()
        gc.freeze()

    gc.freeze()
    gc.disable()
    try:
        yield collect
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()



def _run_batch(times: list[datetime], instrument: Instrument, env: StageEnv, walker: BarWalker,
               summary: ReplaySummary, run: RunState, full_snapshots: str, *, reserved_ids: bool) -> None:
    fresh = [row_new(Cycle, instrument=instrument, mode=Mode.REPLAY, run_id=env.run_id, as_of=t, state=S.IDLE) for t in times]
    if reserved_ids:
        # In the batch's transaction: ids now, one INSERT of the finished rows at the end (journal/bulk.py).
        for cycle, pk in zip(fresh, ids_reserve(model=Cycle, count=len(fresh)), strict=True):
            cycle.pk = pk
        placeholders = fresh
    else:
        # Without a transaction (a network brain) rows that point to a cycle need it to exist first.
        placeholders = Cycle.objects.bulk_create(fresh)
    screener_logs: list[ScreenerLog] = []
    if not reserved_ids:
        mark = summary.mark()
        try:
            _run_cycles(placeholders, env, walker, summary, run, full_snapshots, screener_logs)
        except KeyboardInterrupt:
            env.exchange.flush()
            _keep_what_ran(placeholders, summary, mark, screener_logs)
            raise
        env.exchange.flush()
        Cycle.objects.bulk_create(placeholders, update_conflicts=True, unique_fields=["id"],
                                  update_fields=list(CYCLE_FIELDS))
        ScreenerLog.objects.bulk_create(screener_logs)
        return
    _run_cycles(placeholders, env, walker, summary, run, full_snapshots, screener_logs)
    env.exchange.flush()
    rows_insert(model=Cycle, objs=placeholders)
    for row, pk in zip(screener_logs, ids_reserve(model=ScreenerLog, count=len(screener_logs)), strict=True):
        row.pk = pk
    rows_insert(model=ScreenerLog, objs=screener_logs)


def _keep_what_ran(placeholders: list[Cycle], summary: ReplaySummary, mark: tuple[int, Counter, int, int | None],
                   screener_logs: list[ScreenerLog]) -> None:
    """A network brain's batch stopped by Ctrl-C: its placeholder rows exist already (rows of the
    cycles that ran point to them). The cycles that finished are written as they ended, the one in
    flight as INTERRUPTED, the placeholders of the cycles that never started are removed (nothing
    points to them), and the summary counts what was kept."""
    started = [c for c in placeholders if c.state != S.IDLE]
    for cycle in started:
        if cycle.state not in (S.DONE, S.FAILED, S.INTERRUPTED):
            cycle_end(cycle, outcome=CycleOutcome.INTERRUPTED, reason="replay interrupted (Ctrl-C) in this cycle",
                      state=S.INTERRUPTED)
    Cycle.objects.filter(pk__in=[c.pk for c in placeholders if c.state == S.IDLE]).delete()
    Cycle.objects.bulk_create(started, update_conflicts=True, unique_fields=["id"], update_fields=list(CYCLE_FIELDS))
    kept = {c.pk for c in started}
    ScreenerLog.objects.bulk_create([row for row in screener_logs if row.cycle_id in kept])
    summary.rewind(mark)
    for cycle in started:
        summary.count(cycle)


def _run_cycles(placeholders: list[Cycle], env: StageEnv, walker: BarWalker, summary: ReplaySummary, run: RunState,
                full_snapshots: str, screener_logs: list[ScreenerLog]) -> None:
    """The batch's cycles in order, each counted in the summary and its screener log row kept."""
    for cycle in placeholders:  # each holds `instrument` already (row_new caches it; bulk_create returns the same rows)
        exposed = env.exchange.exposed()
        walker.advance(cycle.as_of, exposed)
        run.balances = None  # new prices
        if exposed:
            sync_if_needed(env, run)
        new_day(cycle.as_of, env, run)
        determined = run.bulk.cycle(cycle, env, run) if run.bulk is not None else None
        if determined is not None:
            # The bulk path wrote the row (tradebot/replay_bulk.py): no order, no risk gate, a compact snapshot.
            snapshot, log_row = determined
            run.last_snapshot = snapshot
            cycle.snapshot = log_row.snapshot_json = compact_snapshot(snapshot)
            screener_logs.append(log_row)
            summary.count(cycle)
            summary.bulk_cycles = (summary.bulk_cycles or 0) + 1
            if run.learn is not None and run.learn.after_cycle(cycle.as_of):
                run.trades_stale = True
            continue
        work = _run_cycle(cycle, env)
        if cycle.client_order_id:
            run.trades_stale = True
            if (cycle.order or {}).get("action") in ("CLOSE", "REDUCE"):
                # order_place synced the account after its reducing order (execution.sync.account_sync):
                # the next cycle need not sync again for what that order closed.
                run.closes_synced = env.exchange.closes
        if cycle.decision and cycle.outcome not in (CycleOutcome.HOLD, CycleOutcome.HALTED):
            # The risk gate ran: it may have halted the run or refreshed its state. (A HALTED cycle
            # changed nothing: a due lift would have let it through to the gate.)
            run.bot = None
        snapshot = work._snapshot
        if snapshot is not None:
            run.last_snapshot = snapshot
            compact = compact_snapshot(snapshot)
            keep_full = bool(cycle.decision) and (full_snapshots == "analyzed" or cycle.outcome != CycleOutcome.HOLD)
            cycle.snapshot = snapshot.as_jsonable() if keep_full else compact
        log_row = work.extra.get("screener_log")
        if log_row is not None:
            log_row.snapshot_json = compact if snapshot is not None else None  # the cycle row has the full one
            screener_logs.append(log_row)
        summary.count(cycle)
        if run.learn is not None and run.learn.after_cycle(cycle.as_of):
            run.trades_stale = True  # a review wrote the run's trades (self_review)


def _run_cycle(cycle: Cycle, env: StageEnv) -> CycleWork:
    """One cycle through the stages, in memory; errors end the cycle, never the replay.

    `started_at` and `ended_at` say when the replay ran the cycle (wall clock, as live
    cycles' do, so it never ends before it started); `as_of` and the stage marks carry
    the replayed time. A network brain's replay writes its batch's rows before running
    them (rows that point to a cycle need it), so its `started_at` is the batch's start.
    """
    work = CycleWork(cycle=cycle)
    cycle.started_at = timezone.now()
    for stage, fn, _queue in STAGES:
        if cycle.state in (S.DONE, S.FAILED):
            break
        if stage == S.JOURNALING and cycle.state != S.CONFIRMING:
            break
        stage_started(cycle, stage, now=cycle.as_of)
        began = time.perf_counter()
        try:
            go_on = fn(work, env)
        except Exception as exc:  # noqa: BLE001 - a failed cycle is journaled; the replay goes on
            message = redact(f"{type(exc).__name__}: {exc}")
            cycle_end(cycle, outcome=CycleOutcome.ERROR, reason=f"{stage} failed: {message}"[:500], error=message,
                      state=S.FAILED)
            log.warning("replay_cycle_failed", as_of=cycle.as_of.isoformat(), stage=stage, error=message)
            go_on = False
        cycle.stage_times[stage]["duration_ms"] = round((time.perf_counter() - began) * 1000, 3)
        if not go_on:
            break
    if cycle.ended_at is None:
        cycle_end(cycle, outcome=CycleOutcome.ERROR, reason=f"cycle stopped in {cycle.state} without an outcome",
                  state=S.FAILED)
    return work
