"""`python manage.py reflect [--deep] [--trade ID] [--no-validate] [--json]`.

Without options: review every closed live trade that has no post-trade review
yet, then run the deep reflection if it is due. `--deep` forces the deep
reflection now (on demand). A candidate playbook it proposes is validated by
replay right away unless `--no-validate`.
"""
from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from brain.reflection import ReflectionError, trade_review_run
from journal.models import Mode, ReflectionLog, ReflectionType, Trade, TradeStatus
from tradebot.learning import ValidationError, learning_run
from tradebot.logging import redact


class Command(BaseCommand):
    help = "Post-trade reviews and the deep reflection (new candidate playbook, validated by replay)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--deep", action="store_true", help="run the deep reflection now, due or not")
        parser.add_argument("--trade", type=int, help="review only this trade")
        parser.add_argument("--brain", choices=["rules", "claude"], help="brain to reflect with (default: settings)")
        parser.add_argument("--no-validate", action="store_true", help="keep a new candidate without replaying it")
        parser.add_argument("--days", type=int, help="validation window in days (default PLAYBOOK_VALIDATION_DAYS)")
        parser.add_argument("--json", action="store_true", help="print one JSON object")

    def handle(self, *args: Any, **opts: Any) -> None:
        reviewed: list[dict[str, Any]] = []
        if opts["trade"]:
            ids = [opts["trade"]]
        else:
            done = set()
            for row in ReflectionLog.objects.filter(reflection_type=ReflectionType.POST_TRADE, status="done").values_list("trade_ids", flat=True):
                done.update(row or [])
            ids = [pk for pk in Trade.objects.filter(mode=Mode.LIVE, run_id="", status=TradeStatus.CLOSED, pnl_usd__isnull=False)
                   .order_by("closed_at", "id").values_list("pk", flat=True) if pk not in done]
        failed: list[str] = []
        for trade_id in ids:
            try:
                row = trade_review_run(trade_id=trade_id, brain_name=opts["brain"])
            except ReflectionError as exc:
                raise CommandError(str(exc)) from exc
            except Exception as exc:  # noqa: BLE001 - the brain failed: the row is FAILED and journaled; go on
                failed.append(f"trade {trade_id}: {redact(f'{type(exc).__name__}: {exc}')}"[:300])
                reviewed.append({"trade_id": trade_id, "log_id": None, "status": "failed", "outcome": None,
                                 "lesson": failed[-1]})
                continue
            review = (row.output_json or {}).get("review") or {}
            reviewed.append({"trade_id": trade_id, "log_id": row.pk, "status": row.status, "outcome": review.get("outcome"),
                             "lesson": review.get("lesson", "")})
        try:
            result = learning_run(force=opts["deep"], brain_name=opts["brain"], validate=not opts["no_validate"],
                                  **({"days": opts["days"]} if opts["days"] else {}))
        except ValidationError as exc:
            raise CommandError(f"validation failed: {exc}") from exc
        result["post_trade_reviews"] = reviewed
        if opts["json"]:
            self.stdout.write(json.dumps(result, default=str))
        else:
            self._print(result, reviewed)
        if failed:
            # After the others and the deep reflection: one brain error does not stop the rest, but the exit says so.
            raise CommandError(f"{len(failed)} post-trade review(s) failed (journaled as trade_review_failed): "
                               + "; ".join(failed))

    def _print(self, result: dict[str, Any], reviewed: list[dict[str, Any]]) -> None:
        self.stdout.write(f"post-trade reviews: {len(reviewed)}")
        for r in reviewed:
            self.stdout.write(f"  trade {r['trade_id']}: {r['outcome']} - {r['lesson']}")
        self.stdout.write(f"deep reflection: {result['reflection']} - {result['reason']}")
        if result["trade_ids"]:
            self.stdout.write(f"  trades: {result['trade_ids']}")
        for d in result["dropped_lessons"]:
            self.stdout.write(f"  dropped lesson {d['lesson'].get('id')!r}: {d['reason']}")
        if result["candidate_version"] is not None:
            self.stdout.write(f"  candidate playbook v{result['candidate_version']}")
        if result["validation"]:
            v = result["validation"]
            self.stdout.write(f"  {'PROMOTED' if v['promoted'] else 'NOT promoted'}: {v['reason']}")
