"""`manage.py llm cost [--days N]`: LLM calls, tokens (cache included) and USD per day and purpose,
then the screener's accuracy over the same days (live cycles)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

from django.core.management.base import BaseCommand, CommandParser
from django.db.models import Count, Sum
from django.db.models.functions import TruncDate

from journal.models import LlmCall, Mode
from journal.selectors import screener_accuracy


class Command(BaseCommand):
    help = "LLM cost report"

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        cost = sub.add_parser("cost", help="calls, tokens and USD per day and purpose")
        cost.add_argument("--days", type=int, default=7)

    def handle(self, *args: object, **opts: object) -> None:
        days = max(1, int(opts["days"]))  # type: ignore[arg-type]
        since = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=days - 1)
        rows = (
            LlmCall.objects.filter(created_at__gte=since)
            .annotate(day=TruncDate("created_at", tzinfo=timezone.utc))
            .values("day", "purpose", "provider")
            .annotate(calls=Count("id"), inp=Sum("input_tokens"), out=Sum("output_tokens"), cw=Sum("cache_write_tokens"),
                      cr=Sum("cache_read_tokens"), usd=Sum("cost_usd"))
            .order_by("day", "purpose")
        )
        header = f"{'day':<11} {'purpose':<16} {'provider':<10} {'calls':>5} {'input':>9} {'output':>9} {'cache_w':>9} {'cache_r':>9} {'usd':>12}"
        self.stdout.write(header)
        total = Decimal(0)
        day_totals: dict[str, Decimal] = {}
        for r in rows:
            usd = Decimal(r["usd"] or 0)
            total += usd
            day_totals[str(r["day"])] = day_totals.get(str(r["day"]), Decimal(0)) + usd
            self.stdout.write(f"{str(r['day']):<11} {r['purpose']:<16} {r['provider']:<10} {r['calls']:>5} {r['inp'] or 0:>9} "
                              f"{r['out'] or 0:>9} {r['cw'] or 0:>9} {r['cr'] or 0:>9} {usd:>12.6f}")
        for day, usd in day_totals.items():
            self.stdout.write(f"day {day}: ${usd:.6f}")
        self.stdout.write(f"total over {days} day(s): ${total:.6f}")
        # Is the cheap screener worth it? Passes the analyst acted on, and what it missed when bypassed.
        self.stdout.write(f"screener accuracy over {days} day(s) (live):")
        for line in screener_accuracy(mode=Mode.LIVE, since=since).lines():
            self.stdout.write(f"  {line}")
