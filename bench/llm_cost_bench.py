"""The `llm_cost` section (issue 20): LLM cost per instrument-day from the `LlmCall` ledger of a replay.

`tradebot.replay.replay_run(brain="claude")` on the real OKX BTC-USDT-SWAP 5m
file of 2022 (its last `--days`, default 3), against the local Messages API
server of the tests (`tests.fakes.anthropic_server.HonestModel`): tokens are
characters / 3.6 (1.3x that for Haiku 5.5's tokenizer), a cache entry exists
only for a prefix marked with cache_control that reaches the model's minimum,
and is read only by a byte-identical prefix within 5 minutes of its last use
on the replay's own clock (the time in the prompt); the screener signals on
20% of its calls, the position watch's routine check wakes the analyst on
25% of its calls (`--wake-rate`), the analyst opens on 15% of its calls while flat
("opens") or never ("never opens"); thinking tokens by purpose and effort,
billed as output. Run for the current 5.5 models and for the seed's Opus 4.6 /
Haiku 4.5. The figures come from the ledger (what `llm cost` sums); the
server's own count of the same calls is checked against it and gives the
thinking tokens (the API's usage folds them into output_tokens).

    .venv/bin/python bench/run.py llm_cost            # 3 days
    .venv/bin/python bench/run.py llm_cost --days 1   # a quicker look
    .venv/bin/python bench/run.py llm_cost --wake-rate 0.1   # a position check that wakes the analyst less often
"""
from __future__ import annotations

import re
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from bench import infra

INST = "BTC-USDT-SWAP"
REAL_FILE = infra.ROOT.parent / "shared" / "data" / "okx_BTC-USDT-SWAP_5m_2022.csv.gz"
CONFIGS = {
    "5.5 models (Opus 5.5 analyst/reflection, Haiku 5.5 screener)":
        {"ANALYST_MODEL": "claude-opus-5-5", "SCREENER_MODEL": "claude-haiku-5-5",
         "REFLECTION_MODEL": "claude-opus-5-5"},
    "seed's models (Opus 4.6 analyst/reflection, Haiku 4.5 screener)":
        {"ANALYST_MODEL": "claude-opus-4-6", "SCREENER_MODEL": "claude-haiku-4-5-20251001",
         "REFLECTION_MODEL": "claude-opus-4-6"},
}
TARGETS = {"5.5": Decimal("0.50"), "seed": Decimal("1.50")}
_TIME = re.compile(r"(?:time_utc: |as_of )(\d{4}-\d{2}-\d{2} \d{2}:\d{2})")


class PromptClock:
    """The replay's virtual time, read from the prompt (the screener's `time_utc`, the analyst's `as_of`); a review
    without a time in it counts at the last time seen. The cache's 5 minutes run on this clock."""

    def __init__(self) -> None:
        self.last = 0.0

    def __call__(self, received: Any) -> float:
        found = _TIME.search(received.body.decode(errors="replace"))
        if found:
            self.last = datetime.strptime(found.group(1), "%Y-%m-%d %H:%M").replace(tzinfo=UTC).timestamp()
        return self.last


def _ledger(run_id: str) -> dict[str, dict[str, Any]]:
    from django.db.models import Count, Sum

    from journal.models import LlmCall

    rows = (LlmCall.objects.filter(cycle__run_id=run_id).values("purpose")
            .annotate(calls=Count("id"), input=Sum("input_tokens"), output=Sum("output_tokens"),
                      cache_read=Sum("cache_read_tokens"), cache_write=Sum("cache_write_tokens"), usd=Sum("cost_usd")))
    found = {r["purpose"]: dict(r) for r in rows}
    # Post-trade reviews of a replay are tied to the trade's cycle; anything without a cycle is counted apart.
    return found


def one_run(*, label: str, models: dict[str, str], open_rate: float, start: datetime, end: datetime, feed: Any,
            server: Any) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, int]], Decimal, Any]:
    from django.conf import settings

    from tests.fakes.anthropic_server import HonestModel
    from tradebot.replay import replay_run

    for name, value in models.items():
        setattr(settings, name, value)
    model = HonestModel(pass_rate=0.2, open_rate=open_rate, wake_rate=infra.OPTIONS.wake_rate, clock=PromptClock())
    server.handler(model.handle)
    run_id = f"bench-llm-{uuid.uuid4().hex[:8]}"
    summary = replay_run(inst_id=INST, start=start, end=end, feed=feed, brain="claude", cycle=timedelta(minutes=5),
                         run_id=run_id)
    ledger = _ledger(run_id)
    total = sum((Decimal(r["usd"] or 0) for r in ledger.values()), Decimal(0))
    return ledger, model.totals(), total, summary


def bench_llm_cost() -> None:
    from django.conf import settings

    from tests.conftest import TEST_KEY
    from tests.fakes.anthropic_server import FakeAnthropic

    days = infra.OPTIONS.days or 3
    if not REAL_FILE.is_file():
        print(f"  the real OKX 2022 5m file is not here ({REAL_FILE}): skipped")
        return
    from tradebot.replay import replay_feed

    feed = replay_feed(inst_id=INST, csv_path=str(REAL_FILE))  # what `manage.py replay --csv` builds
    data_start, data_end = feed.data_range(INST)
    end = data_end
    start = end - timedelta(days=days)
    settings.ANTHROPIC_API_KEY, settings.BRAIN = TEST_KEY, "claude"
    settings.LLM_DAILY_BUDGET_USD = Decimal("1000")  # the figure is what it costs, not where a budget stops it
    print(f"llm_cost: replay of {INST} {start:%Y-%m-%d %H:%M} .. {end:%Y-%m-%d %H:%M} ({days:g} days, "
          f"{int(days * 288)} five-minute cycles), --brain claude against the local Messages API server "
          f"(characters/3.6, cache only for a repeated prefix, screener pass 0.2, position check wakes {infra.OPTIONS.wake_rate:g}); "
          f"POSITION_WATCH_PERIODIC_CHECK={settings.POSITION_WATCH_PERIODIC_CHECK}; journal on {infra.ENV.database}; "
          f"{infra.load()}")
    with FakeAnthropic() as server:
        settings.ANTHROPIC_BASE_URL = server.url
        for label, models in CONFIGS.items():
            print(f"  {label}:")
            for open_label, rate in (("opens 15% of flat calls", 0.15), ("never opens", 0.0)):
                t = time.perf_counter()
                ledger, billed, total, summary = one_run(label=label, models=models, open_rate=rate, start=start,
                                                         end=end, feed=feed, server=server)
                wall = time.perf_counter() - t
                per_day = total / Decimal(str(days))
                target = TARGETS["5.5" if "5.5" in label else "seed"]
                trades = summary.as_dict().get("trades") if hasattr(summary, "as_dict") else "?"
                print(f"    analyst {open_label}: ${per_day:.4f} per instrument-day (target <= ${target}: "
                      f"{'MET' if per_day <= target else 'NOT MET'}); {trades} trades; {wall:.0f} s wall")
                print(f"      {'purpose':<16}{'calls':>7}{'input':>10}{'output':>10}{'thinking':>10}{'cache rd':>10}"
                      f"{'cache wr':>10}{'USD':>10}{'USD/day':>9}")
                for purpose in sorted(set(ledger) | set(billed)):
                    row = ledger.get(purpose, {})
                    server_row = billed.get(purpose, {})
                    usd = Decimal(row.get("usd") or 0)
                    print(f"      {purpose:<16}{row.get('calls', 0):>7}{row.get('input') or 0:>10}"
                          f"{row.get('output') or 0:>10}{server_row.get('thinking_tokens', 0):>10}"
                          f"{row.get('cache_read') or 0:>10}{row.get('cache_write') or 0:>10}{usd:>10.4f}"
                          f"{usd / Decimal(str(days)):>9.4f}")
                    mismatch = [k for k, s in (("input", "input_tokens"), ("output", "output_tokens"),
                                               ("cache_read", "cache_read_tokens"),
                                               ("cache_write", "cache_write_tokens"))
                                if (row.get(k) or 0) != server_row.get(s, 0)]
                    if mismatch or row.get("calls", 0) != server_row.get("calls", 0):
                        print(f"      !! {purpose}: the ledger and the server differ on {mismatch or ['calls']}")
