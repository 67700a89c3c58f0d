"""A small real HTTP server on 127.0.0.1 for the network boundary in tests.

The OKX, Anthropic and Perplexity SDKs talk to it over real sockets. Tests
register routes with scripted responses (status, JSON or raw body, headers,
delay) and read back every request the server received (method, path, query,
headers, body). Nothing in our own code is replaced: only the far end.
"""
from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # dict/list -> JSON; str/bytes -> sent as is
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering (timeouts)


@dataclass
class Received:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body or b"null")


Handler = Callable[[Received], Reply]


class FakeHttpServer:
    """Routes are (METHOD, path) -> a queue of replies (the last one repeats) or a function."""

    def __init__(self, port: int = 0) -> None:
        self.requests: list[Received] = []
        self._routes: dict[tuple[str, str], deque[Reply] | Handler] = {}
        self._lock = threading.Lock()
        outer = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def _serve(self) -> None:
                split = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                received = Received(
                    method=self.command,
                    path=split.path,
                    query={k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()},
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=body,
                )
                with outer._lock:
                    outer.requests.append(received)
                reply = outer._reply_for(received)
                if reply.delay:
                    time.sleep(reply.delay)
                if isinstance(reply.body, (dict, list)):
                    payload = json.dumps(reply.body).encode()
                    content_type = "application/json"
                elif isinstance(reply.body, str):
                    payload = reply.body.encode()
                    content_type = "text/plain"
                else:
                    payload = reply.body or b""
                    content_type = "application/octet-stream"
                try:
                    self.send_response(reply.status)
                    headers = {"Content-Type": content_type, **reply.headers}
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

        # port 0: any free port; a given port lets a test start the server where a client already looks.
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHttpServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeHttpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def route(self, method: str, path: str, *replies: Reply | Handler) -> None:
        """Answer METHOD path with these replies in turn (the last repeats), or a handler function."""
        with self._lock:
            if len(replies) == 1 and callable(replies[0]):
                self._routes[(method.upper(), path)] = replies[0]  # type: ignore[assignment]
            else:
                self._routes[(method.upper(), path)] = deque(replies)  # type: ignore[arg-type]

    def calls(self, method: str, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if r.method == method.upper() and r.path == path]

    def _reply_for(self, received: Received) -> Reply:
        with self._lock:
            route = self._routes.get((received.method, received.path))
            if route is None:
                return Reply(404, {"code": "404", "msg": f"no route for {received.method} {received.path}", "data": []})
            if callable(route):
                handler = route
            else:
                reply = route.popleft() if len(route) > 1 else route[0]
                return reply
        return handler(received)
