"""The house rule: market, journal, brain and execution never import the project (`tradebot`), and the
exchange interface and the risk gate do not import each other in a circle (#16)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_apps_never_import_the_project_not_even_for_logging() -> None:
    offending = []
    for app in ("market", "journal", "brain", "execution"):
        for path in sorted((ROOT / app).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                offending += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "tradebot"]
    assert offending == []


def test_the_risk_gate_loads_without_the_exchange_interface_which_imports_it_at_the_top() -> None:
    code = ("import django, sys; django.setup(); import execution.risk; "
            "print('execution.exchanges.base' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"DJANGO_SETTINGS_MODULE": "tradebot.settings", "PATH": "/usr/bin:/bin",
                               "TRADEBOT_VAR_DIR": str(ROOT / "var")})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"
    base = (ROOT / "execution" / "exchanges" / "base.py").read_text()
    assert "\nfrom execution.risk import ApprovedOrder, approval_is_genuine\n" in base
