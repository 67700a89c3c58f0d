"""`manage.py replay`: its summary against the journal, its errors, Ctrl-C, and a replay with the Claude brain
(local Anthropic server)."""
from __future__ import annotations

import ast
import gzip
import json
import re
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from execution.models import Order, PaperOrder
from journal.models import (
    Cycle, CycleOutcome, CycleState, LlmCall, Mode, RiskRejection, ScreenerLog, Trade, TradeStatus,
)
from market.feeds.synthetic import SyntheticFeed
from tests.conftest import TEST_KEY
from tests.fakes.anthropic_server import FakeAnthropic, Received, Reply, ok
from tradebot.replay import ReplayError, replay_run

INST = "BTC-USDT-SWAP"


def _replay_json(*args: str) -> dict[str, Any]:
    out = StringIO()
    call_command("replay", "--inst", INST, *args, "--json", stdout=out)
    return json.loads(out.getvalue())


@pytest.mark.django_db
def test_the_json_summary_of_a_synthetic_replay_is_what_its_journal_holds(settings) -> None:
    data = _replay_json("--from", "2025-08-01", "--to", "2025-08-03", "--synthetic")
    run_id = data["run_id"]
    assert data["cycles"] == 2 * 24 * 12 == Cycle.objects.filter(mode=Mode.REPLAY, run_id=run_id).count()
    trades = list(Trade.objects.filter(mode=Mode.REPLAY, run_id=run_id))
    closed = sorted((t for t in trades if t.status == TradeStatus.CLOSED), key=lambda t: (t.closed_at, t.id))
    assert closed, "the window must close trades for the figures to mean something"
    assert data["trades"] == len(trades) and data["closed_trades"] == len(closed)
    pnls = [t.pnl_usd for t in closed]
    assert Decimal(data["pnl_usd"]) == sum(pnls, Decimal(0)).quantize(Decimal("0.01"))
    assert data["win_rate"] == round(sum(1 for p in pnls if p > 0) / len(pnls), 4)
    assert Decimal(data["fees_usd"]) == sum((t.fees_usd for t in trades), Decimal(0)).quantize(Decimal("0.01"))
    assert Decimal(data["funding_usd"]) == sum((t.funding_usd for t in trades), Decimal(0)).quantize(Decimal("0.01"))
    won, lost = sum(p for p in pnls if p > 0), -sum(p for p in pnls if p < 0)
    assert data["profit_factor"] == (round(float(won / lost), 4) if lost else None)
    # Drawdown: the deepest fall from a peak of the account's equity, closed trade after closed trade.
    equity = peak = Decimal(settings.PAPER_START_BALANCE)
    deepest = Decimal(0)
    for pnl in pnls:
        equity += pnl
        peak = max(peak, equity)
        deepest = max(deepest, (peak - equity) / peak)
    assert data["max_drawdown_pct"] == round(float(deepest), 6) and (deepest > 0) == (lost > 0)
    outcomes = {o: Cycle.objects.filter(run_id=run_id, outcome=o).count() for o in data["outcomes"]}
    assert data["outcomes"] == outcomes and sum(outcomes.values()) == data["cycles"]
    logs = ScreenerLog.objects.filter(cycle__run_id=run_id)
    assert data["screened"] == logs.filter(bypassed=False).count()
    assert data["bypassed"] == logs.filter(bypassed=True).count()
    assert data["screened"] + data["bypassed"] == data["cycles"]
    assert data["analyzed"] == Cycle.objects.filter(run_id=run_id).exclude(decision=None).count()
    # The rules brain costs nothing and calls nobody.
    assert data["llm_calls"] == 0 and data["llm_cost_usd"] == "0.0000"
    assert data["brain"] == "rules" and data["elapsed_seconds"] > 0


@pytest.mark.django_db
def test_a_replay_of_a_candle_csv_reads_only_that_file(tmp_path: Path) -> None:
    feed = SyntheticFeed(seed=3, start=datetime(2025, 3, 1, tzinfo=UTC), end=datetime(2025, 3, 15, tzinfo=UTC))
    frame = feed.frame(INST, "5m", limit=10_000_000)
    path = tmp_path / "btc_5m.csv.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("ts,open,high,low,close,volume\n")
        for row in frame.itertuples():
            fh.write(f"{int(row.Index.timestamp() * 1000)},{row.open},{row.high},{row.low},{row.close},{row.volume}\n")
    data = _replay_json("--from", "2025-03-13", "--to", "2025-03-14", "--csv", str(path), "--cycle", "15m")
    assert data["cycles"] == 24 * 4 and data["source"] != "synthetic"
    cycles = Cycle.objects.filter(run_id=data["run_id"]).order_by("as_of")
    assert cycles[0].as_of == datetime(2025, 3, 13, 0, 15, tzinfo=UTC)
    # The prices the cycles saw are the file's closes at their times (no lookahead, nothing else mixed in).
    closes = {int(r.Index.timestamp()): Decimal(str(r.close)) for r in frame.itertuples()}
    for cycle in cycles[:20]:
        last_bar = int(cycle.as_of.timestamp()) - 300
        assert Decimal(cycle.snapshot["price"]) == closes[last_bar], cycle.as_of


@pytest.mark.django_db
@pytest.mark.parametrize(("args", "says"), [
    (("--from", "2025-08-03", "--to", "2025-08-01", "--synthetic"), "--to must be after --from"),
    (("--from", "yesterday", "--to", "2025-08-01", "--synthetic"), "not a date: 'yesterday'"),
    (("--from", "2025-08-01", "--to", "2025-08-02", "--cycle", "7m"), "--cycle must be one of"),
    (("--from", "2025-08-01", "--to", "2025-08-02", "--csv", "/nonexistent/candles.csv"), "candles.csv"),
    (("--from", "2030-01-01", "--to", "2030-01-02", "--synthetic"), "no BTC-USDT-SWAP data between the dates"),
])
def test_bad_arguments_are_a_clear_error_and_journal_nothing(args: tuple[str, ...], says: str) -> None:
    with pytest.raises(CommandError) as caught:
        call_command("replay", "--inst", INST, *args)
    assert says in str(caught.value)
    assert not Cycle.objects.exists()


@pytest.mark.django_db
def test_a_candle_file_with_a_bad_cell_is_an_error_that_names_the_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "candles.csv"
    bad.write_text("ts,open,high,low,close,volume\n1700000000000,1,2,0.5,1.5,10\n1700000300000,1,2,0.5,oops,10\n")
    with pytest.raises(CommandError, match=re.escape(f"{bad}: line 3: close 'oops' is not a number")):
        call_command("replay", "--inst", INST, "--from", "2023-11-14", "--to", "2023-11-15", "--csv", str(bad))
    assert not Cycle.objects.exists()


@pytest.mark.django_db
def test_the_text_summary_prints_one_figure_per_line_with_plain_outcome_names() -> None:
    out = StringIO()
    call_command("replay", "--inst", INST, "--from", "2025-08-01", "--to", "2025-08-01T06:00", "--synthetic",
                 stdout=out)
    summary = out.getvalue().split("\n\n")[0]  # the backtest report follows the first blank line
    lines = dict(line.split(None, 1) for line in summary.splitlines() if line.strip())
    assert lines["cycles"] == "72" and lines["brain"] == "rules"
    outcomes = ast.literal_eval(lines["outcomes"])  # a plain dict literal: an enum's repr would not parse
    assert sum(outcomes.values()) == 72 and set(outcomes) <= {o.value for o in CycleOutcome}


@pytest.mark.django_db
def test_a_claude_replay_without_an_api_key_is_refused_not_run_with_the_rules_brain(settings) -> None:
    settings.ANTHROPIC_API_KEY = ""
    feed = SyntheticFeed(seed=7, start=datetime(2025, 6, 15, tzinfo=UTC), end=datetime(2025, 8, 2, tzinfo=UTC))
    with pytest.raises(ReplayError, match="ANTHROPIC_API_KEY"):
        replay_run(inst_id=INST, start=datetime(2025, 8, 1, tzinfo=UTC), end=datetime(2025, 8, 1, 1, tzinfo=UTC),
                   feed=feed, brain="claude")
    assert not Cycle.objects.exists()


# --- the Claude brain, against a local server speaking the Messages API ------------------------


class _Analyst:
    """Answers the screener with a signal every third call; the analyst with HOLD, but twice in a row with prose."""

    def __init__(self, screener_model: str) -> None:
        self.screener_model = screener_model
        self.screens = self.analyses = 0

    def __call__(self, received: Received) -> Reply:
        body = received.json()
        if body["model"] == self.screener_model:
            self.screens += 1
            signal = self.screens % 3 == 0
            return ok(data={"signal": signal, "reason": "a setup" if signal else "nothing here"}, model=body["model"],
                      input_tokens=400, output_tokens=15)
        self.analyses += 1
        if self.analyses in (2, 3):  # the first answer of one cycle and the gateway's strict retry
            return ok("I would rather not say.", model=body["model"], input_tokens=900, output_tokens=9)
        if self.analyses == 4:  # a long whose stop is above any price: the risk gate must refuse it
            return ok(data={"decision": {"action": "OPEN_LONG", "symbol": INST, "size_pct": 0.05, "leverage": 2,
                                         "stop_loss": 1e9, "take_profit": 2e9},
                            "confidence": 0.9, "strategy_used": "trend_pullback", "reasoning": "a stop on the wrong side"},
                      model=body["model"], input_tokens=2000, output_tokens=80)
        return ok(data={"decision": {"action": "HOLD", "symbol": INST}, "confidence": 0.4, "reasoning": "no edge yet"},
                  model=body["model"], input_tokens=2000, output_tokens=60)


@pytest.mark.django_db(transaction=True)
def test_a_claude_replay_journals_every_call_and_turns_a_bad_answer_into_hold(
        settings, anthropic_server: FakeAnthropic) -> None:
    feed = SyntheticFeed(seed=7, start=datetime(2025, 6, 15, tzinfo=UTC), end=datetime(2025, 8, 2, tzinfo=UTC))
    start = datetime(2025, 8, 1, 2, tzinfo=UTC)
    analyst = _Analyst(settings.SCREENER_MODEL)
    anthropic_server.handler(analyst)
    summary = replay_run(inst_id=INST, start=start, end=start + timedelta(hours=3), feed=feed, brain="claude",
                         run_id="claude-run")
    requests = anthropic_server.calls("POST", "/v1/messages")
    assert summary.cycles == 36
    cycles = list(Cycle.objects.filter(run_id="claude-run").order_by("as_of"))
    # Every placeholder written before its cycle ran was completed afterwards: none is left IDLE.
    assert len(cycles) == 36 and all(c.state == CycleState.DONE and c.outcome for c in cycles)
    assert all(c.started_at <= c.ended_at for c in cycles)
    assert analyst.analyses >= 5, "the scenario must reach the analyst past its wrong-side stop"
    # One journaled call per request the server saw, each with its cycle, in replay mode.
    calls = LlmCall.objects.filter(cycle__run_id="claude-run")
    assert calls.count() == len(requests) == analyst.screens + analyst.analyses
    assert set(calls.values_list("mode", flat=True)) == {Mode.REPLAY}
    assert TEST_KEY not in json.dumps(list(calls.values_list("prompt", flat=True)))
    # The answers that were not JSON (the first and the strict retry) are journaled with their text, and
    # their cycle became a HOLD that says why; nothing reached the exchange.
    invalid = calls.filter(status="invalid")
    assert invalid.count() == 2 and {c.cycle_id for c in invalid} == {invalid[0].cycle_id}
    bad = Cycle.objects.get(pk=invalid[0].cycle_id)
    assert bad.outcome == CycleOutcome.HOLD
    assert bad.decision["reasoning"].startswith("analyst invalid: invalid answer twice")
    # The wrong-side stop reached the risk gate, which refused it: rejected, journaled with its rules, no order.
    rejected = [c for c in cycles if c.outcome == CycleOutcome.REJECTED]
    assert len(rejected) == 1 and rejected[0].decision["reasoning"] == "a stop on the wrong side"
    rules = [f["rule"] for r in RiskRejection.objects.filter(cycle__run_id="claude-run") for f in r.failed_rules]
    assert "stop_loss" in rules
    assert all(c.decision["reasoning"] == "no edge yet" for c in cycles
               if c.decision and c.pk not in (bad.pk, rejected[0].pk))
    assert not Trade.objects.filter(run_id="claude-run").exists()
    assert not Order.objects.filter(run_id="claude-run").exists() and not PaperOrder.objects.exists()
    data = summary.as_dict()
    assert data["llm_calls"] == len(requests) and data["brain"] == "claude"
    assert data["risk_rejections"] == dict(Counter(rules)) and data["outcomes"]["rejected"] == 1
    assert Decimal(data["llm_cost_usd"]) == sum((c.cost_usd for c in calls), Decimal(0)).quantize(Decimal("0.0001")) > 0


# --- Ctrl-C ---------------------------------------------------------------------------------------


class _CtrlCAt(SyntheticFeed):
    """The synthetic market, with Ctrl-C pressed while the cycle at `at` collects its ticker."""

    def __init__(self, at: datetime, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.at = at

    def ticker(self, inst_id: str) -> Any:
        if self.now() >= self.at:
            raise KeyboardInterrupt
        return super().ticker(inst_id)


def _kept_figures_match_the_journal(summary: Any) -> list[Cycle]:
    cycles = list(Cycle.objects.filter(run_id=summary.run_id).order_by("as_of"))
    assert summary.interrupted and summary.as_dict()["interrupted"] is True
    assert summary.cycles == len(cycles)
    assert dict(summary.outcomes) == {o: sum(1 for c in cycles if c.outcome == o) for o in summary.outcomes}
    # Nothing points to a cycle that was not kept, and no placeholder is left waiting.
    kept = {c.pk for c in cycles}
    assert set(Trade.objects.filter(run_id=summary.run_id).values_list("cycle_id", flat=True)) <= kept
    assert set(ScreenerLog.objects.filter(mode=Mode.REPLAY).values_list("cycle_id", flat=True)) <= kept
    assert not [c for c in cycles if c.state == CycleState.IDLE]
    return cycles


@pytest.mark.django_db
def test_ctrl_c_in_a_rules_replay_keeps_the_whole_batches_written_and_counts_only_them() -> None:
    start = datetime(2025, 8, 1, tzinfo=UTC)
    feed = _CtrlCAt(start + timedelta(minutes=5 * 700), seed=7, start=datetime(2025, 6, 15, tzinfo=UTC),
                    end=datetime(2025, 8, 5, tzinfo=UTC))
    summary = replay_run(inst_id=INST, start=start, end=start + timedelta(days=3), feed=feed, run_id="ctrl-c")
    cycles = _kept_figures_match_the_journal(summary)
    # The first batch (500 cycles) was written; the second stopped at its 200th cycle and rolled back whole.
    assert len(cycles) == 500 and cycles[-1].as_of == start + timedelta(minutes=5 * 500)
    assert all(c.state in (CycleState.DONE, CycleState.FAILED) for c in cycles)


@pytest.mark.django_db(transaction=True)
def test_ctrl_c_in_a_claude_replay_keeps_the_cycles_that_ran_and_marks_the_one_in_flight(
        settings, anthropic_server: FakeAnthropic) -> None:
    start = datetime(2025, 8, 1, 2, tzinfo=UTC)
    feed = _CtrlCAt(start + timedelta(minutes=5 * 10), seed=7, start=datetime(2025, 6, 15, tzinfo=UTC),
                    end=datetime(2025, 8, 2, tzinfo=UTC))
    anthropic_server.handler(_Analyst(settings.SCREENER_MODEL))
    summary = replay_run(inst_id=INST, start=start, end=start + timedelta(hours=3), feed=feed, brain="claude",
                         run_id="claude-ctrl-c")
    cycles = _kept_figures_match_the_journal(summary)
    assert len(cycles) == 10
    assert [c.state for c in cycles[:9]] == [CycleState.DONE] * 9
    assert (cycles[-1].state, cycles[-1].outcome) == (CycleState.INTERRUPTED, CycleOutcome.INTERRUPTED)
    assert set(LlmCall.objects.filter(mode=Mode.REPLAY).values_list("cycle_id", flat=True)) <= {c.pk for c in cycles}


def test_ctrl_c_stops_the_replay_command_with_a_summary_of_what_the_journal_kept(tmp_path: Path) -> None:
    """A real SIGINT to `manage.py replay` once its first batch is written: exit 130, the summary, no traceback."""
    import os
    import signal
    import sqlite3
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}", "LOG_LEVEL": "ERROR",
           "DJANGO_SETTINGS_MODULE": "tradebot.settings"}
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=root, env=env, check=True, timeout=120)
    proc = subprocess.Popen([sys.executable, "manage.py", "replay", "--inst", INST, "--from", "2025-08-01",
                             "--to", "2025-08-11", "--synthetic"], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = b""
    try:
        while b"500/2880" not in seen:  # the progress line once the first batch is in the journal
            chunk = proc.stderr.read1(256)  # type: ignore[union-attr]
            assert chunk, f"the replay ended before its first batch: {seen.decode(errors='replace')[-2000:]}"
            seen += chunk
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err_text = (seen + err).decode(errors="replace")
    assert proc.returncode == 130, err_text[-2000:]
    assert "Traceback" not in err_text and "interrupted (Ctrl-C)" in err_text
    figures = dict(line.split(None, 1) for line in out.decode().split("\n\n")[0].splitlines() if line.strip())
    assert figures["interrupted"] == "True" and 500 <= int(figures["cycles"]) < 2880
    with sqlite3.connect(tmp_path / "db.sqlite3") as db:
        (stored,) = db.execute("SELECT COUNT(*) FROM journal_cycle WHERE run_id = ?", [figures["run_id"]]).fetchone()
    assert stored == int(figures["cycles"])
