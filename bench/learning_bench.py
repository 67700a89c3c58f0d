"""The `learning` and `validation` sections (issue 15).

`learning`: learning on against learning off, out of sample. For each of the real OKX 2022 5m files (BTC and
ETH, ../shared/data) the same replay runs twice from v1: once with v1 throughout, once with `--learn`
(tradebot.replay_learn: reviews, deep reflections, validated promotion on the replay's clock). A learning run is
walk-forward by construction (a reflection at t reads trades closed by t, its folds candles before t), so its
figures are out of sample. Printed: PnL, max drawdown, profit factor, trades, versions promoted, rejected and
waiting. The learning run is made twice: with the settings' intervals (a deep reflection every 20 trades or 6 h)
and with reflections every 20 trades only: with ~2.6 trades a day the 6 h timer fires first nearly every time, and
the rules reflection then never sees the 5 trades of one strategy its rules need, so it proposes nothing.
`--days N`: the last N days of each file (the earlier months stay in the feed as the validations' past).

`validation`: one `playbook_candidate_validate` of a candidate (v1 with trend_pullback off) over 3 folds x 30 days
x 2 instruments (both 2022 files in one feed), 5-minute cycles: seconds on the bench's PostgreSQL database, then
the same in a child process on a scratch SQLite file. `--days N`: N days in all instead of 90.
"""
from __future__ import annotations

import copy
import subprocess
import sys
import time
from datetime import timedelta
from decimal import Decimal
from typing import Any

from bench import infra

INSTS = ("BTC-USDT-SWAP", "ETH-USDT-SWAP")
DATA = infra.ROOT.parent / "shared" / "data"
FILES = {inst: DATA / f"okx_{inst}_5m_2022.csv.gz" for inst in INSTS}
CYCLE = timedelta(minutes=5)


def _missing() -> str:
    gone = [str(p) for p in FILES.values() if not p.is_file()]
    return f"real OKX 2022 5m files not present ({', '.join(gone)}): skipped" if gone else ""


def _v1() -> Any:
    """The embedded default v1 (stored when the database has none)."""
    from brain.models import PlaybookVersion
    from brain.playbook import playbook_current

    playbook_current()
    return PlaybookVersion.objects.order_by("version").first()


def _feed(insts: tuple[str, ...]) -> Any:
    from market.feeds.replay import ReplayFeed
    from market.feeds.synthetic import SPECS

    feed = ReplayFeed(instruments=[SPECS[i] for i in insts])
    for inst in insts:
        feed.add_csv(inst, FILES[inst], "5m")
    return feed


def _figures(summary: Any) -> dict[str, Any]:
    d = summary.as_dict()
    return {k: d[k] for k in ("pnl_usd", "max_drawdown_pct", "profit_factor", "closed_trades", "win_rate", "fees_usd")}


def _line(label: str, f: dict[str, Any], seconds: float) -> str:
    pf = "n/a" if f["profit_factor"] is None else f"{f['profit_factor']:.3f}"
    wr = "n/a" if f["win_rate"] is None else f"{f['win_rate']:.1%}"
    return (f"    {label:<13} PnL {Decimal(f['pnl_usd']):>10,.2f} USD  max drawdown {f['max_drawdown_pct']:.2%}  "
            f"profit factor {pf}  {f['closed_trades']} closed trades (win rate {wr}, fees {f['fees_usd']})  "
            f"[{seconds:.0f} s]")


def bench_learning() -> None:
    from django.conf import settings

    from tradebot.replay import replay_run
    from tradebot.replay_learn import ReplayLearner

    print(f"learning on vs off: replay of the real OKX 2022 5m files from v1, rules brain, 5-minute cycles, "
          f"{infra.ENV.database}; {infra.load()}")
    missing = _missing()
    if missing:
        print(f"  {missing}")
        return
    v1 = _v1()
    default_hours = settings.REFLECTION_INTERVAL_HOURS
    for inst in INSTS:
        feed = _feed((inst,))
        data_start, data_end = feed.data_range(inst)
        start = max(data_start, data_end - timedelta(days=infra.OPTIONS.days)) if infra.OPTIONS.days else data_start
        print(f"  {inst} {start:%Y-%m-%d} .. {data_end:%Y-%m-%d} ({(data_end - start).days} days)", flush=True)
        t = time.perf_counter()
        off = replay_run(inst_id=inst, start=start, end=data_end, feed=feed, cycle=CYCLE, playbook_version=v1.version,
                         run_id=f"bench-off-{inst[:3]}-{time.time_ns() % 10**8}")
        off_s = time.perf_counter() - t
        print(_line("v1 throughout", _figures(off), off_s), flush=True)
        for label, hours in (("--learn", settings.REFLECTION_INTERVAL_HOURS), ("--learn 20tr", 10**6)):
            settings.REFLECTION_INTERVAL_HOURS = hours
            learner = ReplayLearner(feed=feed, cycle=CYCLE)
            t = time.perf_counter()
            try:
                on = replay_run(inst_id=inst, start=start, end=data_end, feed=feed, cycle=CYCLE,
                                playbook_version=v1.version, learn=learner,
                                run_id=f"bench-learn-{inst[:3]}-{time.time_ns() % 10**8}")
            finally:
                settings.REFLECTION_INTERVAL_HOURS = default_hours
            on_s = time.perf_counter() - t
            print(_line(label, _figures(on), on_s), flush=True)
            r = learner.report()
            every = (f"every {settings.REFLECTION_INTERVAL_TRADES} trades or {hours} h" if hours == default_hours
                     else f"every {settings.REFLECTION_INTERVAL_TRADES} trades only")
            print(f"      learning ({every}): {r['reviews']} reviews, {r['reflections']} deep reflections, "
                  f"{r['candidates']} candidates: {r['promoted']} promoted, {r['rejected']} rejected, "
                  f"{r['waiting']} waiting; ends on v{r['final_version']}")
            for v in r["versions"][1:]:
                when = f", promoted {v['promoted_at'][:16]}" if v["verdict"] == "promoted" else ""
                print(f"        v{v['version']} {v['proposed_at'][:16]} {v['verdict']}{when}: "
                      f"{', '.join(v['changes'])[:90]}: {v['reason'][:150]}")
    print(f"  ({infra.load()} after)", flush=True)


def bench_validation() -> None:
    from brain.models import PlaybookTrigger
    from brain.playbook import playbook_save
    from tradebot.learning import playbook_candidate_validate

    days = int(infra.OPTIONS.days or 90)
    print(f"validation: one candidate, 3 folds x {days / 3:g} days x {len(INSTS)} instruments, 5-minute cycles, "
          f"rules brain, {infra.ENV.database}; {infra.load()}")
    missing = _missing()
    if missing:
        print(f"  {missing}")
        return
    v1 = _v1()
    data = copy.deepcopy(v1.playbook)
    data["strategy_definitions"]["trend_pullback"]["params"]["enabled"] = False
    candidate = playbook_save(data=data, change_summary="bench: trend_pullback off",
                              triggered_by=PlaybookTrigger.MANUAL)
    feed = _feed(INSTS)
    t = time.perf_counter()
    outcome = playbook_candidate_validate(candidate_id=candidate.pk, feed=feed, inst_ids=list(INSTS), days=days,
                                          folds=3, cycle=CYCLE)
    seconds = time.perf_counter() - t
    folds = outcome.figures.get("folds") or []
    cycles = sum(round((_t(f["to"]) - _t(f["from"])) / CYCLE) for f in folds) * 2 * len(INSTS)
    print(f"  {infra.ENV.database}: {seconds:.1f} s for {len(folds)} folds, ~{cycles:,} replayed cycles "
          f"({seconds / cycles * 1e6 if cycles else float('nan'):.0f} us a cycle); verdict {outcome.verdict}: "
          f"{outcome.reason[:160]}", flush=True)
    for f in folds:
        print(f"    {f['from'][:10]} .. {f['to'][:10]}: v1 {f['active']['trades']} trades {f['active']['pnl']} USD; "
              f"candidate {f['candidate']['trades']} trades {f['candidate']['pnl']} USD")
    if infra.ENV.database == "postgresql":
        args = [sys.executable, str(infra.ROOT / "bench" / "run.py"), "validation", "--sqlite"]
        if infra.OPTIONS.days:
            args += ["--days", str(infra.OPTIONS.days)]
        print("validation again on SQLite (a child process):", flush=True)
        done = subprocess.run(args, cwd=infra.ROOT, check=False, capture_output=True, text=True)
        shown = [line for line in done.stdout.splitlines() if line.startswith("  ")]
        print("\n".join(shown) if shown else done.stdout)
        if done.returncode:
            print(f"  the SQLite validation failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")


def _t(text: str) -> Any:
    from datetime import datetime

    return datetime.fromisoformat(text)
