"""The journal: the record every part of the bot writes.

Cycles, trades, screener logs, risk rejections, LLM calls (with prompt,
answer, tokens and cost), reflections, performance snapshots and plain events
(warnings such as "LLM budget at 80%"). `mode` separates the live bot's rows
from replays (`run_id` names the replay run) and from the demo (`make demo`),
so neither pollutes the live statistics.
"""
from __future__ import annotations

from django.db import models

from market.models import Instrument


class Mode(models.TextChoices):
    LIVE = "live", "Live (paper or OKX demo)"
    REPLAY = "replay", "Replay"
    DEMO = "demo", "Demo (make demo)"  # `manage.py demo`'s workers (BOT_MODE=demo): own rows, own paper account


class CycleState(models.TextChoices):
    """The seed's orchestrator states, plus how a cycle ended."""

    IDLE = "IDLE"
    COLLECTING = "COLLECTING"
    SCREENING = "SCREENING"
    RESEARCHING = "RESEARCHING"
    ANALYZING = "ANALYZING"
    RISK_CHECK = "RISK_CHECK"
    EXECUTING = "EXECUTING"
    CONFIRMING = "CONFIRMING"
    JOURNALING = "JOURNALING"
    REFLECTING = "REFLECTING"
    DONE = "DONE"  # ended, see `outcome`
    SKIPPED = "SKIPPED"  # the previous cycle was still running
    FAILED = "FAILED"
    INTERRUPTED = "INTERRUPTED"  # the process stopped while it ran


TERMINAL_CYCLE_STATES = frozenset({CycleState.DONE, CycleState.SKIPPED, CycleState.FAILED, CycleState.INTERRUPTED})


class CycleOutcome(models.TextChoices):
    PENDING = "pending"
    NO_SIGNAL = "no_signal"
    HOLD = "hold"
    REJECTED = "rejected"
    TRADED = "traded"  # an order was placed (open, add, reduce or close)
    HALTED = "halted"  # the bot was halted or cooling down
    SKIPPED = "skipped"
    ERROR = "error"
    INTERRUPTED = "interrupted"


class Cycle(models.Model):
    instrument = models.ForeignKey(Instrument, on_delete=models.PROTECT, related_name="cycles")
    mode = models.CharField(max_length=10, choices=Mode.choices, default=Mode.LIVE)
    # Indexed as the first column of cycle_run_mode_asof (Meta.indexes).
    run_id = models.CharField(max_length=64, blank=True, default="")
    as_of = models.DateTimeField(help_text="Market time the cycle looks at (wall time live, virtual in replay)")
    started_at = models.DateTimeField(auto_now_add=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    state = models.CharField(max_length=12, choices=CycleState.choices, default=CycleState.IDLE, db_index=True)
    outcome = models.CharField(max_length=12, choices=CycleOutcome.choices, default=CycleOutcome.PENDING, db_index=True)
    reason = models.TextField(blank=True, default="", help_text="Why the cycle ended where it did")
    stage_times = models.JSONField(default=dict, blank=True, help_text="{stage: {started, duration_ms}}")
    brain = models.CharField(max_length=20, blank=True, default="")
    playbook_version = models.IntegerField(null=True, blank=True)
    snapshot = models.JSONField(null=True, blank=True)
    screener_result = models.JSONField(null=True, blank=True)
    research = models.JSONField(null=True, blank=True)
    decision = models.JSONField(null=True, blank=True)
    risk_verdict = models.JSONField(null=True, blank=True)
    client_order_id = models.CharField(max_length=32, blank=True, default="", db_index=True)
    order = models.JSONField(null=True, blank=True, help_text="The order as execution reported it (state, fill, fee)")
    error = models.TextField(blank=True, default="")
    # Issue 15: what the LLM analyst read besides the snapshot and research (positions, account, recent
    # trades, upcoming news), so Claude-aware validation can rebuild the exact prompt with another playbook.
    brain_context = models.JSONField(null=True, blank=True,
                                     help_text="The analyst prompt's inputs beyond the snapshot (LLM brain only)")

    class Meta:
        ordering = ["-as_of", "-id"]
        indexes = [
            models.Index(fields=["instrument", "mode", "-as_of"], name="cycle_inst_mode_asof"),
            # A run's (or the live bot's) cycles in time order, and what the cockpit aggregates over them (issue 17:
            # 100,000 cycles): the newest page of the list, the period's first and last, the last cycle per
            # instrument, the counts by state and the join to their screener logs are read from this index alone.
            models.Index(fields=["run_id", "mode", "as_of", "id", "instrument", "state"], name="cycle_run_mode_asof"),
        ]

    def __str__(self) -> str:
        return f"cycle {self.pk} {self.instrument_id} {self.as_of:%Y-%m-%d %H:%M} {self.state}/{self.outcome}"


class TradeStatus(models.TextChoices):
    OPEN = "open"
    CLOSED = "closed"
    CANCELLED = "cancelled"


class Direction(models.TextChoices):
    LONG = "LONG"
    SHORT = "SHORT"


class Trade(models.Model):
    """The seed's `trades` table: one position from open to close."""

    instrument = models.ForeignKey(Instrument, on_delete=models.PROTECT, related_name="trades")
    cycle = models.ForeignKey(Cycle, null=True, blank=True, on_delete=models.SET_NULL, related_name="trades")
    mode = models.CharField(max_length=10, choices=Mode.choices, default=Mode.LIVE)
    run_id = models.CharField(max_length=64, blank=True, default="", db_index=True)
    opened_at = models.DateTimeField()
    closed_at = models.DateTimeField(null=True, blank=True)
    duration_seconds = models.IntegerField(null=True, blank=True)
    direction = models.CharField(max_length=5, choices=Direction.choices)
    entry_price = models.DecimalField(max_digits=24, decimal_places=10)
    exit_price = models.DecimalField(max_digits=24, decimal_places=10, null=True, blank=True)
    stop_loss = models.DecimalField(max_digits=24, decimal_places=10)
    take_profit = models.DecimalField(max_digits=24, decimal_places=10, null=True, blank=True)
    size = models.DecimalField(max_digits=24, decimal_places=10, help_text="Contracts")
    size_pct = models.DecimalField(max_digits=10, decimal_places=6, null=True, blank=True, help_text="Notional / equity")
    leverage = models.DecimalField(max_digits=6, decimal_places=2, default=1)
    pnl_usd = models.DecimalField(max_digits=24, decimal_places=8, null=True, blank=True, help_text="Net of fees and funding")
    pnl_pct = models.DecimalField(max_digits=14, decimal_places=8, null=True, blank=True, help_text="Net PnL / margin")
    fees_usd = models.DecimalField(max_digits=24, decimal_places=8, default=0)
    funding_usd = models.DecimalField(max_digits=24, decimal_places=8, default=0, help_text="Funding received (+) or paid (-)")
    strategy_used = models.CharField(max_length=50, blank=True, default="", db_index=True)
    confidence_at_entry = models.DecimalField(max_digits=4, decimal_places=3, null=True, blank=True)
    market_regime = models.CharField(max_length=20, blank=True, default="", db_index=True)
    reasoning = models.TextField(blank=True, default="")
    indicators_entry = models.JSONField(null=True, blank=True)
    indicators_exit = models.JSONField(null=True, blank=True)
    research_context = models.JSONField(null=True, blank=True)
    self_review = models.JSONField(null=True, blank=True)
    exit_reason = models.CharField(max_length=30, blank=True, default="", help_text="take_profit, stop_loss, liquidation, signal, manual, flatten")
    status = models.CharField(max_length=10, choices=TradeStatus.choices, default=TradeStatus.OPEN, db_index=True)
    client_order_id = models.CharField(max_length=32, blank=True, default="", db_index=True)
    okx_order_id = models.CharField(max_length=50, blank=True, default="")
    okx_algo_id = models.CharField(max_length=50, blank=True, default="")
    playbook_version = models.IntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-opened_at", "-id"]
        indexes = [
            models.Index(fields=["mode", "status", "-closed_at"], name="trade_mode_status_closed"),
            # A run's open trades (the one an opening fill adds to, a sync's open trades, in opening order):
            # without it SQLite read every run's trades on the instrument, and a journal holding the
            # trades of many replays (validation folds, search trials) made each replay ~3x slower.
            models.Index(fields=["run_id", "mode", "status", "opened_at"], name="trade_run_open"),
            # A run's (or the live bot's) last trades, newest first, as the brain sees them every analysed cycle
            # (tradebot.brain_views.TradeViews): without it each read sorted all the run's trades, 4 ms at 640
            # (0.2 ms with it), so a replay's reads grew with the square of its trades, and live with the journal.
            models.Index(fields=["run_id", "mode", "-opened_at", "-id"], name="trade_run_recent"),
        ]
        # One trade per opening order: two account syncs (the orders worker runs several processes) that find
        # the same fill without its trade both passed the "no trade yet" read and wrote one each; the second
        # INSERT now fails and its writer takes the first one's trade (execution.services.trade_open_record).
        constraints = [models.UniqueConstraint(fields=["client_order_id"], condition=~models.Q(client_order_id=""),
                                               name="trade_one_per_opening_order")]

    def __str__(self) -> str:
        return f"trade {self.pk} {self.direction} {self.instrument_id} {self.status}"


class ScreenerLog(models.Model):
    instrument = models.ForeignKey(Instrument, on_delete=models.PROTECT, related_name="screener_logs")
    cycle = models.ForeignKey(Cycle, null=True, blank=True, on_delete=models.SET_NULL, related_name="screener_logs")
    mode = models.CharField(max_length=10, choices=Mode.choices, default=Mode.LIVE)
    signal = models.BooleanField()
    bypassed = models.BooleanField(default=False, help_text="The screener was not asked")
    bypass_reason = models.CharField(max_length=200, blank=True, default="")
    reason = models.TextField(blank=True, default="")
    snapshot_json = models.JSONField(null=True, blank=True)
    model = models.CharField(max_length=60, blank=True, default="")
    tokens_used = models.IntegerField(default=0)
    latency_ms = models.IntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=14, decimal_places=8, default=0)
    analyst_action = models.CharField(max_length=20, blank=True, default="", help_text="What the analyst then did (seed: opus_action)")
    analyst_agreed = models.BooleanField(null=True, blank=True, help_text="Analyst acted on a pass (seed: opus_agreed)")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        # The Brain page's counts (decisions per hour, pass rate, bypasses by reason) over a run's 100,000 logs,
        # joined to their cycles, read from this index without the rows (their snapshot JSON).
        indexes = [models.Index(fields=["cycle", "mode", "analyst_action", "bypassed", "signal", "bypass_reason"],
                                name="screenerlog_cycle_counts")]


class RiskRejection(models.Model):
    instrument = models.ForeignKey(Instrument, null=True, blank=True, on_delete=models.PROTECT, related_name="risk_rejections")
    cycle = models.ForeignKey(Cycle, null=True, blank=True, on_delete=models.SET_NULL, related_name="risk_rejections")
    mode = models.CharField(max_length=10, choices=Mode.choices, default=Mode.LIVE)
    decision_json = models.JSONField()
    failed_rules = models.JSONField(help_text="[{rule, reason}] for every rule that failed")
    account_state = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]


class LlmCallStatus(models.TextChoices):
    PENDING = "pending"  # written before the call
    OK = "ok"
    INVALID = "invalid"  # answered, but not valid against the schema
    TIMEOUT = "timeout"
    ERROR = "error"
    SKIPPED = "skipped"  # budget exhausted or no key: not sent


class LlmCall(models.Model):
    """One request to a model: written before the call, completed after."""

    cycle = models.ForeignKey(Cycle, null=True, blank=True, on_delete=models.SET_NULL, related_name="llm_calls")
    mode = models.CharField(max_length=10, choices=Mode.choices, default=Mode.LIVE)
    purpose = models.CharField(max_length=20, db_index=True, help_text="screen, position_check, analyze, post_trade, deep_reflection, research, validation")
    provider = models.CharField(max_length=20, default="anthropic")
    model = models.CharField(max_length=60)
    attempt = models.PositiveSmallIntegerField(default=1)
    prompt = models.JSONField(help_text="System prompt and messages as sent")
    raw_answer = models.TextField(blank=True, default="")
    status = models.CharField(max_length=10, choices=LlmCallStatus.choices, default=LlmCallStatus.PENDING, db_index=True)
    parsed = models.BooleanField(default=False)
    parse_error = models.TextField(blank=True, default="")
    input_tokens = models.IntegerField(default=0)
    output_tokens = models.IntegerField(default=0, help_text="Thinking tokens included")
    cache_write_tokens = models.IntegerField(default=0)
    cache_read_tokens = models.IntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=14, decimal_places=8, default=0)
    latency_ms = models.IntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    completed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]


class ReflectionType(models.TextChoices):
    POST_TRADE = "post_trade"
    PERIODIC = "periodic"


class ReflectionLog(models.Model):
    reflection_type = models.CharField(max_length=20, choices=ReflectionType.choices, db_index=True)
    mode = models.CharField(max_length=10, choices=Mode.choices, default=Mode.LIVE)
    status = models.CharField(max_length=20, default="done", help_text="running, done, failed, no_trades")
    trade_ids = models.JSONField(default=list, blank=True)
    input_prompt = models.TextField(blank=True, default="")
    output_json = models.JSONField(null=True, blank=True)
    playbook_changes = models.JSONField(null=True, blank=True)
    old_version = models.IntegerField(null=True, blank=True)
    new_version = models.IntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]


class PerformancePeriod(models.TextChoices):
    HOURLY = "hourly"
    DAILY = "daily"
    WEEKLY = "weekly"


class PerformanceSnapshot(models.Model):
    snapshot_type = models.CharField(max_length=10, choices=PerformancePeriod.choices, db_index=True)
    mode = models.CharField(max_length=10, choices=Mode.choices, default=Mode.LIVE)
    equity = models.DecimalField(max_digits=24, decimal_places=8, null=True, blank=True)
    total_pnl = models.DecimalField(max_digits=24, decimal_places=8, null=True, blank=True)
    win_rate = models.DecimalField(max_digits=6, decimal_places=4, null=True, blank=True)
    profit_factor = models.DecimalField(max_digits=12, decimal_places=4, null=True, blank=True)
    sharpe_ratio = models.DecimalField(max_digits=12, decimal_places=4, null=True, blank=True)
    max_drawdown = models.DecimalField(max_digits=10, decimal_places=6, null=True, blank=True)
    total_trades = models.IntegerField(default=0)
    playbook_version = models.IntegerField(null=True, blank=True)
    metrics_json = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]


class EventLevel(models.TextChoices):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


class JournalEvent(models.Model):
    """Anything worth a line in the journal that is not one of the rows above."""

    level = models.CharField(max_length=10, choices=EventLevel.choices, default=EventLevel.INFO, db_index=True)
    kind = models.CharField(max_length=40, db_index=True, help_text="e.g. llm_budget_warning, degrade_mode, research_skipped")
    message = models.TextField()
    data = models.JSONField(default=dict, blank=True)
    instrument = models.ForeignKey(Instrument, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    cycle = models.ForeignKey(Cycle, null=True, blank=True, on_delete=models.SET_NULL, related_name="events")
    mode = models.CharField(max_length=10, choices=Mode.choices, default=Mode.LIVE)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"[{self.level}] {self.kind}: {self.message[:80]}"
