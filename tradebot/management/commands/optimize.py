"""`python manage.py optimize --strategy NAME [--inst ID ...] [--trials N] [--study NAME] [--bounds P=LOW:HIGH ...]`.

Searches one strategy's numeric parameters with Optuna (see tradebot/search.py): trials are replays of the
training windows, run on the reflection workers (or in this process when none answers), the best one
becomes a candidate playbook version that the normal validation judges out of sample. `--trials N` is the
study's total of finished trials: a study of the same name resumes and runs only the missing ones.
Ctrl-C stops cleanly (exit 130): every finished trial is kept.
"""
from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from tradebot.search import SearchError, bounds_parse, search_plan, study_open, study_target


class Command(BaseCommand):
    help = "Search a strategy's numeric parameters (Optuna); the best trial becomes a validated candidate."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--strategy", required=True, help="a strategy of the active playbook")
        parser.add_argument("--inst", nargs="+", default=None, help="instruments (default: every enabled one)")
        parser.add_argument("--trials", default=None,
                            help="finished trials the study should have (default SEARCH_TRIALS)")
        parser.add_argument("--study", default=None, help="the study's name: an existing one resumes")
        parser.add_argument("--bounds", nargs="+", default=[], metavar="P=LOW:HIGH",
                            help="search only these parameters, in these ranges (inside the schema's)")

    def handle(self, *args: Any, **opts: Any) -> None:
        from tradebot.search_run import coordinator_name, reflection_workers, search_finish, search_run, study_claim

        try:
            trials = _trials(opts["trials"])
            plan = search_plan(strategy=opts["strategy"], inst_ids=opts["inst"], trials=trials, study=opts["study"],
                               bounds=bounds_parse(opts["bounds"]) if opts["bounds"] else None)
            dispatch = reflection_workers()
            who = coordinator_name()
            study, created = study_open(plan=plan)
            study_claim(study=study, who=who)
            study_target(study=study, trials=plan.trials)
        except SearchError as exc:
            raise CommandError(str(exc)) from None
        self._describe(study, plan, created, dispatch)
        bar = _Bar(self.stderr._out, total=study.trials_target)  # the raw stream: the bar rewrites its line
        try:
            progress = search_run(study=study, dispatch=dispatch, who=who, on_progress=bar.update,
                                  on_note=lambda text: self.stdout.write(text))
        except KeyboardInterrupt:
            bar.close()
            self._stopped(study, who)
            raise SystemExit(130) from None
        bar.close()
        result = search_finish(study=study, who=who, queue_validation=not dispatch.in_process)
        counts = progress.counts
        self.stdout.write(f"{progress.finished}/{study.trials_target} trials finished: {counts['complete']} complete, "
                          f"{counts['pruned']} pruned, {counts['failed']} failed"
                          + (f"; {counts['lost']} lost with their workers and replaced" if counts["lost"] else ""))
        if result.best is not None:
            params = ", ".join(f"{k}={v:.4g}" for k, v in sorted((result.best.params or {}).items()))
            base = "" if result.baseline is None else f" (the base version's values: {result.baseline:.5f})"
            self.stdout.write(f"best: trial {result.best.number}, objective {result.best.value:.5f}{base}: {params}")
        self.stdout.write(result.message)
        if result.validation:
            self.stdout.write(result.validation)
        elif result.candidate_version and dispatch.in_process:
            self._validate(result.candidate_version)

    def _validate(self, version: int) -> None:
        """No reflection worker: the candidate's validation runs here, as `playbook validate N` would."""
        from tradebot.search_run import search_validate

        self.stdout.write(f"validating v{version} here (out-of-sample folds after the training windows)...")
        try:
            self.stdout.write(search_validate(version=version))
        except KeyboardInterrupt:
            self.stdout.write(f"stopped (Ctrl-C) during the validation: v{version} stays a candidate; "
                              f"validate it with: manage.py playbook validate {version}")
            raise SystemExit(130) from None

    def _describe(self, study: Any, plan: Any, created: bool, dispatch: Any) -> None:
        from tradebot.search import Placement

        placement = Placement.from_json(study.training)
        finished = study.trials.filter(state__in=("complete", "pruned", "failed")).count()
        state = "new" if created else f"resumed at {finished} finished trials"
        bounds = ", ".join(f"{k} [{lo:g}, {hi:g}]" for k, (lo, hi) in sorted(study.bounds.items()))
        self.stdout.write(f"study {study.name} ({state}): strategy {study.strategy} of playbook v{study.base_version} "
                          f"on {', '.join(study.inst_ids)} ({study.source} candles), {study.trials_target} trials; "
                          f"{bounds}")
        windows = ", ".join(f"{a:%Y-%m-%d %H:%M}..{b:%Y-%m-%d %H:%M}" for a, b in placement.windows)
        self.stdout.write(f"objective on {len(placement.windows)} training windows (UTC): {windows}; the validation's "
                          f"folds from {placement.validation[0][0]:%Y-%m-%d %H:%M} on are not seen by the search")
        for note in plan.notes:
            self.stdout.write(note)
        self.stdout.write(dispatch.describe())

    def _stopped(self, study: Any, who: str) -> None:
        from tradebot.search_run import search_stop

        kept = search_stop(study=study, who=who)
        running = f"; {kept['running']} still running on workers finish there and are kept" if kept["running"] else ""
        self.stdout.write(f"stopped (Ctrl-C): {kept['finished']} of {study.trials_target} trials finished and kept"
                          f"{running}; {kept['cancelled']} queued trials cancelled. "
                          f"Resume with: manage.py optimize --strategy {study.strategy} --study {study.name}")


def _trials(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise SearchError(f"--trials must be a whole number, got {text!r}") from None


class _Bar:
    """tqdm's bar (Optuna's own dependency) on the command's error stream, driven by the study's progress."""

    def __init__(self, stream: Any, *, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="trial", file=stream, dynamic_ncols=False, ncols=100, leave=True)
        self.shown = -1

    def update(self, progress: Any) -> None:
        if progress.finished != self.shown:
            self.bar.n = min(progress.finished, self.bar.total)
            self.shown = progress.finished
        self.bar.set_postfix_str(progress.text(), refresh=True)

    def close(self) -> None:
        self.bar.close()
