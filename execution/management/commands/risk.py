"""`python manage.py risk check FILE.json`: the risk gate's verdict on a hypothetical decision.

Prints the verdict as JSON (approved, failed rules with reasons, skipped rules).
Exit 0 approved, 3 rejected, 2 malformed input (with a message saying what is wrong).
Input (seed field names; `size_pct` = notional / equity; `entry_price` is never used):
  {"decision": {...TradeDecision...}, "market": {"last": 65000.0, "mark": 65010.0},
   "account": {"equity": ..., "available_balance": ..., "day_start_equity": ..., "peak_equity": ...},
   "positions": [{"instId": ..., "posSide": "long", "notional_usd": ..., "avgPx": ..., "lever": ...}],
   "bot_state": {"state": "RUNNING", "consecutive_losses": 0}, "returns_1h": {"BTC-USDT-SWAP": [...]}}
"""
from __future__ import annotations

import json
import sys
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from pydantic import ValidationError

from brain.schemas import Decision, TradeDecision
from execution.exchanges.base import AccountState, Position
from execution.models import BotStatus
from execution.risk import BotStateView, MarketRef, risk_check
from execution.validation import to_decimal

EXIT_APPROVED, EXIT_MALFORMED, EXIT_REJECTED = 0, 2, 3


class Malformed(ValueError):
    pass


def _number(value: Any, where: str, *, required: bool = True) -> Any:
    """Numbers (NaN and infinities included: the gate rejects those with a reason) or numeric strings."""
    if value is None:
        if required:
            raise Malformed(f"{where} is required and must be a number")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise Malformed(f"{where} must be a number, got {type(value).__name__}")
    if isinstance(value, str):
        if to_decimal(value) is None and value.strip().lower() not in ("nan", "inf", "-inf", "infinity", "-infinity"):
            raise Malformed(f"{where} must be a number, got {value!r}")
        return float(value)
    return value


def _object(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise Malformed(f"{where} must be a JSON object")
    return data


def parse(payload: Any) -> dict[str, Any]:
    root = _object(payload, "the file")
    for key in ("decision", "market", "account"):
        if key not in root:
            raise Malformed(f'missing "{key}"')
    try:
        decision = Decision(decision=TradeDecision.model_validate(_object(root["decision"], '"decision"')))
    except ValidationError as exc:
        problems = "; ".join(f"decision.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise Malformed(problems) from None
    market_in = _object(root["market"], '"market"')
    ts = None
    if market_in.get("ts"):
        try:
            ts = datetime.fromisoformat(str(market_in["ts"]))
        except ValueError:
            raise Malformed(f"market.ts must be an ISO 8601 time, got {market_in['ts']!r}") from None
    market = MarketRef(last=_number(market_in.get("last"), "market.last", required=False),
                       mark=_number(market_in.get("mark"), "market.mark", required=False), ts=ts)
    acc = _object(root["account"], '"account"')
    account = AccountState(
        equity=_number(acc.get("equity"), "account.equity"),
        available_balance=_number(acc.get("available_balance"), "account.available_balance"),
        day_start_equity=_number(acc.get("day_start_equity"), "account.day_start_equity", required=False),
        peak_equity=_number(acc.get("peak_equity"), "account.peak_equity", required=False),
    )
    positions_in = root.get("positions") or []
    if not isinstance(positions_in, list):
        raise Malformed('"positions" must be a list')
    positions = []
    for i, raw in enumerate(positions_in):
        p = _object(raw, f"positions[{i}]")
        if not isinstance(p.get("instId"), str) or not p["instId"]:
            raise Malformed(f"positions[{i}].instId must be a non-empty string")
        if p.get("posSide") not in ("long", "short"):
            raise Malformed(f'positions[{i}].posSide must be "long" or "short"')
        positions.append(Position(
            inst_id=p["instId"], pos_side=p["posSide"], notional_usd=_number(p.get("notional_usd"), f"positions[{i}].notional_usd"),
            avg_px=_number(p.get("avgPx"), f"positions[{i}].avgPx", required=False) or 0,
            leverage=_number(p.get("lever"), f"positions[{i}].lever", required=False) or 1,
            size=_number(p.get("pos"), f"positions[{i}].pos", required=False) or 0,
        ))
    bot_in = _object(root.get("bot_state") or {"state": "RUNNING"}, '"bot_state"')
    state = bot_in.get("state", "RUNNING")
    if state not in BotStatus.values:
        raise Malformed(f"bot_state.state must be one of {', '.join(BotStatus.values)}, got {state!r}")
    losses = bot_in.get("consecutive_losses", 0)
    if isinstance(losses, bool) or not isinstance(losses, int) or losses < 0:
        raise Malformed("bot_state.consecutive_losses must be a non-negative integer")
    until = None
    if bot_in.get("until"):
        try:
            until = datetime.fromisoformat(str(bot_in["until"]))
        except ValueError:
            raise Malformed(f"bot_state.until must be an ISO 8601 time, got {bot_in['until']!r}") from None
    returns = root.get("returns_1h")
    if returns is not None:
        if not isinstance(returns, dict) or not all(isinstance(v, list) for v in returns.values()):
            raise Malformed('"returns_1h" must be an object of instrument -> list of numbers')
        returns = {k: [_number(x, f"returns_1h.{k}") for x in v] for k, v in returns.items()}
    return {"decision": decision, "market": market, "account": account, "positions": positions,
            "bot": BotStateView(state=state, consecutive_losses=losses, until=until), "returns_1h": returns}


class Command(BaseCommand):
    help = "Check a hypothetical decision against the risk gate: `risk check FILE.json`."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("action", choices=["check"])
        parser.add_argument("file", help="JSON file with decision, market, account, positions, bot_state, returns_1h")

    def handle(self, *args: Any, **options: Any) -> None:
        path = Path(options["file"])
        try:
            payload = json.loads(path.read_text())
            inputs = parse(payload)
        except FileNotFoundError:
            self._malformed(f"{path}: no such file")
        except json.JSONDecodeError as exc:
            self._malformed(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
        except Malformed as exc:
            self._malformed(f"{path}: {exc}")
        verdict = risk_check(**inputs)
        self.stdout.write(json.dumps(verdict.as_json(), indent=2, default=_default))
        sys.exit(EXIT_APPROVED if verdict.approved else EXIT_REJECTED)

    def _malformed(self, message: str) -> None:
        self.stderr.write(f"malformed input: {message}")
        sys.exit(EXIT_MALFORMED)


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    return str(value)
