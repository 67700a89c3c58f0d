"""`manage.py replay --learn`: reviews, deep reflections and validated promotion inside the replay, no lookahead.

The bot trades v1 plus a losing "scalper" (tests/tradebot/test_learning.py), so its reflections soon propose
changes. The same replay runs twice over two candle files that are equal up to T and different after it (the
second mirrors every price after T): every version proposed by T, its verdict, its validation folds and the trades
before T are the same in both runs, while the trades after T are not.
"""
from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from django.core.management import call_command

from brain.models import PlaybookStatus, PlaybookTrigger, PlaybookVersion
from brain.playbook import playbook_activate_forced, playbook_current, playbook_save
from journal.models import Mode, Trade
from market.feeds.synthetic import SyntheticMarket
from tests.tradebot.test_learning import SCALPER

BTC = "BTC-USDT-SWAP"
START = datetime(2026, 1, 10, tzinfo=UTC)
T = START + timedelta(hours=11)  # after the first candidate (proposed and validated at 09:00 with seed 7)
END = T + timedelta(hours=3)


def candles_csv(path: Path, market: SyntheticMarket, *, mirror_after: datetime | None = None) -> Path:
    """The market's 5m BTC bars; with `mirror_after`, every price from then on mirrored around the last close before."""
    bars = {k: np.array(v, dtype=float) for k, v in market.bars[BTC].items()}
    ts = np.asarray(market.ts, dtype=np.int64)
    if mirror_after is not None:
        later = ts >= int(mirror_after.timestamp() * 1000)
        pivot = bars["close"][~later][-1]
        high, low = bars["high"].copy(), bars["low"].copy()
        bars["open"][later], bars["close"][later] = 2 * pivot - bars["open"][later], 2 * pivot - bars["close"][later]
        bars["high"][later], bars["low"][later] = 2 * pivot - low[later], 2 * pivot - high[later]
    lines = ["ts,open,high,low,close,volume"]
    lines += [f"{t},{o!r},{h!r},{lo!r},{c!r},{v!r}" for t, o, h, lo, c, v in
              zip(ts.tolist(), *(bars[k].tolist() for k in ("open", "high", "low", "close", "volume")), strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


def replay_learn(csv: Path, *, learn: bool = True) -> dict[str, Any]:
    out = StringIO()
    call_command("replay", "--inst", BTC, "--csv", str(csv), "--from", START.isoformat(), "--to", END.isoformat(),
                 "--cycle", "1H", *(["--learn"] if learn else []), "--json", stdout=out)
    return json.loads(out.getvalue())


def before_t(run: dict[str, Any]) -> list[dict[str, Any]]:
    """What each version proposed by T was, how it was judged and on which figures (run ids and numbers aside)."""
    out = []
    for v in run["learning"]["versions"]:
        if datetime.fromisoformat(v["proposed_at"]) > T:
            continue
        row = PlaybookVersion.objects.get(version=v["version"])
        folds = [{k: f[k] for k in ("from", "to", "active", "candidate")}
                 for f in (row.validation or {}).get("folds", [])]
        out.append({**{k: v[k] for k in ("proposed_at", "verdict", "promoted_at", "reason", "changes")},
                    "folds": folds, "test": (row.validation or {}).get("test"), "evidence": row.evidence and
                    {k: row.evidence[k] for k in ("from", "to")}})
    return out


def trades(run: dict[str, Any], *, after: bool, at: datetime = T) -> list[tuple[str, str, str]]:
    rows = Trade.objects.filter(mode=Mode.REPLAY, run_id=run["run_id"]).order_by("opened_at", "id")
    # A bar's time is its open: one at T is already the changed future.
    rows = rows.filter(opened_at__gte=at) if after else rows.filter(closed_at__lt=at)
    return [(t.opened_at.isoformat(), str(t.entry_price), str(t.pnl_usd)) for t in rows]


@pytest.mark.django_db
def test_replay_learn_reflects_and_promotes_on_its_clock_and_never_reads_the_future(settings, tmp_path) -> None:
    settings.BRAIN = "rules"
    settings.ANTHROPIC_API_KEY = ""
    settings.INDICATOR_HISTORY_CANDLES = 200
    settings.REFLECTION_INTERVAL_TRADES = 8
    settings.REFLECTION_INTERVAL_HOURS = 24
    settings.PLAYBOOK_VALIDATION_DAYS = 2
    settings.PLAYBOOK_VALIDATION_FOLDS = 2
    settings.PLAYBOOK_VALIDATION_MIN_TRADES = 4
    settings.PLAYBOOK_VALIDATION_CYCLE_SECONDS = 4 * 3600
    data = copy.deepcopy(playbook_current().playbook)
    data["strategy_definitions"]["scalper"] = copy.deepcopy(SCALPER)
    for rule in data["market_regime_rules"].values():
        rule["preferred_strategies"] = ["scalper", *rule["preferred_strategies"]]
    bot = playbook_activate_forced(version=playbook_save(data=data, change_summary="add a scalper",
                                                         triggered_by=PlaybookTrigger.MANUAL).version,
                                   by="test", reason="a losing strategy to learn from")
    # Days of candles after the replay's end: a validation that read past its own time would find whole folds there.
    market = SyntheticMarket(7, START - timedelta(days=15), END + timedelta(days=3), (BTC,))
    csv = candles_csv(tmp_path / "a.csv", market)
    first = replay_learn(csv)
    second = replay_learn(candles_csv(tmp_path / "b.csv", market, mirror_after=T))

    learned = before_t(first)
    assert learned[0]["verdict"] == "start" and len(learned) >= 2, learned  # a version was proposed and judged by T
    proposed = datetime.fromisoformat(learned[1]["proposed_at"])
    assert learned[1]["folds"] and all(datetime.fromisoformat(f["to"]) <= proposed for f in learned[1]["folds"])
    assert before_t(second) == learned  # the future changed; nothing learned before it did
    assert trades(second, after=False) == trades(first, after=False)
    assert trades(second, after=True) != trades(first, after=True)  # ... and the bot did see a different future

    # Until its first promotion the learning run trades exactly as the same replay without learning: its reviews,
    # reflections and validation replays (run inside it) leave the run itself alone.
    promoted_at = datetime.fromisoformat(next(v["promoted_at"] for v in first["learning"]["versions"][1:]
                                              if v["verdict"] == "promoted"))
    plain = replay_learn(csv, learn=False)
    assert "learning" not in plain and trades(plain, after=False, at=promoted_at) == trades(first, after=False,
                                                                                           at=promoted_at)
    assert trades(plain, after=True, at=promoted_at) != trades(first, after=True, at=promoted_at)

    # The run's versions are its own: the bot's active version is unchanged, its promotions are the run's.
    assert playbook_current().pk == bot.pk
    runs = PlaybookVersion.objects.filter(run_id=first["run_id"])
    assert runs.count() == first["learning"]["candidates"] >= 1
    promoted = [v for v in first["learning"]["versions"][1:] if v["verdict"] == "promoted"]
    assert runs.filter(status=PlaybookStatus.ACTIVE).count() == (1 if promoted else 0)
    # A person cannot validate or force it for the bot as it is: it is copied into a candidate of the bot's first.
    from django.core.management import CommandError

    own = runs.order_by("version").first()
    for argv in (["validate", str(own.version)], ["activate", str(own.version), "--force", "--reason", "x"]):
        with pytest.raises(CommandError, match=f"learned inside replay {first['run_id']}"):
            call_command("playbook", *argv, stdout=StringIO())
    assert playbook_current().pk == bot.pk
