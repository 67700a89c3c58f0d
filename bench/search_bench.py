"""The `search` section: parameter-search throughput (`manage.py optimize`), trials per minute with one and with two
reflection workers on Redis and the bench's scratch PostgreSQL database (target: two >= 1.7x one).

The bench is the study's coordinator (the same `tradebot.search_run.search_run` the command runs) and real
solo-pool workers run the trials. Both measured studies search trend_pullback over the same training windows
with the same seed, so they try the same parameters (Optuna's first 10 trials are random): the difference is
the workers. Each worker first runs warm-up trials (its Optuna import, the training market it builds once per
process), not counted.
"""
from __future__ import annotations

import time
from typing import Any

from bench import infra

INST = "BTC-USDT-SWAP"
STRATEGY = "trend_pullback"
TRAINING_DAYS, WINDOWS = 6, 3  # a trial: three 2-day windows of 5-minute cycles (1,728 cycles)


def _configure() -> None:
    from django.conf import settings

    settings.MARKET_DATA_SOURCE = "synthetic"  # as the workers trade it (the harness's default)
    settings.BRAIN = "rules"
    settings.INSTRUMENTS = [INST]
    settings.SEARCH_TRAINING_DAYS, settings.SEARCH_TRAINING_WINDOWS = TRAINING_DAYS, WINDOWS
    settings.SEARCH_CYCLE_SECONDS = 300
    settings.SEARCH_MIN_TRADES = 0  # every trial is scored: the same work whatever it finds
    settings.SEARCH_WORKER_PING_SECONDS = 3.0


def _run(study: Any, *, target: int, note: str) -> tuple[float, list[Any]]:
    """Run `study` to `target` finished trials on the workers that answer; (seconds, the new trials)."""
    from tradebot.models import SearchStudy, SearchTrial
    from tradebot.search import study_target
    from tradebot.search_run import coordinator_name, reflection_workers, search_run, study_claim

    dispatch = reflection_workers()
    if dispatch.in_process:
        raise RuntimeError(f"{note}: {dispatch.describe()}")
    who = coordinator_name()
    study_claim(study=study, who=who)
    study_target(study=study, trials=target)
    before = set(SearchTrial.objects.filter(study=study).values_list("pk", flat=True))
    began = time.perf_counter()
    search_run(study=study, dispatch=dispatch, who=who)
    elapsed = time.perf_counter() - began
    SearchStudy.objects.filter(pk=study.pk).update(coordinator="", coordinator_seen_at=None)
    return elapsed, list(SearchTrial.objects.filter(study=study).exclude(pk__in=before).order_by("seq"))


def _study(plan: Any, name: str, seed: int) -> Any:
    from dataclasses import replace

    from tradebot.models import SearchStudy
    from tradebot.search import study_open

    study, _ = study_open(plan=replace(plan, name=name, existing=None, notes=[]))
    SearchStudy.objects.filter(pk=study.pk).update(seed=seed)  # the same parameters in both measured studies
    study.seed = seed
    return study


def _warm(plan: Any, workers: Any, names: list[str]) -> None:
    """Warm-up trials until every worker in `names` has run one (its market built, Optuna imported)."""
    study = _study(plan, f"bench-warm-{len(names)}", seed=1)
    target = 0
    for _ in range(6):
        target += len(names)
        _, trials = _run(study, target=target, note="warm-up")
        done = {t.worker.split("@")[0] for t in study.trials.all() if t.state == "complete"}
        if set(names) <= done:
            return
    raise RuntimeError(f"warm-up: workers {sorted(set(names) - done)} never took a trial\n{workers.worker_logs()}")


def _figure(label: str, elapsed: float, trials: list[Any]) -> float:
    done = [t for t in trials if t.state in ("complete", "pruned", "failed")]
    per_trial = [(t.finished_at - t.started_at).total_seconds() for t in done if t.started_at and t.finished_at]
    rate = len(done) / elapsed * 60
    by = {}
    for t in done:
        by[t.worker.split("@")[0]] = by.get(t.worker.split("@")[0], 0) + 1
    print(f"  {label}: {len(done)} trials in {elapsed:.1f} s = {rate:.1f} trials/min "
          f"(a trial {sum(per_trial) / len(per_trial):.2f} s on its worker on average; by worker {by})", flush=True)
    return rate


def bench_search() -> None:
    missing = infra.worker_sections_missing()
    if missing:
        print(f"search: skipped: {missing}")
        return
    _configure()
    from tradebot.search import search_plan, storage_forget

    trials = infra.OPTIONS.trials
    plan = search_plan(strategy=STRATEGY, inst_ids=[INST], trials=trials)
    windows = ", ".join(f"{a:%m-%d %H:%M}..{b:%m-%d %H:%M}" for a, b in plan.placement.windows)
    print(f"search: {STRATEGY}, {len(plan.bounds)} parameters, {trials} trials a measurement; a trial replays "
          f"{WINDOWS} training windows of {TRAINING_DAYS // WINDOWS} days at 5-minute cycles ({windows} UTC, {INST}, "
          f"synthetic market, rules brain); PostgreSQL + Redis, solo-pool reflection workers", flush=True)
    workers = infra.workers_start_queues({"reflection": "reflection"})
    try:
        _warm(plan, workers, ["reflection"])
        one = _figure("1 reflection worker ", *_run(_study(plan, "bench-1", seed=7), target=trials, note="1 worker"))
        workers.start_as(reflection2="reflection")
        _warm(plan, workers, ["reflection", "reflection2"])
        two = _figure("2 reflection workers", *_run(_study(plan, "bench-2", seed=7), target=trials, note="2 workers"))
        print(f"  two workers / one: {two / one:.2f}x (target >= 1.7x); {infra.load()}", flush=True)
    finally:
        workers.stop_all()
        storage_forget()
