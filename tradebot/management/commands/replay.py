"""`manage.py replay --inst BTC-USDT-SWAP --from DATE --to DATE [--csv PATH | --synthetic] [--brain rules|claude]
[--cycle 5m] [--json] [--trades-csv PATH] [--learn] [--per-cycle]`.

The text output is the run's summary (one figure a line), then the backtest report of `journal.report`
(trades, results per instrument, strategy, exit reason, day and month, balances, ratios, drawdown, buy-and-hold).
`--learn` (tradebot.replay_learn): post-trade reviews, deep reflections and validated promotion inside the
replay on its own clock; the output then lists each version, when it was promoted and why (`learning` in --json)."""
from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from journal.models import Mode
from journal.report import report_lines, run_report, trades_csv
from market.feeds.base import FeedError
from tradebot.replay import ReplayError, parse_cycle, replay_feed, replay_run


def parse_date(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise CommandError(f"not a date: {text!r} (use YYYY-MM-DD or an ISO time)") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def learning_lines(report: dict[str, Any]) -> list[str]:
    """The learning section: counts, then one line per version (proposed, verdict, promoted, why)."""
    lines = [f"learning: {report['reviews']} post-trade reviews, {report['reflections']} deep reflections, "
             f"{report['candidates']} candidates: {report['promoted']} promoted, {report['rejected']} rejected, "
             f"{report['waiting']} waiting; ends on v{report['final_version']}"]
    for v in report["versions"]:
        promoted = f", promoted {v['promoted_at']}" if v["promoted_at"] and v["verdict"] != "start" else ""
        changes = f" [{', '.join(v['changes'])}]" if v["changes"] else ""
        lines.append(f"  v{v['version']} proposed {v['proposed_at']}: {v['verdict']}{promoted}{changes}: {v['reason']}")
    return lines


class Command(BaseCommand):
    help = "Replay history through the same cycle stages on a virtual clock (paper exchange, no broker)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--inst", required=True)
        parser.add_argument("--from", dest="start", required=True, type=parse_date)
        parser.add_argument("--to", dest="end", required=True, type=parse_date)
        source = parser.add_mutually_exclusive_group()
        source.add_argument("--csv", help="candles CSV (ts,open,high,low,close,volume)")
        source.add_argument("--synthetic", action="store_true", help="the synthetic market (default)")
        parser.add_argument("--brain", choices=("rules", "claude"), default="rules")
        parser.add_argument("--cycle", default="5m", help="cycle length: 5m, 15m, 1H ...")
        parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
        parser.add_argument("--trades-csv", metavar="PATH", help="also write the run's per-trade list to this CSV file")
        parser.add_argument("--learn", action="store_true",
                            help="review trades, reflect and promote validated versions inside the replay "
                                 "(no lookahead)")
        parser.add_argument("--per-cycle", action="store_true",
                            help="run every cycle through the stages (default: the cycles whose result is "
                                 "determined are written in bulk, with the same rows: tradebot/replay_bulk.py)")

    def handle(self, *args: Any, **opts: Any) -> None:
        try:
            cycle = parse_cycle(opts["cycle"])
            feed = replay_feed(inst_id=opts["inst"], csv_path=opts["csv"])
        except (ReplayError, FeedError, OSError, ValueError) as exc:
            # A missing or unreadable candle file is the user's input: a message, not a traceback.
            raise CommandError(str(exc)) from exc
        bar = None
        if not opts["json"] and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=0, unit="cycle", file=sys.stderr)

        def progress(done: int, total: int) -> None:
            if bar is not None:
                bar.total = total
                bar.update(done - bar.n)
            elif not opts["json"]:
                self.stderr.write(f"\r{done}/{total} cycles", ending="")

        learner, snapshots = None, "acted"
        if opts["learn"]:
            from tradebot.replay_learn import ReplayLearner

            learner = ReplayLearner(feed=feed, brain=opts["brain"], cycle=cycle)
            if opts["brain"] == "claude":  # Claude-aware validation re-decides the run's analysed cycles: keep them
                snapshots = "analyzed"
        try:
            summary = replay_run(inst_id=opts["inst"], start=opts["start"], end=opts["end"], feed=feed,
                                 brain=opts["brain"], cycle=cycle, progress=progress, learn=learner,
                                 full_snapshots=snapshots, per_cycle=opts["per_cycle"])
        except (ReplayError, FeedError) as exc:
            raise CommandError(str(exc)) from exc
        finally:
            if bar is not None:
                bar.close()
        data = summary.as_dict()
        if learner is not None:
            data["learning"] = learner.report()
        # Until the last cycle (no `until`): a trade its stop closed at the very end counts, as in the summary.
        report = run_report(mode=Mode.REPLAY, run_id=summary.run_id, since=summary.start)
        if opts["json"]:
            self.stdout.write(json.dumps(data, default=str))
        else:
            self.stderr.write("")
            width = max(len(k) for k in data)
            for key, value in data.items():
                if key != "learning":
                    self.stdout.write(f"{key.ljust(width)}  {value}")
            self.stdout.write("")  # the summary ends at the first blank line; the report follows
            if learner is not None:
                self.stdout.write("\n".join(learning_lines(data["learning"])))
                self.stdout.write("")
            self.stdout.write("\n".join(report_lines(report)))
        if opts["trades_csv"]:
            try:
                with open(opts["trades_csv"], "w", newline="", encoding="utf-8") as out:
                    written = trades_csv(report, out)
            except OSError as exc:
                # The run is in the journal already: say where the CSV could not go, and how to find the run.
                raise CommandError(f"cannot write {opts['trades_csv']}: {exc} (run id {summary.run_id})") from exc
            self.stderr.write(f"{written} trade(s) written to {opts['trades_csv']}")
        if summary.interrupted:
            self.stderr.write(f"interrupted (Ctrl-C): the journal holds the {summary.cycles} cycles counted above, "
                              f"run id {summary.run_id}")
            # 128 + SIGINT, as a shell reports a command Ctrl-C stopped.
            raise SystemExit(130)
