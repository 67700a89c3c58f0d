"""Numbers for a phone: Decimal at the instrument's precision, short and plain."""
from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from typing import Any

TELEGRAM_LIMIT = 4096  # characters per message (Bot API sendMessage `text`)
CENT = Decimal("0.01")


def _dec(value: Any) -> Decimal | None:
    if value is None or value == "":
        return None
    try:
        return value if isinstance(value, Decimal) else Decimal(str(value))
    except ArithmeticError:
        return None


def _quantum(step: Any) -> Decimal | None:
    step = _dec(step)
    if not step or step <= 0:
        return None
    return Decimal(1).scaleb(step.normalize().as_tuple().exponent) if step.normalize().as_tuple().exponent < 0 else Decimal(1)


def price(value: Any, instrument: Any = None) -> str:
    """A price at the instrument's tick size (BTC-USDT-SWAP: 0.1)."""
    d = _dec(value)
    if d is None:
        return "?"
    q = _quantum(getattr(instrument, "tick_sz", None))
    return f"{d.quantize(q, rounding=ROUND_HALF_UP) if q is not None else d.normalize():f}"


def size(value: Any, instrument: Any = None) -> str:
    """Contracts at the instrument's lot size."""
    d = _dec(value)
    if d is None:
        return "?"
    q = _quantum(getattr(instrument, "lot_sz", None))
    return f"{d.quantize(q, rounding=ROUND_HALF_UP) if q is not None else d.normalize():f}"


def money(value: Any, instrument: Any = None, *, places: Decimal = CENT) -> str:
    """An amount in the settlement currency (USDT), to the cent (`places`); a non-zero amount under a cent keeps 4 places."""
    d = _dec(value)
    if d is None:
        return "?"
    ccy = getattr(instrument, "settle_ccy", None) or "USDT"
    q = places if abs(d) >= CENT or d == 0 else min(places, Decimal("0.0001"))
    return f"{d.quantize(q, rounding=ROUND_HALF_UP):f} {ccy}"


def usd(value: Any, places: str = "0.01") -> str:
    d = _dec(value)
    return "?" if d is None else f"${d.quantize(Decimal(places), rounding=ROUND_HALF_UP):f}"


def pct(value: Any) -> str:
    """A fraction as a percentage with one decimal (0.0412 -> +4.1%)."""
    d = _dec(value)
    if d is None:
        return "?"
    return f"{(d * 100).quantize(Decimal('0.1'), rounding=ROUND_HALF_UP):+f}%"


def duration(seconds: Any) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def split_message(text: str, limit: int = TELEGRAM_LIMIT) -> list[str]:
    """Parts of at most `limit` characters, cut at a line break where there is one; nothing dropped."""
    if not text:
        return [""]
    parts: list[str] = []
    rest = text
    while len(rest) > limit:
        cut = rest.rfind("\n", 0, limit + 1)
        if cut <= 0:
            parts.append(rest[:limit])
            rest = rest[limit:]
        else:
            parts.append(rest[:cut])
            rest = rest[cut + 1:]
    parts.append(rest)
    return parts
