"""kvoffload: long-context LLM inference when the KV cache does not fit in fast memory."""

from kvoffload.config import EngineConfig, SamplingParams
from kvoffload.errors import KvoffloadError

__all__ = ["LLM", "SamplingParams", "EngineConfig", "KvoffloadError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch and the model code; import it only when asked for.
    if name == "LLM":
        from kvoffload.api import LLM

        return LLM
    raise AttributeError(name)
