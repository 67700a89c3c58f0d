"""Print the fault suite's report (one JSON object a line, FAULT_REPORT) as the drill table (`make drill`).

Columns: the fault; when the cycle it caught ended (seconds after the kill, or after the outage ended); recovery
(seconds from the fault's end to the first cycle run to DONE); ticks lost unrecorded (the gap rows that record the
others); orders duplicated; whether every invariant held. Exits non-zero when a drill is missing a row or failed.
"""
from __future__ import annotations

import json
import sys


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main(path: str) -> int:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    head = ("fault", "caught cycle ended (s)", "recovery (s)", "ticks lost unrecorded (gap rows)", "orders duplicated",
            "invariants held")
    table = [head] + [(r["fault"], _s(r.get("freed_s")), _s(r["recovery_s"]),
                       f"{r['ticks_lost_unrecorded']} ({r['gap_rows']})", str(r["orders_duplicated"]),
                       "yes" if r["invariants_held"] else "NO") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for n, row in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    return 0 if rows and all(r["invariants_held"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
