"""Starting the real `radixserve serve` as a subprocess, and helpers shared by the server tests."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import httpx
import openai
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STARTUP_TIMEOUT_S = 120
SHUTDOWN_TIMEOUT_S = 60
CONTEXT_LENGTH = 8192  # SmolLM2's own; the 16384-token KV pool does not cap it
ERROR_KEYS = {"object", "message", "type", "code"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log_path: str
    model: str = ""

    def log(self, tail: int = 8000) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-tail:]

    def client(self, api_key: str = "unused", **kw) -> openai.OpenAI:
        # No retries: a 503 or 5xx must reach the test as it is.
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120, **kw)

    def http(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kw)

    def stop(self) -> int:
        """SIGTERM, then wait (kill after SHUTDOWN_TIMEOUT_S, which fails the test); returns the exit code.
        Checks that the shutdown was graceful: the app's lifespan shutdown completed (which stops the
        engine) and no child process (the engine) is left behind. Idempotent."""
        proc = self.proc
        if proc.poll() is not None:
            return proc.returncode
        children = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            pytest.fail(f"the server did not exit within {SHUTDOWN_TIMEOUT_S}s of SIGTERM:\n{self.log()}")
        deadline = time.monotonic() + 10
        left = [c for c in children if _alive(c)]
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = [c for c in left if _alive(c)]
        for c in left:
            os.kill(c, signal.SIGKILL)
        assert not left, f"child processes {left} outlived the server:\n{self.log()}"
        assert "Application shutdown complete" in self.log(), f"no graceful shutdown:\n{self.log()}"
        return proc.returncode


def _wait_ready(server: Server, headers: dict) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"the server exited with code {server.proc.returncode} while starting:\n{server.log()}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                server.model = httpx.get(server.url + "/v1/models", headers=headers, timeout=10).json()["data"][0]["id"]
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the server did not become healthy within {STARTUP_TIMEOUT_S}s:\n{server.log()}")


def _children(pid: int) -> list[int]:
    """Live child processes of pid (Linux /proc)."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(entry))
    return kids


def start_server(log_dir: str, *flags: str, api_key: str | None = None) -> Server:
    """Start `radixserve serve` with `flags` (plus --api-key when given) on a free port; returns at once."""
    port = free_port()
    log_path = os.path.join(log_dir, f"server-{port}.log")
    cmd = [sys.executable, "-m", "radixserve.cli", "serve", "--port", str(port), "--host", "127.0.0.1",
           "--max-total-tokens", "16384", *flags]
    if api_key:
        cmd += ["--api-key", api_key]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
    return Server(f"http://127.0.0.1:{port}", proc, log_path)


@contextlib.contextmanager
def run_server(log_dir: str, *flags: str, api_key: str | None = None) -> Iterator[Server]:
    """Start `radixserve serve` with `flags` (plus --api-key when given), wait for /health, yield it, and
    always stop it with SIGTERM, asserting a graceful exit (code 0)."""
    server = start_server(log_dir, *flags, api_key=api_key)
    proc = server.proc
    try:
        _wait_ready(server, {"Authorization": f"Bearer {api_key}"} if api_key else {})
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        raise
    try:
        yield server
    finally:
        code = server.stop()
    assert code == 0, f"the server exited with code {code} after SIGTERM:\n{server.log()}"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ---- helpers for assertions


def assert_error(response: httpx.Response, status: int, *, code=None, contains: str | None = None) -> dict:
    """An OpenAI-style error: the status, and a body {"object": "error", "message", "type", "code", ...}."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert ERROR_KEYS <= body.keys(), body
    assert body["object"] == "error"
    assert isinstance(body["message"], str) and body["message"]
    assert isinstance(body["type"], str) and body["type"]
    assert body["code"] == (status if code is None else code), body
    if contains is not None:
        assert contains.lower() in body["message"].lower(), body
    return body


def assert_serving(server: Server, headers: dict | None = None) -> None:
    """The server still answers /health and a normal request."""
    with server.http(headers=headers or {}) as http:
        assert http.get("/health").status_code == 200
        r = http.post("/v1/chat/completions", json={
            "model": server.model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2,
            "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")


def sse_events(raw: str) -> list[str]:
    """Split an SSE body into its `data:` payloads, checking the framing: every event is exactly one
    `data: ...` line, events are separated by a blank line, and the body ends with one."""
    assert raw.endswith("\n\n"), repr(raw[-200:])
    events = raw[:-2].split("\n\n")
    payloads = []
    for event in events:
        assert "\n" not in event, f"an event of several lines: {event!r}"
        assert event.startswith("data: "), f"not a data line: {event!r}"
        payloads.append(event[len("data: "):])
    return payloads


def sse_json(raw: str) -> list[dict]:
    """The JSON payloads of an SSE body, which must end with `data: [DONE]` (and have it only there)."""
    payloads = sse_events(raw)
    assert payloads and payloads[-1] == "[DONE]", payloads[-3:]
    assert "[DONE]" not in payloads[:-1]
    return [json.loads(p) for p in payloads[:-1]]


def stats(server: Server, headers: dict | None = None) -> dict:
    r = httpx.get(server.url + "/get_server_info", headers=headers or {}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["stats"]


def wait_idle(server: Server, timeout: float, headers: dict | None = None) -> dict:
    """Poll /get_server_info until nothing runs and no KV slot is held by a request (free or cached)."""
    deadline = time.monotonic() + timeout
    s = stats(server, headers)
    while not (s["num_running"] == 0 and s["num_waiting"] == 0 and s["kv_used"] == 0 and s["active_requests"] == 0):
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
        s = stats(server, headers)
    return s
