"""Market state: instruments (synced from OKX, never hard-coded) and candles."""
from __future__ import annotations

from decimal import Decimal

from django.db import models


class Timeframe(models.TextChoices):
    M5 = "5m", "5 minutes"
    M15 = "15m", "15 minutes"
    H1 = "1H", "1 hour"
    H4 = "4H", "4 hours"


TIMEFRAME_SECONDS: dict[str, int] = {"1m": 60, "5m": 300, "15m": 900, "1H": 3600, "4H": 14400, "1D": 86400}


class Instrument(models.Model):
    """An OKX instrument as /public/instruments describes it."""

    inst_id = models.CharField(max_length=40, unique=True)
    inst_type = models.CharField(max_length=10, default="SWAP")
    ct_val = models.DecimalField(max_digits=24, decimal_places=12, help_text="Contract value in base currency")
    lot_sz = models.DecimalField(max_digits=24, decimal_places=12, help_text="Size increment in contracts")
    min_sz = models.DecimalField(max_digits=24, decimal_places=12, help_text="Minimum size in contracts")
    tick_sz = models.DecimalField(max_digits=24, decimal_places=12, help_text="Price increment")
    max_lever = models.DecimalField(max_digits=8, decimal_places=2, default=Decimal("1"))
    settle_ccy = models.CharField(max_length=10, default="USDT")
    state = models.CharField(max_length=20, default="live")
    trading_enabled = models.BooleanField(default=False, help_text="Run the decision cycle for this instrument")
    auto_selected = models.BooleanField(
        default=False, help_text="Enabled by the daily top-N-by-volume selection (WATCHLIST_TOP_N), not by a person: "
                                 "the next selection may turn it off again")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["inst_id"]

    def __str__(self) -> str:
        return self.inst_id


class Candle(models.Model):
    """One OHLCV bar; `ts` is the bar's open time (UTC).

    The unique constraint on (instrument, timeframe, ts) is what upserts
    conflict on. On TimescaleDB the table becomes a hypertable on `ts`
    (migration 0002), which also needs that constraint to include `ts`.
    """

    instrument = models.ForeignKey(Instrument, on_delete=models.CASCADE, related_name="candles")
    timeframe = models.CharField(max_length=4, choices=Timeframe.choices)
    ts = models.DateTimeField(help_text="Open time, UTC")
    open = models.DecimalField(max_digits=24, decimal_places=10)
    high = models.DecimalField(max_digits=24, decimal_places=10)
    low = models.DecimalField(max_digits=24, decimal_places=10)
    close = models.DecimalField(max_digits=24, decimal_places=10)
    volume = models.DecimalField(max_digits=30, decimal_places=10, help_text="Base-currency volume (OKX volCcy)")
    confirmed = models.BooleanField(default=True, help_text="OKX confirm == '1': the bar is closed")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["instrument", "timeframe", "ts"], name="candle_unique_inst_tf_ts"),
        ]
        indexes = [models.Index(fields=["instrument", "timeframe", "-ts"], name="candle_inst_tf_ts_desc")]
        ordering = ["instrument", "timeframe", "ts"]

    def __str__(self) -> str:
        return f"{self.instrument_id} {self.timeframe} {self.ts:%Y-%m-%d %H:%M}"


class LiveMarket(models.Model):
    """The latest ticker, top-5 book, funding rate and open interest one instrument's OKX stream pushed.

    Written by `manage.py stream_okx` about once a second (only what changed), read by the
    cycle's COLLECTING instead of four REST calls while fresh. Numbers as OKX sent them
    (strings parsed to Decimal), times aware UTC; None until the channel pushed once.
    """

    instrument = models.OneToOneField(Instrument, on_delete=models.CASCADE, related_name="live")
    last = models.DecimalField(max_digits=24, decimal_places=10, null=True)
    bid = models.DecimalField(max_digits=24, decimal_places=10, null=True)
    ask = models.DecimalField(max_digits=24, decimal_places=10, null=True)
    open_24h = models.DecimalField(max_digits=24, decimal_places=10, null=True)
    high_24h = models.DecimalField(max_digits=24, decimal_places=10, null=True)
    low_24h = models.DecimalField(max_digits=24, decimal_places=10, null=True)
    volume_24h = models.DecimalField(max_digits=30, decimal_places=10, null=True, help_text="volCcy24h (base currency)")
    ticker_ts = models.DateTimeField(null=True)
    book = models.JSONField(null=True, blank=True, help_text='{"bids": [[px, sz], ...], "asks": [...]} as strings')
    book_ts = models.DateTimeField(null=True)
    funding_rate = models.DecimalField(max_digits=30, decimal_places=18, null=True)
    next_funding_time = models.DateTimeField(null=True)
    funding_ts = models.DateTimeField(null=True)
    oi = models.DecimalField(max_digits=30, decimal_places=10, null=True, help_text="open interest, contracts")
    oi_ccy = models.DecimalField(max_digits=30, decimal_places=10, null=True)
    oi_usd = models.DecimalField(max_digits=30, decimal_places=10, null=True)
    oi_ts = models.DateTimeField(null=True)
    updated_at = models.DateTimeField(help_text="when the stream last wrote this row (its clock)")

    def __str__(self) -> str:
        return f"live {self.instrument_id}"


class OpenInterestSample(models.Model):
    """Open interest (contracts) as the stream saw it, one sample per instrument every few minutes.

    The snapshot's live `oi_change_4h_pct` compares the latest value with the sample nearest
    4 hours earlier (OKX's public REST has no point-in-time open interest). Kept for a day.
    """

    instrument = models.ForeignKey(Instrument, on_delete=models.CASCADE, related_name="+")
    ts = models.DateTimeField()
    oi = models.DecimalField(max_digits=30, decimal_places=10)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["instrument", "ts"], name="oi_sample_unique_inst_ts")]
        indexes = [models.Index(fields=["instrument", "-ts"], name="oi_sample_inst_ts_desc")]


class StreamStatus(models.Model):
    """One OKX WebSocket connection of `manage.py stream_okx`: what `bot status` and the health check show."""

    name = models.CharField(max_length=20, unique=True, help_text="public, business, private or algo")
    url = models.CharField(max_length=200, default="")
    connected = models.BooleanField(default=False)
    stopped = models.BooleanField(default=False, help_text="given up for good (a refused login): no reconnect")
    connected_at = models.DateTimeField(null=True)
    last_message_at = models.DateTimeField(null=True)
    last_by_channel = models.JSONField(default=dict, blank=True, help_text="channel -> ISO time of its last push")
    reconnects = models.PositiveIntegerField(default=0)
    messages = models.PositiveBigIntegerField(default=0)
    error = models.TextField(blank=True, default="")
    updated_at = models.DateTimeField()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"stream {self.name} {'up' if self.connected else 'down'}"
