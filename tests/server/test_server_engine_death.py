"""If the engine process dies, the server says so (503) instead of hanging, and still shuts down cleanly."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

from server_util import _children, assert_error, sse_events


def _engine_pid(server_pid: int) -> int:
    for pid in _children(server_pid):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ")
        if b"radixserve.engine.process" in cmd:
            return pid
    raise AssertionError("no engine process found under the server")


def test_engine_death_gives_503_not_a_hang(launch_server):
    with launch_server() as server, server.http() as http:
        model = http.get("/v1/models").json()["data"][0]["id"]
        body = {"model": model, "prompt": "Once upon a time", "max_tokens": 4000, "stream": True,
                "ignore_eos": True}
        events: list[str] = []
        first_chunk = threading.Event()

        def stream():
            with server.http() as c, c.stream("POST", "/v1/completions", json=body) as r:
                buf = ""
                for text in r.iter_text():
                    buf += text
                    first_chunk.set()
                events.extend(sse_events(buf))

        reader = threading.Thread(target=stream)
        reader.start()
        assert first_chunk.wait(60), server.log()
        os.kill(_engine_pid(server.proc.pid), signal.SIGKILL)

        reader.join(30)
        assert not reader.is_alive(), "the stream hung after the engine died"
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == 503 and "engine" in error["message"]

        deadline = time.monotonic() + 10
        while http.get("/health").status_code != 503 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert_error(http.get("/health"), 503)
        assert_error(http.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 2}), 503,
                     contains="engine")
