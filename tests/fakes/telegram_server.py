"""A local Telegram Bot API server on 127.0.0.1: getMe, getUpdates (long polling), sendMessage.

python-telegram-bot talks to it over real HTTP (`base_url=<url>/bot`). Bodies are the
recorded shapes in tests/fixtures/telegram/. Tests push incoming messages
(`push_message`), read what the bot sent (`sent`), script sendMessage failures
(`fail_next`: a 429 with retry_after, a 400), stop the server and start it again on
the same port (Telegram unreachable, then back), or hold every sendMessage unanswered (`hang`).
"""
from __future__ import annotations

import copy
import json
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from tests.fakes.http_server import FakeHttpServer, Received, Reply

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "telegram"
TOKEN = "7012345678:AAHk3vX9-test_token_Qz81LmNoPqRsTuVwXyZ"


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def params(received: Received) -> dict[str, Any]:
    """A Bot API call's parameters: JSON body, or form fields whose values are JSON-encoded (PTB's way)."""
    if not received.body:
        return dict(received.query)
    if received.headers.get("content-type", "").startswith("application/json"):
        return json.loads(received.body)
    out: dict[str, Any] = {}
    for key, values in parse_qs(received.body.decode(), keep_blank_values=True).items():
        raw = values[-1]
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


class FakeTelegram:
    def __init__(self, *, token: str = TOKEN, port: int = 0) -> None:
        self.token = token
        self._port = port
        self._lock = threading.Lock()
        self._updates: list[dict[str, Any]] = []
        self._next_update_id = 480372001
        self._next_message_id = 1201
        self._failures: list[Reply] = []
        self.sent: list[dict[str, Any]] = []  # every sendMessage that succeeded: {chat_id, text, at}
        self.send_attempts: list[float] = []  # monotonic time of every sendMessage received
        self._hanging = threading.Event()  # set: sendMessage is accepted and never answered (Telegram hanging)
        self.hung: list[float] = []  # monotonic time of every sendMessage held unanswered
        self.server: FakeHttpServer | None = None

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> FakeTelegram:
        self.server = FakeHttpServer(port=self._port)
        self._port = self.server._server.server_address[1]  # noqa: SLF001 - the same port after a restart
        base = f"/bot{self.token}"
        self.server.route("POST", f"{base}/getMe", lambda r: Reply(200, fixture("getMe")))
        self.server.route("POST", f"{base}/getUpdates", self._get_updates)
        self.server.route("POST", f"{base}/sendMessage", self._send_message)
        self.server.route("POST", f"{base}/deleteWebhook", lambda r: Reply(200, {"ok": True, "result": True}))
        self.server.start()
        return self

    def stop(self) -> None:
        self._hanging.clear()  # the held requests end (their clients gave up long ago)
        if self.server is not None:
            self.server.stop()
            self.server = None

    def __enter__(self) -> FakeTelegram:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}/bot"

    def reset(self) -> None:
        self._hanging.clear()
        with self._lock:
            self.hung.clear()
            self._updates.clear()
            self._failures.clear()
            self.sent.clear()
            self.send_attempts.clear()

    # --- scripting ---------------------------------------------------------------------------
    def push_message(self, *, chat_id: int, text: str, user_id: int | None = None, username: str = "ann_trader") -> int:
        """An incoming text message, as getUpdates will return it."""
        body = fixture("getUpdates")["result"][0]
        with self._lock:
            update = copy.deepcopy(body)
            update["update_id"] = self._next_update_id
            self._next_update_id += 1
            msg = update["message"]
            msg["message_id"] = update["update_id"] % 100000
            msg["from"].update(id=user_id or chat_id, username=username)
            msg["chat"].update(id=chat_id, username=username)
            msg["date"] = int(time.time())
            msg["text"] = text
            if text.startswith("/"):
                msg["entities"] = [{"offset": 0, "length": len(text.split()[0]), "type": "bot_command"}]
            else:
                msg.pop("entities", None)
            self._updates.append(update)
            return update["update_id"]

    def hang(self, on: bool = True) -> None:
        """Telegram slow or half-down: every sendMessage is accepted, then never answered (until `hang(False)`,
        when the held ones get a 502 their clients no longer wait for: never counted as sent)."""
        if on:
            self._hanging.set()
        else:
            self._hanging.clear()

    def fail_next(self, *replies: Reply) -> None:
        """The next sendMessage calls get these replies instead of success."""
        with self._lock:
            self._failures.extend(replies)

    def wait_sent(self, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.sent) >= count:
                    return list(self.sent)
            time.sleep(0.05)
        raise AssertionError(f"{len(self.sent)} message(s) sent, expected {count}: {self.sent}")

    # --- handlers ----------------------------------------------------------------------------
    def _get_updates(self, received: Received) -> Reply:
        p = params(received)
        offset = int(p.get("offset") or 0)
        # Long polling, kept short: answer as soon as there is an update, else after <= 0.5 s.
        deadline = time.monotonic() + min(float(p.get("timeout") or 0), 0.5)
        while True:
            with self._lock:
                self._updates = [u for u in self._updates if u["update_id"] >= offset]
                ready = list(self._updates)
            if ready or time.monotonic() >= deadline:
                return Reply(200, {"ok": True, "result": ready})
            time.sleep(0.02)

    def _send_message(self, received: Received) -> Reply:
        p = params(received)
        if self._hanging.is_set():
            with self._lock:
                self.hung.append(time.monotonic())
            while self._hanging.is_set():
                time.sleep(0.05)
            return Reply(502, {"ok": False, "error_code": 502, "description": "Bad Gateway"})
        with self._lock:
            self.send_attempts.append(time.monotonic())
            if self._failures:
                return self._failures.pop(0)
            body = fixture("sendMessage")
            result = body["result"]
            result["message_id"] = self._next_message_id
            self._next_message_id += 1
            result["chat"]["id"] = int(p["chat_id"])
            result["date"] = int(time.time())
            result["text"] = p["text"]
            self.sent.append({"chat_id": int(p["chat_id"]), "text": p["text"], "at": time.monotonic()})
        return Reply(200, body)


def retry_after_reply(seconds: int) -> Reply:
    body = fixture("error_429")
    body["parameters"]["retry_after"] = seconds
    body["description"] = f"Too Many Requests: retry after {seconds}"
    return Reply(429, body)
