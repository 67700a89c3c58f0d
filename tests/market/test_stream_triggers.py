"""The stream's triggers on a live price: the position watch's levels (move from the last review, SL/TP near)."""
from __future__ import annotations

from market.streams.triggers import InstrumentWatch, PositionLevels, stream_triggers_check

LEVELS = PositionLevels(review_price=70000.0, atr=420.0, stop_loss=68900.0, take_profit=72000.0, atr_multiple=1.0,
                        near_atr=0.5)


def ticks(watch: InstrumentWatch, prices: list[float]) -> list[list[str]]:
    return [stream_triggers_check(watch=watch, price=p, now=1_000_000.0) for p in prices]


def test_a_position_watch_move_of_one_atr_starts_one_cycle_not_one_per_tick() -> None:
    watch = InstrumentWatch(inst_id="BTC-USDT-SWAP", move_threshold=0.03, position=LEVELS)
    fired = ticks(watch, [70100.0, 70300.0, 70420.0, 70500.0, 70460.0, 70200.0, 70430.0])
    assert [len(f) for f in fired] == [0, 0, 1, 0, 0, 0, 1]  # crosses at 1.00 ATR; again only after coming back
    assert fired[2] == ["position watch: price moved 1.00 ATR since the last review (70000 -> 70420)"]


def test_a_stop_loss_or_take_profit_coming_near_starts_a_cycle() -> None:
    watch = InstrumentWatch(inst_id="BTC-USDT-SWAP", move_threshold=0.03,
                            position=PositionLevels(**{**LEVELS.__dict__, "atr_multiple": 10.0}))
    [[sl]] = [f for f in ticks(watch, [69500.0, 69200.0, 69100.0]) if f]
    assert sl == "position watch: stop loss 68900 is 0.48 ATR from 69100"
    watch.position = PositionLevels(**{**LEVELS.__dict__, "atr_multiple": 10.0, "stop_loss": None})
    watch.active.clear()
    assert ticks(watch, [69100.0]) == [[]]
    assert ticks(watch, [71800.0]) == [["position watch: take profit 72000 is 0.48 ATR from 71800"]]


def test_without_a_position_the_watch_never_fires() -> None:
    watch = InstrumentWatch(inst_id="BTC-USDT-SWAP", move_threshold=0.03)
    assert ticks(watch, [70000.0, 75000.0, 60000.0]) == [[], [], []]  # and no 1H reference: no move trigger either
