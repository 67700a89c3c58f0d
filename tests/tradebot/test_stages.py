"""The stage functions on their own (no broker): what RISK_CHECK does with the bot's state."""
from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest

from execution.exchanges.paper import PaperExchange
from execution.models import BotState, BotStatus
from journal.models import Cycle, CycleOutcome, CycleState, Mode
from market.models import Instrument
from tests.brain.factories import NOW, snapshot
from tests.execution.helpers import decision
from tradebot.stages import CycleWork, StageEnv, risk


@pytest.fixture
def btc(db) -> Instrument:
    return Instrument.objects.create(
        inst_id="BTC-USDT-SWAP", ct_val=Decimal("0.01"), lot_sz=Decimal("0.01"), min_sz=Decimal("0.01"),
        tick_sz=Decimal("0.1"), max_lever=Decimal("100"), trading_enabled=True,
    )


def _work(btc: Instrument, env: StageEnv) -> CycleWork:
    cycle = Cycle.objects.create(instrument=btc, as_of=NOW, state=CycleState.RISK_CHECK, mode=env.mode, run_id=env.run_id)
    snap = snapshot(price=65000.0, ts=NOW)
    env.exchange.set_price(btc.inst_id, snap.price, NOW)
    return CycleWork(cycle=cycle, _snapshot=snap, _decision=decision("OPEN_LONG"))


def _cooldown(scope: str, until_offset: timedelta) -> None:
    BotState.objects.update_or_create(scope=scope, defaults=dict(
        state=BotStatus.COOLDOWN, reason="3 consecutive losses", consecutive_losses=3,
        since=NOW - timedelta(minutes=40), until=NOW + until_offset, day_start_equity=Decimal("10000"),
        peak_equity=Decimal("10000")))


def test_a_cooldown_whose_time_is_up_is_lifted_and_the_decision_goes_to_the_gate(btc: Instrument) -> None:
    env = StageEnv(feed=None, exchange=PaperExchange(account_name="stages-lift"))
    _cooldown(env.scope, -timedelta(minutes=10))
    work = _work(btc, env)
    assert risk(work, env) is True, work.cycle.reason
    assert work.cycle.risk_verdict["approved"] is True
    row = BotState.objects.get(scope=env.scope)
    assert row.state == BotStatus.RUNNING and row.consecutive_losses == 0


def test_a_cooldown_still_running_halts_the_cycle(btc: Instrument) -> None:
    env = StageEnv(feed=None, exchange=PaperExchange(account_name="stages-hold"))
    _cooldown(env.scope, timedelta(minutes=10))
    work = _work(btc, env)
    assert risk(work, env) is False
    assert work.cycle.outcome == CycleOutcome.HALTED and "COOLDOWN" in work.cycle.reason
    assert BotState.objects.get(scope=env.scope).state == BotStatus.COOLDOWN


def test_a_replay_asks_its_own_bot_state_provider_and_the_lift_still_happens(btc: Instrument) -> None:
    from execution.selectors import bot_state

    calls = []
    env = StageEnv(feed=None, exchange=PaperExchange(account_name="stages-replay"), mode=Mode.REPLAY, run_id="r-stages")
    _cooldown(env.scope, -timedelta(minutes=1))
    known = bot_state(scope=env.scope)
    env.bot_provider = lambda: calls.append(1) or known
    work = _work(btc, env)
    assert risk(work, env) is True
    assert calls == [1]
    assert BotState.objects.get(scope=env.scope).state == BotStatus.RUNNING
