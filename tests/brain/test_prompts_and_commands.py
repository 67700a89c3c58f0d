"""Prompt sections and sizes; the brain and llm commands."""
from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from brain.playbook import playbook_default
from brain.prompts import analyst_prompt, approx_tokens, screener_prompt
from brain.schemas import TradeView
from journal.models import LlmCall
from tests.brain import factories as f
from tests.brain.test_services import research

pytestmark = pytest.mark.django_db


def trades(n: int = 10) -> list[TradeView]:
    return [TradeView(id=i, inst_id="BTC-USDT-SWAP", direction="LONG", opened_at=f.NOW - timedelta(hours=i * 5),
                      closed_at=f.NOW - timedelta(hours=i * 5 - 2), entry_price=Decimal("69000.5"), exit_price=Decimal("69800.1"),
                      pnl_usd=Decimal("12.34"), strategy_used="trend_pullback", exit_reason="take_profit",
                      confidence_at_entry=Decimal("0.65"), market_regime="trending_up") for i in range(1, n + 1)]


def test_the_screener_prompt_has_the_seed_fields_and_stays_small():
    text = screener_prompt(f.pullback_long())
    for field in ("symbol", "price", "change_24h", "rsi_15m", "rsi_1h", "macd_15m", "macd_1h", "regime_1h", "adx_1h",
                  "volume_vs_avg", "funding_rate", "oi_change_4h", "bb_position_15m", "ema_alignment"):
        assert field in text
    assert approx_tokens(text) < 400


def test_the_analyst_prompt_has_every_seed_section_near_3000_tokens():
    context = f.context(positions=[f.long_position()], trades=trades())
    prompt = analyst_prompt(snapshot=f.pullback_long(), context=context, research=research("ETF inflows continue"),
                            playbook=playbook_default(), playbook_version=1)
    for tag in ("<system>", "<output_format>", '<playbook version="1">', "<market_snapshot>", 'timeframe="15m"', 'timeframe="1H"',
                'timeframe="4H"', "<current_positions>", "<account_state>", "<research_context", '<recent_trades count="10">'):
        assert tag in prompt.text()
    assert set(prompt.sections) >= {"system", "output_format", "playbook", "market_snapshot", "recent_trades", "research_context"}
    assert 1500 <= prompt.total_tokens <= 4000, prompt.sections


def test_brain_decide_prints_the_screen_and_decision_for_a_saved_snapshot(tmp_path, settings):
    settings.ANTHROPIC_API_KEY, settings.BRAIN = "", "auto"
    path = tmp_path / "snap.json"
    path.write_text(f.pullback_long().to_json())
    out = StringIO()
    call_command("brain", "decide", "--snapshot", str(path), "--json", stdout=out)
    result = json.loads(out.getvalue())
    assert result["brain"] == "rules" and result["screen"]["signal"] is True
    assert result["decision"]["decision"]["action"] == "OPEN_LONG"
    out = StringIO()
    call_command("brain", "decide", "--snapshot", str(path), "--brain", "rules", stdout=out)
    assert "decision: OPEN_LONG" in out.getvalue()
    path.write_text('{"inst_id": ""}')
    with pytest.raises(CommandError, match="not a MarketSnapshot"):
        call_command("brain", "decide", "--snapshot", str(path))


def test_llm_cost_sums_calls_tokens_and_usd_per_day_and_purpose():
    LlmCall.objects.create(purpose="analyze", model="claude-opus-4-6", prompt={}, input_tokens=1000, output_tokens=500,
                           cache_write_tokens=2000, cache_read_tokens=3000, cost_usd=Decimal("0.0315"))
    LlmCall.objects.create(purpose="screen", model="claude-haiku-4-5-20251001", prompt={}, input_tokens=480, output_tokens=25,
                           cost_usd=Decimal("0.000605"))
    out = StringIO()
    call_command("llm", "cost", "--days", "2", stdout=out)
    text = out.getvalue()
    assert "analyze" in text and "screen" in text and "3000" in text and "total over 2 day(s): $0.032105" in text
