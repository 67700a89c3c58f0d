"""The `vs_freqtrade` section (issue 21): `manage.py replay --brain rules` against a freqtrade backtest
of the same candles, whole-process wall time, alternated three times each in one run.

    .venv/bin/python bench/run.py vs_freqtrade            # SQLite, and PostgreSQL when it answers
    .venv/bin/python bench/run.py --vs-freqtrade --sqlite  # SQLite only
    make bench BENCH_ARGS=--vs-freqtrade

freqtrade 2026.9 is installed once into a scratch folder by ../shared/bench/freqtrade/setup.sh (pip,
then the shared OKX candles converted to its format); `run.sh DIR` is one backtest (BTC-USDT-SWAP 5m,
May-Dec 2022, futures, 7 TA-Lib indicators). Where it cannot be installed (no network, no Python
3.12) the section says why and prints our figures alone. Each program runs as its own process: the
times include starting Python, loading the candles and computing the indicators, for both. Peak
memory is each process tree's largest resident set (wait4). Our replays write to a scratch database
(SQLite file; PostgreSQL: the bench's scratch database). The per-cycle path (`--per-cycle`) runs
once for its cycles per second.

The year (issue 21's second target): a replay of a synthetic year of 5-minute cycles (105,120, the
market generator a user without data runs on) against freqtrade on a run of the same length. The shared
data has no year of 5m candles (the 2022 file holds May-Dec); its OKX BTC-USDT-SWAP 15m file does hold
three years (2023-2025: 105,216 candles), so freqtrade backtests those with `--timeframe 15m` (its cost
goes by candles, not by their length). The 15m candles are converted into the scratch folder once, with
freqtrade's own data handler, as setup.sh converts the 5m ones.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import infra

FT_DIR = infra.ROOT.parent / "shared" / "bench" / "freqtrade"
REAL_FILE = infra.ROOT.parent / "shared" / "data" / "okx_BTC-USDT-SWAP_5m_2022.csv.gz"
YEAR_FILE = infra.ROOT.parent / "shared" / "data" / "okx_BTC-USDT-SWAP_15m.csv.gz"  # 2023-01 to 2026-04
SCRATCH = Path(os.environ.get("FREQTRADE_BENCH_DIR", str(infra.ROOT / "var" / "bench" / "freqtrade")))
ROUNDS = 3


def timed(args: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[float, int, str, str]:
    """(wall seconds, peak RSS of the process tree in MB, stdout, stderr) of one process, to its end.

    The peak is wait4's for that process: its own and its waited-for descendants' largest resident set
    (run.sh's Python is run.sh's child)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        began = time.perf_counter()
        proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - began
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args[:3])} ... exited {proc.returncode}: {stderr.strip()[-1500:]}")
    return wall, int(usage.ru_maxrss // 1024), stdout, stderr


def freqtrade_setup() -> tuple[Path | None, str]:
    """(the scratch folder, "") once freqtrade is installed there; (None, why) when it cannot be."""
    if not (FT_DIR / "setup.sh").is_file():
        return None, f"{FT_DIR}/setup.sh is not here"
    SCRATCH.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    done = subprocess.run(["bash", str(FT_DIR / "setup.sh"), str(SCRATCH)], capture_output=True, text=True, check=False)
    if done.returncode or not (SCRATCH / "venv" / "bin" / "python").exists():
        tail = [line for line in done.stderr.splitlines() if not line.startswith("WARNING: Location")][-5:]
        return None, f"setup.sh failed (exit {done.returncode}): {' | '.join(tail)}"
    print(f"  freqtrade ready in {SCRATCH} (setup.sh: {time.perf_counter() - began:.0f} s, untimed)")
    return SCRATCH, ""


def ours(*, database_url: str, per_cycle: bool = False, year: bool = False) -> dict[str, Any]:
    """One `manage.py replay` process: the 8-month real file, or (`year`) a synthetic year."""
    source = ["--synthetic", "--from", "2025-01-01", "--to", "2026-01-01"] if year else \
        ["--csv", str(REAL_FILE), "--from", "2022-05-01", "--to", "2023-01-01"]
    args = [sys.executable, str(infra.ROOT / "manage.py"), "replay", "--inst", "BTC-USDT-SWAP", *source,
            "--brain", "rules", "--json"]
    if per_cycle:
        args.append("--per-cycle")
    env = {**os.environ, "DATABASE_URL": database_url, "LOG_LEVEL": "ERROR"}
    wall, peak, out, _ = timed(args, env=env, cwd=infra.ROOT)
    summary = json.loads(out.strip().splitlines()[-1])
    return {"wall": wall, "peak_mb": peak, "cycles": summary["cycles"], "trades": summary["trades"],
            "loop": summary["elapsed_seconds"], "bulk": summary.get("bulk_cycles")}


def theirs(folder: Path) -> dict[str, Any]:
    wall, peak, out, _ = timed(["bash", str(FT_DIR / "run.sh"), str(folder)])
    seconds, trades = out.split()[-2:]
    return {"wall": wall, "peak_mb": peak, "own": float(seconds), "trades": trades}


# freqtrade's 15m candles of 2023-2025, stored as setup.sh stores the 5m ones (run in freqtrade's venv).
_CONVERT_15M = """
import os
from pathlib import Path
import pandas as pd
from freqtrade.data.history.datahandlers import get_datahandler
from freqtrade.enums import CandleType
df = pd.read_csv(Path(os.environ["YEAR_FILE"]))
df["date"] = pd.to_datetime(df["ts"], unit="ms", utc=True)
out = df[["date", "open", "high", "low", "close", "volume"]].copy()
out["volume"] = out["volume"].fillna(0.0)
out = out.astype({c: "float64" for c in ["open", "high", "low", "close", "volume"]})
get_datahandler(Path("user_data/data/okx"), "feather").ohlcv_store("BTC/USDT:USDT", "15m", out, CandleType.FUTURES)
print(len(out))
"""
YEAR_RANGE = "20230101-20260101"  # 105,216 15m candles (freqtrade starts 100 candles later: startup_candle_count)


def theirs_year(folder: Path) -> dict[str, Any]:
    """One freqtrade backtest of the three 15m years, as run.sh runs the 5m one (its own process, offline)."""
    shared = str(FT_DIR.parent.parent / "data")
    if not (folder / "user_data" / "data" / "okx" / "futures" / "BTC_USDT_USDT-15m-futures.feather").is_file():
        subprocess.run([str(folder / "venv" / "bin" / "python"), "-c", _CONVERT_15M], cwd=folder, check=True,
                       env={**os.environ, "YEAR_FILE": str(YEAR_FILE)}, capture_output=True)
    log_path = folder / "run_year.log"
    wall, peak, _, _ = timed(["bash", "-c", f"venv/bin/python ft_offline.py backtesting -c config_futures.json "
                                            f"--strategy BenchStrategy --cache none --fee 0.0005 --timeframe 15m "
                                            f"--timerange {YEAR_RANGE} > {log_path} 2>&1"],
                             env={**os.environ, "SHARED_DATA": shared}, cwd=folder)
    found = re.search(r"BenchStrategy *│ *(\d+)", log_path.read_text())
    if found is None:
        raise ValueError(f"no trade count in {log_path}")
    return {"wall": wall, "peak_mb": peak, "trades": found.group(1)}


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def compare(*, label: str, database_url: str, folder: Path | None, year: bool = False) -> None:
    """Ours and freqtrade alternated ROUNDS times: the 8-month real file, or (`year`) a synthetic year of our
    cycles against freqtrade's three 15m years; medians and the ratio printed."""
    if year and folder is not None and not YEAR_FILE.is_file():
        print(f"  {label}: {YEAR_FILE.name} is not here: our figures alone")
        folder = None
    mine: list[dict[str, Any]] = []
    ft: list[dict[str, Any]] = []
    for k in range(ROUNDS):
        if folder is not None:
            try:
                ft.append(theirs_year(folder) if year else theirs(folder))
            except (RuntimeError, ValueError, subprocess.CalledProcessError) as exc:
                # Installed but not runnable here: ours alone from now on.
                print(f"  freqtrade's run failed ({exc}); our figures alone")
                folder = None
        head = f"freqtrade {ft[-1]['wall']:.2f} s ({ft[-1]['trades']} trades); " if folder is not None else ""
        mine.append(ours(database_url=database_url, year=year))
        print(f"  {label} round {k + 1}: {head}ours {mine[-1]['wall']:.2f} s ({mine[-1]['trades']} trades); "
              f"{infra.load()}", flush=True)
    m = _median(mine, "wall")
    cycles = mine[0]["cycles"]
    print(f"  {label}: ours median {m:.2f} s whole process for {cycles} {'synthetic ' if year else ''}cycles "
          f"({cycles / m:.0f} cycles/s; the loop alone {cycles / _median(mine, 'loop'):.0f} cycles/s, "
          f"{mine[0]['bulk']} written in bulk), peak {max(r['peak_mb'] for r in mine)} MB")
    if ft:
        f = _median(ft, "wall")
        what = f"for the 15m candles of {YEAR_RANGE}" if year else f"({_median(ft, 'own'):.2f} s by run.sh's clock)"
        print(f"  {label}: freqtrade median {f:.2f} s whole process {what}, peak {max(r['peak_mb'] for r in ft)} MB; "
              f"ratio ours/freqtrade {m / f:.2f} (target <= 1.0: {'MET' if m / f <= 1.0 else 'NOT MET'})")


def bench_vs_freqtrade() -> None:
    print(f"vs_freqtrade: BTC-USDT-SWAP 5m May-Dec 2022 ({REAL_FILE.name}), rules brain, paper exchange; "
          f"{ROUNDS} alternated rounds; {infra.load()}")
    if not REAL_FILE.is_file():
        print(f"  the real OKX 2022 file is not here ({REAL_FILE}): skipped")
        return
    folder, why = freqtrade_setup()
    if folder is None:
        print(f"  freqtrade cannot be installed here: {why}; our figures alone")
    assert infra.ENV.tmp is not None
    sqlite_url = f"sqlite:///{infra.ENV.tmp / 'vs_freqtrade.sqlite3'}"
    env = {**os.environ, "DATABASE_URL": sqlite_url}
    subprocess.run([sys.executable, str(infra.ROOT / "manage.py"), "migrate", "-v0"], env=env, cwd=infra.ROOT, check=True)
    compare(label="SQLite", database_url=sqlite_url, folder=folder)
    slow = ours(database_url=sqlite_url, per_cycle=True)
    print(f"  SQLite --per-cycle (once): {slow['wall']:.2f} s whole process, {slow['cycles'] / slow['wall']:.0f} "
          f"cycles/s (the loop alone {slow['cycles'] / slow['loop']:.0f} cycles/s), peak {slow['peak_mb']} MB; "
          f"{infra.load()}")
    if infra.ENV.database == "postgresql" and infra.ENV.db_name:
        compare(label="PostgreSQL", database_url=os.environ["DATABASE_URL"], folder=folder)
    else:
        print(f"  PostgreSQL: not measured ({infra.ENV.postgres_missing or 'no scratch database'})")
    compare(label="year, SQLite", database_url=sqlite_url, folder=folder, year=True)
