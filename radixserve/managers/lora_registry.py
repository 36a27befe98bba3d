"""The API process's mirror of the engine's LoRA adapters: names → ids as the engine last reported them,
and the control calls that load and unload adapters (the engine owns the weights and the truth)."""
from __future__ import annotations

import asyncio
import logging
import os
import uuid

from radixserve.config import ServerArgs
from radixserve.lora.refs import LoRANotFoundError
from radixserve.managers.engine_client import EngineClient
from radixserve.managers.messages import LoadLoRAReq, LoRAAdapterInfo, LoRAUpdateOutput, UnloadLoRAReq

logger = logging.getLogger(__name__)


class LoRARegistry:
    def __init__(self, client: EngineClient, args: ServerArgs, is_generation: bool,
                 loaded: list[LoRAAdapterInfo]):
        self.client, self.enabled, self.is_generation = client, args.enable_lora, is_generation
        # The adapters requests may use (name → id, path), as the engine last reported them.
        self.adapters: dict[str, LoRAAdapterInfo] = {a.name: a for a in loaded}
        self._path_loads: dict[str, asyncio.Future] = {}  # adapters loaded by path for a request
        self._unloading: set[str] = set()  # names no new request may use, whatever a reply still lists

    def names(self) -> str:
        return ", ".join(sorted(self.adapters)) or "none"

    def loaded(self) -> dict[str, str]:
        """{name: path} of the adapters requests may use."""
        return {a.name: a.path for a in self.adapters.values()}

    def check_loaded(self, lora_id: int) -> None:
        """Raise unless the adapter is still loaded. An unload leaves the registry before the engine hears
        of it, so a request that passes this check reaches the engine before the unload does."""
        if lora_id and all(a.id != lora_id for a in self.adapters.values()):
            raise LoRANotFoundError(f"the LoRA adapter was unloaded; loaded: {self.names()}")

    def _require_enabled(self) -> None:
        if not self.is_generation:
            raise ValueError("LoRA adapters apply to generation models; this model is served for embeddings")
        if not self.enabled:
            raise ValueError("LoRA adapters are not enabled on this server (start it with --enable-lora)")

    def find(self, name_or_path: str) -> int | None:
        """The id of the loaded adapter with this name or loaded from this path, if any."""
        if name_or_path in self.adapters:
            return self.adapters[name_or_path].id
        return next((a.id for a in self.adapters.values()
                     if os.path.abspath(a.path) == os.path.abspath(name_or_path)), None)

    async def resolve(self, name_or_path: str | None, load_folders: bool = True) -> int:
        """The id of a loaded adapter given by name or by path; with load_folders, a folder not loaded yet
        is loaded (named after its path). 0 for None / "" (the base model). Raises LoRANotFoundError."""
        if not name_or_path:
            return 0
        self._require_enabled()
        found = self.find(name_or_path)
        if found is not None:
            return found
        if not load_folders or not os.path.isdir(name_or_path):
            raise LoRANotFoundError(f"LoRA adapter {name_or_path!r} is not loaded; loaded: {self.names()}")
        load = self._path_loads.get(name_or_path)
        if load is None:  # concurrent requests for one new path load it once
            load = asyncio.ensure_future(self.load(name_or_path, name_or_path))
            self._path_loads[name_or_path] = load
            load.add_done_callback(lambda _: self._path_loads.pop(name_or_path, None))
        await asyncio.shield(load)
        return self.adapters[name_or_path].id

    async def load(self, name: str, path: str, pinned: bool = False) -> dict[str, str]:
        """Load a PEFT adapter folder under name; {name: path} of the adapters loaded. ValueError when
        the files are missing or unsupported (the message names what)."""
        self._require_enabled()
        if not name:
            raise ValueError("lora_name must be a non-empty string")
        if name in self.adapters:
            raise ValueError(f"a LoRA adapter named {name!r} is already loaded (unload it first)")
        reply = await self._control(LoadLoRAReq(uuid.uuid4().hex, name, path, pinned))
        if not reply.success:
            raise ValueError(reply.message)
        return self.loaded()

    async def unload(self, name: str) -> dict[str, str]:
        """Unload an adapter once its running requests have finished (new ones are refused at once)."""
        if not self.enabled:
            raise LoRANotFoundError(f"LoRA adapter {name!r} is not loaded (this server has no LoRA adapters; "
                                    f"start it with --enable-lora)")
        if name not in self.adapters:
            raise LoRANotFoundError(f"LoRA adapter {name!r} is not loaded; loaded: {self.names()}")
        del self.adapters[name]
        self._unloading.add(name)
        try:
            reply = await self._control(UnloadLoRAReq(uuid.uuid4().hex, name))
        finally:
            self._unloading.discard(name)
        if not reply.success:
            raise (LoRANotFoundError if reply.not_found else ValueError)(reply.message)
        return self.loaded()

    async def reattach(self, client: EngineClient, loaded: list[LoRAAdapterInfo]) -> None:
        """Talk to a new engine (the last one died): it loaded the --lora-paths adapters (`loaded`); the
        adapters loaded at run time are loaded into it again, under the same names."""
        at_start = {a.name for a in loaded}
        runtime = [a for a in self.adapters.values() if a.name not in at_start]
        self.client, self.adapters = client, {a.name: a for a in loaded}
        for a in runtime:
            try:
                await self.load(a.name, a.path, a.pinned)
            except Exception as e:  # noqa: BLE001 - the others still load; requests naming it get 404
                logger.error("LoRA adapter %r could not be loaded again from %s: %s", a.name, a.path, e)

    async def _control(self, msg: LoadLoRAReq | UnloadLoRAReq) -> LoRAUpdateOutput:
        reply = await self.client.control(msg)
        self.adapters = {a.name: a for a in reply.adapters if a.name not in self._unloading}
        return reply
