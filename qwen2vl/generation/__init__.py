"""Generation for Qwen2-VL: `generate`, `GenerationConfig`, logits processing, stopping and streamers."""
from .config import GenerationConfig
from .generate import GenerateDecoderOnlyOutput, generate
from .streamers import BaseStreamer, TextIteratorStreamer, TextStreamer

__all__ = ["BaseStreamer", "GenerateDecoderOnlyOutput", "GenerationConfig", "TextIteratorStreamer", "TextStreamer",
           "generate"]
