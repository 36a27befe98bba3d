"""The API process's line to the engine process: sends typed messages, receives the engine's outputs on
one asyncio task, answers request/response calls (stats, adapter loads) with futures, and notices when
the engine dies (every waiter then fails with EngineDeadError)."""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

import msgspec
import zmq
import zmq.asyncio

from radixserve.managers.launch import EngineProcess
from radixserve.managers.messages import (BatchOutput, EngineInput, EngineOutput, FlushCacheReq, LoRAUpdateOutput, Stats,
                                          StatsReq, TokenOutput)

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


class EngineClient:
    def __init__(self, engine: EngineProcess, on_outputs: Callable[[list[TokenOutput]], None],
                 on_death: Callable[[EngineDeadError], None]):
        """engine: started and ready; on_outputs gets each step's outputs, on_death the error once."""
        self.engine = engine
        self._on_outputs, self._on_death = on_outputs, on_death
        self._zmq = zmq.Context()
        self._send = self._zmq.socket(zmq.PUSH)
        self._send.connect(engine.in_addr)
        self._azmq = zmq.asyncio.Context()
        self._recv = self._azmq.socket(zmq.PULL)
        self._recv.connect(engine.out_addr)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(EngineOutput)
        self._stats_waiters: list[asyncio.Future] = []  # answered in order
        self._control_waiters: dict[str, asyncio.Future] = {}  # adapter loads/unloads, by request id
        self._recv_task: asyncio.Task | None = None
        self.dead = False

    def alive(self) -> bool:
        return not self.dead and self.engine.alive()

    def check_alive(self) -> None:
        if self.dead:
            raise EngineDeadError("the engine process is not running")

    def send(self, msg: EngineInput) -> None:
        self._send.send(self._encoder.encode(msg))

    async def ask(self, msg: StatsReq | FlushCacheReq) -> Stats:
        self.check_alive()
        self.ensure_receiving()
        fut = asyncio.get_running_loop().create_future()
        self._stats_waiters.append(fut)
        self.send(msg)
        return await fut

    async def control(self, msg) -> LoRAUpdateOutput:
        """Send an adapter load/unload and await its answer (matched by msg.req_id)."""
        self.check_alive()
        self.ensure_receiving()
        fut = asyncio.get_running_loop().create_future()
        self._control_waiters[msg.req_id] = fut
        self.send(msg)
        return await fut

    # ---- outputs
    def ensure_receiving(self) -> None:
        if self._recv_task is None or self._recv_task.done():
            self._recv_task = asyncio.get_running_loop().create_task(self._receive_loop())

    async def _receive_loop(self) -> None:
        while True:
            if not await self._recv.poll(1000):
                if not self.engine.alive():
                    self._died()
                    return
                continue
            msg = self._decoder.decode(await self._recv.recv())
            if isinstance(msg, BatchOutput):
                self._on_outputs(msg.outputs)
            elif isinstance(msg, Stats):
                self._stats_waiters.pop(0).set_result(msg)
            elif isinstance(msg, LoRAUpdateOutput):
                fut = self._control_waiters.pop(msg.req_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)

    def _died(self) -> None:
        self.dead = True
        logger.error("the engine process died (exit code %s)", self.engine.exit_code)
        err = EngineDeadError("the engine process died")
        for fut in [*self._stats_waiters, *self._control_waiters.values()]:
            if not fut.done():
                fut.set_exception(err)
        self._stats_waiters.clear()
        self._control_waiters.clear()
        self._on_death(err)

    async def stop_receiving(self) -> None:
        if self._recv_task is not None:
            self._recv_task.cancel()
            await asyncio.gather(self._recv_task, return_exceptions=True)

    def close(self) -> None:
        """Stop the engine process and close the sockets (also of a client whose engine died)."""
        self.engine.stop()
        self._send.close(0)
        self._recv.close(0)
        self._zmq.term()
        self._azmq.term()
