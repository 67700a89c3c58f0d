"""The project's own rows: the bot-control proxy (halt / resume / flatten in the admin) and the parameter search."""
from __future__ import annotations

from django.db import models

from execution.models import BotState


class BotControl(BotState):
    class Meta:
        proxy = True
        verbose_name = "bot control"
        verbose_name_plural = "bot controls"


# --- parameter search (issue 15, `manage.py optimize`) -------------------------------------------------------------
# Optuna keeps the study itself in its own tables in this database (RDB storage). These rows mirror it for the
# admin and the coordinator: one SearchStudy per study, one SearchTrial per trial the command asked for (a
# ticket: queued, then claimed by the process that runs it with a conditional UPDATE, so a redelivered task is
# harmless), with the trial's Optuna number, parameters, value and the figures of its replays.


class SearchStudyStatus(models.TextChoices):
    RUNNING = "running"  # an optimize command is coordinating it
    STOPPED = "stopped"  # Ctrl-C (or the command died): run the same command to resume
    DONE = "done"  # the asked number of trials finished


class SearchStudy(models.Model):
    name = models.CharField(max_length=100, unique=True)
    optuna_name = models.CharField(max_length=150, unique=True, help_text="The study's name in Optuna's tables")
    strategy = models.CharField(max_length=100)
    inst_ids = models.JSONField(default=list)
    bounds = models.JSONField(default=dict, help_text="parameter -> [low, high] searched")
    base_version = models.PositiveIntegerField(help_text="The playbook version the trials change the strategy of")
    training = models.JSONField(default=dict,
                                help_text="Training windows (the objective's) and the validation span after them")
    source = models.CharField(max_length=20, help_text="database (stored candles) or synthetic")
    cycle_seconds = models.PositiveIntegerField(default=300)
    min_trades = models.PositiveIntegerField(default=0,
                                             help_text="Fewer closed trades over the windows: pruned, not ranked")
    trials_target = models.PositiveIntegerField(
        help_text="Finished trials the study is asked for (all commands together)")
    seed = models.BigIntegerField(default=0)
    status = models.CharField(max_length=10, choices=SearchStudyStatus.choices, default=SearchStudyStatus.RUNNING)
    coordinator = models.CharField(max_length=200, blank=True, default="",
                                   help_text="host:pid of the command running it")
    coordinator_seen_at = models.DateTimeField(null=True, blank=True)
    baseline_value = models.FloatField(null=True, blank=True,
                                       help_text="The objective of the base version's own values")
    best_trial = models.IntegerField(null=True, blank=True)
    best_value = models.FloatField(null=True, blank=True)
    best_params = models.JSONField(null=True, blank=True)
    candidate_version = models.PositiveIntegerField(null=True, blank=True)
    message = models.TextField(blank=True, default="", help_text="The last command's outcome")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "search studies"

    def __str__(self) -> str:
        return f"study {self.name} ({self.strategy}, {self.status})"


class SearchTrialState(models.TextChoices):
    QUEUED = "queued"  # asked for, its task not started yet
    RUNNING = "running"
    COMPLETE = "complete"
    PRUNED = "pruned"  # not ranked: an invalid combination, or too few trades to judge
    FAILED = "failed"  # the trial's replay raised
    LOST = "lost"  # its worker died (no heartbeat): a new trial replaces it
    CANCELLED = "cancelled"  # still queued when the command stopped: never ran
    INTERRUPTED = "interrupted"  # Ctrl-C stopped it in the command's own process


FINISHED_TRIAL_STATES = (SearchTrialState.COMPLETE, SearchTrialState.PRUNED, SearchTrialState.FAILED)


class SearchTrial(models.Model):
    study = models.ForeignKey(SearchStudy, on_delete=models.CASCADE, related_name="trials")
    seq = models.PositiveIntegerField(help_text="The order the command asked for it")
    state = models.CharField(max_length=12, choices=SearchTrialState.choices, default=SearchTrialState.QUEUED,
                             db_index=True)
    number = models.IntegerField(null=True, blank=True, help_text="Optuna's trial number")
    params = models.JSONField(null=True, blank=True)
    value = models.FloatField(null=True, blank=True)
    figures = models.JSONField(null=True, blank=True, help_text="Per training window: trades, PnL, return, drawdown")
    run_ids = models.JSONField(default=list)
    reason = models.TextField(blank=True, default="")
    dispatch = models.CharField(max_length=12, default="worker", help_text="worker (Celery) or in-process")
    worker = models.CharField(max_length=200, blank=True, default="")
    queued_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["study_id", "seq"]
        constraints = [models.UniqueConstraint(fields=["study", "seq"], name="search_trial_study_seq")]

    def __str__(self) -> str:
        return f"trial {self.seq} of {self.study_id} ({self.state})"
