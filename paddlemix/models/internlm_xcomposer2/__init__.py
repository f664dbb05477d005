"""InternLM-XComposer2: CLIP ViT-L/14 -> MLP projector -> InternLM2 decoder with Partial-LoRA."""
from .configuration import InternLMXComposer2Config
from .image_processing import InternLMXComposer2ImageProcessor
from .modeling import InternLMXComposer2ForCausalLM
from .processor import InternLMXComposer2Processor
from .tokenizer import InternLMXComposer2Tokenizer

__all__ = [
    "InternLMXComposer2Config",
    "InternLMXComposer2ForCausalLM",
    "InternLMXComposer2ImageProcessor",
    "InternLMXComposer2Processor",
    "InternLMXComposer2Tokenizer",
]
