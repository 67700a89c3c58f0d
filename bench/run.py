#!/usr/bin/env python
"""`make bench`: performance figures, printed (never asserted in unit tests).

    .venv/bin/python bench/run.py            # every section
    .venv/bin/python bench/run.py snapshot   # one or more sections by name
    .venv/bin/python bench/run.py --list
    .venv/bin/python bench/run.py replay --days 30             # a shorter replay window
    .venv/bin/python bench/run.py replay --profile              # with a cProfile of the replay
    .venv/bin/python bench/run.py replay --sqlite               # the replay on SQLite only
    .venv/bin/python bench/run.py pipeline --cycles 100         # cycles per series (>= 50)
    .venv/bin/python bench/run.py instruments300 --instruments 300 --concurrency 1
    .venv/bin/python bench/run.py llm_cost [--days 3 --wake-rate 0.25]      # LLM cost per instrument-day (issue 20)
    .venv/bin/python bench/run.py llm_load [--instruments 300 --interval 300 --ticks 3 --concurrency 1]
    .venv/bin/python bench/run.py streams --messages 300000 --fills 30   # stream throughput, fill -> close
    .venv/bin/python bench/run.py learning --days 60           # replay --learn vs v1 on the last 60 days of 2022
    .venv/bin/python bench/run.py validation                    # one validation, 3 folds x 30 days x 2 instruments
    .venv/bin/python bench/run.py search --trials 10                # trials per minute, one vs two workers
    .venv/bin/python bench/run.py --vs-freqtrade [--sqlite]        # replay vs a freqtrade backtest (issue 21)
    .venv/bin/python bench/run.py grown_journal   # a replay beside ~80 earlier runs' orders and trades (issue 21)

The sections `pipeline` and `instruments300` start real Celery workers (one
per queue) on Redis 127.0.0.1:6379 (REDIS_URL) and a scratch PostgreSQL
database created and dropped by the bench (BENCH_POSTGRES_URL, default
postgres://postgres@127.0.0.1:5432); without either they print why and skip.
`replay` runs on the same scratch database and then, in a child process, on a
scratch SQLite file (the embedded default a user's `manage.py replay` writes
to); on SQLite alone without PostgreSQL or with `--sqlite`. See bench/infra.py,
bench/pipeline_bench.py, bench/replay_bench.py.

Sections register themselves with `@section("name")`; each prints its own
figures. Add a section by writing a function here (or in a module imported
below) that takes no arguments.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tradebot.settings")

SECTIONS: dict[str, Callable[[], None]] = {}


def section(name: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    def register(fn: Callable[[], None]) -> Callable[[], None]:
        SECTIONS[name] = fn
        return fn

    return register


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# --- snapshot ----------------------------------------------------------------
_TFS = (("15m", "okx_BTC-USDT-SWAP_15m.csv.gz"), ("1H", "okx_BTC-USDT-SWAP_1H.csv"), ("4H", "okx_BTC-USDT-SWAP_4H.csv"))


def _candle_frames():
    """Full candle histories per timeframe: the real OKX data when present, else the synthetic market."""
    import pandas as pd

    if SHARED.is_dir():
        frames = {}
        for tf, name in _TFS:
            raw = pd.read_csv(SHARED / name)
            df = raw[["open", "high", "low", "close", "volume"]].astype(float)
            df.index = pd.DatetimeIndex(pd.to_datetime(raw["ts"], unit="ms", utc=True), name="ts")
            frames[tf] = df
        return "real OKX BTC-USDT-SWAP (../shared/data)", frames
    from market.feeds.synthetic import SyntheticFeed

    end = datetime(2024, 12, 31, tzinfo=UTC)
    feed = SyntheticFeed(seed=7, start=end - timedelta(days=400), end=end, clock=end)
    return "synthetic market (no ../shared/data)", {tf: feed.frame("BTC-USDT-SWAP", tf, limit=10**6) for tf, _ in _TFS}


def _cold_first_call() -> str:
    """The first snapshot in a fresh process with an empty numba cache (the compile), timed there."""
    code = (
        "import os,sys,time,django;sys.path.insert(0,%r);django.setup();"
        "import numpy as np,pandas as pd;from datetime import timedelta;"
        "from market.snapshot import snapshot_from_frames;"
        "idx=pd.date_range('2024-01-01',periods=1000,freq='1h',tz='UTC');"
        "c=100+np.cumsum(np.random.default_rng(1).normal(0,1,1000));"
        "f=pd.DataFrame({'open':c,'high':c+1,'low':c-1,'close':c,'volume':1.0},index=idx);"
        "t=time.perf_counter();snapshot_from_frames(inst_id='X',as_of=(idx[-1]+timedelta(hours=1)).to_pydatetime(),"
        "source='bench',candles={'1H':f});print(time.perf_counter()-t)"
    ) % str(ROOT)
    with __import__("tempfile").TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        return f"failed: {out.stderr.strip().splitlines()[-1:]}"
    return ms(float(out.stdout.strip().splitlines()[-1]))


@section("snapshot")
def bench_snapshot() -> None:
    import django

    django.setup()
    from django.conf import settings

    from market.snapshot import closed_by, snapshot_from_frames

    window = settings.INDICATOR_HISTORY_CANDLES
    label, full = _candle_frames()
    print(f"snapshot: data = {label}; {len(full)} timeframes x {window} candles, all indicators, regime, S/R, VP")
    print(f"  first call, cold numba compile (fresh process, empty cache): {_cold_first_call()}")

    one_hour = full["1H"].index
    # as-of times spread over the history, each with >= window candles on every timeframe
    start = max(f.index[0] for f in full.values()) + timedelta(hours=4 * (window + 2))
    candidates = one_hour[(one_hour >= start)]
    rng = __import__("numpy").random.default_rng(0)
    picks = sorted(rng.choice(len(candidates), size=min(330, len(candidates)), replace=False))
    as_ofs = [candidates[i].to_pydatetime() + timedelta(hours=1) for i in picks]

    def windows(as_of: datetime) -> dict:
        return {tf: closed_by(f, tf, as_of).iloc[-window:] for tf, f in full.items()}

    prepared = [(as_of, windows(as_of)) for as_of in as_ofs]

    t0 = time.perf_counter()
    snapshot_from_frames(inst_id="BTC-USDT-SWAP", as_of=prepared[0][0], source="bench", candles=prepared[0][1])
    print(f"  first call in this process (numba cache loaded from disk): {ms(time.perf_counter() - t0)}")

    runs = []
    for as_of, frames in prepared[:60]:
        t = time.perf_counter()
        snap = snapshot_from_frames(inst_id="BTC-USDT-SWAP", as_of=as_of, source="bench", candles=frames)
        runs.append(time.perf_counter() - t)
        assert all(v.candles_used == window for v in snap.timeframes.values())
    print(f"  per instrument over {len(runs)} runs: median {ms(statistics.median(runs))}, "
          f"p95 {ms(percentile(runs, 0.95))}, min {ms(min(runs))}, max {ms(max(runs))} (target median <= 40 ms)")

    batch = prepared[:300]
    t = time.perf_counter()
    for i, (as_of, frames) in enumerate(batch):
        snapshot_from_frames(inst_id=f"INST-{i}", as_of=as_of, source="bench", candles=frames)
    total = time.perf_counter() - t
    print(f"  {len(batch)} instruments in one process: {total:.2f} s ({ms(total / len(batch))} each)")

    from market.feeds.synthetic import SyntheticFeed
    from market.snapshot import snapshot_build

    end = datetime(2024, 6, 1, tzinfo=UTC)
    feed = SyntheticFeed(seed=7, start=end - timedelta(days=200), end=end, clock=end)
    snapshot_build(feed=feed, inst_id="BTC-USDT-SWAP")
    feed_runs = []
    for i in range(30):
        feed.set_clock(end - timedelta(minutes=5 * i))
        t = time.perf_counter()
        snapshot_build(feed=feed, inst_id="BTC-USDT-SWAP")
        feed_runs.append(time.perf_counter() - t)
    print(f"  snapshot_build on the synthetic feed (feed reads included), {len(feed_runs)} runs: "
          f"median {ms(statistics.median(feed_runs))}, p95 {ms(percentile(feed_runs, 0.95))}")


# --- dashboard (issue 17): each cockpit page's server time on 100,000 cycles and 5,000 trades ------
from bench.dashboard_bench import bench_dashboard  # noqa: E402

section("dashboard")(bench_dashboard)

# --- pipeline, instruments300, replay (bench/pipeline_bench.py, bench/replay_bench.py) -----
from bench import infra  # noqa: E402
from bench.pipeline_bench import bench_instruments300, bench_pipeline  # noqa: E402
from bench.replay_bench import bench_grown_journal, bench_replay  # noqa: E402

section("pipeline")(bench_pipeline)
section("instruments300")(bench_instruments300)
section("replay")(bench_replay)
section("grown_journal")(bench_grown_journal)

# --- issue 20: LLM cost per instrument-day, the latency-realistic load (bench/llm_cost_bench.py, load_bench.py)
from bench.llm_cost_bench import bench_llm_cost  # noqa: E402
from bench.load_bench import bench_llm_load  # noqa: E402

section("llm_cost")(bench_llm_cost)
section("llm_load")(bench_llm_load)

# --- streams (#19: bench/streams_bench.py) -------------------------------------------------
from bench.streams_bench import bench_streams  # noqa: E402

section("streams")(bench_streams)

# --- learning, validation (issue 15: bench/learning_bench.py) -----------------------------------------
from bench.learning_bench import bench_learning, bench_validation  # noqa: E402

section("learning")(bench_learning)
section("validation")(bench_validation)

# --- search (issue 15: manage.py optimize; bench/search_bench.py) -----------------------------------------------------
from bench.search_bench import bench_search  # noqa: E402

section("search")(bench_search)

# --- vs_freqtrade (issue 21: the replay against a freqtrade backtest of the same candles; bench/freqtrade_bench.py) --
from bench.freqtrade_bench import bench_vs_freqtrade  # noqa: E402

section("vs_freqtrade")(bench_vs_freqtrade)

_VALUE_OPTIONS = {"--days": ("days", float), "--cycles": ("cycles", int), "--instruments": ("instruments", int),
                  "--concurrency": ("concurrency", int), "--interval": ("interval", float),
                  "--ticks": ("load_cycles", int),
                  "--messages": ("messages", int), "--fills": ("fills", int), "--trials": ("trials", int),
                  "--wake-rate": ("wake_rate", float)}


def _options(argv: list[str]) -> list[str]:
    """Strip the options into infra.OPTIONS; return the section names."""
    names: list[str] = []
    args = iter(argv)
    for arg in args:
        key, _, inline = arg.partition("=")
        if key in _VALUE_OPTIONS:
            field, cast = _VALUE_OPTIONS[key]
            raw = inline or next(args, "")
            try:
                setattr(infra.OPTIONS, field, cast(raw))
            except ValueError:
                raise SystemExit(f"{key} needs a number, got {raw!r}") from None
        elif arg == "--profile":
            infra.OPTIONS.profile = True
        elif arg == "--sqlite":
            infra.OPTIONS.sqlite = True
        elif arg == "--vs-freqtrade":  # the section's name as an option: `make bench BENCH_ARGS=--vs-freqtrade`
            names.append("vs_freqtrade")
        elif arg.startswith("-"):
            known = [*_VALUE_OPTIONS, "--profile", "--sqlite", "--vs-freqtrade", "--list"]
            raise SystemExit(f"unknown option {arg}; options: {', '.join(known)}")
        else:
            names.append(arg)
    return names


def main(argv: list[str]) -> int:
    if "--list" in argv:
        print("\n".join(SECTIONS))
        return 0
    names = _options(argv) or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        print(f"unknown section(s): {', '.join(unknown)}; known: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    infra.prepare(names)
    print(f"machine: {infra.cpu_reference()}; {infra.load()}", flush=True)
    try:
        for name in names:
            print(f"== {name} ==", flush=True)
            SECTIONS[name]()
        # Again at the end: the VM's speed can change during a long bench.
        print(f"machine at the end: {infra.cpu_reference()}; {infra.load()}", flush=True)
    finally:
        infra.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
