"""`python manage.py playbook show [N] | diff A B | rollback N | activate N --force --reason TEXT | validate N | history`.

`rollback N` stores a NEW version equal to N as a CANDIDATE (triggered_by
rollback) and queues its validation: it trades only once validated, like every
change. `activate N --force --reason TEXT` is the one way around validation
from the command line: a person's explicit, journaled action that records who
(the OS user) and why. `validate N` validates a candidate now, in this process.
"""
from __future__ import annotations

import getpass
import socket
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from brain.models import PlaybookTrigger, PlaybookVersion
from brain.playbook import (PlaybookError, playbook_activate_forced, playbook_candidate_propose, playbook_current, playbook_diff,
                            playbook_text)


def version_get(number: int) -> PlaybookVersion:
    row = PlaybookVersion.objects.filter(version=number).first()
    if row is None:
        raise CommandError(f"playbook version {number} does not exist")
    return row


def playbook_rollback(*, version: int, by: str = "manual") -> PlaybookVersion:
    """A candidate equal to v`version` (validated before it trades)."""
    target = version_get(version)
    try:
        return playbook_candidate_propose(data=target.playbook, change_summary=f"rollback to v{target.version} by {by}",
                                          triggered_by=PlaybookTrigger.ROLLBACK)
    except PlaybookError as exc:
        raise CommandError(str(exc)) from exc


def who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown-user"
    return f"{user}@{socket.gethostname()} (manage.py playbook activate)"


class Command(BaseCommand):
    help = "Show, compare and roll back playbook versions."

    def add_arguments(self, parser: Any) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        show = sub.add_parser("show", help="a version (default: the active one)")
        show.add_argument("version", nargs="?", type=int)
        diff = sub.add_parser("diff", help="what changed from A to B")
        diff.add_argument("a", type=int)
        diff.add_argument("b", type=int)
        back = sub.add_parser("rollback", help="make a new active version equal to N")
        back.add_argument("version", type=int)
        act = sub.add_parser("activate", help="activate N WITHOUT validation (a person's journaled decision)")
        act.add_argument("version", type=int)
        act.add_argument("--force", action="store_true", help="required: skip validation")
        act.add_argument("--reason", default="", help="required with --force: why (journaled)")
        val = sub.add_parser("validate", help="validate candidate N now (out-of-sample folds)")
        val.add_argument("version", type=int)
        sub.add_parser("history", help="every version with status and change summary")

    def handle(self, *args: Any, **opts: Any) -> None:
        action = opts["action"]
        if action == "show":
            row = version_get(opts["version"]) if opts["version"] else playbook_current()
            self.stdout.write(f"playbook v{row.version} ({row.status}, {row.triggered_by}, {row.created_at:%Y-%m-%d %H:%M} UTC)")
            self.stdout.write(f"changes: {row.change_summary or '-'}")
            if row.validation:
                self.stdout.write(f"validation: {row.validation.get('reason', '')}")
            self.stdout.write("\n".join(playbook_text(row)))
        elif action == "diff":
            lines = playbook_diff(version_get(opts["a"]), version_get(opts["b"]))
            self.stdout.write("\n".join(lines) if lines else f"v{opts['a']} and v{opts['b']} are identical")
        elif action == "rollback":
            row = playbook_rollback(version=opts["version"], by=who())
            self.stdout.write(f"playbook v{row.version} is a candidate (a copy of v{opts['version']}); it trades only once "
                              f"validated (queued on the reflection queue)")
        elif action == "activate":
            self._activate(opts)
        elif action == "validate":
            self._validate(opts)
        else:
            for row in PlaybookVersion.objects.order_by("version"):
                scope = f"  [replay {row.run_id}]" if row.run_id else ""  # a replay --learn run's own version
                self.stdout.write(f"v{row.version:<4} {row.status:<9} {row.triggered_by:<10} {row.created_at:%Y-%m-%d %H:%M}  "
                                  f"{(row.change_summary or '').splitlines()[0][:90] if row.change_summary else ''}{scope}")

    def _activate(self, opts: dict[str, Any]) -> None:
        if not opts["force"]:
            raise CommandError("activation without validation needs --force and --reason TEXT (or `playbook validate N`)")
        if not opts["reason"].strip():
            raise CommandError("--force needs --reason TEXT: a forced activation is journaled with who and why")
        version_get(opts["version"])
        try:
            row = playbook_activate_forced(version=opts["version"], by=who(), reason=opts["reason"])
        except PlaybookError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"playbook v{row.version} is now active WITHOUT validation (by {row.activated_by}: {row.activation_reason})")

    def _validate(self, opts: dict[str, Any]) -> None:
        from tradebot.learning import ValidationError, playbook_candidate_validate

        row = version_get(opts["version"])
        try:
            outcome = playbook_candidate_validate(candidate_id=row.pk,
                                                  cycle=timedelta(seconds=settings.PLAYBOOK_VALIDATION_CYCLE_SECONDS))
        except ValidationError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"playbook v{outcome.candidate_version} {outcome.verdict} against v{outcome.current_version}: {outcome.reason}")
