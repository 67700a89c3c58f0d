"""The worker sections of `make bench`: `pipeline` (overhead per cycle vs a bare chain) and `instruments300`.

Both run real Celery workers, one per queue, on Redis (a key prefix of their
own) and the bench's scratch PostgreSQL database, with the rules brain, the
paper exchange and synthetic data: no LLM and no network waits.
"""
from __future__ import annotations

import statistics
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from bench import infra

INST = "BTC-USDT-SWAP"
# Known from tests/tradebot/test_pipeline_workers.py (seed 7): an OPEN_LONG at 00:30 on this day.
DAY = datetime(2025, 9, 5, tzinfo=UTC)
OPEN_AT = DAY + timedelta(minutes=30)
# Both figures are read from times the workers stamp (the last task's end), not from when this process
# notices: the polling interval is not in them, only the polling's own load on the 2 cores is.
POLL = 0.01


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def stages_run(cycle: Any) -> list[str]:
    from tradebot.stages import STAGES

    return [s for s, _, _ in STAGES if s in (cycle.stage_times or {})]


# --- the floor: a bare chain of trivial tasks -------------------------------------------


def floor_once(hops: int, workers: Any, timeout: float = 30.0) -> float:
    """Seconds from send to the end of the last trivial task, over the pipeline's first `hops` queues."""
    import redis
    from celery import chain

    from tradebot.celery import app
    from tradebot.stages import STAGES

    queues = [q for _, _, q in STAGES][:hops]
    run = uuid.uuid4().hex
    sigs = [app.signature("bench.hop", args=(run,), immutable=True).set(queue=q) for q in queues[:-1]]
    sigs.append(app.signature("bench.hop_last", args=(run,), immutable=True).set(queue=queues[-1]))
    client = redis.Redis.from_url(workers.redis_url)
    key = f"{workers.prefix}bench:done:{run}"  # what done_key() gives inside the workers
    t0 = time.time()
    (chain(*sigs) if len(sigs) > 1 else sigs[0]).apply_async()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = client.get(key)
        if value is not None:
            client.delete(key)
            return float(value) - t0
        time.sleep(POLL)
    raise RuntimeError(f"the floor chain of {hops} hops did not finish in {timeout} s\n{workers.worker_logs()}")


def floors(hop_counts: list[int], workers: Any, runs: int) -> dict[int, list[float]]:
    for _ in range(5):  # warm the connections and the workers' code paths
        floor_once(7, workers)
    return {h: [floor_once(h, workers) for _ in range(runs)] for h in sorted(set(hop_counts))}


# --- one cycle through the workers -------------------------------------------------------


def cycle_run(instrument: Any, as_of: datetime, workers: Any, timeout: float = 60.0) -> tuple[float, Any]:
    seconds, row, _ = cycle_run_timed(instrument, as_of, workers, timeout)
    return seconds, row


def cycle_run_timed(instrument: Any, as_of: datetime, workers: Any, timeout: float = 60.0) -> tuple[float, Any, float]:
    """Launch one cycle the way beat's task does and wait for it; seconds from send to its end."""
    from journal.models import TERMINAL_CYCLE_STATES, Cycle
    from tradebot.pipeline import cycle_launch

    t0 = time.time()
    cycle = cycle_launch(instrument=instrument, as_of=as_of, trigger="bench")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = Cycle.objects.filter(pk=cycle.pk).only("state").first()
        if row is not None and row.state in TERMINAL_CYCLE_STATES:
            row = Cycle.objects.get(pk=cycle.pk)
            # ended_at is stamped inside the last stage (before its final UPDATE): the same point the
            # floor's last task stamps, so the polling interval is not part of the figure.
            return row.ended_at.timestamp() - t0, row, t0
        time.sleep(POLL)
    raise RuntimeError(f"cycle {cycle.pk} did not finish in {timeout} s\n{workers.worker_logs()}")


def paper_reset() -> None:
    """Close what the last cycle opened and let the bot run again (outside the timing)."""
    from execution.exchanges import exchange_from_settings
    from execution.services import positions_flatten
    from execution.bot import bot_resume

    # A unique reason: the close's client order id derives from it and the paper clock, which stands still here.
    positions_flatten(exchange=exchange_from_settings(), reason=f"bench reset {uuid.uuid4().hex[:8]}")
    bot_resume(by="bench")


def stage_medians(cycles: list[Any]) -> str:
    from tradebot.stages import STAGES

    parts = []
    for stage, _, queue in STAGES:
        values = [c.stage_times[stage]["duration_ms"] for c in cycles
                  if "duration_ms" in (c.stage_times.get(stage) or {})]
        if values:
            parts.append(f"{stage.lower()}@{queue} {statistics.median(values):.1f}")
    return "; ".join(parts) + " (ms, median inside the task)"


def time_split(launches: list[tuple[float, float, Any]]) -> str:
    """Per cycle: the sum of the stage functions' own durations vs everything else.

    `launches` holds (send time, seconds to the end, cycle). Everything else = opening the cycle, the
    broker hops, and per stage the task's set-up, its lock and claim, its write-back and lock release.
    "Open and send to first claim" runs from before `cycle_launch` to COLLECTING's claim (its `started`).
    """
    from tradebot.stages import STAGES

    inside, gaps, first = [], [], []
    for t0, total, cycle in launches:
        times = cycle.stage_times or {}
        ran = [s for s, _, _ in STAGES if "started" in (times.get(s) or {})]
        if not ran:
            continue
        stage_sum = sum(float(times[s].get("duration_ms", 0.0)) for s in ran) / 1000
        inside.append(stage_sum)
        gaps.append(total - stage_sum)
        first.append(datetime.fromisoformat(times[ran[0]]["started"]).timestamp() - t0)
    if not inside:
        return "no stage times"
    return (f"stage functions {ms(statistics.median(inside))}, everything else {ms(statistics.median(gaps))} "
            f"(of which open and send to first claim {ms(statistics.median(first))}) (medians per cycle)")


def stage_breakdown(cycles: list[Any], floor_per_hop: float) -> list[str]:
    """Per stage, medians over the cycles: the claim, the stage function, and from its end to the next claim.

    From the worker's own stamps (tradebot.tasks): `started` (before the lock and claim statement),
    `claim_ms` (that statement with the row's decoding) and `duration_ms` (the stage function). What
    is left between the end of a stage function and the next stage's `started` is its write-back
    (which also releases the lock), the task's end in Celery, the send of the next link, the broker
    hop and the next task's start: compare it with the floor's hop (a trivial task's whole hop).
    """
    from tradebot.stages import STAGES

    rows = []
    for i, (stage, _, queue) in enumerate(STAGES):
        claims, fns, gaps = [], [], []
        for c in cycles:
            times = c.stage_times or {}
            entry = times.get(stage) or {}
            if "started" not in entry or "duration_ms" not in entry:
                continue
            claim = float(entry.get("claim_ms", "nan"))
            claims.append(claim)
            fns.append(float(entry["duration_ms"]))
            nxt = times.get(STAGES[i + 1][0]) if i + 1 < len(STAGES) else None
            if nxt and "started" in nxt and claim == claim:
                end = datetime.fromisoformat(entry["started"]).timestamp() + (claim + float(entry["duration_ms"])) / 1000
                gaps.append((datetime.fromisoformat(nxt["started"]).timestamp() - end) * 1000)
        if not fns:
            continue
        gap = f"{statistics.median(gaps):5.1f}" if gaps else "    -"
        rows.append(f"      {stage.lower():12s} @{queue:8s} claim {statistics.median(claims):4.1f}  stage {statistics.median(fns):5.1f}"
                    f"  write-back + hop to the next claim {gap}")
    rows.append(f"      (ms, medians; the floor's whole hop is {floor_per_hop * 1000:.1f} ms: a 7-hop chain's p50 / 7)")
    return rows


def snapshot_build_time(runs: int = 20) -> float:
    """Median snapshot_build on the synthetic feed the workers use (feed reads included), in this process."""
    from django.conf import settings

    from market.feeds.synthetic import EPOCH, SyntheticFeed
    from market.snapshot import snapshot_build

    feed = SyntheticFeed(seed=settings.SYNTHETIC_SEED, start=EPOCH, end=DAY + timedelta(days=1), inst_ids=(INST,))
    snapshot_build(feed=feed, inst_id=INST, as_of=OPEN_AT)
    times = []
    for i in range(runs):
        as_of = DAY + timedelta(minutes=5 * (i + 1))
        feed.set_clock(as_of)
        t = time.perf_counter()
        snapshot_build(feed=feed, inst_id=INST, as_of=as_of)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_pipeline() -> None:
    """Pipeline overhead per cycle through real workers, beside a bare chain with the same hops."""
    why = infra.worker_sections_missing()
    if why:
        print(f"pipeline: skipped: {why}")
        return
    from django.conf import settings

    from market.feeds.synthetic import SyntheticFeed
    from market.models import Instrument
    from market.services import instruments_sync

    n = max(50, infra.OPTIONS.cycles)
    instruments_sync(feed=SyntheticFeed(seed=settings.SYNTHETIC_SEED, start=DAY - timedelta(days=1), end=DAY,
                                        inst_ids=(INST,)), enable=[INST])
    btc = Instrument.objects.get(inst_id=INST)
    print(f"pipeline: real workers (solo pool, one per queue) on Redis + PostgreSQL {infra.ENV.db_name}; rules brain, "
          f"paper exchange, synthetic market (seed {settings.SYNTHETIC_SEED}), {INST}; {infra.load()}")
    t = time.perf_counter()
    workers = infra.workers_start(feed="settings")
    print(f"  workers ready in {time.perf_counter() - t:.1f} s (each builds the synthetic feed and one snapshot)")
    # How this differs from production: docker-compose.yml starts `celery -A tradebot worker -Q <queue> -c N` with
    # Celery's default prefork pool (okx -c 2, orders -c 2, default -c 2) and a threads pool for llm (x8). Prefork adds
    # a pipe hop to a child per task.
    print("  (production differs: docker-compose runs the prefork pool, -c 2 okx/orders/default, llm on 8 threads; "
          "prefork adds a parent-to-child hop per task)")
    try:
        for i in range(3):  # warm-up, untimed
            cycle_run(btc, DAY - timedelta(minutes=5 * (i + 1)), workers)
        paper_reset()

        # Series 1: every cycle goes through all 7 stages (the 00:30 OPEN_LONG, flattened after each).
        full: list[tuple[float, Any]] = []
        sends: list[tuple[float, float, Any]] = []
        for _ in range(n):
            seconds, row, t0 = cycle_run_timed(btc, OPEN_AT, workers)
            full.append((seconds, row))
            sends.append((t0, seconds, row))
            paper_reset()
        # Series 2: consecutive 5-minute cycles as they come (no signal, HOLD, trades...).
        mixed = [cycle_run(btc, DAY + timedelta(minutes=5 * (i + 1)), workers) for i in range(n)]
        paper_reset()
        load_after = infra.load()

        hop_counts = [7] + [len(stages_run(c)) for _, c in mixed]
        floor = floors(hop_counts, workers, runs=max(30, n // 2))
        snap = snapshot_build_time()
    finally:
        workers.stop_all()

    f7 = floor[7]
    print(f"  floor, a bare chain of 7 trivial tasks on the same queues (okx>llm>llm>llm>default>orders>default), "
          f"{len(f7)} runs: p50 {ms(statistics.median(f7))}, p99 {ms(pct(f7, 0.99))}")
    print(f"  snapshot_build (synthetic feed, feed reads included, this process): median {ms(snap)}")

    full_s = [s for s, _ in full]
    outcomes = Counter(c.outcome for _, c in full)
    seven = [s for s, c in full if len(stages_run(c)) == 7]
    p50 = statistics.median(full_s)
    print(f"  full cycles (all 7 stages: open, risk, order, journal), {len(full_s)} cycles {dict(outcomes)}: "
          f"p50 {ms(p50)}, p99 {ms(pct(full_s, 0.99))}, min {ms(min(full_s))}, max {ms(max(full_s))}; "
          f"ratio p50/floor p50 = {p50 / statistics.median(f7):.1f}x")
    print(f"    stages: {stage_medians([c for _, c in full])}")
    print(f"    time split: {time_split(sends)}")
    print("    per stage:")
    for line in stage_breakdown([c for _, c in full], statistics.median(f7) / 7):
        print(line)
    target = 2 * statistics.median(f7) + snap
    print(f"    target p50 <= 2 x floor + snapshot = {ms(target)}: "
          f"{'MET' if p50 <= target else 'NOT MET'} (p50 {ms(p50)}; {len(seven)} of {len(full)} ran all 7 stages)")

    mixed_s = [s for s, _ in mixed]
    print(f"  consecutive 5-minute cycles from {DAY:%Y-%m-%d %H:%M}, {len(mixed_s)} cycles "
          f"{dict(Counter(c.outcome for _, c in mixed))}: p50 {ms(statistics.median(mixed_s))}, "
          f"p99 {ms(pct(mixed_s, 0.99))}")
    by_hops: dict[int, list[float]] = {}
    for s, c in mixed:
        by_hops.setdefault(len(stages_run(c)), []).append(s)
    for hops, values in sorted(by_hops.items()):
        fl = statistics.median(floor[hops])
        p = statistics.median(values)
        print(f"    {hops} stages ({len(values)} cycles): p50 {ms(p)}, p99 {ms(pct(values, 0.99))}; floor({hops} hops) "
              f"p50 {ms(fl)}; ratio {p / fl:.1f}x; target 2 x floor + snapshot = {ms(2 * fl + snap)}: "
              f"{'MET' if p <= 2 * fl + snap else 'NOT MET'}")
    print(f"    stages: {stage_medians([c for _, c in mixed])}")
    print(f"  ({load_after} after the cycles)")


# --- 300 instruments on one cycle -----------------------------------------------------------


def backfill(ids: list[str], as_of: datetime) -> float:
    """Stored candles for every instrument: the last window+1 closed bars per timeframe, via candles_upsert."""
    from django.conf import settings

    from market.feeds.synthetic import SyntheticFeed
    from market.models import Instrument
    from market.services import candles_upsert, instruments_sync

    window = int(settings.INDICATOR_HISTORY_CANDLES)
    start = as_of - timedelta(hours=4 * (window + 3))
    t = time.perf_counter()
    for offset in range(0, len(ids), 25):
        chunk = ids[offset:offset + 25]
        feed = SyntheticFeed(seed=settings.SYNTHETIC_SEED, start=start, end=as_of, inst_ids=tuple(chunk), clock=as_of)
        instruments_sync(feed=feed, enable=chunk)
        for inst in Instrument.objects.filter(inst_id__in=chunk):
            for tf in settings.TIMEFRAMES:
                candles_upsert(instrument=inst, timeframe=tf, bars=feed.candles(inst.inst_id, tf, limit=window + 1))
    return time.perf_counter() - t


def bench_instruments300() -> None:
    """N instruments (300) on one cycle through real workers: the time for all N cycles to finish."""
    why = infra.worker_sections_missing()
    if why:
        print("instruments300: skipped: " + why)
        return
    from django.conf import settings

    from journal.models import TERMINAL_CYCLE_STATES, Cycle
    from market.models import Candle
    from tradebot.celery import app

    n = infra.OPTIONS.instruments
    conc = infra.OPTIONS.concurrency
    pool = "solo" if conc <= 1 else "prefork"
    ids = [f"S{i:03d}-USDT-SWAP" for i in range(1, n + 1)]
    as_of = OPEN_AT
    print(f"instruments300: {n} synthetic instruments, one cycle each at {as_of:%Y-%m-%d %H:%M}, rules brain, paper "
          f"exchange; 4 workers (one per queue), pool {pool} x {max(conc, 1)}; PostgreSQL {infra.ENV.db_name}")
    took = backfill(ids, as_of)
    rows = Candle.objects.filter(instrument__inst_id__in=ids).count()
    print(f"  backfill (untimed): {rows} candles ({', '.join(settings.TIMEFRAMES)}, "
          f"{settings.INDICATOR_HISTORY_CANDLES + 1} per timeframe) in {took:.1f} s")
    print("  COLLECTING reads: the okx worker's feed = the stored candles (ReplayFeed.from_db, loaded once at worker "
          "start); per cycle it upserts the 10 newest bars per timeframe into PostgreSQL (candles_sync) and builds "
          "the snapshot (1,000 bars x 3 timeframes, all indicators) from that feed. Live, the feed is OKX REST.")
    t = time.perf_counter()
    workers = infra.workers_start(feed="db", pool=pool, concurrency=conc, instruments=ids)
    print(f"  workers ready in {time.perf_counter() - t:.1f} s; {infra.load()}")
    try:
        from tradebot.tasks import cycle_start  # noqa: F401  (the task beat sends, by name below)

        t0 = time.time()
        for inst_id in ids:  # what one beat tick sends: one cycle_start per instrument, on `default`
            app.signature("tradebot.tasks.cycle_start", args=[inst_id], kwargs={"as_of": as_of.isoformat()}) \
                .set(queue="default").apply_async()
        sent = time.time() - t0
        deadline = time.monotonic() + 900
        done = 0
        while time.monotonic() < deadline:
            done = Cycle.objects.filter(instrument__inst_id__in=ids, as_of=as_of, state__in=TERMINAL_CYCLE_STATES).count()
            if done >= n:
                break
            time.sleep(0.25)
        load_after = infra.load()
        cycles = list(Cycle.objects.filter(instrument__inst_id__in=ids, as_of=as_of))
    finally:
        workers.stop_all()
    ended = [c.ended_at.timestamp() for c in cycles if c.ended_at]
    total = max(ended) - t0 if ended else float("nan")
    print(f"  {done}/{n} cycles finished; all done {total:.1f} s after the first send (sending took {sent:.2f} s); "
          f"target <= 60 s: {'MET' if done >= n and total <= 60 else 'NOT MET'}")
    print(f"  outcomes {dict(Counter(c.outcome for c in cycles))}")
    spans = sorted(c.ended_at.timestamp() - c.started_at.timestamp() for c in cycles if c.ended_at)
    if spans:
        print(f"  per cycle, open to end (queueing included): p50 {spans[len(spans) // 2]:.1f} s, max {spans[-1]:.1f} s")
    print(f"  stages: {stage_medians(cycles)}")
    print(f"  ({load_after} at the end)")
