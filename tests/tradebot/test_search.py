"""`manage.py optimize`: bad input refused whole, the schema's search ranges, the walk-forward placement, and one
search in this process (Ctrl-C, resume, the candidate and its out-of-sample validation) on stored candles.

The distributed search (two reflection workers, one killed) is in test_search_workers.py.
"""
from __future__ import annotations

import copy
import os
import signal
import threading
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import ManagementUtility, call_command
from django.db import connection

from brain.models import PlaybookStatus, PlaybookTrigger, PlaybookVersion
from brain.playbook import playbook_activate_forced, playbook_current, playbook_save
from brain.playbook_schema import SearchRangeError, StrategyParams, search_range_check, search_ranges
from journal.models import Cycle, Trade
from market.models import Instrument
from tradebot.models import SearchStudy, SearchTrial, SearchTrialState
from tradebot.search import SearchError, windows_place

BTC = "BTC-USDT-SWAP"
END = datetime(2026, 1, 20, tzinfo=UTC)  # the stored candles end here (a fixed market: the same search every run)


def optimize(*args: str) -> tuple[int, str, str]:
    """The command as a person runs it (argv, exit code, both streams)."""
    out, err = StringIO(), StringIO()
    code = 0
    try:
        call_command("optimize", *args, stdout=out, stderr=err)
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def written() -> dict[str, int]:
    optuna_studies = 0
    if "studies" in connection.introspection.table_names():  # Optuna's own table, once any study was made
        with connection.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM studies")
            optuna_studies = cur.fetchone()[0]
    return {"studies": SearchStudy.objects.count(), "trials": SearchTrial.objects.count(), "optuna": optuna_studies,
            "versions": PlaybookVersion.objects.count(), "cycles": Cycle.objects.count(),
            "trades": Trade.objects.count(), "instruments": Instrument.objects.count()}


@pytest.mark.parametrize(("args", "message"), [
    (["--strategy", "martingale"], "unknown strategy 'martingale': the active playbook v1 has momentum_breakout, "),
    (["--strategy", "trend_pullback", "--bounds", "stop_atr_mult=2.5:1"], "the range of stop_atr_mult is inverted"),
    (["--strategy", "trend_pullback", "--bounds", "stop_atr_mult=1.5:1.5"], "the range of stop_atr_mult is empty"),
    (["--strategy", "trend_pullback", "--bounds", "stop_atr_mult="], "the range of stop_atr_mult is empty"),
    (["--strategy", "trend_pullback", "--trials", "0"], "--trials must be at least 1, got 0"),
    (["--strategy", "trend_pullback", "--study", "breakouts-jan"],
     "study breakouts-jan searches strategy momentum_breakout, not trend_pullback"),
])
def test_bad_input_is_a_one_line_error_with_a_non_zero_exit_and_nothing_written(db, capsys, args, message) -> None:
    playbook_current()  # v1 exists, as on any machine that has run the bot
    SearchStudy.objects.create(name="breakouts-jan", optuna_name="breakouts-jan-0", strategy="momentum_breakout",
                               inst_ids=[BTC], bounds={"volume_min": [1, 3]}, base_version=1, training={},
                               source="database", trials_target=20)
    before = written()
    with pytest.raises(SystemExit) as exc:
        ManagementUtility(["manage.py", "optimize", *args]).execute()
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("CommandError: ") and message in err, err
    assert written() == before


def test_the_schema_declares_each_search_range_inside_the_fields_bounds_and_sizing_is_not_searched() -> None:
    ranges = search_ranges()
    assert {"stop_atr_mult", "target_atr_mult", "adx_min", "volume_min", "pullback_atr"} <= set(ranges)
    assert not {"size_pct", "leverage", "confidence", "disabled_reflections"} & set(ranges)
    for name, (low, high) in ranges.items():
        bounds = {type(m).__name__: m for m in StrategyParams.model_fields[name].metadata}
        assert bounds["Ge"].ge <= low < high <= bounds["Le"].le, name
    with pytest.raises(SearchRangeError, match="leaves its bounds"):
        search_range_check(name="stop_atr_mult", low=0.1, high=2.0)  # the schema refuses a 0.1 ATR stop
    with pytest.raises(SearchRangeError, match="inverted"):
        search_range_check(name="adx_min", low=30, high=20)


def test_the_training_windows_come_right_before_the_validation_folds_and_leave_room_for_indicators(settings) -> None:
    settings.INDICATOR_HISTORY_CANDLES = 100
    start = datetime(2026, 1, 1, tzinfo=UTC)
    placed = windows_place(data_start=start, data_end=start + timedelta(days=40), train_days=12, windows=3, val_days=9,
                           folds=3)
    assert [b - a for a, b in placed.validation] == [timedelta(days=3)] * 3
    assert placed.validation[-1][1] == start + timedelta(days=40)
    assert placed.windows[0][0] == start + timedelta(days=19) and placed.windows[-1][1] == placed.validation[0][0]
    assert all(placed.windows[i][1] == placed.windows[i + 1][0] for i in range(2))
    assert placed.since == start + timedelta(days=19) - timedelta(hours=400)
    with pytest.raises(SearchError, match="not enough market data: 25 training days"):  # no room for the warm-up
        windows_place(data_start=start, data_end=start + timedelta(days=40), train_days=25, windows=3, val_days=9,
                      folds=3)
    with pytest.raises(SearchError, match="not enough market data: 3 validation folds"):
        windows_place(data_start=start, data_end=start + timedelta(days=12), train_days=1, windows=1, val_days=9,
                      folds=3)


SCALPER = {
    "entry": "fade the band", "exit": "a small target", "filters": [],
    "params": {"enabled": True, "signal": "range_mean_reversion",
               "regimes": ["trending_up", "trending_down", "volatile", "ranging", "unknown"], "direction": "both",
               "atr_timeframe": "15m", "stop_atr_mult": 0.5, "target_atr_mult": 1.0, "size_pct": 0.02, "leverage": 1,
               "bb_long_max": 0.5, "bb_short_min": 0.5, "confidence": 0.7},
}


def search_market(settings) -> PlaybookVersion:
    """Twelve days of stored 15m candles (1H, 4H further back), short windows, and a fee-eating scalper a person
    activated: any narrower band than its own trades less and beats it, so a search always has a candidate."""
    from market.feeds.synthetic import SyntheticFeed
    from market.services import candles_upsert

    settings.BRAIN = "rules"
    settings.ANTHROPIC_API_KEY = ""
    settings.MARKET_DATA_SOURCE = "auto"  # the stored candles
    settings.INSTRUMENTS = [BTC]
    settings.SEARCH_TRAINING_DAYS, settings.SEARCH_TRAINING_WINDOWS = 1, 2
    settings.PLAYBOOK_VALIDATION_DAYS, settings.PLAYBOOK_VALIDATION_FOLDS = 1, 1
    settings.SEARCH_CYCLE_SECONDS = settings.PLAYBOOK_VALIDATION_CYCLE_SECONDS = 3600
    settings.SEARCH_MIN_TRADES = 1
    settings.PLAYBOOK_VALIDATION_MIN_TRADES = 10_000  # the candidate waits: what the test reads is where it was judged
    instrument = Instrument.objects.create(inst_id=BTC, ct_val=Decimal("0.01"), lot_sz=Decimal("0.01"),
                                           min_sz=Decimal("0.01"), tick_sz=Decimal("0.1"), max_lever=Decimal("100"),
                                           trading_enabled=True)
    feed = SyntheticFeed(seed=7, start=END - timedelta(days=45), end=END)
    feed.set_clock(END)
    for tf, n in (("15m", 4 * 24 * 12), ("1H", 24 * 14), ("4H", 6 * 40)):
        candles_upsert(instrument=instrument, timeframe=tf, bars=feed.candles(BTC, tf, limit=n))
    data = copy.deepcopy(playbook_current().playbook)
    data["strategy_definitions"]["scalper"] = copy.deepcopy(SCALPER)
    for rule in data["market_regime_rules"].values():
        rule["preferred_strategies"] = ["scalper", *rule["preferred_strategies"]]
    v2 = playbook_save(data=data, change_summary="add a scalper", triggered_by=PlaybookTrigger.MANUAL)
    return playbook_activate_forced(version=v2.version, by="test", reason="try a scalper")


@pytest.fixture
def market(transactional_db, settings) -> PlaybookVersion:
    settings.SEARCH_WORKER_PING_SECONDS = 0.1
    return search_market(settings)


def interrupt_after_first_trial() -> threading.Thread:
    """Ctrl-C (a real SIGINT to this process) once the first trial has finished and the second replays (its
    parameters chosen: in the tests' shared-cache in-memory SQLite a table lock is refused at once, not waited
    for, and an Optuna write cut short by Ctrl-C can leave its table locked for the resumed run)."""
    def watch() -> None:
        try:
            # This thread's reads must not lock the tables the search writes (shared cache: a writer that meets
            # a reader's table lock fails at once): read uncommitted takes no read locks.
            with connection.cursor() as cur:
                cur.execute("PRAGMA read_uncommitted = 1")
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if SearchTrial.objects.filter(seq=2, state=SearchTrialState.RUNNING, params__isnull=False).exists():
                    os.kill(os.getpid(), signal.SIGINT)
                    return
                time.sleep(0.05)
        finally:
            connection.close()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_search_stops_on_ctrl_c_keeping_what_ran_resumes_and_ends_in_a_candidate_validated_after_its_windows(
        market, admin_client) -> None:
    import optuna

    from tradebot.search import search_storage

    args = ["--strategy", "scalper", "--study", "scalper-jan", "--bounds", "bb_long_max=-0.5:0.5",
            "bb_short_min=0.5:1.5", "--trials", "3"]
    watcher = interrupt_after_first_trial()
    code, out, err = optimize(*args)
    watcher.join(timeout=5)
    assert code == 130, out + err
    assert "Traceback" not in out + err and "trials run in this process: " in out
    assert "stopped (Ctrl-C): 1 of 3 trials finished and kept" in out, out
    assert "Resume with: manage.py optimize --strategy scalper --study scalper-jan" in out
    study = SearchStudy.objects.get(name="scalper-jan")
    kept = {t.seq: (t.state, t.value, t.params) for t in study.trials.all()}
    assert [s for s, _, _ in kept.values()] == [SearchTrialState.COMPLETE, SearchTrialState.INTERRUPTED]
    assert study.status == "stopped" and study.coordinator == ""
    # The first trial is the active version's own values: the figure the others are read against.
    assert kept[1][2] == {"bb_long_max": 0.5, "bb_short_min": 0.5} and study.trials.get(seq=1).figures["baseline"]

    code, out, err = optimize(*args)
    assert code == 0 and "Traceback" not in out + err, out + err
    assert "study scalper-jan (resumed at 1 finished trials)" in out and "3/3 trials finished" in out, out
    trials = list(study.trials.order_by("seq"))
    assert (trials[0].state, trials[0].value, trials[0].params) == kept[1]  # what ran before is kept as it was
    assert [t.state for t in trials[2:]] == [SearchTrialState.COMPLETE] * 2 and trials[1].state == "interrupted"
    loaded = optuna.load_study(study_name=study.optuna_name, storage=search_storage(heartbeat=False))
    states = [t.state for t in loaded.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 3 and states.count(optuna.trial.TrialState.FAIL) == 1

    study.refresh_from_db()
    best = max(trials[2:] + trials[:1], key=lambda t: t.value)
    assert best.seq != 1 and best.value > trials[0].value, "every other trial trades less than the fee-eating baseline"
    assert f"candidate playbook v{study.candidate_version} (not active" in out and study.status == "done"
    candidate = PlaybookVersion.objects.get(version=study.candidate_version)
    assert candidate.status == PlaybookStatus.CANDIDATE and candidate.triggered_by == PlaybookTrigger.SEARCH
    assert playbook_current().version == market.version  # a search result never trades by itself
    assert candidate.playbook["strategy_definitions"]["scalper"]["params"]["bb_long_max"] == best.params["bb_long_max"]
    train_from, train_to = study.training["from"], study.training["to"]
    assert candidate.evidence["from"] == train_from and candidate.evidence["to"] == train_to
    # The normal validation judged it, on folds after the training span only (it waits: not enough trades here).
    assert candidate.validation["window"]["evidence"] == [train_from, train_to]
    assert candidate.validation["folds"] and all(f["from"] >= train_to for f in candidate.validation["folds"])
    assert "validation: waiting: not enough evidence" in out
    assert {c["path"] for c in candidate.changes} <= {"strategy_definitions.scalper.params.bb_long_max",
                                                       "strategy_definitions.scalper.params.bb_short_min"}

    page = admin_client.get("/admin/tradebot/searchstudy/").content.decode()
    assert "scalper-jan" in page and "done" in page
    detail = admin_client.get(f"/admin/tradebot/searchstudy/{study.pk}/change/").content.decode()
    assert "interrupted" in detail and "in-process:" in detail
    assert admin_client.get("/admin/tradebot/searchtrial/add/").status_code == 403


def test_a_ticket_that_is_not_queued_any_more_is_left_alone(db) -> None:
    from tradebot.search import search_trial_run

    study = SearchStudy.objects.create(name="s", optuna_name="s-0", strategy="trend_pullback", inst_ids=[BTC],
                                       bounds={"adx_min": [10, 40]}, base_version=1, training={}, source="database",
                                       trials_target=3)
    ticket = SearchTrial.objects.create(study=study, seq=1, state=SearchTrialState.CANCELLED)
    assert search_trial_run(ticket_id=ticket.pk, worker="w@test", dispatch="worker") is None
    ticket.refresh_from_db()
    assert ticket.state == SearchTrialState.CANCELLED and ticket.worker == "" and ticket.started_at is None


def test_a_trial_whose_worker_died_before_its_first_heartbeat_is_lost_not_waited_for_forever(
        transactional_db, settings) -> None:
    """Optuna fails only a trial whose heartbeat went stale: one killed between ask() and its first heartbeat had
    none, and `optimize` waited for it forever. Failed after the grace; a trial with a heartbeat is Optuna's."""
    import optuna
    from django.utils import timezone

    from tradebot.search import search_storage, storage_forget
    from tradebot.search_run import lost_check

    settings.SEARCH_HEARTBEAT_SECONDS, settings.SEARCH_TRIAL_GRACE_SECONDS = 1, 2
    study = SearchStudy.objects.create(name="s", optuna_name="s-heartbeat", strategy="trend_pullback", inst_ids=[BTC],
                                       bounds={"adx_min": [10, 40]}, base_version=1, training={}, source="database",
                                       trials_target=3)
    try:
        optuna.create_study(study_name=study.optuna_name, storage=search_storage(heartbeat=False), direction="maximize")
        watched = optuna.load_study(study_name=study.optuna_name, storage=search_storage(heartbeat=True))
        silent, beating = watched.ask(), watched.ask()  # RUNNING in Optuna; the first never wrote a heartbeat
        search_storage(heartbeat=True).record_heartbeat(beating._trial_id)
        claimed = timezone.now() - timedelta(seconds=10)
        for seq, trial in enumerate((silent, beating), start=1):
            SearchTrial.objects.create(study=study, seq=seq, state=SearchTrialState.RUNNING, dispatch="worker",
                                       number=trial.number, worker=f"w{seq}@test", started_at=claimed)
        search_storage(heartbeat=True).record_heartbeat(beating._trial_id)  # fresh: its worker is alive
        lost_check(study, watched)
        first, second = SearchTrial.objects.order_by("seq")
        assert first.state == SearchTrialState.LOST and "no heartbeat" in first.reason, first.reason
        assert second.state == SearchTrialState.RUNNING
        states = {t.number: t.state for t in optuna.load_study(
            study_name=study.optuna_name, storage=search_storage(heartbeat=False)).trials}
        assert states == {silent.number: optuna.trial.TrialState.FAIL, beating.number: optuna.trial.TrialState.RUNNING}
    finally:
        storage_forget()
