"""The admin's CSS with DEBUG off: `collectstatic` (the Makefile's web/run/demo, the Dockerfile) then WhiteNoise."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_admin_css_loads_from_runserver_with_debug_off(tmp_path: Path) -> None:
    env = {**os.environ, "TRADEBOT_VAR_DIR": str(tmp_path / "var"), "DATABASE_URL": f"sqlite:///{tmp_path / 'db'}",
           "DJANGO_DEBUG": "false", "DJANGO_SETTINGS_MODULE": "tradebot.settings", "LOG_LEVEL": "ERROR"}
    subprocess.run([sys.executable, "manage.py", "collectstatic", "--noinput", "-v0"], cwd=ROOT, env=env,
                   check=True, timeout=120)
    assert (tmp_path / "var" / "static" / "admin" / "css" / "base.css").is_file()  # STATIC_ROOT is under var/
    port = _free_port()
    server = subprocess.Popen([sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline, answer = time.monotonic() + 60, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/static/admin/css/base.css", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert answer is not None, server.stderr.read().decode() if server.poll() is not None else "no answer in 60 s"
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/css")
        assert answer.text == (tmp_path / "var" / "static" / "admin" / "css" / "base.css").read_text()
        login = httpx.get(f"http://127.0.0.1:{port}/admin/login/", timeout=5)
        assert '/static/admin/css/base.css' in login.text  # the page links the file that loads
    finally:
        server.terminate()
        server.wait(timeout=20)
