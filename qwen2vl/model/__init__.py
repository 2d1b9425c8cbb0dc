from .cache import KVCache
from .modeling import Qwen2VLForConditionalGeneration, Qwen2VLModel, Qwen2VLPreTrainedModel
from .text import Qwen2VLTextModel
from .vision import Qwen2VisionTransformerPretrainedModel

__all__ = ["KVCache", "Qwen2VLForConditionalGeneration", "Qwen2VLModel", "Qwen2VLPreTrainedModel",
           "Qwen2VLTextModel", "Qwen2VisionTransformerPretrainedModel"]
