"""The server watches its engine process: a death mid-stream gives the stream an error event and [DONE],
every request a 503 while a new engine starts, and then the server serves again with no manual step.
An engine that cannot start, or keeps dying past --engine-restart-limit, makes `radixserve serve` exit
non-zero with the reason (a supervisor then sees a failure, not a server answering 503 forever)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pytest
from server_util import _children, assert_error, assert_serving, sse_events, start_server

RESTART_TIMEOUT_S = 120


def _engine_pid(server_pid: int) -> int:
    for pid in _children(server_pid):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ")
        if b"radixserve.engine.process" in cmd:
            return pid
    raise AssertionError("no engine process found under the server")


def _kill_engine_mid_stream(server) -> list[str]:
    """Start a long stream, SIGKILL the engine once it has begun; the stream's events."""
    body = {"model": server.model, "prompt": "Once upon a time", "max_tokens": 4000, "stream": True,
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
    return events


def _exit_code(server, timeout: float) -> int:
    try:
        return server.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(10)
        pytest.fail(f"the server did not exit within {timeout}s:\n{server.log()}")


def test_engine_death_gives_503_then_a_new_engine(launch_server):
    with launch_server() as server, server.http() as http:
        events = _kill_engine_mid_stream(server)
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == 503 and "engine" in error["message"]

        r = http.post("/v1/completions", json={"model": server.model, "prompt": "Hi", "max_tokens": 2})
        if r.status_code != 200:  # unless the new engine was already up
            assert_error(r, 503, contains="engine")
            assert r.headers["retry-after"]

        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while http.get("/health").status_code != 200:
            assert time.monotonic() < deadline, f"no new engine within {RESTART_TIMEOUT_S}s:\n{server.log()}"
            time.sleep(0.5)
        assert_serving(server)
        assert "the engine is serving again" in server.log()


def test_restart_limit_spent_exits_non_zero(server_logs):
    server = start_server(server_logs, "--engine-restart-limit", "0")
    try:
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while True:
            try:
                if server.http().get("/health").status_code == 200:
                    break
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            assert server.proc.poll() is None and time.monotonic() < deadline, server.log()
            time.sleep(0.5)
        os.kill(_engine_pid(server.proc.pid), signal.SIGKILL)
        assert _exit_code(server, 60) != 0
        assert "--engine-restart-limit" in server.log()
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(10)


@pytest.mark.parametrize("config, reason", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "unsupported model type 'gpt2'"),
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "engine failed to start"),  # bad weights
], ids=["unsupported", "engine-fails"])
def test_serve_exits_non_zero_when_the_engine_cannot_start(server_logs, tmp_path, config, reason):
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    server = start_server(server_logs, "--model-path", str(tmp_path))
    code = _exit_code(server, 120)
    assert code != 0, server.log()
    assert "error: the engine failed to start: " in server.log() and reason in server.log()
