"""tokenmill: a small, fast LLM serving engine."""
from .config import EngineConfig
from .engine.llm import LLM
from .engine.outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput", "CompletionOutput", "__version__"]
