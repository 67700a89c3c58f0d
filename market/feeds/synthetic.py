"""A seeded, reproducible synthetic market (venue "SYN") so the project runs with no external data.

It generates 5-minute OHLCV for BTC-USDT-SWAP and ETH-USDT-SWAP (the bot's
usual instrument ids, so nothing else changes) with:

- regimes that switch (Markov chain per 6-hour block, shared by both
  instruments): trend_up, trend_down, range (pulled back towards an anchor),
  high_vol;
- occasional jumps (a large return inside a bar) and gaps (a bar opening away
  from the previous close);
- maintenance fillers like OKX's: short runs of flat zero-volume bars
  (O = H = L = C = previous close, V = 0);
- funding every 8 h (00:00, 08:00, 16:00 UTC) that leans with the trend and
  spikes in high volatility, and an hourly open-interest series;
- BTC-like price levels (ETH moves with BTC, beta ~1.2, correlation ~0.85);
- any other instrument id gets its own profile (price level, beta, volume,
  tick) seeded by the id, so a market of hundreds of instruments (the
  300-instrument benchmark) is just as reproducible.

Reproducible and prefix-stable: each 6-hour block draws from its own
generator seeded by (seed, block index), so the same seed and start give
identical bars, and a later `end` only appends bars. The 15m/1H/4H series are
resampled from the 5-minute base by `ReplayFeed`.
"""
from __future__ import annotations

import zlib
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import numpy as np
from django.conf import settings

from market.feeds.base import InstrumentSpec
from market.feeds.replay import ReplayFeed, dt_to_ms, ms_to_dt

SOURCE = "SYN"
BASE_TIMEFRAME = "5m"
BASE_MS = 300_000
BLOCK_BARS = 72  # 6 hours of 5-minute bars: regimes switch between blocks
REGIMES = ("trend_up", "trend_down", "range", "high_vol")
# A fixed start for the live synthetic market, so the same bar time always has the same price.
EPOCH = datetime(2025, 1, 1, tzinfo=UTC)

# Per-regime (drift per bar, volatility per bar) of log returns.
_REGIME_PARAMS = {
    "trend_up": (0.00010, 0.0016),
    "trend_down": (-0.00010, 0.0016),
    "range": (0.0, 0.0010),
    "high_vol": (0.0, 0.0035),
}
_STAY_PROBABILITY = 0.85
_JUMP_PROBABILITY = 0.0015
_GAP_PROBABILITY = 0.004
_MAINTENANCE_PROBABILITY = 0.05  # per 6-hour block
_LEVEL_PULL = 0.015  # share of the log distance from the start level removed per block


def _spec(inst_id: str, ct_val: str, lot: str, min_sz: str, tick: str, lever: str) -> InstrumentSpec:
    return InstrumentSpec(inst_id=inst_id, inst_type="SWAP", ct_val=Decimal(ct_val), lot_sz=Decimal(lot),
                          min_sz=Decimal(min_sz), tick_sz=Decimal(tick), max_lever=Decimal(lever),
                          settle_ccy="USDT", state="live")


# The synthetic venue's own instrument specs, equal in shape to OKX's today.
SPECS: dict[str, InstrumentSpec] = {
    "BTC-USDT-SWAP": _spec("BTC-USDT-SWAP", "0.01", "0.01", "0.01", "0.1", "100"),
    "ETH-USDT-SWAP": _spec("ETH-USDT-SWAP", "0.1", "0.01", "0.01", "0.01", "100"),
}
# (start price, beta to the market factor, idiosyncratic vol share, typical 5m base volume, price decimals)
_PROFILES = {
    "BTC-USDT-SWAP": (95_000.0, 1.0, 0.25, 300.0, 1),
    "ETH-USDT-SWAP": (3_300.0, 1.2, 0.45, 3_000.0, 2),
}


def profile_for(inst_id: str) -> tuple[float, float, float, float, int]:
    """The instrument's (start price, beta, idiosyncratic vol share, base volume, price decimals).

    BTC and ETH have fixed profiles; any other id gets one drawn from a
    generator seeded by the id itself, so it is the same in every process.
    """
    if inst_id in _PROFILES:
        return _PROFILES[inst_id]
    rng = np.random.default_rng(zlib.crc32(inst_id.encode()))
    price = float(10 ** rng.uniform(-1.0, 4.0))  # 0.1 .. 10,000 USDT
    decimals = int(min(6, max(1, 4 - np.floor(np.log10(price)))))  # about 5 significant digits
    return (round(price, decimals), float(rng.uniform(0.6, 1.6)), float(rng.uniform(0.25, 0.8)),
            float(10 ** rng.uniform(2.0, 5.0)), decimals)


def spec_for(inst_id: str) -> InstrumentSpec:
    """The venue's spec for any instrument id: a contract worth roughly 10-100 USDT at the start price."""
    if inst_id in SPECS:
        return SPECS[inst_id]
    price, *_, decimals = profile_for(inst_id)
    ct_val = Decimal(10) ** int(np.round(np.log10(50.0 / price)))
    return _spec(inst_id, str(ct_val), "1", "1", str(Decimal(10) ** -decimals), "50")


class SyntheticMarket:
    """Generated 5m bars, funding and open interest for `inst_ids` over [start, end)."""

    def __init__(self, seed: int, start: datetime, end: datetime,
                 inst_ids: tuple[str, ...] = ("BTC-USDT-SWAP", "ETH-USDT-SWAP")) -> None:
        if not inst_ids:
            raise ValueError("the synthetic market needs at least one instrument id")
        self.seed = int(seed)
        self.start_ms = dt_to_ms(start) // BASE_MS * BASE_MS
        end_ms = dt_to_ms(end)
        if end_ms <= self.start_ms:
            raise ValueError("the synthetic market needs end after start")
        self.inst_ids = tuple(inst_ids)
        self.n_blocks = -(-(end_ms - self.start_ms) // (BASE_MS * BLOCK_BARS))
        n = self.n_blocks * BLOCK_BARS
        self.ts = self.start_ms + np.arange(n, dtype=np.int64) * BASE_MS
        keep = self.ts < end_ms
        self._generate()
        self.ts = self.ts[keep]
        self.regime, self.flat, self.jump, self.gap = (a[keep] for a in (self.regime, self.flat, self.jump, self.gap))
        self.bars = {k: {f: a[keep] for f, a in v.items()} for k, v in self.bars.items()}

    @property
    def specs(self) -> list[InstrumentSpec]:
        return [spec_for(i) for i in self.inst_ids]

    # -- generation ---------------------------------------------------------
    def _generate(self) -> None:
        n = self.n_blocks * BLOCK_BARS
        regime_idx = np.empty(self.n_blocks, dtype=np.int8)
        self.flat = np.zeros(n, dtype=bool)
        self.jump = np.zeros(n, dtype=bool)
        self.gap = np.zeros(n, dtype=bool)
        cols = {inst: {f: np.empty(n) for f in ("open", "high", "low", "close", "volume")} for inst in self.inst_ids}
        profiles = {inst: profile_for(inst) for inst in self.inst_ids}
        last = {inst: np.log(profiles[inst][0]) for inst in self.inst_ids}  # log of the previous close
        anchor = dict(last)  # where the current range started
        state = 2  # start in a range
        for b in range(self.n_blocks):
            rng = np.random.default_rng([self.seed, b])
            switch, pick = rng.random(), int(rng.integers(0, 3))
            if b and switch > _STAY_PROBABILITY:
                state = [r for r in range(4) if r != state][pick]
                if state == 2:
                    anchor = dict(last)
            regime_idx[b] = state
            drift, vol = _REGIME_PARAMS[REGIMES[state]]
            sl = slice(b * BLOCK_BARS, (b + 1) * BLOCK_BARS)
            market = drift + vol * rng.standard_normal(BLOCK_BARS)
            jumps = rng.random(BLOCK_BARS) < _JUMP_PROBABILITY
            jump = np.where(jumps, rng.normal(0, 0.02, BLOCK_BARS), 0.0)
            gaps = rng.random(BLOCK_BARS) < _GAP_PROBABILITY
            gap = np.where(gaps, rng.normal(0, 0.003, BLOCK_BARS), 0.0)
            flat = np.zeros(BLOCK_BARS, dtype=bool)
            if rng.random() < _MAINTENANCE_PROBABILITY:
                first = int(rng.integers(0, BLOCK_BARS - 6))
                flat[first:first + int(rng.integers(1, 7))] = True
            jump[flat] = 0.0
            gap[flat] = 0.0
            self.flat[sl], self.jump[sl], self.gap[sl] = flat, jump != 0, gap != 0
            for inst in self.inst_ids:
                _, beta, idio_share, base_volume, decimals = profiles[inst]
                idio = rng.standard_normal(BLOCK_BARS)
                noise = rng.random((BLOCK_BARS, 3))
                ret = beta * (market + jump) + idio_share * vol * idio
                if state == 2:  # range: pull back towards the anchor over the block
                    ret += -0.5 * (last[inst] - anchor[inst]) / BLOCK_BARS
                # A weak pull towards the profile's level keeps prices BTC-like over years of trends.
                ret += -_LEVEL_PULL * (last[inst] - np.log(profiles[inst][0])) / BLOCK_BARS
                ret[flat] = 0.0
                g = beta * gap
                log_close = last[inst] + np.cumsum(ret + g)
                close = np.exp(log_close)
                prev = np.exp(np.concatenate([[last[inst]], log_close[:-1]]))
                open_ = prev * np.exp(g)
                wick = vol * (0.3 + noise[:, 0]) * 0.8
                high = np.maximum(open_, close) * np.exp(wick * noise[:, 1])
                low = np.minimum(open_, close) * np.exp(-wick * noise[:, 2])
                open_, high, low, close = (np.round(a, decimals) for a in (open_, high, low, close))
                # A maintenance filler repeats the previous close exactly (ret and gap are 0 there).
                prev_rounded = np.round(np.concatenate([[np.exp(last[inst])], close[:-1]]), decimals)
                for a in (open_, high, low, close):
                    a[flat] = prev_rounded[flat]
                close[flat] = open_[flat]
                high = np.maximum.reduce([high, open_, close])
                low = np.minimum.reduce([low, open_, close])
                activity = np.abs(ret) / vol
                volume = base_volume * (vol / 0.0016) * (0.4 + 0.6 * activity) * (0.5 + noise[:, 0])
                out = cols[inst]
                out["open"][sl], out["high"][sl], out["low"][sl], out["close"][sl] = open_, high, low, close
                out["volume"][sl] = np.where(flat, 0.0, np.round(volume, 4))
                last[inst] = float(np.log(close[-1]))
        self.regime = np.array(REGIMES)[np.repeat(regime_idx, BLOCK_BARS)]
        self.bars = cols
        self._funding_and_oi(regime_idx)

    def _funding_and_oi(self, regime_idx: np.ndarray) -> None:
        rng = np.random.default_rng([self.seed, 1_000_003])
        first = -(-self.start_ms // (8 * 3600_000)) * 8 * 3600_000
        self.funding_ts = np.arange(first, int(self.ts[-1]) + BASE_MS, 8 * 3600_000, dtype=np.int64)
        lean = {"trend_up": 0.00008, "trend_down": -0.00006, "range": 0.0, "high_vol": 0.0}
        blocks = np.clip((self.funding_ts - self.start_ms) // (BASE_MS * BLOCK_BARS), 0, self.n_blocks - 1)
        names = [REGIMES[regime_idx[b]] for b in blocks]
        base = 0.0001 + np.array([lean[n] for n in names])
        spread = np.array([0.0004 if n == "high_vol" else 0.00004 for n in names])
        self.funding_rate = np.clip(np.round(base + spread * rng.standard_normal(len(base)), 8), -0.00375, 0.00375)
        self.oi_ts = np.arange(self.start_ms, int(self.ts[-1]) + BASE_MS, 3600_000, dtype=np.int64)
        hourly_blocks = np.clip((self.oi_ts - self.start_ms) // (BASE_MS * BLOCK_BARS), 0, self.n_blocks - 1)
        step = np.where(regime_idx[hourly_blocks] == 3, 0.012, 0.004) * rng.standard_normal(len(self.oi_ts))
        self.oi_factor = np.exp(np.cumsum(step))

    # -- outputs ------------------------------------------------------------
    def open_interest(self, inst_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ts ms, contracts, base currency) hourly."""
        contracts = np.round(2_000_000.0 * self.oi_factor, 2) if inst_id.startswith("BTC") else np.round(
            3_000_000.0 * self.oi_factor, 2)
        return self.oi_ts, contracts, np.round(contracts * float(spec_for(inst_id).ct_val), 4)

    def add_to(self, feed: ReplayFeed) -> None:
        for inst in self.inst_ids:
            feed.add_series(inst, BASE_TIMEFRAME, ts=self.ts, **self.bars[inst])
            feed.add_funding(inst, ts=self.funding_ts, rate=self.funding_rate)
            ts, contracts, ccy = self.open_interest(inst)
            feed.add_open_interest(inst, ts=ts, oi_contracts=contracts, oi_ccy=ccy)


class SyntheticFeed(ReplayFeed):
    """A ReplayFeed over a SyntheticMarket: same clock semantics, 15m/1H/4H built from 5m.

    With no clock set, `now()` is wall time, so a live bot sees bars close as
    time passes (the market is generated `ahead` past now for that).
    """

    name = "synthetic"
    source = SOURCE

    def __init__(self, *, seed: int | None = None, start: datetime | None = None, end: datetime | None = None,
                 inst_ids: tuple[str, ...] = ("BTC-USDT-SWAP", "ETH-USDT-SWAP"), clock: datetime | None = None,
                 ahead: timedelta = timedelta(days=7)) -> None:
        self.seed = settings.SYNTHETIC_SEED if seed is None else seed
        start = start or EPOCH
        end = end or datetime.now(UTC) + ahead
        self.market = SyntheticMarket(self.seed, start, end, inst_ids)
        super().__init__(clock=clock, instruments=self.market.specs)
        self.market.add_to(self)

    @property
    def end(self) -> datetime:
        return ms_to_dt(int(self.market.ts[-1]) + BASE_MS)
