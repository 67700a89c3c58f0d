"""Parameter search: Optuna over the rules brain's numeric strategy parameters (issue 15, `manage.py optimize`).

What is searched: the parameters of ONE strategy that the playbook schema declares a search range for
(`brain.playbook_schema.search_ranges`), and that the strategy uses (a threshold left None stays off), or a
narrower range a person asks for with `--bounds NAME=LOW:HIGH` (inside the declared one).

Where it is judged, walk-forward: the validation's folds (PLAYBOOK_VALIDATION_DAYS in
PLAYBOOK_VALIDATION_FOLDS, placed as `tradebot.learning.folds_place` places them) are kept for later; the
objective is measured on SEARCH_TRAINING_DAYS before them, in SEARCH_TRAINING_WINDOWS windows. A trial
replays each window on each instrument (rules brain, replay mode, its own run ids) with the base playbook
version whose strategy carries the trial's parameters; its value is the mean return of the windows minus
the worst window's max drawdown. A trial with fewer than SEARCH_MIN_TRADES closed trades, or whose
parameters the schema rejects (a target inside the stop), is pruned: not ranked. The best trial becomes a
CANDIDATE playbook version (never an active one) whose evidence window is the training span, so the normal
validation (`tradebot.learning.playbook_candidate_validate`) judges it only on the folds after it.

Where it lives: the Optuna study in the project's own database (Optuna's RDB storage over a SQLAlchemy URL
built from Django's DATABASES; SQLite alone works, PostgreSQL serves many machines), mirrored by
`tradebot.models.SearchStudy` / `SearchTrial` rows for the admin. A SearchTrial is a ticket: the process
that runs it claims it with a conditional UPDATE (a redelivered task finds it taken and does nothing),
asks Optuna for the trial (`study.optimize(n_trials=1)`: Optuna's own sampler, heartbeat and bookkeeping)
and writes the outcome. `tradebot.search_run` dispatches tickets and waits.
"""
from __future__ import annotations

import copy
import math
import uuid
import warnings
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import connections
from django.db.models import Max, Min
from django.utils import timezone

from brain.models import PlaybookStatus, PlaybookVersion
from brain.playbook import playbook_default
from brain.playbook_schema import SearchRangeError, playbook_validate, search_range_check, search_ranges
from journal.models import Mode, Trade, TradeStatus
from tradebot.learning import FOLD_WARMUP, folds_place, validation_instruments
from tradebot.logging import get_logger, redact
from tradebot.models import SearchStudy, SearchTrial, SearchTrialState

log = get_logger(__name__)
S = SearchTrialState
_STORAGES: dict[tuple[Any, ...], Any] = {}
_FEEDS: dict[str, Any] = {}  # one study's training feed per process (the last study asked for)


class SearchError(Exception):
    """Bad input or a study that cannot run: one line for the person, nothing written."""


def _optuna() -> Any:
    """Optuna, imported on first use (a worker that never runs a trial does not pay for it), kept quiet:
    trial outcomes are our own log lines and rows, and a failed trial's traceback is not the console's."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    return optuna


# --- storage ---------------------------------------------------------------------------------------------------------


def storage_url() -> str:
    """The SQLAlchemy URL of Django's default database (the one this process uses, test databases included)."""
    db = connections["default"].settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        name = str(db["NAME"])
        if name.startswith("file:"):  # a URI (the test runner's shared in-memory database)
            return f"sqlite:///{name}{'&' if '?' in name else '?'}uri=true"
        if name == ":memory:" or not name:
            raise SearchError("the search needs a database other processes can open; an in-memory SQLite one is not")
        return f"sqlite:///{Path(name).resolve()}"
    from sqlalchemy.engine import URL

    return URL.create("postgresql+psycopg", username=db.get("USER") or None, password=db.get("PASSWORD") or None,
                      host=db.get("HOST") or None, port=int(db["PORT"]) if db.get("PORT") else None,
                      database=str(db["NAME"])).render_as_string(hide_password=False)


def _stale_trial(study: Any, trial: Any) -> None:
    """Optuna failed a trial whose heartbeat stopped (its worker died): its ticket is lost, not finished."""
    lost = SearchTrial.objects.filter(study__optuna_name=study.study_name, number=trial.number, state=S.RUNNING).update(
        state=S.LOST, finished_at=timezone.now(),
        reason=f"no heartbeat for {settings.SEARCH_TRIAL_GRACE_SECONDS} s: its worker is gone; "
               f"another trial replaces it")
    if lost:
        log.warning("search_trial_lost", study=study.study_name, number=trial.number)


def search_storage(*, heartbeat: bool) -> Any:
    """Optuna's RDB storage on the project database, one per process (and settings).

    With `heartbeat` (a worker's trials, and the command that watches them) a running trial writes a heartbeat
    every SEARCH_HEARTBEAT_SECONDS and one silent for SEARCH_TRIAL_GRACE_SECONDS is failed by Optuna and its
    ticket marked lost (`_stale_trial`). A trial in the command's own process needs none.
    """
    url = storage_url()
    key = (url, heartbeat, settings.SEARCH_HEARTBEAT_SECONDS, settings.SEARCH_TRIAL_GRACE_SECONDS)
    storage = _STORAGES.get(key)
    if storage is None:
        optuna = _optuna()
        engine: dict[str, Any] = {"pool_pre_ping": True}
        if url.startswith("sqlite"):
            engine["connect_args"] = {"timeout": 30}  # wait for Django's writer as Django does (SQLITE_OPTIONS)
            if "mode=memory" in url:  # the test runner's shared in-memory database: one connection per thread
                from sqlalchemy.pool import SingletonThreadPool

                engine["poolclass"] = SingletonThreadPool
        kwargs: dict[str, Any] = {}
        if heartbeat:
            kwargs = {"heartbeat_interval": settings.SEARCH_HEARTBEAT_SECONDS,
                      "grace_period": settings.SEARCH_TRIAL_GRACE_SECONDS,
                      "heartbeat_stale_trial_callback": _stale_trial}
        storage = _STORAGES[key] = optuna.storages.RDBStorage(url, engine_kwargs=engine, **kwargs)
    return storage


def storage_forget() -> None:
    """Drop the cached storages (their engines) and feeds: tests that remove databases, and after a fork."""
    for storage in _STORAGES.values():
        try:
            storage.engine.dispose()
        except Exception:  # noqa: BLE001 - disposing a dead engine is best effort
            pass
    _STORAGES.clear()
    _FEEDS.clear()


# --- what is searched ------------------------------------------------------------------------------------------------


def bounds_parse(texts: list[str]) -> dict[str, tuple[float, float]]:
    """`--bounds NAME=LOW:HIGH` (repeatable) into {name: (low, high)}; SearchError on any malformed one."""
    bounds: dict[str, tuple[float, float]] = {}
    for text in texts:
        name, sep, rng = text.partition("=")
        name = name.strip()
        if not sep or not name:
            raise SearchError(f"--bounds takes NAME=LOW:HIGH, got {text!r}")
        if not rng.strip():
            raise SearchError(f"the range of {name} is empty: --bounds {name}=LOW:HIGH")
        low_text, colon, high_text = rng.partition(":")
        if not colon or not low_text.strip() or not high_text.strip():
            raise SearchError(f"--bounds takes NAME=LOW:HIGH, got {text!r}")
        try:
            low, high = float(low_text), float(high_text)
        except ValueError:
            raise SearchError(f"--bounds {name}: LOW and HIGH must be numbers, got {rng!r}") from None
        if not (math.isfinite(low) and math.isfinite(high)):
            raise SearchError(f"--bounds {name}: LOW and HIGH must be finite numbers, got {rng!r}")
        if name in bounds:
            raise SearchError(f"--bounds names {name} twice")
        bounds[name] = (low, high)
    return bounds


def search_space(*, strategy_params: dict[str, Any], strategy: str,
                 asked: dict[str, tuple[float, float]] | None) -> dict[str, tuple[float, float]]:
    """The parameters to search and their ranges: the schema's, or the asked ones checked against it."""
    try:
        declared = search_ranges()
    except SearchRangeError as exc:  # a schema edit declared a range the search cannot use
        raise SearchError(f"the playbook schema declares a bad search range: {exc}") from exc
    used = {name: rng for name, rng in declared.items() if strategy_params.get(name) is not None}
    if not asked:
        if not used:
            raise SearchError(f"strategy {strategy} uses no parameter with a declared search range")
        return used
    space: dict[str, tuple[float, float]] = {}
    for name, (low, high) in asked.items():
        if name not in declared:
            raise SearchError(f"{name} is not a searchable parameter (searchable: {', '.join(sorted(declared))})")
        if name not in used:
            raise SearchError(f"strategy {strategy} does not use {name} (it is None there); searchable: "
                              f"{', '.join(sorted(used)) or 'none'}")
        try:
            search_range_check(name=name, low=low, high=high)
        except SearchRangeError as exc:
            raise SearchError(str(exc)) from exc
        d_low, d_high = declared[name]
        if low < d_low or high > d_high:
            raise SearchError(f"the range of {name} ({low:g} to {high:g}) leaves the range the playbook schema "
                              f"declares ({d_low:g} to {d_high:g})")
        space[name] = (low, high)
    return space


# --- where it is judged ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """The training windows (the objective's), the validation folds after them, and the feed's slice."""

    windows: list[tuple[datetime, datetime]]
    validation: list[tuple[datetime, datetime]]
    since: datetime  # the training feed starts here: indicator history before the first window
    data: tuple[datetime, datetime]

    def as_json(self) -> dict[str, Any]:
        return {"windows": [[a.isoformat(), b.isoformat()] for a, b in self.windows],
                "from": self.windows[0][0].isoformat(), "to": self.windows[-1][1].isoformat(),
                "validation": [[a.isoformat(), b.isoformat()] for a, b in self.validation],
                "since": self.since.isoformat(), "data": [self.data[0].isoformat(), self.data[1].isoformat()]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Placement:
        def pair(p: list[str]) -> tuple[datetime, datetime]:
            return datetime.fromisoformat(p[0]), datetime.fromisoformat(p[1])

        return cls(windows=[pair(w) for w in data["windows"]], validation=[pair(v) for v in data["validation"]],
                   since=datetime.fromisoformat(data["since"]), data=pair(data["data"]))


def windows_place(*, data_start: datetime, data_end: datetime, train_days: int, windows: int, val_days: int,
                  folds: int) -> Placement:
    """Walk-forward: the validation folds at the data's end first, the training windows right before them."""
    validation = folds_place(data_start=data_start, data_end=data_end, days=val_days, count=folds, evidence=None)
    if len(validation) < folds:
        raise SearchError(f"not enough market data: {folds} validation folds of {val_days} days in all do not fit in "
                          f"{data_start:%Y-%m-%d %H:%M}..{data_end:%Y-%m-%d %H:%M} UTC")
    end = validation[0][0]
    start = end - timedelta(days=train_days)
    if start < data_start + FOLD_WARMUP:
        raise SearchError(f"not enough market data: {train_days} training days before the validation's {val_days} need "
                          f"candles from {start - FOLD_WARMUP:%Y-%m-%d %H:%M} UTC (with the indicators' warm-up); "
                          f"they start {data_start:%Y-%m-%d %H:%M} UTC")
    step = (end - start) / windows
    placed = [(start + i * step, start + (i + 1) * step) for i in range(windows)]
    # The indicators of the first window see the same history a live cycle's do (the coarsest timeframe's).
    since = max(data_start, start - timedelta(hours=4) * int(settings.INDICATOR_HISTORY_CANDLES))
    return Placement(windows=placed, validation=validation, since=since, data=(data_start, data_end))


def market_span(*, inst_ids: list[str]) -> tuple[str, datetime, datetime]:
    """(source, first, last) of the market the bot trades: the stored candles (the finest timeframe each
    instrument has), or the synthetic market (up to now) when MARKET_DATA_SOURCE=synthetic, as validation does."""
    from market.models import TIMEFRAME_SECONDS, Candle

    if settings.MARKET_DATA_SOURCE == "synthetic":
        from market.feeds.synthetic import EPOCH, SPECS

        unknown = [i for i in inst_ids if i not in SPECS]
        if unknown:
            raise SearchError(f"the synthetic market has no {', '.join(unknown)} (it has {', '.join(sorted(SPECS))})")
        now = timezone.now().replace(second=0, microsecond=0)
        return "synthetic", EPOCH, now - timedelta(minutes=now.minute % 5)
    starts, ends = [], []
    for inst in inst_ids:
        for tf in ("5m", *settings.TIMEFRAMES):
            span = Candle.objects.filter(instrument__inst_id=inst, timeframe=tf, confirmed=True).aggregate(
                lo=Min("ts"), hi=Max("ts"))
            if span["lo"] is not None:
                starts.append(span["lo"])
                ends.append(span["hi"] + timedelta(seconds=TIMEFRAME_SECONDS[tf]))
                break
        else:
            raise SearchError(f"no stored candles for {inst}: load some first "
                              f"(manage.py backfill --inst {inst} --tf 15m 1H 4H)")
    return "database", max(starts), min(ends)


def training_feed(*, study: SearchStudy) -> Any:
    """The market of the study's training span (from its `since`), built once per process: per study for
    stored candles, per span for the synthetic market (the same seed always gives the same bars)."""
    placement = Placement.from_json(study.training)
    until = placement.windows[-1][1]
    key = (f"synthetic:{settings.SYNTHETIC_SEED}:{placement.since.isoformat()}:{until.isoformat()}"
           if study.source == "synthetic" else study.optuna_name)
    feed = _FEEDS.get(key)
    if feed is not None:
        return feed
    if study.source == "synthetic":
        feed = _synthetic_window(since=placement.since, until=until)
    else:
        from market.feeds.replay import ReplayFeed

        feed = ReplayFeed.from_db(inst_ids=list(study.inst_ids), timeframes=["5m", *settings.TIMEFRAMES],
                                  since=placement.since, until=until)
    _FEEDS.clear()  # a worker serves one study at a time: keep only its market in memory
    _FEEDS[key] = feed
    return feed


def _synthetic_window(*, since: datetime, until: datetime) -> Any:
    """The synthetic market the bot trades (same seed, generated from its epoch) cut to [since, until]:
    the indicators start at `since` instead of computing two years of history in every replay."""
    from market.feeds.replay import ReplayFeed, dt_to_ms
    from market.feeds.synthetic import BASE_TIMEFRAME, SyntheticFeed

    market = SyntheticFeed(seed=settings.SYNTHETIC_SEED, end=until + timedelta(hours=1)).market
    lo, hi = dt_to_ms(since), dt_to_ms(until)
    feed = ReplayFeed(instruments=market.specs, name="synthetic")
    keep = (market.ts >= lo) & (market.ts < hi)
    funding = (market.funding_ts <= hi)
    for inst in market.inst_ids:
        feed.add_series(inst, BASE_TIMEFRAME, ts=market.ts[keep], **{k: v[keep] for k, v in market.bars[inst].items()})
        feed.add_funding(inst, ts=market.funding_ts[funding], rate=market.funding_rate[funding])
        ts, contracts, ccy = market.open_interest(inst)
        oi = ts <= hi
        feed.add_open_interest(inst, ts=ts[oi], oi_contracts=contracts[oi], oi_ccy=ccy[oi])
    return feed


# --- the plan: every check before anything is written ----------------------------------------------------------------


@dataclass
class SearchPlan:
    name: str
    strategy: str
    inst_ids: list[str]
    bounds: dict[str, tuple[float, float]]
    trials: int
    base_version: int | None  # None: v1, not stored yet (created when the study is)
    base_playbook: dict
    placement: Placement
    source: str
    existing: SearchStudy | None = None
    notes: list[str] = field(default_factory=list)


def _active_playbook() -> tuple[int | None, dict]:
    """The active version without creating v1 (a refused command writes nothing)."""
    row = PlaybookVersion.objects.filter(status=PlaybookStatus.ACTIVE).order_by("-version").first()
    return (row.version, row.playbook) if row is not None else (None, playbook_default())


def search_plan(*, strategy: str, inst_ids: list[str] | None = None, trials: int | None = None,
                study: str | None = None, bounds: dict[str, tuple[float, float]] | None = None) -> SearchPlan:
    """Check the request; SearchError with one line when it cannot run. Reads only."""
    if trials is not None and trials < 1:
        raise SearchError(f"--trials must be at least 1, got {trials}")
    name = (study or "").strip()
    if study is not None and not name:
        raise SearchError("--study needs a name")
    if len(name) > 100:
        raise SearchError(f"--study names are at most 100 characters, got {len(name)}")
    existing = SearchStudy.objects.filter(name=name).first() if name else None
    if existing is not None:
        return _plan_resume(existing, strategy=strategy, inst_ids=inst_ids, trials=trials, bounds=bounds)
    version, playbook = _active_playbook()
    strategies = playbook["strategy_definitions"]
    if strategy not in strategies:
        raise SearchError(f"unknown strategy {strategy!r}: the active playbook v{version or 1} has "
                          f"{', '.join(sorted(strategies))}")
    space = search_space(strategy_params=strategies[strategy]["params"], strategy=strategy, asked=bounds)
    inst_ids = list(dict.fromkeys(inst_ids or validation_instruments()))
    source, data_start, data_end = market_span(inst_ids=inst_ids)
    placement = windows_place(data_start=data_start, data_end=data_end, train_days=settings.SEARCH_TRAINING_DAYS,
                              windows=settings.SEARCH_TRAINING_WINDOWS, val_days=settings.PLAYBOOK_VALIDATION_DAYS,
                              folds=settings.PLAYBOOK_VALIDATION_FOLDS)
    name = name or f"{strategy}-{timezone.now():%Y%m%d-%H%M%S}"
    return SearchPlan(name=name, strategy=strategy, inst_ids=inst_ids, bounds=space,
                      trials=trials or settings.SEARCH_TRIALS, base_version=version, base_playbook=playbook,
                      placement=placement, source=source)


def _plan_resume(existing: SearchStudy, *, strategy: str, inst_ids: list[str] | None, trials: int | None,
                 bounds: dict[str, tuple[float, float]] | None) -> SearchPlan:
    if existing.strategy != strategy:
        raise SearchError(f"study {existing.name} searches strategy {existing.strategy}, not {strategy}: "
                          f"choose another --study name")
    if inst_ids and list(dict.fromkeys(inst_ids)) != list(existing.inst_ids):
        raise SearchError(f"study {existing.name} trades {', '.join(existing.inst_ids)}, not {', '.join(inst_ids)}: "
                          f"choose another --study name")
    stored = {k: (float(v[0]), float(v[1])) for k, v in existing.bounds.items()}
    if bounds and bounds != stored:
        raise SearchError(f"study {existing.name} searches {_bounds_text(stored)}, not {_bounds_text(bounds)}: "
                          f"choose another --study name")
    base = PlaybookVersion.objects.filter(version=existing.base_version).first()
    if base is None:
        raise SearchError(f"study {existing.name} changes playbook v{existing.base_version}, which no longer exists")
    return SearchPlan(name=existing.name, strategy=existing.strategy, inst_ids=list(existing.inst_ids), bounds=stored,
                      trials=trials or existing.trials_target, base_version=base.version, base_playbook=base.playbook,
                      placement=Placement.from_json(existing.training), source=existing.source, existing=existing)


def _bounds_text(bounds: dict[str, tuple[float, float]]) -> str:
    return ", ".join(f"{k} [{lo:g}, {hi:g}]" for k, (lo, hi) in sorted(bounds.items()))


def study_open(*, plan: SearchPlan) -> tuple[SearchStudy, bool]:
    """The study's rows (and Optuna's study) for the plan: (study, created). A resumed one keeps its own."""
    from brain.playbook import playbook_current

    if plan.existing is not None:
        return plan.existing, False  # its target changes once the command holds it (study_target)
    optuna = _optuna()
    base = playbook_current()  # creates v1 when the database has none yet
    optuna_name = f"{plan.name}-{uuid.uuid4().hex[:8]}"
    seed = zlib.crc32(plan.name.encode())  # from the name: a study of the same name samples the same way
    storage = search_storage(heartbeat=False)
    study = optuna.create_study(study_name=optuna_name, storage=storage, direction="maximize")
    for key, value in (("strategy", plan.strategy), ("inst_ids", plan.inst_ids), ("base_version", base.version),
                       ("training", plan.placement.as_json())):
        study.set_user_attr(key, value)
    current = base.playbook["strategy_definitions"][plan.strategy]["params"]
    baseline = {k: float(current[k]) for k in plan.bounds}
    if all(lo <= baseline[k] <= hi for k, (lo, hi) in plan.bounds.items()):
        # The first trial is the base version's own values: the figure every other trial is read against.
        study.enqueue_trial(baseline, user_attrs={"baseline": True})
    else:
        plan.notes.append("the base version's values lie outside the bounds: no baseline trial")
    try:
        row = SearchStudy.objects.create(
            name=plan.name, optuna_name=optuna_name, strategy=plan.strategy, inst_ids=plan.inst_ids,
            bounds={k: [lo, hi] for k, (lo, hi) in plan.bounds.items()}, base_version=base.version,
            training=plan.placement.as_json(), source=plan.source, cycle_seconds=settings.SEARCH_CYCLE_SECONDS,
            min_trades=settings.SEARCH_MIN_TRADES, trials_target=plan.trials, seed=seed)
    except Exception:
        optuna.delete_study(study_name=optuna_name, storage=storage)  # the two stores agree: neither has it
        raise
    return row, True


def study_target(*, study: SearchStudy, trials: int) -> None:
    """A resumed study's number of finished trials to reach (what --trials asks this time)."""
    if trials != study.trials_target:
        SearchStudy.objects.filter(pk=study.pk).update(trials_target=trials)
        study.trials_target = trials


# --- one trial -------------------------------------------------------------------------------------------------------


def trial_playbook(*, base: dict, strategy: str, params: dict[str, float]) -> dict:
    """The base playbook with the strategy's parameters set; ValueError when the schema rejects them."""
    data = copy.deepcopy(base)
    data["strategy_definitions"][strategy]["params"].update(params)
    return playbook_validate(data).model_dump(mode="json")


def _closed(run_id: str) -> list[tuple[Decimal, datetime]]:
    rows = Trade.objects.filter(mode=Mode.REPLAY, run_id=run_id, status=TradeStatus.CLOSED, pnl_usd__isnull=False)
    return [(t.pnl_usd, t.closed_at or t.opened_at) for t in rows.only("pnl_usd", "closed_at", "opened_at")]


def _max_drawdown(trades: list[tuple[Decimal, datetime]], equity: Decimal) -> Decimal:
    peak = level = equity
    worst = Decimal(0)
    for pnl, _ in sorted(trades, key=lambda t: t[1]):
        level += pnl
        peak = max(peak, level)
        worst = max(worst, (peak - level) / peak if peak > 0 else Decimal(1))
    return worst


def trial_evaluate(*, study: SearchStudy, playbook: dict, label: str, feed: Any, run_ids: list[str],
                   tick: Any = None) -> tuple[float, dict[str, Any]]:
    """Replay every training window on every instrument: (objective, figures); `run_ids` gets each replay's
    run id as it starts (a trial that fails half-way still says where its journal rows are).

    Objective: mean return of the windows minus the worst window's max drawdown (each window's accounts
    start at PAPER_START_BALANCE per instrument). Ctrl-C in a replay raises KeyboardInterrupt here.
    """
    from tradebot.replay import replay_run

    placement = Placement.from_json(study.training)
    equity = Decimal(settings.PAPER_START_BALANCE) * len(study.inst_ids)
    cycle = timedelta(seconds=study.cycle_seconds)
    windows = []
    for k, (start, end) in enumerate(placement.windows):
        trades: list[tuple[Decimal, datetime]] = []
        for inst in study.inst_ids:
            run_id = f"search-{study.pk}-{label}-w{k}-{inst.split('-')[0]}-{uuid.uuid4().hex[:6]}"[:64]
            run_ids.append(run_id)
            summary = replay_run(inst_id=inst, start=start, end=end, feed=feed, brain="rules", cycle=cycle,
                                 run_id=run_id, playbook=playbook, playbook_version=study.base_version, progress=tick)
            if summary.interrupted:
                raise KeyboardInterrupt
            trades.extend(_closed(run_id))
        pnl = sum((p for p, _ in trades), Decimal(0))
        windows.append({"from": start.isoformat(), "to": end.isoformat(), "trades": len(trades),
                        "pnl": str(pnl.quantize(Decimal("0.01"))), "return": float(pnl / equity),
                        "max_drawdown": float(_max_drawdown(trades, equity))})
    mean_return = sum(w["return"] for w in windows) / len(windows)
    worst = max(w["max_drawdown"] for w in windows)
    figures = {"windows": windows, "trades": sum(w["trades"] for w in windows), "mean_return": mean_return,
               "worst_drawdown": worst}
    return mean_return - worst, figures


def search_trial_run(*, ticket_id: int, worker: str, dispatch: str, tick: Any = None) -> str | None:
    """Run one ticket: claim it, ask Optuna for a trial, replay it, tell the value. Its final state, or None
    when the ticket was not queued any more (a redelivered task, a cancelled ticket): nothing is done then."""
    ticket = SearchTrial.objects.select_related("study").filter(pk=ticket_id, state=S.QUEUED).first()
    if ticket is None:
        log.info("search_trial_skipped", ticket=ticket_id, reason="not queued (taken, cancelled or gone)")
        return None
    row = ticket.study
    # Optuna is ready before the claim: a claimed ticket gets its trial number within moments, so the
    # watcher can tell a worker that died before its trial started (search_run.lost_check).
    optuna = _optuna()
    storage = search_storage(heartbeat=dispatch == "worker")
    # Seeded per ticket: two workers starting at once sample different points, and a study replays the same way.
    sampler = optuna.samplers.TPESampler(seed=(row.seed + ticket.seq) % (2**32), constant_liar=True)
    study = optuna.load_study(study_name=row.optuna_name, storage=storage, sampler=sampler)
    claimed = SearchTrial.objects.filter(pk=ticket_id, state=S.QUEUED).update(
        state=S.RUNNING, worker=worker[:200], dispatch=dispatch, started_at=timezone.now())
    if not claimed:
        log.info("search_trial_skipped", ticket=ticket_id, reason="taken meanwhile")
        return None
    base_playbook = PlaybookVersion.objects.get(version=row.base_version).playbook
    base = {k: float(v) for k, v in base_playbook["strategy_definitions"][row.strategy]["params"].items()
            if k in row.bounds}
    outcome: dict[str, Any] = {"run_ids": [], "reason": ""}

    def objective(trial: Any) -> float:
        SearchTrial.objects.filter(pk=ticket_id).update(number=trial.number)
        params = {name: trial.suggest_float(name, float(lo), float(hi)) for name, (lo, hi) in row.bounds.items()}
        SearchTrial.objects.filter(pk=ticket_id).update(params=params)
        try:
            playbook = trial_playbook(base=base_playbook, strategy=row.strategy, params=params)
        except ValueError as exc:
            outcome["reason"] = "invalid combination: " + _first_error(exc)
            raise optuna.TrialPruned(outcome["reason"]) from None
        try:
            value, figures = trial_evaluate(study=row, playbook=playbook, label=f"t{trial.number}",
                                            feed=training_feed(study=row), run_ids=outcome["run_ids"], tick=tick)
        except (KeyboardInterrupt, optuna.TrialPruned):
            raise
        except Exception as exc:
            outcome["reason"] = redact(f"{type(exc).__name__}: {exc}")[:2000]
            log.warning("search_trial_failed", study=row.name, number=trial.number, error=outcome["reason"])
            raise
        figures["baseline"] = params == base
        outcome["figures"] = figures
        if figures["trades"] < row.min_trades:
            outcome["reason"] = (f"{figures['trades']} closed trades over the training windows, "
                                 f"at least {row.min_trades} (SEARCH_MIN_TRADES) to rank a trial")
            raise optuna.TrialPruned(outcome["reason"])
        return value

    def mirror(_study: Any, frozen: Any) -> None:
        state = {optuna.trial.TrialState.COMPLETE: S.COMPLETE, optuna.trial.TrialState.PRUNED: S.PRUNED}.get(
            frozen.state, S.FAILED)
        SearchTrial.objects.filter(pk=ticket_id, state=S.RUNNING).update(
            state=state, value=frozen.value if state == S.COMPLETE else None, params=frozen.params,
            figures=outcome.get("figures"), run_ids=outcome["run_ids"], reason=outcome["reason"],
            finished_at=timezone.now())

    try:
        study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[mirror], gc_after_trial=False)
    except KeyboardInterrupt:
        _interrupted(ticket_id, outcome["run_ids"])
        raise
    except Exception as exc:
        # Ctrl-C inside one of Optuna's own writes can make its bookkeeping fail after it (Optuna then raises
        # something else): still a Ctrl-C for the person, not a traceback.
        if not _from_ctrl_c(exc):
            raise
        _interrupted(ticket_id, outcome["run_ids"])
        raise KeyboardInterrupt from exc
    except optuna.exceptions.UpdateFinishedTrialError:
        # The watcher failed it meanwhile (its heartbeat came too late: a starved worker): the ticket stays lost
        # and another replaces it; say that its worker was alive after all.
        log.warning("search_trial_finished_meanwhile", study=row.name, ticket=ticket_id)
        SearchTrial.objects.filter(pk=ticket_id, state=S.LOST).update(
            reason=f"its heartbeat was late by more than {settings.SEARCH_TRIAL_GRACE_SECONDS} s (a busy worker, "
                   f"alive after all): failed and replaced; its result was not counted", run_ids=outcome["run_ids"])
    return SearchTrial.objects.filter(pk=ticket_id).values_list("state", flat=True).first()


def _interrupted(ticket_id: int, run_ids: list[str]) -> None:
    SearchTrial.objects.filter(pk=ticket_id, state=S.RUNNING).update(
        state=S.INTERRUPTED, reason="stopped by Ctrl-C: its replays are not scored", finished_at=timezone.now(),
        run_ids=run_ids)


def _from_ctrl_c(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
            return str(first.get("msg", exc)).removeprefix("Value error, ")
        except (IndexError, TypeError, AttributeError):
            pass
    return str(exc).splitlines()[0]
