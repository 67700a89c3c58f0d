"""`manage.py brain decide --snapshot FILE.json [--brain rules|claude] [--json]`.

Prints the screen result and the decision a brain makes for a saved
MarketSnapshot (JSON as `MarketSnapshot.to_json()` writes it). No positions,
the paper start balance as the account, the snapshot's time as now.
"""
from __future__ import annotations

import json
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from pydantic import ValidationError

from brain.base import brain_for_settings
from brain.schemas import AccountView, BrainContext
from brain.services import decision_bound
from market.schemas import MarketSnapshot


class Command(BaseCommand):
    help = "Run a brain on a saved market snapshot"

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        decide = sub.add_parser("decide", help="screen and decide for a saved snapshot")
        decide.add_argument("--snapshot", required=True, help="a MarketSnapshot JSON file")
        decide.add_argument("--brain", choices=("rules", "claude"), default=None, help="default: settings.BRAIN")
        decide.add_argument("--json", action="store_true", help="print JSON")

    def handle(self, *args: object, **opts: object) -> None:
        path = Path(str(opts["snapshot"]))
        try:
            snapshot = MarketSnapshot.model_validate_json(path.read_text())
        except OSError as exc:
            raise CommandError(f"cannot read {path}: {exc}") from None
        except ValidationError as exc:
            raise CommandError(f"{path} is not a MarketSnapshot: {exc.error_count()} problem(s): {exc.errors()[0]['msg']}") from None
        equity = settings.PAPER_START_BALANCE
        context = BrainContext(account=AccountView(equity=equity, available_balance=equity, day_start_equity=equity, peak_equity=equity),
                               now=snapshot.ts)
        brain = brain_for_settings(opts.get("brain"))  # type: ignore[arg-type]
        screen = brain.screen(snapshot=snapshot, context=context)
        decision = decision_bound(brain.decide(snapshot=snapshot, context=context), symbol=snapshot.inst_id)
        if opts["json"]:
            self.stdout.write(json.dumps({"brain": brain.name, "screen": screen.model_dump(mode="json"),
                                          "decision": decision.model_dump(mode="json")}, indent=2))
            return
        d = decision.decision
        self.stdout.write(f"brain: {brain.name}  snapshot: {snapshot.inst_id} @ {snapshot.ts:%Y-%m-%d %H:%M} UTC  price {snapshot.price}  regime {snapshot.regime}")
        self.stdout.write(f"screen: signal={screen.signal}  {screen.reason}")
        self.stdout.write(f"decision: {d.action} size_pct={d.size_pct} leverage={d.leverage} stop={d.stop_loss} target={d.take_profit} "
                          f"strategy={decision.strategy_used or '-'} confidence={decision.confidence}")
        self.stdout.write(f"reasoning: {decision.reasoning}")
