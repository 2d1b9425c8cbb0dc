"""Demo: synthetic shapes/words VQA data (``data``), the demo tokenizer (``build_tokenizer``) and the bundled
demo model. Submodules are imported lazily (``from qwen2vl.demo import data``)."""
