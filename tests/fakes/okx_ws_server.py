"""A local WebSocket server on 127.0.0.1 that speaks OKX's v5 WebSocket protocol, for tests and the bench.

Paths and channels as OKX splits them: /ws/v5/public (tickers, books5, funding-rate,
open-interest), /ws/v5/business (candle*, and orders-algo after a login), /ws/v5/private
(orders, positions, account, after a login). It answers like OKX:
- `{"op": "subscribe"|"unsubscribe", "args": [...]}` -> one `{"event": "subscribe", "arg", "connId"}`
  per arg, or `{"event": "error", "code": "60018", ...}` for a channel the path does not have,
  `60011` for a private channel before login, `60012` for a request it cannot read;
- login: checks the timestamp (within 30 s) and the signature base64(HMAC-SHA256(secret,
  timestamp + "GET/users/self/verify")) against the key it was given -> `{"event": "login",
  "code": "0"}` or `{"event": "error", "code": "60009", "msg": "Login failed."}`;
- "ping" -> "pong" (unless `answer_pings` is off);
- pushes `{"arg": {...}, "data": [...]}` to the connections subscribed to that arg; tests call
  `push(...)`, `push_raw(...)` and `drop(...)` (a server-side disconnect) from their own thread.
The server runs its own event loop in a thread; every method here is safe to call from another.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

PUBLIC = "/ws/v5/public"
BUSINESS = "/ws/v5/business"
PRIVATE = "/ws/v5/private"
CHANNELS = {
    PUBLIC: {"tickers", "books5", "funding-rate", "open-interest"},
    BUSINESS: {"orders-algo"},  # + every candle<bar>
    PRIVATE: {"orders", "positions", "account"},
}
LOGIN_REQUIRED = {"orders-algo", "orders", "positions", "account"}


def okx_sign(secret: str, timestamp: str) -> str:
    """OKX's WebSocket login signature, written here from OKX's docs (independently of the client's)."""
    digest = hmac.new(secret.encode("utf-8"), (timestamp + "GET" + "/users/self/verify").encode("utf-8"),
                      hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def _allowed(path: str, channel: str) -> bool:
    return channel in CHANNELS.get(path, set()) or (path == BUSINESS and channel.startswith("candle"))


@dataclass
class _Conn:
    ws: ServerConnection
    path: str
    conn_id: str
    logged_in: bool = False
    subs: set[tuple[str, str]] = field(default_factory=set)  # (channel, instId or "")


class FakeOkxWs:
    def __init__(self, *, api_key: str = "", secret: str = "", passphrase: str = "") -> None:
        self.api_key, self.secret, self.passphrase = api_key, secret, passphrase
        self.answer_pings = True
        self.received: list[tuple[str, str]] = []  # (path, text) of every frame a client sent
        self.logins: list[tuple[str, bool]] = []  # (path, accepted)
        self.connections: dict[str, int] = {PUBLIC: 0, BUSINESS: 0, PRIVATE: 0}
        self.pings = 0
        self._conns: list[_Conn] = []
        self._ids = itertools.count(1)
        self._loop = asyncio.new_event_loop()
        self._server: Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="fake-okx-ws")
        self._lock = threading.Lock()
        self.port = 0

    # -- life ----------------------------------------------------------------------------------
    def start(self) -> FakeOkxWs:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def _serve(self) -> Server:
        return await serve(self._handle, "127.0.0.1", 0, ping_interval=None, compression=None, max_queue=None)

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self) -> FakeOkxWs:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    # -- the protocol ------------------------------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        path = ws.request.path.split("?")[0] if ws.request is not None else ""
        conn = _Conn(ws=ws, path=path, conn_id=f"{next(self._ids):08x}")
        with self._lock:
            self._conns.append(conn)
            self.connections[path] = self.connections.get(path, 0) + 1
        try:
            async for text in ws:
                with self._lock:
                    self.received.append((path, str(text)))
                await self._answer(conn, str(text))
        except ConnectionClosed:
            pass
        finally:
            with self._lock:
                if conn in self._conns:
                    self._conns.remove(conn)

    async def _answer(self, conn: _Conn, text: str) -> None:
        if text == "ping":
            self.pings += 1
            if self.answer_pings:
                await conn.ws.send("pong")
            return
        try:
            req = json.loads(text)
            op, args = req["op"], req["args"]
            assert isinstance(args, list)
        except (ValueError, KeyError, TypeError, AssertionError):
            await self._send(conn, {"event": "error", "code": "60012", "msg": f"Invalid request: {text[:200]}"})
            return
        if op == "login":
            await self._login(conn, args)
        elif op in ("subscribe", "unsubscribe"):
            for arg in args:
                channel = str(arg.get("channel", ""))
                if not _allowed(conn.path, channel):
                    await self._send(conn, {"event": "error", "code": "60018",
                                            "msg": f"Wrong URL or channel:{channel},instId:{arg.get('instId', '')} "
                                                   "doesn't exist. Please use the correct URL, channel and parameters "
                                                   "referring to API document."})
                    continue
                if channel in LOGIN_REQUIRED and not conn.logged_in:
                    await self._send(conn, {"event": "error", "code": "60011", "msg": "Please log in"})
                    continue
                key = (channel, str(arg.get("instId", "")))
                (conn.subs.add if op == "subscribe" else conn.subs.discard)(key)
                echo = {k: v for k, v in arg.items() if k != "extraParams"}
                await self._send(conn, {"event": op, "arg": echo})
        else:
            await self._send(conn, {"event": "error", "code": "60012", "msg": f"Invalid request: {text[:200]}"})

    async def _login(self, conn: _Conn, args: list[Any]) -> None:
        arg = args[0] if args and isinstance(args[0], dict) else {}
        ts = str(arg.get("timestamp", ""))
        try:
            fresh = abs(time.time() - int(ts)) <= 30
        except ValueError:
            fresh = False
        ok = (bool(self.api_key) and arg.get("apiKey") == self.api_key and arg.get("passphrase") == self.passphrase
              and fresh and hmac.compare_digest(str(arg.get("sign", "")), okx_sign(self.secret, ts)))
        with self._lock:
            self.logins.append((conn.path, ok))
        if ok:
            conn.logged_in = True
            await self._send(conn, {"event": "login", "code": "0", "msg": ""})
        else:
            await self._send(conn, {"event": "error", "code": "60009", "msg": "Login failed."})

    async def _send(self, conn: _Conn, body: dict[str, Any]) -> None:
        body["connId"] = conn.conn_id
        try:
            await conn.ws.send(json.dumps(body))
        except ConnectionClosed:
            pass

    # -- what tests do -------------------------------------------------------------------------------
    def _run(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def subscribed(self, path: str, channel: str, inst_id: str = "") -> int:
        """How many open connections on `path` are subscribed to (channel, instId)."""
        with self._lock:
            return sum(1 for c in self._conns if c.path == path and (channel, inst_id) in c.subs)

    def wait_subscribed(self, path: str, channel: str, inst_id: str = "", *, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.subscribed(path, channel, inst_id):
            if time.monotonic() > deadline:
                raise AssertionError(f"nobody subscribed to {channel} {inst_id} on {path} in {timeout}s; "
                                     f"received: {self.received[-10:]}")
            time.sleep(0.02)

    def push(self, path: str, arg: dict[str, Any], data: list[Any], **extra: Any) -> int:
        """Send `{"arg": arg, "data": data, **extra}` to every subscriber of `arg`; returns how many got it."""
        key = (str(arg["channel"]), str(arg.get("instId", "")))
        return self.push_raw(path, json.dumps({"arg": arg, "data": data, **extra}), key=key)

    def push_raw(self, path: str, text: str, *, key: tuple[str, str] | None = None) -> int:
        """Send a frame as is to the connections on `path` (subscribed to `key`, when given)."""
        async def send() -> int:
            with self._lock:
                targets = [c for c in self._conns if c.path == path and (key is None or key in c.subs)]
            for conn in targets:
                try:
                    await conn.ws.send(text)
                except ConnectionClosed:
                    pass
            return len(targets)

        return self._run(send())

    def drop(self, path: str | None = None) -> int:
        """A server-side disconnect: close every connection (on `path`) without a goodbye (TCP reset)."""
        async def drop() -> int:
            with self._lock:
                targets = [c for c in self._conns if path is None or c.path == path]
            for conn in targets:
                conn.ws.transport.abort()
            return len(targets)

        return self._run(drop())

    def blast_framed(self, path: str, frames: list[str], *, total: int, rate: float | None = None,
                     chunk: int = 60) -> float:
        """Send `total` frames (cycling through `frames`) to every connection on `path`, framed here.

        The frames are built once as WebSocket text frames (unmasked, uncompressed: what a server sends)
        and written `chunk` at a time straight to the sockets, so this server is never what limits the
        client's rate (the bench's throughput). `rate` paces them (frames per second); else as fast as
        the client takes them (at most ~4 MB waiting in the socket buffer). Returns the seconds it took.
        """
        def frame(text: str) -> bytes:
            payload = text.encode()
            n = len(payload)
            head = bytes([0x81, n]) if n < 126 else (bytes([0x81, 126]) + n.to_bytes(2, "big") if n < 65536
                                                     else bytes([0x81, 127]) + n.to_bytes(8, "big"))
            return head + payload

        chunk = max(1, min(chunk, total))
        framed = [frame(f) for f in frames]
        blobs = [b"".join(framed[(i + k) % len(framed)] for k in range(chunk)) for i in range(0, len(framed), chunk)]

        async def go() -> float:
            with self._lock:
                targets = [c for c in self._conns if c.path == path]
            started = time.perf_counter()
            sent = 0
            for i in itertools.count():
                if sent >= total:
                    break
                blob = blobs[i % len(blobs)]
                for conn in targets:
                    conn.ws.transport.write(blob)
                sent += chunk
                if rate:
                    ahead = started + sent / rate - time.perf_counter()
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                while any(c.ws.transport.get_write_buffer_size() > 4_000_000 for c in targets):
                    await asyncio.sleep(0.001)
            return time.perf_counter() - started

        return self._run(go(), timeout=3600)

    def blast(self, path: str, frames: list[str], *, total: int) -> float:
        """Send `total` frames (cycling through `frames`) to every connection on `path` as fast as it can.

        Returns the seconds it took to hand them to the sockets (the bench's push rate ceiling).
        """
        async def go() -> float:
            with self._lock:
                targets = [c for c in self._conns if c.path == path]
            started = time.perf_counter()
            n = len(frames)
            for i in range(total):
                for conn in targets:
                    await conn.ws.send(frames[i % n])
            return time.perf_counter() - started

        return self._run(go(), timeout=600)
