"""Text and media preprocessing: tokenizer, image/video processors, the combined processor and chat templating."""
from .batch_feature import BatchFeature
from .chat_template import render_chat_template
from .image_processing import Qwen2VLImageProcessor, smart_resize
from .image_processing_pil import Qwen2VLImageProcessorPil
from .media import MediaLimits, load_image, load_video
from .processor import AutoProcessor, Qwen2VLProcessor
from .tokenizer import AutoTokenizer, Qwen2Tokenizer, Qwen2TokenizerFast, Qwen2VLTokenizer
from .video_processing import Qwen2VLVideoProcessor

__all__ = [
    "AutoProcessor", "AutoTokenizer", "BatchFeature", "MediaLimits", "Qwen2Tokenizer", "Qwen2TokenizerFast",
    "Qwen2VLImageProcessor", "Qwen2VLImageProcessorPil", "Qwen2VLProcessor", "Qwen2VLTokenizer",
    "Qwen2VLVideoProcessor", "load_image", "load_video", "render_chat_template", "smart_resize",
]
