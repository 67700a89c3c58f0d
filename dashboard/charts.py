"""Plotly figures as plain dicts (the JSON plotly.js draws), built without plotly's Python objects.

plotly's graph objects validate every point (seconds for 100,000 of them); the dashboard only needs the
JSON, so it builds it here. Each figure carries `link`: the rows behind it (a list page or the admin);
a point with `customdata` set to a URL opens that row's page when clicked (static/dashboard/charts.js).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any


def num(value: Any) -> float | None:
    """A JSON number for plotly (money stays Decimal everywhere else; a chart only draws it)."""
    if value is None:
        return None
    return float(value)


def when(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass
class Figure:
    key: str  # the element id and the name tests find it by
    title: str
    traces: list[dict[str, Any]]
    link: str = ""
    link_label: str = "rows"
    layout: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        layout = {"title": {"text": self.title, "font": {"size": 14}}, "margin": {"l": 50, "r": 20, "t": 40, "b": 40},
                  "height": 300, "legend": {"orientation": "h"}, **self.layout}
        return {"key": self.key, "data": self.traces, "layout": layout}


def line(name: str, x: list[Any], y: list[Any], *, links: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    trace: dict[str, Any] = {"type": "scatter", "mode": "lines", "name": name, "x": x, "y": y, **extra}
    if links is not None:
        trace["customdata"] = links
    return trace


def bars(name: str, x: list[Any], y: list[Any], *, links: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    trace: dict[str, Any] = {"type": "bar", "name": name, "x": x, "y": y, **extra}
    if links is not None:
        trace["customdata"] = links
    return trace


def markers(name: str, x: list[Any], y: list[Any], *, links: list[str] | None = None, symbol: str = "circle",
            color: str | None = None, size: int = 9, **extra: Any) -> dict[str, Any]:
    marker: dict[str, Any] = {"symbol": symbol, "size": size}
    if color:
        marker["color"] = color
    return line(name, x, y, links=links, mode="markers", marker=marker, **extra)


def pct(value: Decimal | float | None, places: int = 1) -> str:
    return "n/a" if value is None else f"{float(value) * 100:.{places}f}%"
