"""agentserve: an LLM serving runtime for AI agents."""

from agentserve.config import EngineConfig
from agentserve.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "EngineConfig"]
__version__ = "0.1.0"


def __getattr__(name: str):  # LLM pulls in torch and the model code: import it on first use
    if name == "LLM":
        from agentserve.llm import LLM

        return LLM
    raise AttributeError(name)
