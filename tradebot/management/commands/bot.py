"""`manage.py bot status | halt [--reason TEXT] [--flatten] | resume | run-cycle --inst ID | confirm-live`."""
from __future__ import annotations

import getpass
import json
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from tradebot.logging import redact

CONFIRM_PHRASE = "I understand this trades real money"


class Command(BaseCommand):
    help = "Watch and control the bot: status, halt, resume, run one cycle, confirm live trading."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        status = sub.add_parser("status", help="state, positions, equity, today's PnL, last cycles, queues, LLM cost")
        status.add_argument("--json", action="store_true", help="one JSON object")
        halt = sub.add_parser("halt", help="stop new orders from the next stage on")
        halt.add_argument("--reason", default="halted by a person", help="why (journaled)")
        halt.add_argument("--flatten", action="store_true", help="also close every position and cancel algo orders")
        sub.add_parser("resume", help="back to RUNNING (also ends an EMERGENCY_HALT)")
        run = sub.add_parser("run-cycle", help="run one cycle for an instrument now (the screener is bypassed)")
        run.add_argument("--inst", required=True, help="e.g. BTC-USDT-SWAP")
        run.add_argument("--via-workers", action="store_true", help="send the chain to the broker instead of running it here")
        sub.add_parser("confirm-live", help="confirm that real money may be traded (asks for a phrase)")
        for p in (halt, sub.choices["resume"], sub.choices["confirm-live"]):
            p.add_argument("--by", default="", help="who (default: the login name)")

    def handle(self, *args: Any, **opts: Any) -> None:
        action = opts["action"]
        by = (opts.get("by") or "").strip() or getpass.getuser()
        if action == "status":
            self._status(as_json=opts["json"])
        elif action == "halt":
            from tradebot.controls import bot_halt_and_flatten

            result = bot_halt_and_flatten(reason=opts["reason"], by=by, flatten=opts["flatten"])
            self.stdout.write(f"bot {result['state']}: {result['reason']}")
            if "flatten" in result:
                self.stdout.write(f"flatten: {result['flatten']}")
        elif action == "resume":
            from execution.bot import bot_resume

            view = bot_resume(by=by)
            self.stdout.write(f"bot {view.state}")
        elif action == "run-cycle":
            self._run_cycle(opts["inst"], via_workers=opts["via_workers"])
        elif action == "confirm-live":
            self._confirm_live(by)

    def _status(self, *, as_json: bool) -> None:
        from dataclasses import asdict

        from tradebot.controls import bot_status

        report = bot_status()
        if as_json:
            self.stdout.write(json.dumps(asdict(report), default=str))
            return
        w = self.stdout.write
        w(f"state      {report.state}" + (f" since {report.since:%Y-%m-%d %H:%M} UTC by {report.by}: {report.reason}" if report.since else ""))
        w(f"brain      {report.brain}    exchange {report.exchange or '?'}    broker {report.broker}")
        w(f"equity     {report.equity if report.equity is not None else '?'} USDT    today's PnL {report.today_pnl:.2f}    "
          f"LLM cost today ${report.llm_cost_today:.4f}")
        w(f"positions  {len(report.positions)}")
        for p in report.positions:
            w(f"  {p['inst_id']} {p['side']} {p['size']} @ {p['entry']}  uPnL {p['upl']}  SL {p['sl']}  TP {p['tp']}")
        w("last cycles")
        for c in report.last_cycles:
            w(f"  {c['inst_id']}: " + (f"#{c['cycle']} {c['as_of']} {c['state']}/{c['outcome']} {c['reason']}" if c["cycle"] else "none yet"))
        w("queues     " + "  ".join(f"{q}={'?' if n is None else n}" for q, n in report.queues.items()))
        w(f"account syncs failed (24 h)  {report.account_sync_failures_24h}")
        health = report.streams_health
        w("streams    " + ("none (manage.py stream_okx is not running)" if not report.streams
                           else "ok" if health.get("ok") else "; ".join(health.get("problems") or ["not running"])))
        for s in report.streams:
            state = "stopped" if s["stopped"] else "connected" if s["connected"] else "disconnected"
            w(f"  {s['name']}: {state}, {s['messages']} messages, {s['reconnects']} reconnects, last message "
              f"{s['last_message_at'] or 'never'}" + (f", error: {s['error']}" if s["error"] else ""))
            for channel, at in s["last_by_channel"].items():
                w(f"    {channel} {at}")
        for e in report.errors:
            w(self.style.WARNING(redact(e)))

    def _run_cycle(self, inst_id: str, *, via_workers: bool) -> None:
        from django.utils import timezone

        from journal.models import Cycle, CycleState
        from market.models import Instrument
        from tradebot.cycle import cycle_open
        from tradebot.pipeline import pipeline_chain

        instrument = Instrument.objects.filter(inst_id=inst_id).first()
        if instrument is None:
            raise CommandError(f"unknown instrument {inst_id}: sync instruments first (manage.py backfill)")
        cycle = cycle_open(instrument=instrument, as_of=timezone.now(), trigger="manual")
        if cycle.state == CycleState.SKIPPED:
            raise CommandError(f"not started: {cycle.reason}")
        try:
            if via_workers:
                pipeline_chain(cycle.pk).apply_async()
                self.stdout.write(f"cycle {cycle.pk} sent to the workers")
                return
            # Same task code, run here: each stage claims, runs and ends exactly as on a worker.
            result = pipeline_chain(cycle.pk).apply()
        except Exception as exc:
            self._cycle_failed(cycle.pk, exc, only_idle=True)
            raise CommandError(f"cycle {cycle.pk} FAILED before its first stage: {redact(repr(exc))}") from exc
        if result.failed():
            # A stage raised past its own handling: nothing else will run this cycle, so it must not stay open.
            self._cycle_failed(cycle.pk, result.result, only_idle=False)
        cycle = Cycle.objects.get(pk=cycle.pk)
        self.stdout.write(f"cycle {cycle.pk}: {cycle.state}/{cycle.outcome}: {cycle.reason}")
        if cycle.state == CycleState.FAILED:
            raise CommandError(f"cycle {cycle.pk} FAILED: {cycle.reason}")

    @staticmethod
    def _cycle_failed(cycle_id: int, exc: BaseException | None, *, only_idle: bool) -> None:
        """End the cycle FAILED with the error, unless a stage already ended it (a conditional UPDATE)."""
        from django.utils import timezone

        from journal.models import TERMINAL_CYCLE_STATES, Cycle, CycleOutcome, CycleState

        rows = Cycle.objects.filter(pk=cycle_id)
        rows = rows.filter(state=CycleState.IDLE) if only_idle else rows.exclude(state__in=TERMINAL_CYCLE_STATES)
        rows.update(state=CycleState.FAILED, outcome=CycleOutcome.ERROR, ended_at=timezone.now(),
                    reason=redact(f"run-cycle failed: {exc!r}")[:4000], error=redact(repr(exc))[:8000])

    def _confirm_live(self, by: str) -> None:
        from django.conf import settings

        from execution.bot import live_trading_confirm

        if not settings.OKX_LIVE_TRADING:
            raise CommandError("OKX_LIVE_TRADING is not true: set it (and OKX_DEMO=false) before confirming")
        self.stdout.write(f"Real money will be traded on OKX. Type exactly: {CONFIRM_PHRASE}")
        typed = sys.stdin.readline().strip()
        if typed != CONFIRM_PHRASE:
            raise CommandError("the phrase did not match; nothing confirmed")
        row = live_trading_confirm(by=by)
        self.stdout.write(f"live trading confirmed by {row.by} at {row.confirmed_at:%Y-%m-%d %H:%M:%S} UTC")
