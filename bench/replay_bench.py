"""The `replay` section: `tradebot.replay.replay_run` for one instrument, 5-minute cycles, rules brain, journal written.

Robust to the replay loop's signature (another engineer is optimising it): it
passes only the keyword arguments `replay_run` accepts and says which required
ones it could not fill.
"""
from __future__ import annotations

import cProfile
import inspect
import io
import pstats
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench import infra

INST = "BTC-USDT-SWAP"
REAL_FILE = infra.ROOT.parent / "shared" / "data" / "okx_BTC-USDT-SWAP_5m_2022.csv.gz"
SYNTH_END = datetime(2025, 9, 1, tzinfo=UTC)
FREQTRADE_US_PER_CANDLE = 41.0


def first_playbook_version() -> int | None:
    """The first stored playbook (the embedded default): the earlier sections' workers may have
    reflected and promoted another one in this database, and the figures must not depend on that."""
    from brain.models import PlaybookVersion
    from brain.playbook import playbook_current

    playbook_current()  # stores the embedded default (v1) when the database has none yet
    return PlaybookVersion.objects.order_by("version").values_list("version", flat=True).first()


def replay_call(*, feed: Any, start: datetime, end: datetime, label: str) -> tuple[Any, float]:
    from tradebot import replay

    offered = {"inst_id": INST, "start": start, "end": end, "feed": feed, "brain": "rules",
               "cycle": timedelta(minutes=5), "run_id": f"bench-{label}-{uuid.uuid4().hex[:8]}",
               "playbook_version": first_playbook_version()}
    params = inspect.signature(replay.replay_run).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in offered.items() if takes_any or k in params}
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty
               and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n not in kwargs]
    if missing:
        raise TypeError(f"replay_run now requires {missing}, which the bench does not know how to fill")
    t = time.perf_counter()
    summary = replay.replay_run(**kwargs)
    return summary, time.perf_counter() - t


def report(label: str, summary: Any, wall: float) -> None:
    cycles = int(getattr(summary, "cycles", 0) or 0)
    inner = getattr(summary, "elapsed_seconds", None)
    outcomes = dict(getattr(summary, "outcomes", {}) or {})
    # Orders are the cycles whose outcome is "traded"; trades are the journal's Trade rows (read after the clock stopped).
    as_dict = getattr(summary, "as_dict", None)
    trades = as_dict()["trades"] if callable(as_dict) else getattr(summary, "trades", None)
    per = wall / cycles * 1e6 if cycles else float("nan")
    start, end = getattr(summary, "start", None), getattr(summary, "end", None)
    span = f"{start:%Y-%m-%d} .. {end:%Y-%m-%d}" if start and end else ""
    print(f"  {label} {span}: {cycles} cycles in {wall:.1f} s (replay_run's own clock: "
          f"{inner if inner is None else f'{inner:.1f} s'}) = {cycles / wall:.0f} cycles/s, {per:.0f} us per cycle "
          f"({per / FREQTRADE_US_PER_CANDLE:.1f}x freqtrade's ~41 us per candle)")
    year = per * 105_120 / 1e6
    print(f"    a year of 5-minute cycles (105,120) at this rate: {year:.1f} s; target <= 30 s: "
          f"{'MET' if year <= 30 else 'NOT MET'}; outcomes {outcomes}" + (f"; trades {trades}" if trades is not None else ""))


def profiled(fn: Any) -> Any:
    """Run fn under cProfile when --profile was given; print where the time goes."""
    if not infra.OPTIONS.profile:
        return fn()
    prof = cProfile.Profile()
    result = prof.runcall(fn)
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out).sort_stats("cumulative")
    stats.print_stats(30)
    print("\n".join(out.getvalue().splitlines()[:60]))
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(20)
    print("\n".join(out.getvalue().splitlines()[:40]))
    return result


def bench_replay() -> None:
    from django.conf import settings

    from market.feeds.synthetic import SyntheticFeed

    days = infra.OPTIONS.days
    window = int(settings.INDICATOR_HISTORY_CANDLES)
    span = timedelta(days=days if days else 365)
    start = SYNTH_END - span
    print(f"replay: {INST}, 5-minute cycles, rules brain, paper exchange, journal written to "
          f"{infra.ENV.database} {infra.ENV.db_name or ''}; {infra.load()}")
    t = time.perf_counter()
    # History before the first cycle so the 4H EMA200 has converged from the first cycle on (untimed).
    feed = SyntheticFeed(seed=settings.SYNTHETIC_SEED, start=start - timedelta(hours=4 * (window + 3)),
                         end=SYNTH_END, inst_ids=(INST,), clock=SYNTH_END)
    print(f"  synthetic feed generated in {time.perf_counter() - t:.1f} s (untimed)")
    summary, wall = profiled(lambda: replay_call(feed=feed, start=start, end=SYNTH_END, label="synthetic"))
    report(f"synthetic, {span.days} days", summary, wall)

    if not REAL_FILE.is_file():
        print(f"  real OKX 2022 file not present ({REAL_FILE}): skipped")
        return
    from market.feeds.replay import ReplayFeed

    real = ReplayFeed.from_csv(REAL_FILE, inst_id=INST)
    data_start, data_end = real.data_range(INST)
    real_start = max(data_start, data_end - span) if days else data_start
    summary, wall = replay_call(feed=real, start=real_start, end=data_end, label="okx2022")
    report(f"real OKX 5m {Path(REAL_FILE).name}, {(data_end - real_start).days} days", summary, wall)
    print(f"  ({infra.load()} after)", flush=True)
    if infra.ENV.database == "postgresql":
        on_sqlite()


def on_sqlite() -> None:
    """The same runs on a scratch SQLite file, in a child process: the database is chosen once per
    process, before Django starts (bench/infra.py)."""
    args = [sys.executable, str(infra.ROOT / "bench" / "run.py"), "replay", "--sqlite"]
    if infra.OPTIONS.days:
        args += ["--days", str(infra.OPTIONS.days)]
    print("replay again on SQLite (the embedded default; a child process):", flush=True)
    done = subprocess.run(args, cwd=infra.ROOT, check=False, capture_output=True, text=True)
    lines = done.stdout.splitlines()
    # The child's own header lines (its database, its machine line) are left out; its figures are kept.
    shown = [line for line in lines if line.startswith("  ")]
    print("\n".join(shown) if shown else done.stdout)
    if done.returncode:
        print(f"  the SQLite replay failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")


# --- grown_journal: a replay beside many earlier runs' orders and trades ---------------------------------------------
GROWN_COPIES = 80  # about what 80 two-month replays (validation folds, search trials) leave in the journal


def _replay_process(database_url: str) -> dict[str, Any]:
    """One `manage.py replay` of two months of synthetic cycles, as its own process; its summary."""
    import json
    import os

    args = [sys.executable, str(infra.ROOT / "manage.py"), "replay", "--inst", INST, "--synthetic",
            "--from", "2025-06-01", "--to", "2025-08-01", "--brain", "rules", "--json"]
    done = subprocess.run(args, cwd=infra.ROOT, check=True, capture_output=True, text=True,
                          env={**os.environ, "DATABASE_URL": database_url, "LOG_LEVEL": "ERROR"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def _copy_runs(path: Path, copies: int) -> tuple[int, int]:
    """The journal's orders and trades copied `copies` times under other run ids (what as many earlier
    replays of the same window would have left); (orders, trades) in the table afterwards."""
    import sqlite3

    con = sqlite3.connect(path)
    try:
        for table in ("execution_order", "journal_trade"):
            columns = [row[1] for row in con.execute(f"PRAGMA table_info({table})") if row[1] != "id"]
            originals = con.execute(f"SELECT max(id) FROM {table}").fetchone()[0] or 0
            for k in range(copies):
                picked = ", ".join(f"client_order_id || '-{k}'" if c == "client_order_id" else
                                   f"run_id || '-copy{k}'" if c == "run_id" else c for c in columns)
                con.execute(f"INSERT INTO {table} ({', '.join(columns)}) SELECT {picked} FROM {table} "
                            f"WHERE id <= ?", (originals,))
        con.commit()
        return (con.execute("SELECT count(*) FROM execution_order").fetchone()[0],
                con.execute("SELECT count(*) FROM journal_trade").fetchone()[0])
    finally:
        con.close()


def bench_grown_journal() -> None:
    """A two-month replay in an empty journal, then in one holding ~80 earlier runs' orders and trades.

    Validation and the parameter search run many replays into one database; a replay's reads of its
    own orders and trades must not slow down with the others' (they did, ~3x at this size, before
    the run indexes of journal/0007 and execution/0004). SQLite (the embedded default), processes of
    their own; the copies are made by SQL, not by 80 replays, to keep the section short."""
    assert infra.ENV.tmp is not None
    path = infra.ENV.tmp / "grown_journal.sqlite3"
    url = f"sqlite:///{path}"
    import os

    subprocess.run([sys.executable, str(infra.ROOT / "manage.py"), "migrate", "-v0"], cwd=infra.ROOT, check=True,
                   env={**os.environ, "DATABASE_URL": url})
    print(f"grown_journal: {INST}, two months of synthetic 5-minute cycles, rules brain, SQLite; {infra.load()}")
    first = _replay_process(url)
    print(f"  empty journal: {first['elapsed_seconds']:.2f} s for {first['cycles']} cycles ({first['trades']} trades)")
    orders, trades = _copy_runs(path, GROWN_COPIES)
    again = _replay_process(url)
    print(f"  beside {GROWN_COPIES} earlier runs' rows ({orders} orders, {trades} trades): "
          f"{again['elapsed_seconds']:.2f} s (x{again['elapsed_seconds'] / first['elapsed_seconds']:.2f}); "
          f"{infra.load()}")
