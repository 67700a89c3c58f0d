"""The `llm_load` section (issue 20): N instruments on real workers against a model with realistic latency.

Workers as `make run` starts them: one per queue on Redis and PostgreSQL, the
llm one on a threads pool of LLM_WORKER_THREADS (8), the orders one (EXECUTING/
CONFIRMING, the account sync) prefork with ORDERS_WORKER_CONCURRENCY (2)
processes, the others prefork with `--concurrency` processes (1, runbot's
default; 2 is compose's okx and default).
The brain is Claude against the local Messages API server of the tests
(`HonestModel` with REALISTIC_LATENCY: screener p50 1 s, analyst p50 20 s with
5% at 60 s, honest usage), screener pass rate 0.2, analyst opening 15% of flat
calls; paper exchange; the okx worker's market is the stored candles of N
synthetic instruments (bench/worker_app.py, BENCH_FEED=db).

Every `--interval` seconds (300 = the real cycle) the bench sends what beat
sends: one cycle_start per instrument (virtual times 5 minutes apart) and,
every ACCOUNT_SYNC_SECONDS scaled the same way, an account sync. `--interval`
below 300 compresses time: the model's latencies are multiplied by
interval/300 (so the llm queue is as loaded relative to the cycle as it is for
real) while the stages' CPU work is not: a compressed run is harder on the
okx/default workers than the real one.

Figures: cycles that ended within their interval and the ones SKIPPED because
the previous one was still running (target 0); approved order to exchange call
(the risk gate's end to the Order row written just before the exchange call;
target p99 <= 2 s while the llm queue is saturated); account sync lateness
(its start minus its send; target never > 5 s); the llm threads' load.

    .venv/bin/python bench/run.py llm_load                                   # 300 instruments, 3 ticks of 300 s
    .venv/bin/python bench/run.py llm_load --instruments 60 --interval 60 --ticks 3
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

from bench import infra
from bench.pipeline_bench import OPEN_AT, backfill


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def bench_llm_load() -> None:
    why = infra.worker_sections_missing()
    if why:
        print("llm_load: skipped: " + why)
        return
    from django.conf import settings

    from bench.worker_app import SYNC_STARTS_KEY
    from execution.models import Order
    from journal.models import TERMINAL_CYCLE_STATES, Cycle, CycleState
    from tests.conftest import TEST_KEY
    from tests.fakes.anthropic_server import REALISTIC_LATENCY, FakeAnthropic, HonestModel
    from tests.tradebot.workers import Workers
    from tradebot.celery import app

    n = infra.OPTIONS.instruments
    ticks = max(1, infra.OPTIONS.load_cycles)
    interval = infra.OPTIONS.interval
    scale = interval / 300.0
    conc = max(1, infra.OPTIONS.concurrency)
    threads = int(settings.LLM_WORKER_THREADS)
    orders_conc = int(settings.ORDERS_WORKER_CONCURRENCY)
    sync_every = settings.ACCOUNT_SYNC_SECONDS * scale
    ids = [f"S{i:03d}-USDT-SWAP" for i in range(1, n + 1)]
    first = OPEN_AT
    last = first + timedelta(minutes=5 * (ticks - 1))
    print(f"llm_load: {n} instruments, {ticks} ticks every {interval:g} s (virtual 5 minutes; "
          f"model latency x{scale:g}),"
          f" workers okx/default/reflection prefork x{conc}, orders prefork x{orders_conc}, llm threads x{threads}; "
          f"Claude brain on the local server "
          f"(screener p50 {1 * scale:g} s, analyst p50 {20 * scale:g} s, 5% at {60 * scale:g} s); account sync every "
          f"{sync_every:g} s; PostgreSQL {infra.ENV.db_name}; {infra.load()}")
    took = backfill(ids, last)
    print(f"  backfill (untimed): {n} instruments' candles up to {last:%H:%M} in {took:.1f} s")
    model = HonestModel(pass_rate=0.2, open_rate=0.15, latency=REALISTIC_LATENCY, time_scale=scale)
    with FakeAnthropic() as server:
        server.handler(model.handle)
        tmp = Path(tempfile.mkdtemp(prefix="workers-", dir=infra.ENV.tmp))
        (tmp / "instruments.txt").write_text("\n".join(ids))
        extra = {"BENCH_FEED": "db", "BENCH_INSTRUMENTS_FILE": str(tmp / "instruments.txt"),
                 "NUMBA_CACHE_DIR": os.environ["NUMBA_CACHE_DIR"], "CELERY_VISIBILITY_TIMEOUT": "3600",
                 "BRAIN": "claude", "ANTHROPIC_API_KEY": TEST_KEY, "ANTHROPIC_BASE_URL": server.url,
                 "LLM_DAILY_BUDGET_USD": "100000", "DECISION_CYCLE_SECONDS": str(max(10, int(interval)))}
        workers = Workers(redis_url=infra.OPTIONS.redis_url, tmp=tmp, app_module="bench.worker_app",
                          prefix=f"tbload{os.getpid()}:", pool="prefork", concurrency=conc,
                          pools={"llm": ("threads", threads), "orders": ("prefork", orders_conc)},
                          visibility_timeout=3600, extra_env=extra,
                          ready_timeout=300.0)
        t = time.perf_counter()
        workers.start_all()
        print(f"  workers ready in {time.perf_counter() - t:.1f} s; {infra.load()}", flush=True)
        sync_sent: list[float] = []
        tick_sent: list[float] = []
        try:
            from tradebot.tasks import cycle_start  # noqa: F401

            t0 = time.time()
            next_sync = t0
            for k in range(ticks):
                due = t0 + k * interval
                while time.time() < due:
                    if time.time() >= next_sync:
                        sync_sent.append(time.time())
                        app.send_task("tradebot.tasks.account_sync", queue="orders")
                        next_sync += sync_every
                    time.sleep(0.05)
                tick_sent.append(time.time())
                as_of = first + timedelta(minutes=5 * k)
                for inst_id in ids:  # one beat tick: a cycle_start per instrument on `default`
                    app.signature("tradebot.tasks.cycle_start", args=[inst_id],
                                  kwargs={"as_of": as_of.isoformat()}).set(queue="default").apply_async()
            # The last tick's interval, syncs going on, then what is still running may finish.
            end_at = t0 + ticks * interval
            while time.time() < end_at:
                if time.time() >= next_sync:
                    sync_sent.append(time.time())
                    app.send_task("tradebot.tasks.account_sync", queue="orders")
                    next_sync += sync_every
                time.sleep(0.05)
            deadline = time.monotonic() + 120 * max(scale, 0.2)
            while time.monotonic() < deadline and Cycle.objects.filter(
                    instrument__inst_id__in=ids).exclude(state__in=TERMINAL_CYCLE_STATES).exists():
                time.sleep(0.5)
            starts = [float(v) for v in workers.redis().lrange(workers.prefix + SYNC_STARTS_KEY, 0, -1)]
            load_after = infra.load()
            cycles = list(Cycle.objects.filter(instrument__inst_id__in=ids).select_related("instrument"))
            orders = {o.cycle_id: o for o in Order.objects.filter(cycle__in=[c.pk for c in cycles])}
        finally:
            workers.stop_all()
    _report(cycles=cycles, orders=orders, tick_sent=tick_sent, interval=interval, first=first, ticks=ticks, n=n,
            sync_sent=sync_sent, sync_started=starts, model=model, threads=threads, load_after=load_after,
            state_skipped=CycleState.SKIPPED)


def _report(*, cycles, orders, tick_sent, interval, first, ticks, n,  # noqa: ANN001
            sync_sent, sync_started, model, threads,
            load_after, state_skipped) -> None:
    by_tick: Counter[int] = Counter()
    within, late, skipped_overrun, unfinished = 0, [], 0, 0
    for c in cycles:
        k = int((c.as_of - first).total_seconds() // 300)
        by_tick[k] += 1
        if c.state == state_skipped:
            if "running" in (c.reason or "") or "still" in (c.reason or ""):
                skipped_overrun += 1
            continue
        if not c.ended_at:
            unfinished += 1
            continue
        took = c.ended_at.timestamp() - tick_sent[k] if k < len(tick_sent) else float("nan")
        if took <= interval:
            within += 1
        else:
            late.append(took)
    print(f"  cycles: {len(cycles)} of {n * ticks} opened; ended within their interval: {within}; ended after it: "
          f"{len(late)}{f' (up to {max(late):.0f} s)' if late else ''}; SKIPPED because the previous one still ran: "
          f"{skipped_overrun} (target 0); unfinished: {unfinished}")
    print(f"  outcomes {dict(Counter(str(c.outcome) for c in cycles))}")
    waits = []
    for cycle_id, order in orders.items():
        cycle = next(c for c in cycles if c.pk == cycle_id)
        risk = (cycle.stage_times or {}).get("RISK_CHECK") or {}
        if "started" in risk and "duration_ms" in risk:
            approved = datetime.fromisoformat(risk["started"]).timestamp() + risk["duration_ms"] / 1000
            waits.append(order.created_at.timestamp() - approved)
    if waits:
        print(f"  approved order to exchange call: {len(waits)} orders, p50 {statistics.median(waits) * 1000:.0f} ms, "
              f"p99 {_pct(waits, 0.99) * 1000:.0f} ms, max {max(waits) * 1000:.0f} ms (target p99 <= 2 s)")
    else:
        print("  approved order to exchange call: no order in this run")
    lateness = [s - sent for s, sent in zip(sorted(sync_started), sync_sent)]
    if lateness:
        print(f"  account sync: {len(sync_started)} of {len(sync_sent)} sent started; lateness p50 "
              f"{statistics.median(lateness) * 1000:.0f} ms, max {max(lateness) * 1000:.0f} ms (target never > 5 s)")
    calls = model.calls
    busy = sum(c.latency_s for c in calls)
    span = (max(tick_sent) + interval - min(tick_sent)) if tick_sent else 1
    by_purpose = Counter(c.purpose for c in calls)
    print(f"  model calls {dict(by_purpose)}; llm threads busy {busy / span:.1f} of {threads} on average "
          f"(model time / wall time)")
    print(f"  ({load_after} at the end)")
