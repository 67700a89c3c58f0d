"""The brain's own tables: playbook versions, the research cache, the news calendar."""
from __future__ import annotations

from django.db import models


class PlaybookTrigger(models.TextChoices):
    INIT = "init"
    REFLECTION = "reflection"
    MANUAL = "manual"
    ROLLBACK = "rollback"  # a copy of an older version (a candidate like any other)
    SEARCH = "search"  # the best trial of a parameter search (manage.py optimize), a candidate like any other


class PlaybookStatus(models.TextChoices):
    CANDIDATE = "candidate"  # proposed by reflection, waiting for validation
    ACTIVE = "active"  # the one the brains trade on
    REJECTED = "rejected"  # failed validation
    RETIRED = "retired"  # replaced by a newer active version


# Allowed status transitions; anything else is refused by playbook_transition.
PLAYBOOK_TRANSITIONS: dict[str, frozenset[str]] = {
# Only validation (brain.playbook.playbook_promote) or a person's forced, journaled activation
# (brain.playbook.playbook_activate_forced) moves a version to ACTIVE.
    PlaybookStatus.CANDIDATE: frozenset({PlaybookStatus.ACTIVE, PlaybookStatus.REJECTED}),
    PlaybookStatus.ACTIVE: frozenset({PlaybookStatus.RETIRED}),
    PlaybookStatus.REJECTED: frozenset({PlaybookStatus.ACTIVE}),  # forced by a person only
    PlaybookStatus.RETIRED: frozenset({PlaybookStatus.ACTIVE}),  # forced by a person only
}


class PlaybookVersion(models.Model):
    version = models.PositiveIntegerField(unique=True)
    playbook = models.JSONField(help_text="Validated by brain.playbook_schema.Playbook")
    change_summary = models.TextField(blank=True, default="")
    triggered_by = models.CharField(max_length=12, choices=PlaybookTrigger.choices)
    performance_at_update = models.JSONField(null=True, blank=True)
    status = models.CharField(max_length=10, choices=PlaybookStatus.choices, default=PlaybookStatus.ACTIVE, db_index=True)
    validation = models.JSONField(null=True, blank=True, help_text="Replay figures of a candidate vs the active version")
    parent_version = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # Issue 15: what a candidate changes in trading content and why (path, old, new, reason, evidence_trade_ids).
    changes = models.JSONField(null=True, blank=True, help_text="Trading fields this version changes, why, citing trades")
    # The trades and time span the change was learned from: validation folds never overlap it.
    evidence = models.JSONField(null=True, blank=True, help_text="Evidence window (from, to, trade ids)")
    validated_against = models.PositiveIntegerField(null=True, blank=True, help_text="The active version it was judged against")
    activated_at = models.DateTimeField(null=True, blank=True)
    activated_by = models.CharField(max_length=150, blank=True, default="", help_text="validation, or the person who forced it")
    activation_reason = models.TextField(blank=True, default="")
    # Issue 15 (replay --learn): the replay run that learned this version; its statuses are that run's
    # (active = what the run ended trading). Blank: the bot's own versions, the only ones live trading reads.
    run_id = models.CharField(max_length=64, blank=True, default="", db_index=True,
                              help_text="The replay run that learned it (blank: the bot's own)")

    class Meta:
        ordering = ["-version"]

    def __str__(self) -> str:
        return f"playbook v{self.version} ({self.status}, {self.triggered_by})"


class PlaybookObservation(models.Model):
    """Statistics a reflection measured (win rate, R:R, calibration), recorded against the version that traded.

    They describe the past; they do not change what trades, so they are not a new version.
    """

    version = models.ForeignKey(PlaybookVersion, on_delete=models.CASCADE, related_name="observations")
    statistics = models.JSONField(help_text="brain.playbook.playbook_split's statistics part")
    trade_ids = models.JSONField(default=list)
    reflection_log_id = models.PositiveIntegerField(null=True, blank=True, unique=True)
    mode = models.CharField(max_length=10, default="live")
    run_id = models.CharField(max_length=64, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"observation {self.pk} of playbook v{self.version.version} ({len(self.trade_ids)} trades)"


class ResearchCache(models.Model):
    """The seed's research_cache: one answer per key, reused for ttl_seconds."""

    key = models.CharField(max_length=200, db_index=True, help_text="instrument + triggers")
    query = models.TextField()
    response_json = models.JSONField()
    source = models.CharField(max_length=20, default="perplexity")
    ttl_seconds = models.PositiveIntegerField(default=3600)
    created_at = models.DateTimeField(db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]


class NewsKind(models.TextChoices):
    FOMC = "FOMC"
    CPI = "CPI"
    NFP = "NFP"
    GDP = "GDP"
    OTHER = "OTHER"


class NewsEvent(models.Model):
    name = models.CharField(max_length=120)
    kind = models.CharField(max_length=10, choices=NewsKind.choices)
    scheduled_at = models.DateTimeField(db_index=True, help_text="UTC")
    impact = models.CharField(max_length=10, default="high", choices=[("high", "high"), ("medium", "medium"), ("low", "low")])
    currency = models.CharField(max_length=10, default="USD")
    source = models.CharField(max_length=300, blank=True, default="")
    confidence = models.CharField(max_length=10, default="high", help_text="How sure the shipped date is: high, medium, low")
    enabled = models.BooleanField(default=True)

    class Meta:
        ordering = ["scheduled_at"]
        constraints = [models.UniqueConstraint(fields=["kind", "scheduled_at"], name="news_event_kind_time")]

    def __str__(self) -> str:
        return f"{self.name} {self.scheduled_at:%Y-%m-%d %H:%M} UTC"
