"""The playbook's shape: what every version must satisfy (also admin edits).

Each strategy carries a text description for the LLM (entry, exit, filters)
AND machine-readable parameters (`params`) the rules brain trades on. The
parameters are bounded here so that no edit, manual or by reflection, can
produce a nonsensical strategy; the risk limits themselves are settings the
risk gate reads, never fields of the playbook.

The parameter search (`manage.py optimize`, issue 15) tunes only the fields
that declare a search range here (`json_schema_extra={"search": {...}}`,
read by `search_ranges`), each inside its validation bounds. Sizing
(size_pct, leverage) is not searched: a larger size scales return and
drawdown alike and the risk gate caps both; `confidence` does not change a
rules-brain trade; `disabled_reflections` is a statistic.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Regime = Literal["trending_up", "trending_down", "volatile", "ranging", "unknown"]
Signal = Literal["trend_pullback", "momentum_breakout", "range_mean_reversion"]
Timeframe = Literal["15m", "1H", "4H"]


def _search(low: float, high: float) -> dict[str, Any]:
    """The range the parameter search may try for a field (inside the field's own ge/le)."""
    return {"search": {"low": low, "high": high}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StrategyParams(_Strict):
    """Rules-brain parameters. Thresholds left None are not checked."""

    enabled: bool = True
    signal: Signal  # which entry rule this strategy uses
    regimes: list[Regime] = Field(min_length=1)
    direction: Literal["both", "long", "short"] = "both"
    atr_timeframe: Timeframe = "1H"
    stop_atr_mult: float = Field(ge=0.2, le=6.0, json_schema_extra=_search(0.5, 3.0))
    target_atr_mult: float = Field(ge=0.3, le=20.0, json_schema_extra=_search(1.0, 8.0))
    size_pct: float = Field(gt=0.0, le=1.0)
    leverage: float = Field(ge=1.0, le=20.0)
    adx_min: float | None = Field(default=None, ge=0, le=100, json_schema_extra=_search(10, 40))
    adx_max: float | None = Field(default=None, ge=0, le=100, json_schema_extra=_search(10, 40))
    rsi_long_min: float | None = Field(default=None, ge=0, le=100, json_schema_extra=_search(10, 90))
    rsi_long_max: float | None = Field(default=None, ge=0, le=100, json_schema_extra=_search(10, 90))
    rsi_short_min: float | None = Field(default=None, ge=0, le=100, json_schema_extra=_search(10, 90))
    rsi_short_max: float | None = Field(default=None, ge=0, le=100, json_schema_extra=_search(10, 90))
    volume_min: float | None = Field(default=None, ge=0, le=20, json_schema_extra=_search(0.5, 4.0))
    bb_long_max: float | None = Field(default=None, ge=-1, le=2, json_schema_extra=_search(-0.5, 0.5))
    bb_short_min: float | None = Field(default=None, ge=-1, le=2, json_schema_extra=_search(0.5, 1.5))
    pullback_atr: float | None = Field(default=None, ge=0, le=10, json_schema_extra=_search(0.1, 2.0))
    confidence: float = Field(default=0.6, ge=0, le=1)
    # Set by reflection: how many reflections it has been switched off for.
    disabled_reflections: int = Field(default=0, ge=0)


class Strategy(_Strict):
    entry: str
    exit: str
    filters: list[str] = Field(default_factory=list)
    historical_winrate: float | None = Field(default=None, ge=0, le=1)
    avg_rr: float | None = None
    params: StrategyParams


class RegimeRule(_Strict):
    preferred_strategies: list[str] = Field(default_factory=list)
    avoid_strategies: list[str] = Field(default_factory=list)
    max_position_pct: float = Field(ge=0, le=1)
    preferred_timeframe: Timeframe = "1H"


class Lesson(_Strict):
    id: str
    date: str
    lesson: str
    evidence: str = ""
    # The journal trade ids the lesson comes from; reflection drops a new lesson
    # that cites none, or cites a trade that does not exist (no invented history).
    evidence_trade_ids: list[int] = Field(default_factory=list)
    impact: Literal["high", "medium", "low"] = "medium"


class CalibrationEntry(_Strict):
    trades: int = Field(default=0, ge=0)
    actual_win_rate: float | None = Field(default=None, ge=0, le=1)
    note: str = ""


class TimeFilters(_Strict):
    avoid_hours_utc: list[int] = Field(default_factory=list)
    preferred_hours_utc: list[int] = Field(default_factory=list)

    @model_validator(mode="after")
    def _hours(self) -> TimeFilters:
        for hour in [*self.avoid_hours_utc, *self.preferred_hours_utc]:
            if not 0 <= hour <= 23:
                raise ValueError(f"hour {hour} is not between 0 and 23")
        return self


class Learning(_Strict):
    """How the rules brain's reflection judges a strategy."""

    min_trades: int = Field(default=5, ge=2)
    disable_profit_factor: float = Field(default=0.7, ge=0)
    disable_win_rate: float = Field(default=0.35, ge=0, le=1)
    tighten_profit_factor: float = Field(default=1.0, ge=0)
    reward_profit_factor: float = Field(default=1.5, ge=0)
    reenable_after_reflections: int = Field(default=3, ge=1)


class Playbook(_Strict):
    market_regime_rules: dict[Regime, RegimeRule]
    strategy_definitions: dict[str, Strategy] = Field(min_length=1)
    lessons_learned: list[Lesson] = Field(default_factory=list)
    confidence_calibration: dict[str, CalibrationEntry] = Field(default_factory=dict)
    time_filters: TimeFilters = Field(default_factory=TimeFilters)
    learning: Learning = Field(default_factory=Learning)

    @model_validator(mode="after")
    def _references(self) -> Playbook:
        known = set(self.strategy_definitions)
        for regime, rule in self.market_regime_rules.items():
            unknown = (set(rule.preferred_strategies) | set(rule.avoid_strategies)) - known
            if unknown:
                raise ValueError(f"regime {regime} names unknown strategies: {sorted(unknown)}")
        for name, strategy in self.strategy_definitions.items():
            p = strategy.params
            if p.target_atr_mult <= p.stop_atr_mult:
                raise ValueError(f"{name}: target_atr_mult must exceed stop_atr_mult (reward must beat risk)")
        return self


class SearchRangeError(ValueError):
    """A declared or asked search range is empty, inverted or outside the field's bounds."""


def _field_bounds(name: str) -> tuple[float | None, float | None]:
    """The field's own validation bounds (ge or gt, le or lt) from its pydantic metadata."""
    low = high = None
    for meta in StrategyParams.model_fields[name].metadata:
        for attr in ("ge", "gt"):
            if getattr(meta, attr, None) is not None:
                low = float(getattr(meta, attr))
        for attr in ("le", "lt"):
            if getattr(meta, attr, None) is not None:
                high = float(getattr(meta, attr))
    return low, high


def search_ranges() -> dict[str, tuple[float, float]]:
    """Every strategy parameter the search may tune, with the range the schema declares for it.

    Raises SearchRangeError when a declared range is empty, inverted or leaves the field's bounds:
    a search over it could only try values the playbook rejects.
    """
    ranges: dict[str, tuple[float, float]] = {}
    for name, info in StrategyParams.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        declared = extra.get("search")
        if not isinstance(declared, dict):
            continue
        low, high = float(declared["low"]), float(declared["high"])
        search_range_check(name=name, low=low, high=high)
        ranges[name] = (low, high)
    return ranges


def search_range_check(*, name: str, low: float, high: float) -> None:
    """A usable range: low < high, both inside the field's validation bounds."""
    if name not in StrategyParams.model_fields:
        raise SearchRangeError(f"{name} is not a strategy parameter")
    if low > high:
        raise SearchRangeError(f"the range of {name} is inverted: {low:g} > {high:g}")
    if low == high:
        raise SearchRangeError(f"the range of {name} is empty: {low:g} to {high:g}")
    field_low, field_high = _field_bounds(name)
    if (field_low is not None and low < field_low) or (field_high is not None and high > field_high):
        raise SearchRangeError(f"the range of {name} ({low:g} to {high:g}) leaves its bounds "
                               f"({'-inf' if field_low is None else f'{field_low:g}'} to "
                               f"{'inf' if field_high is None else f'{field_high:g}'})")


def playbook_validate(data: object) -> Playbook:
    """Parse a playbook dict; raises pydantic.ValidationError with every problem."""
    return Playbook.model_validate(data)
