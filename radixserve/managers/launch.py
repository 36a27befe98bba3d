"""Starts and supervises the engine process. It is started by module name (`python -m
radixserve.engine.process`), so the API process imports nothing of the engine, and a caller's own
`__main__` (a script fed on stdin, a notebook) is never re-imported. The handshake is awaited together
with the child's exit: an engine that dies before it is ready raises at once, with its exit code and the
last lines it wrote."""
from __future__ import annotations

import collections
import dataclasses
import logging
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import msgspec
import zmq

from radixserve.config import ServerArgs
from radixserve.managers.messages import EngineFailed, EngineHandshake, EngineInfo, EngineStart
from radixserve.model_files import check_model_files

logger = logging.getLogger(__name__)

_TAIL_LINES = 20  # of the engine's stderr, quoted when it dies during start-up


class EngineStartError(RuntimeError):
    """The engine process failed to start (the message says why, with its last lines when it died)."""


class RestartBudget:
    """How often a dead engine is started again: up to `limit` times in a row, after 1, 2, 4 ... 30 s.
    An engine that then runs for HEALTHY_AFTER_S earns the whole budget back, so that a rare crash
    never uses it up while a crash loop does."""

    HEALTHY_AFTER_S = 600.0
    MAX_DELAY_S = 30.0

    def __init__(self, limit: int):
        self.limit, self.failures = limit, 0
        self._started = time.monotonic()

    def started(self) -> None:
        self._started = time.monotonic()

    def died(self) -> None:
        if time.monotonic() - self._started >= self.HEALTHY_AFTER_S:
            self.failures = 0

    def next_delay(self) -> float | None:
        """Seconds to wait before the next try; None when the budget is spent."""
        if self.failures >= self.limit:
            return None
        self.failures += 1
        return min(2.0 ** (self.failures - 1), self.MAX_DELAY_S)


class EngineProcess:
    """A running engine process: where to talk to it, whether it is alive, how to stop it."""

    def __init__(self, args: ServerArgs):
        """Validate the model files, then spawn the engine (returns at once; see wait_ready)."""
        check_model_files(args.model_path)
        self._started = time.perf_counter()
        self._dir = tempfile.mkdtemp(prefix="radixserve-")
        self.in_addr, self.out_addr = f"ipc://{self._dir}/in", f"ipc://{self._dir}/out"
        self._zmq = zmq.Context()
        self._ready = self._zmq.socket(zmq.PULL)
        ready_addr = f"ipc://{self._dir}/ready"
        self._ready.bind(ready_addr)
        start = EngineStart(dataclasses.asdict(args), self.in_addr, self.out_addr, ready_addr)
        self.proc = subprocess.Popen([sys.executable, "-m", "radixserve.engine.process"], stdin=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self._tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._stderr = threading.Thread(target=self._forward_stderr, name="radixserve-engine-stderr", daemon=True)
        self._stderr.start()
        self.proc.stdin.write(msgspec.json.encode(start))
        self.proc.stdin.close()

    def _forward_stderr(self) -> None:
        """The engine's log goes on to ours; its last lines are kept for a start-up failure."""
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace")
            self._tail.append(line.rstrip("\n"))
            sys.stderr.write(line)
        self.proc.stderr.close()

    def wait_ready(self) -> EngineInfo:
        """Block until the engine has loaded the model; EngineStartError if it fails or dies first."""
        decoder = msgspec.msgpack.Decoder(EngineHandshake)
        try:
            while not self._ready.poll(100):
                if self.proc.poll() is not None:
                    self._stderr.join(2)  # its last lines
                    tail = "\n".join(self._tail) or "(nothing)"
                    raise EngineStartError(f"the engine process exited with code {self.proc.returncode} before it "
                                           f"was ready; its last lines:\n{tail}")
            msg = decoder.decode(self._ready.recv())
        except BaseException:
            self.stop()
            raise
        finally:
            self._ready.close(0)
        if isinstance(msg, EngineFailed):
            self.stop()
            raise EngineStartError(f"engine failed to start: {msg.error}")
        logger.info("engine ready in %.1fs", time.perf_counter() - self._started)
        return msg.info

    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def exit_code(self) -> int | None:
        return self.proc.poll()

    def stop(self, timeout: float = 10) -> None:
        """Terminate the engine (killed if it does not exit in time) and remove its sockets; idempotent."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._ready.close(0)
        self._zmq.term()
        shutil.rmtree(self._dir, ignore_errors=True)
