"""One OKX v5 WebSocket connection, kept open: login, subscribe, ping/pong, reconnect, resubscribe.

OKX's protocol (docs-v5 "WebSocket"), as this client speaks it:
- requests are JSON text frames `{"op": "login"|"subscribe"|"unsubscribe", "args": [...]}`; the
  server acknowledges each subscription with `{"event": "subscribe", "arg": {...}, "connId": ...}`
  and refuses with `{"event": "error", "code": "60012", "msg": ..., "connId": ...}`;
- data arrives as `{"arg": {"channel": ..., "instId": ...}, "data": [...]}` (numbers as strings);
- login: `{"apiKey", "passphrase", "timestamp" (Unix seconds), "sign"}` where sign is
  base64(HMAC-SHA256(secret, timestamp + "GET" + "/users/self/verify")); answered with
  `{"event": "login", "code": "0"}` or an `event: error` (60009 login failed, 60005 bad key,
  60024 bad passphrase, ...);
- OKX closes a connection that carried nothing for 30 s: we send the text frame "ping" after
  `ping_after` seconds of silence (25 s) and expect "pong" (or anything) within `pong_timeout`.

A dropped connection is reopened with exponential backoff (1 s doubling to 60 s, with jitter, never over 60 s;
reset once a new connection has subscribed), logged in again and subscribed again; the
handler's `on_connected` then fills what was missed (REST). A refused login stops this
connection for good with one clear message (the key will not get better by retrying).
Nothing a server sends can crash the loop: malformed text, unknown messages, `event: error`
and handler failures are reported to `on_problem` with the raw text (our secrets redacted).
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

log = structlog.get_logger(__name__)

LOGIN_PATH = "/users/self/verify"
SUBSCRIBE_CHUNK = 100  # args per subscribe request (OKX caps a request's text at 64 KB)
RAW_LIMIT = 2000  # characters of a raw message kept in a problem report
# Login replies that are not about the key: try again later rather than give up.
LOGIN_TEMPORARY_CODES = frozenset({"50001", "50004", "50011", "50013", "50026", "60032"})
PROBLEMS_PER_MINUTE = 10  # per connection and kind; the rest are counted, not journaled one by one


class StreamDataError(Exception):
    """A push whose content we cannot use (a field that is not a number, a row of the wrong shape)."""


class LoginRefused(Exception):
    """OKX refused the login: the key, passphrase or signature is wrong. Not retried."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"OKX refused the WebSocket login (code {code}): {message}")
        self.code = code


class _Stale(Exception):
    """No pong (nor anything else) after our ping: the connection is dead even if TCP says otherwise."""


@dataclass(frozen=True)
class Credentials:
    api_key: str
    secret: str
    passphrase: str

    def secrets(self) -> tuple[str, ...]:
        return tuple(s for s in (self.api_key, self.secret, self.passphrase) if len(s) >= 4)


def login_sign(*, secret: str, timestamp: str) -> str:
    """base64(HMAC-SHA256(secret, timestamp + 'GET' + '/users/self/verify')), OKX's WebSocket login signature."""
    mac = hmac.new(secret.encode(), f"{timestamp}GET{LOGIN_PATH}".encode(), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


def login_request(credentials: Credentials, *, now: float | None = None) -> str:
    timestamp = str(int(now if now is not None else time.time()))
    arg = {"apiKey": credentials.api_key, "passphrase": credentials.passphrase, "timestamp": timestamp,
           "sign": login_sign(secret=credentials.secret, timestamp=timestamp)}
    return orjson.dumps({"op": "login", "args": [arg]}).decode()


def arg_key(arg: dict[str, Any]) -> str:
    """A subscription's identity: its channel and parameters (what the acks echo back)."""
    return "|".join(f"{k}={arg[k]}" for k in sorted(arg) if k != "extraParams")


class StreamHandler(Protocol):
    """What a connection hands its pushes to. `on_push` runs on the event loop: it must be quick."""

    def on_push(self, channel: str, arg: dict[str, Any], data: list[Any], message: dict[str, Any]) -> None: ...

    def on_connected(self, *, stream: str, reconnect: bool) -> None: ...


ProblemReporter = Callable[..., None]  # (kind=, message=, raw=, level=, stream=) -> None


@dataclass
class StreamState:
    """What the status shows of one connection (wall-clock seconds; persisted by the caller)."""

    name: str
    url: str
    connected: bool = False
    stopped: bool = False
    connected_at: float | None = None
    last_message_at: float | None = None
    last_by_channel: dict[str, float] = field(default_factory=dict)
    reconnects: int = 0
    messages: int = 0
    error: str = ""
    subscribed: set[str] = field(default_factory=set)
    suppressed: int = 0


class OkxStream:
    """One connection's life: connect, log in (with credentials), subscribe `args`, dispatch, reconnect."""

    def __init__(self, *, name: str, url: str, args: list[dict[str, Any]], handler: StreamHandler,
                 on_problem: ProblemReporter, credentials: Credentials | None = None, ping_after: float = 25.0,
                 pong_timeout: float = 5.0, backoff_first: float = 1.0, backoff_max: float = 60.0,
                 login_timeout: float = 10.0, open_timeout: float = 10.0) -> None:
        self.name, self.url, self.args = name, url, list(args)
        self.handler, self.on_problem, self.credentials = handler, on_problem, credentials
        self.ping_after, self.pong_timeout, self.login_timeout = ping_after, pong_timeout, login_timeout
        self.backoff_first, self.backoff_max, self.open_timeout = backoff_first, backoff_max, open_timeout
        self.state = StreamState(name=name, url=url)
        self._stop = asyncio.Event()
        self.logged_in = asyncio.Event()  # set by the first accepted login (another connection may wait for it)
        self._ws: ClientConnection | None = None
        self._last_rx = 0.0
        self._ping_sent: float | None = None
        self._problem_window: dict[str, tuple[float, int]] = {}
        self.delays: list[float] = []  # the backoff delays slept so far (status, tests)

    # -- life -----------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()
        if self._ws is not None:
            asyncio.ensure_future(self._ws.close())

    async def run(self) -> None:
        """Until `stop()` or a refused login: every connection, each reconnect after a backoff."""
        delay = self.backoff_first
        first = True
        while not self._stop.is_set():
            subscribed = False
            try:
                subscribed = await self._connection(reconnect=not first)
            except LoginRefused as exc:
                self.state.connected, self.state.stopped, self.state.error = False, True, str(exc)
                self._problem("stream_login_refused", f"{self.name} stream stopped: {exc}; check OKX_API_KEY, "
                              "OKX_API_SECRET and OKX_PASSPHRASE (not retried)", raw=getattr(exc, "raw", ""),
                              level="error", limited=False)
                return
            except (OSError, TimeoutError, ConnectionClosed, InvalidHandshake, InvalidURI, _Stale) as exc:
                self.state.error = f"{type(exc).__name__}: {self._redact(str(exc))}"[:500]
                log.warning("stream_disconnected", stream=self.name, error=self.state.error)
            finally:
                self._ws = None
                self.state.connected = False
                self.state.subscribed.clear()
            if self._stop.is_set():
                break
            first = False
            if subscribed:
                delay = self.backoff_first  # the last connection worked: start the backoff over
            self.state.reconnects += 1
            # The jitter spreads many clients' reconnects; the cap holds after it (never more than backoff_max).
            sleep = min(delay * (0.8 + 0.4 * random.random()), self.backoff_max)
            self.delays.append(sleep)
            log.info("stream_reconnecting", stream=self.name, in_s=round(sleep, 2), reconnects=self.state.reconnects)
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=sleep)
            except TimeoutError:
                pass
            delay = min(delay * 2, self.backoff_max)

    async def _connection(self, *, reconnect: bool) -> bool:
        """One connection until it drops; True once it had subscribed (a working connection)."""
        async with connect(self.url, ping_interval=None, open_timeout=self.open_timeout, max_queue=None,
                           compression=None, max_size=2**22) as ws:
            self._ws = ws
            self._last_rx, self._ping_sent = time.monotonic(), None
            if self.credentials is not None:
                await self._login(ws)
            for i in range(0, len(self.args), SUBSCRIBE_CHUNK):
                await ws.send(orjson.dumps({"op": "subscribe", "args": self.args[i:i + SUBSCRIBE_CHUNK]}).decode())
            now = time.time()
            self.state.connected, self.state.connected_at, self.state.error = True, now, ""
            log.info("stream_connected", stream=self.name, url=self.url, subscriptions=len(self.args),
                     reconnect=reconnect)
            try:
                self.handler.on_connected(stream=self.name, reconnect=reconnect)
            except Exception as exc:  # noqa: BLE001 - a failed gap fill must not drop the connection
                self._problem("stream_handler_error", f"{self.name} on_connected: {type(exc).__name__}: {exc}")
            watchdog = asyncio.ensure_future(self._watchdog(ws))
            try:
                async for text in ws:
                    self._last_rx, self._ping_sent = time.monotonic(), None
                    self.dispatch(text)
            finally:
                watchdog.cancel()
            if watchdog.done() and not watchdog.cancelled() and watchdog.exception() is not None:
                raise watchdog.exception()  # type: ignore[misc]
            if self._ws_stale:
                raise _Stale(f"no pong within {self.pong_timeout:g}s of our ping")
            return True

    _ws_stale = False

    async def _watchdog(self, ws: ClientConnection) -> None:
        """OKX's 30-second rule: ping after `ping_after` s of silence; no answer in `pong_timeout` s -> drop."""
        self._ws_stale = False
        tick = min(1.0, self.ping_after / 4, self.pong_timeout / 2)
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if self._ping_sent is not None:
                if now - self._ping_sent > self.pong_timeout:
                    self._ws_stale = True
                    log.warning("stream_no_pong", stream=self.name, waited_s=round(now - self._ping_sent, 1))
                    await ws.close(code=1011, reason="no pong")
                    return
            elif now - self._last_rx >= self.ping_after:
                self._ping_sent = now
                await ws.send("ping")

    async def _login(self, ws: ClientConnection) -> None:
        assert self.credentials is not None
        await ws.send(login_request(self.credentials))
        deadline = time.monotonic() + self.login_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no answer to the login within {self.login_timeout:g}s")
            text = await asyncio.wait_for(ws.recv(), timeout=remaining)
            self._last_rx = time.monotonic()
            try:
                msg = orjson.loads(text) if text != "pong" else None
            except orjson.JSONDecodeError:
                msg = None
            if isinstance(msg, dict) and msg.get("event") == "login" and str(msg.get("code", "0")) == "0":
                log.info("stream_logged_in", stream=self.name)
                self.logged_in.set()
                return
            if isinstance(msg, dict) and msg.get("event") == "error":
                code = str(msg.get("code", ""))
                if code in LOGIN_TEMPORARY_CODES:
                    raise TimeoutError(f"login answered with temporary code {code}: {msg.get('msg', '')}")
                exc = LoginRefused(code, self._redact(str(msg.get("msg", ""))))
                exc.raw = self._redact(str(text))[:RAW_LIMIT]  # type: ignore[attr-defined]
                raise exc
            self.dispatch(text)  # anything else before the answer is handled as usual

    # -- messages -------------------------------------------------------------------------------
    def dispatch(self, text: str | bytes) -> None:
        """Handle one frame. Never raises: what cannot be used is reported with its raw text."""
        state = self.state
        now = time.time()
        state.messages += 1
        state.last_message_at = now
        if text == "pong":
            return
        try:
            msg = orjson.loads(text)
        except orjson.JSONDecodeError:
            self._problem("stream_malformed", f"{self.name}: a frame that is not JSON", raw=text)
            return
        if not isinstance(msg, dict):
            self._problem("stream_unknown_message", f"{self.name}: a JSON frame that is not an object", raw=text)
            return
        event = msg.get("event")
        if event is None:
            arg, data = msg.get("arg"), msg.get("data")
            if not isinstance(arg, dict) or not isinstance(data, list) or not isinstance(arg.get("channel"), str):
                self._problem("stream_unknown_message", f"{self.name}: a frame with no arg/data", raw=text)
                return
            channel = arg["channel"]
            state.last_by_channel[channel] = now
            try:
                self.handler.on_push(channel, arg, data, msg)
            except StreamDataError as exc:
                self._problem("stream_bad_push", f"{self.name} {channel} {arg.get('instId', '')}: {exc}; ignored",
                              raw=text)
            except Exception as exc:  # noqa: BLE001 - one bad push must not stop the stream
                self._problem("stream_handler_error",
                              f"{self.name} {channel}: {type(exc).__name__}: {exc}; ignored", raw=text)
            return
        if event in ("subscribe", "unsubscribe"):
            arg = msg.get("arg") if isinstance(msg.get("arg"), dict) else {}
            (state.subscribed.add if event == "subscribe" else state.subscribed.discard)(arg_key(arg))
        elif event == "error":
            self._problem("stream_error_event", f"{self.name}: OKX error {msg.get('code', '?')}: {msg.get('msg', '')}",
                          raw=text)
        elif event in ("login", "channel-conn-count"):
            pass
        elif event == "notice":  # e.g. 64008: the service is being upgraded, reconnect soon
            self._problem("stream_notice", f"{self.name}: OKX notice {msg.get('code', '')}: {msg.get('msg', '')}",
                          raw=text, level="warning")
        else:
            self._problem("stream_unknown_message", f"{self.name}: unknown event {str(event)[:40]!r}", raw=text)

    def _redact(self, text: str) -> str:
        for secret in self.credentials.secrets() if self.credentials is not None else ():
            text = text.replace(secret, "[REDACTED]")
        return text

    def _problem(self, kind: str, message: str, *, raw: str | bytes = "", level: str = "warning",
                 limited: bool = True) -> None:
        """Report (at most PROBLEMS_PER_MINUTE per kind and minute; the rest are counted in the next report)."""
        if limited:
            now = time.monotonic()
            start, count = self._problem_window.get(kind, (now, 0))
            if now - start >= 60:
                start, count = now, 0
            self._problem_window[kind] = (start, count + 1)
            if count >= PROBLEMS_PER_MINUTE:
                self.state.suppressed += 1
                return
            if self.state.suppressed:
                message = f"{message} ({self.state.suppressed} earlier reports not journaled one by one)"
                self.state.suppressed = 0
        raw_text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        log.warning(kind, stream=self.name, message=self._redact(message))
        try:
            self.on_problem(kind=kind, message=self._redact(message), raw=self._redact(raw_text)[:RAW_LIMIT],
                            level=level, stream=self.name)
        except Exception as exc:  # noqa: BLE001 - the journal being down must not stop the stream
            log.error("stream_problem_not_reported", stream=self.name, kind=kind, error=str(exc))
