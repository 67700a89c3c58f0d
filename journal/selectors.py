"""Reads over the journal that more than one place shows (commands, admin)."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from django.db.models import QuerySet

from journal.models import ScreenerLog

HOLD = "HOLD"  # the analyst's "do nothing" (brain.schemas.Action.HOLD; journal may not import brain)


@dataclass(frozen=True)
class ScreenerAccuracy:
    """How useful the screener's "go" was, and what the analyst did when the screener was skipped.

    passes: the screener was asked and said go; of those, `passes_answered` got
    an analyst action (a cycle can end before the analyst, e.g. on a failure)
    and `passes_acted` were not HOLD. bypassed: the screener was not asked (a
    bypass rule sent the cycle straight to the analyst); `bypassed_acted` of the
    answered ones were not HOLD: how often the analyst found something to do
    in cycles the screener never saw.
    """

    screened: int
    passes: int
    passes_answered: int
    passes_acted: int
    bypassed: int
    bypassed_answered: int
    bypassed_acted: int

    @staticmethod
    def _share(part: int, whole: int) -> Decimal | None:
        return (Decimal(part) / Decimal(whole)).quantize(Decimal("0.0001")) if whole else None

    @property
    def pass_rate(self) -> Decimal | None:
        return self._share(self.passes, self.screened)

    @property
    def pass_acted_share(self) -> Decimal | None:
        """Share of answered screener passes the analyst acted on (None with no answered pass)."""
        return self._share(self.passes_acted, self.passes_answered)

    @property
    def bypassed_acted_share(self) -> Decimal | None:
        return self._share(self.bypassed_acted, self.bypassed_answered)

    def lines(self) -> list[str]:
        """Human-readable summary (the `llm cost` command and the admin show the same words)."""
        def pct(value: Decimal | None) -> str:
            return "n/a" if value is None else f"{value:.1%}"

        return [
            f"screener asked {self.screened} time(s), passed {self.passes} ({pct(self.pass_rate)})",
            f"analyst acted on {self.passes_acted} of {self.passes_answered} answered pass(es): {pct(self.pass_acted_share)}",
            f"bypassed cycles: {self.bypassed}; analyst acted in {self.bypassed_acted} of {self.bypassed_answered} answered: "
            f"{pct(self.bypassed_acted_share)}",
        ]


def screener_accuracy(*, rows: QuerySet[ScreenerLog] | None = None, mode: str | None = None,
                      since: datetime | None = None) -> ScreenerAccuracy:
    """Screener accuracy over `rows` (default all screener logs), optionally one mode and since a time."""
    qs = ScreenerLog.objects.all() if rows is None else rows
    if mode is not None:
        qs = qs.filter(mode=mode)
    if since is not None:
        qs = qs.filter(created_at__gte=since)
    asked = qs.filter(bypassed=False)
    passes = asked.filter(signal=True)
    answered = passes.exclude(analyst_action="")
    skipped = qs.filter(bypassed=True)
    skipped_answered = skipped.exclude(analyst_action="")
    return ScreenerAccuracy(
        screened=asked.count(), passes=passes.count(), passes_answered=answered.count(),
        passes_acted=answered.exclude(analyst_action=HOLD).count(), bypassed=skipped.count(),
        bypassed_answered=skipped_answered.count(), bypassed_acted=skipped_answered.exclude(analyst_action=HOLD).count(),
    )
