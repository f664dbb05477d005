"""Configuration of InternLM-XComposer2.

The official ``config.json`` only describes the InternLM2 decoder (plus ``img_size``).
The vision tower (CLIP ViT-L/14-336), the projector and the Partial-LoRA sizes are
hard-coded in the official Python code; here they are defaults that explicit keys
(``vision_config``, ``lora_r``, ``lora_alpha``, ``lora_dropout``, PaddleMIX's
``vision_projector``) may override, so the real ``config.json`` loads unchanged and
smaller or other variants load too.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Optional

from paddlenlp.transformers import PretrainedConfig

__all__ = ["InternLMXComposer2Config", "VisionConfig", "CLIP_VIT_L14_336"]


@dataclass(frozen=True)
class VisionConfig:
    """The subset of a HF ``CLIPVisionConfig`` that the vision tower uses."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    patch_size: int = 14
    image_size: int = 336  # the size CLIP was trained at; the model runs at ``img_size``
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "VisionConfig":
        """Keep the known keys of a CLIP vision config dict (HF or PaddleNLP), ignore the rest."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


# What the official code builds (``openai/clip-vit-large-patch14-336``).
CLIP_VIT_L14_336 = VisionConfig()


class InternLMXComposer2Config(PretrainedConfig):
    """Config of :class:`InternLMXComposer2ForCausalLM`; defaults are the real 7B."""

    model_type = "internlmxcomposer2"

    def __init__(
        self,
        vocab_size: int = 92544,
        hidden_size: int = 4096,
        intermediate_size: int = 14336,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int = 8,
        hidden_act: str = "silu",
        max_position_embeddings: int = 32768,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-5,
        use_cache: bool = False,
        pad_token_id: int = 2,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        tie_word_embeddings: bool = False,
        bias: bool = False,
        rope_theta: float = 1000000.0,
        rope_scaling: Optional[Dict[str, Any]] = None,
        attn_implementation: str = "eager",
        max_length: int = 4096,
        img_size: int = 224,
        vision_config: Optional[Dict[str, Any]] = None,
        vision_projector: Optional[Dict[str, Any]] = None,
        vision_tower: Optional[str] = None,
        lora_r: int = 256,
        lora_alpha: int = 256,
        lora_dropout: float = 0.05,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("auto_map", None)  # names HF remote-code modules; meaningless here
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.bias = bias
        self.rope_theta = rope_theta
        self.rope_scaling = copy.deepcopy(rope_scaling) if rope_scaling is not None else {"type": "dynamic", "factor": 1.0}
        self.attn_implementation = attn_implementation
        self.img_size = img_size
        self.vision_config = dict(vision_config) if vision_config else asdict(CLIP_VIT_L14_336)
        self.vision_projector = dict(vision_projector) if vision_projector else None
        self.vision_tower = vision_tower
        self.lora_r = lora_r
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            use_cache=use_cache,
            **kwargs,
        )
        # PretrainedConfig treats ``max_length`` as a generation default (20); here it is the
        # official truncation length of the interleaved sequence.
        self.max_length = max_length
        self.validate()

    # --- derived sizes -------------------------------------------------------------------
    @property
    def vision(self) -> VisionConfig:
        return VisionConfig.from_dict(self.vision_config)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def image_grid(self) -> int:
        """Patches per side at ``img_size`` (224/14 = 16 for the 7B, 490/14 = 35 for vl-7b)."""
        return self.img_size // self.vision.patch_size

    @property
    def num_image_tokens(self) -> int:
        return self.image_grid**2

    @property
    def projector_depth(self) -> int:
        """Number of Linear layers in ``vision_proj`` (official: 2, GELU between)."""
        return int((self.vision_projector or {}).get("mlp_depth", 2))

    def validate(self) -> None:
        """Reject sizes the model cannot be built with, naming the key to fix."""
        problems = []
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads {self.num_key_value_heads}"
            )
        patch = self.vision.patch_size
        if self.img_size <= 0 or self.img_size % patch:
            problems.append(f"img_size {self.img_size} is not a positive multiple of the vision patch size {patch}")
        if self.lora_r <= 0:
            problems.append(f"lora_r must be positive, got {self.lora_r}")
        proj = self.vision_projector or {}
        if "mm_hidden_size" in proj and int(proj["mm_hidden_size"]) != self.vision.hidden_size:
            problems.append(
                f"vision_projector.mm_hidden_size {proj['mm_hidden_size']} != vision hidden_size {self.vision.hidden_size}"
            )
        if "hidden_size" in proj and int(proj["hidden_size"]) != self.hidden_size:
            problems.append(f"vision_projector.hidden_size {proj['hidden_size']} != hidden_size {self.hidden_size}")
        if self.projector_depth < 1:
            problems.append(f"vision_projector.mlp_depth must be >= 1, got {self.projector_depth}")
        if problems:
            raise ValueError("invalid InternLM-XComposer2 config: " + "; ".join(problems))
