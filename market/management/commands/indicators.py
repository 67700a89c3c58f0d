"""`manage.py indicators --csv PATH --tf 1H [--out FILE.csv]`: every indicator for every candle.

The input CSV has `ts,open,high,low,close,volume` (ts = open time, epoch ms;
.gz works). The output has `ts` plus every column of `market.indicators.COLUMNS`
(empty = not defined yet). ema_alignment and macd_cross are codes: +1/-1/0.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pandas as pd
from django.core.management.base import BaseCommand, CommandError, CommandParser

from market.indicators import COLUMNS, indicators_compute
from market.snapshot import TIMEFRAME_DURATIONS, tf_duration

REQUIRED = ("ts", "open", "high", "low", "close", "volume")


def candles_read_csv(path: Path) -> pd.DataFrame:
    try:
        raw = pd.read_csv(path)
    except (OSError, ValueError) as e:
        raise CommandError(f"cannot read {path}: {e}") from e
    missing = [c for c in REQUIRED if c not in raw.columns]
    if missing:
        raise CommandError(f"{path} lacks column(s) {', '.join(missing)}; expected {','.join(REQUIRED)}")
    try:
        values = raw.loc[:, list(REQUIRED[1:])].apply(pd.to_numeric, errors="raise").astype("float64")
        index = pd.DatetimeIndex(pd.to_datetime(raw["ts"].astype("int64"), unit="ms", utc=True), name="ts")
    except (ValueError, TypeError) as e:
        raise CommandError(f"{path} has a non-numeric value: {e}") from e
    values.index = index
    return values


class Command(BaseCommand):
    help = "Write every indicator column for every candle of a CSV (ts,open,high,low,close,volume; ts epoch ms)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--csv", required=True, type=Path, help="input candles CSV")
        parser.add_argument("--tf", required=True, choices=sorted(TIMEFRAME_DURATIONS), help="the candles' timeframe")
        parser.add_argument("--out", type=Path, default=None, help="output CSV (default: stdout)")
        parser.add_argument("--profile-bars", type=int, default=None,
                            help="volume profile window in bars (default INDICATOR_HISTORY_CANDLES)")

    def handle(self, *args: Any, **opts: Any) -> None:
        frame = candles_read_csv(opts["csv"])
        computed = indicators_compute(frame, profile_bars=opts["profile_bars"], bar=tf_duration(opts["tf"]))
        out = computed.loc[:, list(COLUMNS)]
        out.insert(0, "ts", computed.index.asi8 // 1_000_000)
        target = opts["out"]
        out.to_csv(target if target is not None else sys.stdout, index=False, float_format="%.12g")
        if target is not None:
            self.stderr.write(f"wrote {len(out)} rows x {len(COLUMNS)} indicators to {target}")
