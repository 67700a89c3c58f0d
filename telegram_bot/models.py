"""The Telegram outbox: alerts derived from the journal, and their delivery to each chat.

An `Alert` is what a person should hear about (a fill, a close, a halt...), built by
`telegram_bot.alerts.alerts_scan` from rows the lower apps already wrote. Each source
row is claimed once by an `AlertKey` (unique), so a rescan never alerts twice. Repeats
of one alert type within the cooldown, and INFO/WARN alerts during silent hours, wait
in one PENDING alert that merges them. When it is due the alert is DISPATCHED: its text
is frozen and one `AlertDelivery` per chat is queued. A delivery that fails stays
QUEUED with its next attempt time (backoff, or Telegram's `retry_after`): never lost.
"""
from __future__ import annotations

from django.db import models


class Severity(models.TextChoices):
    INFO = "INFO"
    WARN = "WARN"
    CRITICAL = "CRITICAL"


class AlertStatus(models.TextChoices):
    PENDING = "pending"  # waiting for its time (cooldown, silent hours); repeats merge into it
    DISPATCHED = "dispatched"  # text frozen, deliveries queued


class Alert(models.Model):
    alert_type = models.CharField(max_length=40, db_index=True, help_text="order_filled, trade_closed, sl_hit, bot_halted, ...")
    severity = models.CharField(max_length=8, choices=Severity.choices, default=Severity.INFO)
    status = models.CharField(max_length=12, choices=AlertStatus.choices, default=AlertStatus.PENDING, db_index=True)
    lines = models.JSONField(default=list, help_text="One text per merged source row, oldest first")
    send_after = models.DateTimeField(db_index=True)
    held_reason = models.CharField(max_length=40, blank=True, default="", help_text="cooldown or silent_hours")
    text = models.TextField(blank=True, default="", help_text="The message as dispatched")
    created_at = models.DateTimeField(auto_now_add=True)
    dispatched_at = models.DateTimeField(null=True, blank=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"alert {self.pk} {self.severity} {self.alert_type} ({self.status}, {len(self.lines)} line(s))"


class AlertKey(models.Model):
    """One source row (e.g. `order:<client order id>`, `event:<id>`) that has become (part of) an alert."""

    key = models.CharField(max_length=120, unique=True)
    alert = models.ForeignKey(Alert, on_delete=models.CASCADE, related_name="keys")
    created_at = models.DateTimeField(auto_now_add=True)


class DeliveryStatus(models.TextChoices):
    QUEUED = "queued"
    SENDING = "sending"  # claimed by a send pass
    SENT = "sent"
    FAILED = "failed"  # Telegram refused it for good (bad chat, bot blocked): journaled


class AlertDelivery(models.Model):
    alert = models.ForeignKey(Alert, on_delete=models.CASCADE, related_name="deliveries")
    chat_id = models.BigIntegerField()
    status = models.CharField(max_length=10, choices=DeliveryStatus.choices, default=DeliveryStatus.QUEUED, db_index=True)
    attempts = models.PositiveIntegerField(default=0)
    parts_sent = models.PositiveIntegerField(default=0, help_text="A long text goes in parts of <= 4096 characters")
    message_ids = models.JSONField(default=list, blank=True)
    next_attempt_at = models.DateTimeField(db_index=True)
    claimed_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="", help_text="Secrets redacted")
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["id"]
        constraints = [models.UniqueConstraint(fields=["alert", "chat_id"], name="telegram_delivery_alert_chat")]


class ScanCursor(models.Model):
    """Where the last scan of one source ended (the next scan looks back a little from here)."""

    source = models.CharField(max_length=20, unique=True)
    scanned_to = models.DateTimeField()
