"""Print the fault suite's report (one JSON object a line, FAULT_REPORT) as the drill table (`make drill`)."""
from __future__ import annotations

import json
import sys


def main(path: str) -> int:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    head = ("fault", "recovery (s)", "ticks lost unrecorded", "gap rows", "orders duplicated", "invariants held")
    table = [head] + [(r["fault"], "-" if r["recovery_s"] is None else f"{r['recovery_s']:.1f}",
                       str(r["ticks_lost_unrecorded"]), str(r["gap_rows"]), str(r["orders_duplicated"]),
                       "yes" if r["invariants_held"] else "NO") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for n, row in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    return 0 if rows and all(r["invariants_held"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
