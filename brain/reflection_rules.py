"""The rules brain's reflection: measure each strategy, then adjust the playbook.

For every strategy with at least `learning.min_trades` closed trades in the
sample: profit factor and win rate below the `disable_*` thresholds switch it
off; a profit factor under `tighten_profit_factor` shrinks its size and
tightens its entry filters (and widens its stop when most losses were
stop-outs); a profit factor at or above `reward_profit_factor` grows its size a
little. A switched-off strategy comes back when the sample shows it paying
again, or on probation at half size after `reenable_after_reflections`
reflections. Every change lists the trade ids it is based on.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from decimal import Decimal

from django.conf import settings

from brain.playbook_schema import playbook_validate
from brain.schemas import DeepReflection, PlaybookChange, TradeView

MIN_SIZE = 0.005


@dataclass(frozen=True)
class StrategyStats:
    trades: int
    wins: int
    win_rate: float
    profit_factor: float
    avg_rr: float | None
    stop_outs: int  # losing trades closed by their stop
    trade_ids: tuple[int, ...]


def strategy_stats(trades: list[TradeView]) -> StrategyStats:
    pnls = [float(t.pnl_usd) for t in trades if t.pnl_usd is not None]
    wins = [p for p in pnls if p > 0]
    losses = [-p for p in pnls if p < 0]
    gross_loss = sum(losses)
    pf = (sum(wins) / gross_loss) if gross_loss > 0 else (float("inf") if wins else 0.0)
    avg_rr = (sum(wins) / len(wins)) / (gross_loss / len(losses)) if wins and losses else None
    return StrategyStats(
        trades=len(pnls), wins=len(wins), win_rate=len(wins) / len(pnls) if pnls else 0.0, profit_factor=pf, avg_rr=avg_rr,
        stop_outs=sum(1 for t in trades if t.pnl_usd is not None and t.pnl_usd < 0 and t.exit_reason == "stop_loss"),
        trade_ids=tuple(t.id for t in trades),
    )


def _fmt_pf(pf: float) -> str:
    return "inf" if pf == float("inf") else f"{pf:.2f}"


def rules_reflect(*, trades: list[TradeView], playbook: dict) -> DeepReflection:
    data = copy.deepcopy(playbook_validate(playbook).model_dump(mode="json"))
    learning = data["learning"]
    closed = sorted((t for t in trades if t.status == "closed" and t.pnl_usd is not None), key=lambda t: (t.closed_at or t.opened_at, t.id))
    changes: list[PlaybookChange] = []
    insights: list[str] = []
    max_size = float(settings.MAX_SINGLE_TRADE_PCT)

    def change(path: str, old: object, new: object, reason: str, ids: tuple[int, ...]) -> None:
        changes.append(PlaybookChange(path=path, old=str(old), new=str(new), reason=reason, evidence_trade_ids=list(ids)))

    for name, strategy in data["strategy_definitions"].items():
        params = strategy["params"]
        group = [t for t in closed if t.strategy_used == name]
        stats = strategy_stats(group)
        base = f"strategy_definitions.{name}.params"
        if stats.trades:
            insights.append(f"{name}: {stats.trades} trades, win rate {stats.win_rate:.0%}, profit factor {_fmt_pf(stats.profit_factor)}")
            strategy["historical_winrate"] = round(stats.win_rate, 4)
            if stats.avg_rr is not None:
                strategy["avg_rr"] = round(stats.avg_rr, 3)
        enough = stats.trades >= learning["min_trades"]
        if not params["enabled"]:
            if enough and stats.profit_factor >= learning["reward_profit_factor"]:
                params["enabled"], params["disabled_reflections"] = True, 0
                change(f"{base}.enabled", False, True, f"measured profit factor {_fmt_pf(stats.profit_factor)} over {stats.trades} trades", stats.trade_ids)
            else:
                params["disabled_reflections"] += 1
                if params["disabled_reflections"] >= learning["reenable_after_reflections"]:
                    old_size = params["size_pct"]
                    params.update(enabled=True, disabled_reflections=0, size_pct=max(MIN_SIZE, round(old_size / 2, 4)))
                    change(f"{base}.enabled", False, True, f"probation after {learning['reenable_after_reflections']} reflections off, size {old_size} -> {params['size_pct']}", stats.trade_ids)
            continue
        if not enough:
            continue
        if stats.profit_factor < learning["disable_profit_factor"] and stats.win_rate < learning["disable_win_rate"]:
            params["enabled"], params["disabled_reflections"] = False, 0
            change(f"{base}.enabled", True, False, f"profit factor {_fmt_pf(stats.profit_factor)} and win rate {stats.win_rate:.0%} over {stats.trades} trades", stats.trade_ids)
            data["lessons_learned"].append({
                "id": f"L{len(data['lessons_learned']) + 1}", "date": (closed[-1].closed_at or closed[-1].opened_at).date().isoformat(),
                "lesson": f"{name} lost money ({stats.wins}/{stats.trades} wins); switched off", "evidence": f"trades {list(stats.trade_ids)}", "impact": "high",
                "evidence_trade_ids": list(stats.trade_ids),
            })
        elif stats.profit_factor < learning["tighten_profit_factor"]:
            old = params["size_pct"]
            params["size_pct"] = max(MIN_SIZE, round(old * 0.75, 4))
            change(f"{base}.size_pct", old, params["size_pct"], f"profit factor {_fmt_pf(stats.profit_factor)} below {learning['tighten_profit_factor']}", stats.trade_ids)
            for key, step, limit in (("adx_min", 2.0, 60.0), ("volume_min", 0.2, 5.0)):
                if params.get(key) is not None and params[key] + step <= limit:
                    change(f"{base}.{key}", params[key], round(params[key] + step, 3), "stricter entry filter after a losing sample", stats.trade_ids)
                    params[key] = round(params[key] + step, 3)
            losers = sum(1 for t in group if t.pnl_usd is not None and t.pnl_usd < 0)
            if losers and stats.stop_outs / losers > 0.7 and params["stop_atr_mult"] * 1.1 <= 6.0:
                old_stop, old_target = params["stop_atr_mult"], params["target_atr_mult"]
                params["stop_atr_mult"] = round(old_stop * 1.1, 3)
                params["target_atr_mult"] = round(min(20.0, old_target * 1.1), 3)
                change(f"{base}.stop_atr_mult", old_stop, params["stop_atr_mult"], f"{stats.stop_outs}/{losers} losses were stop-outs: stop too tight", stats.trade_ids)
        elif stats.profit_factor >= learning["reward_profit_factor"] and stats.win_rate >= 0.45:
            old = params["size_pct"]
            new = min(max_size, round(old * 1.1, 4))
            if new > old:
                params["size_pct"] = new
                change(f"{base}.size_pct", old, new, f"profit factor {_fmt_pf(stats.profit_factor)}, win rate {stats.win_rate:.0%}", stats.trade_ids)

    _calibrate(data, closed)
    playbook_validate(data)  # never hand back an invalid playbook
    used = [t.id for t in closed]
    disciplined = sum(1 for t in closed if t.stop_loss is not None and t.exit_reason in ("take_profit", "stop_loss", "signal"))
    score = int(round(100 * disciplined / len(closed))) if closed else 0
    biases = []
    longs = [t for t in closed if t.direction == "LONG"]
    if closed and len(longs) / len(closed) > 0.8:
        biases.append(f"long bias: {len(longs)} of {len(closed)} trades were long")
    if closed and len(longs) / len(closed) < 0.2:
        biases.append(f"short bias: {len(closed) - len(longs)} of {len(closed)} trades were short")
    summary = (f"{len(changes)} change(s) from {len(closed)} closed trades" if changes
               else f"no change: {len(closed)} closed trades, none of the thresholds was met")
    return DeepReflection(updated_playbook=data, pattern_insights=insights, bias_findings=biases, discipline_score=score,
                          summary=summary, changes=changes, trade_ids=used)


def _calibrate(data: dict, closed: list[TradeView]) -> None:
    buckets = {"0.5-0.6": (0.5, 0.6), "0.6-0.7": (0.6, 0.7), "0.7-0.8": (0.7, 0.8), "0.8-1.0": (0.8, 1.01)}
    for label, (low, high) in buckets.items():
        group = [t for t in closed if t.confidence_at_entry is not None and Decimal(str(low)) <= t.confidence_at_entry < Decimal(str(high))]
        if group:
            wins = sum(1 for t in group if t.pnl_usd is not None and t.pnl_usd > 0)
            data["confidence_calibration"][label] = {"trades": len(group), "actual_win_rate": round(wins / len(group), 4),
                                                     "note": f"trades {[t.id for t in group][:20]}"}
