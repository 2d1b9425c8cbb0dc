"""qwen2vl: a standalone, Hugging-Face-compatible PyTorch implementation of Qwen2-VL."""
__version__ = "0.1.0"
