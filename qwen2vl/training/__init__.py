"""Supervised fine-tuning internals (data / labels / collation, the training loop); public API in `qwen2vl.train`."""
