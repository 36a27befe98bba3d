"""Admission control (--max-running-requests 1 --max-queued-requests 1) and the shutdown exit code."""
from __future__ import annotations

import json
import threading

import pytest
from server_util import assert_error, assert_serving, sse_json, wait_idle


@pytest.fixture(scope="module")
def small_server(launch_server):
    with launch_server("--max-running-requests", "1", "--max-queued-requests", "1") as s:
        yield s


class LongStream(threading.Thread):
    """A streaming chat request of 200 tokens; `started` is set once the server has answered 200."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.server, self.started = server, threading.Event()
        self.status, self.raw, self.error = None, "", None

    def run(self):
        body = {"model": self.server.model, "messages": [{"role": "user", "content": "Tell me a long story."}],
                "max_tokens": 200, "ignore_eos": True, "stream": True, "temperature": 0,
                "stream_options": {"include_usage": True}}
        try:
            with self.server.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
                self.status = r.status_code
                self.started.set()
                self.raw = "".join(r.iter_text())
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.error = e
        finally:
            self.started.set()


# Requests sent while two long streams hold the one running and the one queued place.
THIRD = {
    "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
    "completions": ("/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
    "generate": ("/generate", {"text": "Hi", "sampling_params": {"max_new_tokens": 2}}),
}


@pytest.fixture(scope="module")
def overload(small_server):
    """Start two long (200-token) streams, send each THIRD request while both run, then let the streams
    finish. Returns ({name: response of the third request}, health status meanwhile, the streams)."""
    streams = [LongStream(small_server) for _ in range(2)]
    third = {}
    for s in streams:
        s.start()
        assert s.started.wait(60) and s.status == 200, (s.status, s.error)
    try:
        with small_server.http() as http:
            for name, (route, body) in THIRD.items():
                extra = {} if name == "generate" else {"model": small_server.model}
                third[name] = http.post(route, json={**extra, **body})
            health = http.get("/health").status_code
        still_running = all(s.is_alive() for s in streams)
    finally:
        for s in streams:
            s.join(120)
    assert still_running, "the streams ended before the third requests were sent: the test proves nothing"
    return third, health, streams


def _check_503(r) -> None:
    assert_error(r, 503, contains="overloaded")
    assert r.json()["type"] == "service_unavailable"
    assert int(r.headers["retry-after"]) >= 1


def test_overload_generate_503(overload):
    third, health, _ = overload
    _check_503(third["generate"])
    assert health == 200, "overload is not ill health"


@pytest.mark.parametrize("name", ["chat", "completions"])
def test_overload_openai_routes_503(overload, name):
    _check_503(overload[0][name])


def test_streams_finish_then_serves_again(overload, small_server):
    _, _, streams = overload
    for s in streams:
        assert not s.is_alive() and s.error is None, s.error
        events = sse_json(s.raw)
        assert events[-1]["usage"]["completion_tokens"] == 200
    assert wait_idle(small_server, 10)["active_requests"] == 0
    assert_serving(small_server)


def test_queue_admits_one_waiting(small_server):
    """One running + one queued are both served (the second waits for the first)."""
    results = []

    def one():
        with small_server.http() as http:
            r = http.post("/v1/completions", json={"model": small_server.model, "prompt": "Hi", "max_tokens": 8,
                                                   "ignore_eos": True})
            results.append((r.status_code, r.json()))

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [code for code, _ in results] == [200, 200], results
    assert all(body["usage"]["completion_tokens"] == 8 for _, body in results)


def test_sigterm_exit_code(small_server):
    """Last in this module: stop the server and require a clean exit."""
    code = small_server.stop()  # also checks the lifespan shutdown ran and the engine process is gone
    assert code == 0, f"exit code {code}: {json.dumps(small_server.log()[-500:])}"
