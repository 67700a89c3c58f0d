"""`python manage.py playbook show [N] | diff A B | rollback N | history`.

`rollback N` stores a NEW active version equal to N (triggered_by manual), so
history is never rewritten.
"""
from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from brain.models import PlaybookTrigger, PlaybookVersion
from brain.playbook import playbook_current, playbook_diff, playbook_save, playbook_text


def version_get(number: int) -> PlaybookVersion:
    row = PlaybookVersion.objects.filter(version=number).first()
    if row is None:
        raise CommandError(f"playbook version {number} does not exist")
    return row


def playbook_rollback(*, version: int, by: str = "manual") -> PlaybookVersion:
    target = version_get(version)
    return playbook_save(data=target.playbook, change_summary=f"rollback to v{target.version} by {by}",
                         triggered_by=PlaybookTrigger.MANUAL)


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
            row = playbook_rollback(version=opts["version"])
            self.stdout.write(f"playbook v{row.version} is now active (a copy of v{opts['version']}, triggered_by manual)")
        else:
            for row in PlaybookVersion.objects.order_by("version"):
                self.stdout.write(f"v{row.version:<4} {row.status:<9} {row.triggered_by:<10} {row.created_at:%Y-%m-%d %H:%M}  "
                                  f"{(row.change_summary or '').splitlines()[0][:90] if row.change_summary else ''}")
