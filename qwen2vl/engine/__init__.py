"""Continuous-batching inference engine (KV pool, scheduler, runner), offline `LLM` and `AsyncEngine`."""
from .async_engine import AsyncEngine
from .prompts import ProcessedPrompt
from .llm import LLM
from .llm_engine import EngineConfig, LLMEngine
from .sampling_params import SamplingParams
from .sequence import (CompletionOutput, EngineDead, EngineError, QueueFull, RequestOutput, RequestRejected)

__all__ = ["AsyncEngine", "CompletionOutput", "EngineConfig", "EngineDead", "EngineError", "LLM", "LLMEngine",
           "ProcessedPrompt", "QueueFull", "RequestOutput", "RequestRejected", "SamplingParams"]
