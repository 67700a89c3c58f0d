from __future__ import annotations

import httpx

from tests.fakes.http_server import FakeHttpServer, Reply


def test_it_answers_scripted_replies_in_turn_and_records_requests() -> None:
    with FakeHttpServer() as server:
        server.route("GET", "/a", Reply(429, {"code": "50011"}), Reply(200, {"ok": True}))
        assert httpx.get(server.url + "/a?x=1").status_code == 429
        assert httpx.get(server.url + "/a").json() == {"ok": True}
        assert httpx.get(server.url + "/a").json() == {"ok": True}
        assert httpx.get(server.url + "/missing").status_code == 404
        assert [r.query for r in server.calls("GET", "/a")] == [{"x": "1"}, {}, {}]
