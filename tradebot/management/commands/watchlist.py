"""`manage.py watchlist show | import FILE.csv [--replace] [--dry-run] | export [FILE] [--all] | top [--n N]`.

Exit codes of `import`: 0 every row imported, 3 some rows were bad (each
listed, the good ones imported), 2 the file could not be read (nothing changed).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser


class Command(BaseCommand):
    help = "The instruments the bot trades: show, import or export a CSV watchlist, select the top N by volume."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        sub.add_parser("show", help="the enabled instruments (and which the top-N selection enabled)")
        imp = sub.add_parser("import", help="a CSV with an inst_id column (and optionally enabled: true/false)")
        imp.add_argument("file", help="CSV file ('-' reads standard input)")
        imp.add_argument("--replace", action="store_true",
                         help="also turn off every enabled instrument not in the file")
        imp.add_argument("--dry-run", action="store_true", help="report what would change; change nothing")
        exp = sub.add_parser("export", help="the watchlist as CSV (inst_id,enabled)")
        exp.add_argument("file", nargs="?", default="-", help="where to write ('-': standard output)")
        exp.add_argument("--all", action="store_true", help="every instrument stored, not only the enabled ones")
        top = sub.add_parser("top", help="enable the top N USDT swaps by 24-hour volume on OKX now")
        top.add_argument("--n", type=int, default=None, help="how many (default WATCHLIST_TOP_N)")

    def handle(self, *args: Any, **opts: Any) -> None:
        action = opts["action"]
        if action == "show":
            self._show()
        elif action == "import":
            self._import(opts["file"], replace=opts["replace"], dry_run=opts["dry_run"])
        elif action == "export":
            from market.watchlist import watchlist_export

            text = watchlist_export(only_enabled=not opts["all"])
            if opts["file"] == "-":
                self.stdout.write(text, ending="")
            else:
                Path(opts["file"]).write_text(text)
                self.stdout.write(f"wrote {text.count(chr(10)) - 1} instrument(s) to {opts['file']}")
        elif action == "top":
            self._top(opts["n"])

    def _show(self) -> None:
        from market.models import Instrument

        rows = list(Instrument.objects.filter(trading_enabled=True).values_list("inst_id", "auto_selected"))
        self.stdout.write(f"{len(rows)} instrument(s) trade (at most {settings.WATCHLIST_MAX_ENABLED}; "
                          f"top-N selection: {settings.WATCHLIST_TOP_N or 'off'})")
        for inst_id, auto in rows:
            self.stdout.write(f"  {inst_id}{'  (top-N)' if auto else ''}")

    def _import(self, file: str, *, replace: bool, dry_run: bool) -> None:
        from market.watchlist import watchlist_import

        try:
            data = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise CommandError(f"cannot read {file}: {exc}") from exc
        report = watchlist_import(data=data, replace=replace, dry_run=dry_run)
        if report.error:
            self.stderr.write(f"{file}: {report.error}")
            sys.exit(2)
        note = " (dry run: nothing changed)" if dry_run else ""
        self.stdout.write(f"enabled: {len(report.enabled)} {' '.join(report.enabled)}{note}")
        self.stdout.write(f"disabled: {len(report.disabled)} {' '.join(report.disabled)}{note}")
        self.stdout.write(f"unchanged: {len(report.unchanged)}")
        for problem in report.problems:
            self.stderr.write(f"bad row, {problem}")
        if report.problems:
            self.stderr.write(f"{len(report.problems)} bad row(s) left out; the good ones were "
                              f"{'checked' if dry_run else 'imported'}")
            sys.exit(3)

    def _top(self, n: int | None) -> None:
        from market.feeds.base import FeedError
        from tradebot.watchlist import watchlist_top_n_refresh

        n = settings.WATCHLIST_TOP_N if n is None else n
        if n <= 0:
            raise CommandError("give --n N (WATCHLIST_TOP_N is 0: the selection is off)")
        try:
            report = watchlist_top_n_refresh(n=n)
        except (FeedError, ValueError) as exc:
            raise CommandError(f"top-N selection failed: {exc}") from exc
        self.stdout.write(f"top {len(report.ranked)} USDT swaps by 24-hour volume:")
        for inst_id, volume in report.ranked:
            self.stdout.write(f"  {inst_id:<20} {volume:>18,.0f} USDT")
        self.stdout.write(f"enabled: {', '.join(report.enabled) or '-'}; "
                          f"turned off: {', '.join(report.dropped) or '-'}; "
                          f"kept (position open): {', '.join(report.kept) or '-'}")
        if report.over_limit:
            self.stdout.write(f"not enabled, over WATCHLIST_MAX_ENABLED={settings.WATCHLIST_MAX_ENABLED}: "
                              f"{', '.join(report.over_limit)}")
