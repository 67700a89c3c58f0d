"""`manage.py snapshot --inst BTC-USDT-SWAP [--json] [--source auto|okx|synthetic]`: print the market snapshot.

Without market data (OKX unreachable) it says so and exits non-zero: the synthetic market is printed only when
asked for (`--source synthetic` or MARKET_DATA_SOURCE=synthetic), never as if it were the market (#16).
"""
from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from market.feeds import feed_from_settings
from market.feeds.base import FeedError
from market.schemas import MarketSnapshot
from market.snapshot import SnapshotUnavailable, snapshot_build


def _f(value: float | None, fmt: str = ".2f") -> str:
    return "n/a" if value is None else format(value, fmt)


def snapshot_text(s: MarketSnapshot) -> str:
    """A human-readable rendering of a snapshot."""
    lines = [
        f"{s.inst_id} @ {s.ts.isoformat()} (source {s.source})",
        f"  price {s.price}  1H change {_f(s.price_change_1h_pct, '+.2%')}  24h change "
        f"{_f(s.ticker.change_24h_pct, '+.2%')}  regime(1H) {s.regime}",
        f"  funding {s.funding_rate if s.funding_rate is not None else 'n/a'} next "
        f"{s.next_funding_time.isoformat() if s.next_funding_time else 'n/a'}  open interest "
        f"{s.open_interest if s.open_interest is not None else 'n/a'} (4H {_f(s.oi_change_4h_pct, '+.2%')})",
    ]
    if s.order_book is not None:
        b = s.order_book
        lines.append(f"  book top5: best bid {b.bids[0][0] if b.bids else 'n/a'} best ask "
                     f"{b.asks[0][0] if b.asks else 'n/a'} spread {b.spread} imbalance {_f(b.imbalance, '+.3f')}")
    else:
        lines.append("  book: n/a")
    lines.append("  anomalies: " + ("; ".join(s.anomalies.reasons) if s.anomalies.any else "none"))
    for tf, view in s.timeframes.items():
        i = view.indicators
        lines.append(f"  [{tf}] {view.candles_used} candles, last {view.last_closed_ts}, regime {view.regime}")
        lines.append(f"     RSI {_f(i.rsi_14)}  MACD {_f(i.macd)}/{_f(i.macd_signal_line)} ({i.macd_signal})  "
                     f"ADX {_f(i.adx_14)} +DI {_f(i.plus_di)} -DI {_f(i.minus_di)}  ATR {_f(i.atr_14)} "
                     f"ratio {_f(i.atr_ratio)}")
        lines.append(f"     BB {_f(i.bb_lower)}..{_f(i.bb_upper)} pos {_f(i.bb_position)}  EMA20/50/200 "
                     f"{_f(i.ema_20)}/{_f(i.ema_50)}/{_f(i.ema_200)} ({i.ema_alignment})  "
                     f"StochRSI {_f(i.stochrsi_k)}/{_f(i.stochrsi_d)}  vol/avg {_f(i.volume_vs_avg)}")
        lines.append(f"     VWAP {_f(i.vwap)}  POC {_f(i.vp_poc)} VA {_f(i.vp_val)}..{_f(i.vp_vah)}  "
                     f"support {', '.join(f'{x:.1f}' for x in i.support) or 'n/a'}  "
                     f"resistance {', '.join(f'{x:.1f}' for x in i.resistance) or 'n/a'}")
    return "\n".join(lines)


class Command(BaseCommand):
    help = "Build and print the market snapshot of one instrument from the configured feed."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--inst", default="BTC-USDT-SWAP", help="instrument id, e.g. BTC-USDT-SWAP")
        parser.add_argument("--json", action="store_true", help="print the snapshot as JSON")
        parser.add_argument("--source", choices=("auto", "okx", "synthetic"), default=None,
                            help="market data source (default MARKET_DATA_SOURCE)")

    def handle(self, *args: Any, **opts: Any) -> None:
        try:
            feed = feed_from_settings(source=opts["source"])
            snapshot = snapshot_build(feed=feed, inst_id=opts["inst"])
        except (FeedError, SnapshotUnavailable) as e:
            raise CommandError(f"no snapshot for {opts['inst']}: {e}") from e
        self.stdout.write(snapshot.model_dump_json(indent=2) if opts["json"] else snapshot_text(snapshot))
