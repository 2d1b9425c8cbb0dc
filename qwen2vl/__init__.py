"""qwen2vl: a standalone, Hugging-Face-compatible PyTorch implementation of Qwen2-VL."""
from __future__ import annotations

from importlib import import_module

__version__ = "0.1.0"

# Public names → defining module; imported lazily so `import qwen2vl` stays cheap and optional parts
# (server, training) only load when used.
_EXPORTS = {
    "Qwen2VLConfig": "qwen2vl.configuration",
    "Qwen2VLTextConfig": "qwen2vl.configuration",
    "Qwen2VLVisionConfig": "qwen2vl.configuration",
    "Qwen2VLTextModel": "qwen2vl.model",
    "Qwen2VLModel": "qwen2vl.model",
    "Qwen2VLForConditionalGeneration": "qwen2vl.model",
    "KVCache": "qwen2vl.model",
    "Qwen2VLProcessor": "qwen2vl.processing",
    "AutoProcessor": "qwen2vl.processing",
    "AutoTokenizer": "qwen2vl.processing",
    "Qwen2VLImageProcessor": "qwen2vl.processing.image_processing",
    "Qwen2VLImageProcessorPil": "qwen2vl.processing.image_processing_pil",
    "Qwen2VLVideoProcessor": "qwen2vl.processing.video_processing",
    "BatchFeature": "qwen2vl.processing.batch_feature",
    "GenerationConfig": "qwen2vl.generation",
    "TextStreamer": "qwen2vl.generation",
    "TextIteratorStreamer": "qwen2vl.generation",
    "LLM": "qwen2vl.engine",
    "SamplingParams": "qwen2vl.engine",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qwen2vl' has no attribute {name!r}")


def __dir__():
    return __all__
