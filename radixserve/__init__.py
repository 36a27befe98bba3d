"""radixserve: a fast LLM serving engine with an OpenAI-compatible API."""
from radixserve.config import ServerArgs
from radixserve.sampling.params import SamplingParams


def __getattr__(name: str):
    # Engine pulls in torch and the engine process machinery: import it on first use only.
    if name == "Engine":
        from radixserve.entrypoints.engine import Engine

        return Engine
    raise AttributeError(name)


__all__ = ["Engine", "SamplingParams", "ServerArgs"]
