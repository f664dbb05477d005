"""InternLM-XComposer2 for causal LM: CLIP ViT → projector → InternLM2 decoder (PLoRA).

::

    pixel_values [n,3,S,S] ──vit──> [n,P,Dv] ──vision_proj──> [n,P,H] ─┐
                                                                      │ fill the im_mask rows, in order
    input_ids / layout  [b,T] ──tok_embeddings──> [b,T,H] ────────────┴─> inputs_embeds [b,T,H]
    im_mask             [b,T]  (1 on image rows: PLoRA applies there) ──> decoder ──> output ──> logits
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Union

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddlenlp.transformers import PretrainedModel
from paddlenlp.transformers.model_outputs import CausalLMOutputWithPast

from . import checkpoint
from .chat import ChatMixin
from .configuration import InternLMXComposer2Config
from .fast_decode import DECODER_LINEARS
from .hub import resolve_pretrained
from .image_processing import InternLMXComposer2ImageProcessor
from .internlm2 import InternLM2Model
from .kv_cache import KVCache
from .official_api import OfficialAPIMixin
from .plora import ImageRows, PLoRALinear
from .row_gemm import MIN_WEIGHT_BYTES, host_weight, pack_weights, row_matmul, takes_host_gemm, unpack_weights
from .vision import CLIPVisionTower, build_vision_projector

__all__ = ["InternLMXComposer2PretrainedModel", "InternLMXComposer2ForCausalLM", "causal_lm_loss", "IGNORE_INDEX"]

IGNORE_INDEX = -100  # label of positions that are not learned (as torch's CrossEntropyLoss default)


def shift_labels(labels: paddle.Tensor) -> paddle.Tensor:
    """``labels[:, 1:]`` padded with ``IGNORE_INDEX``: the target of every position.

    Shifting the (small) labels instead of slicing the (huge, ``[b, T, V]``) logits avoids
    a full-size copy forward and backward."""
    pad = paddle.full([labels.shape[0], 1], IGNORE_INDEX, dtype="int64")
    return paddle.concat([labels[:, 1:].astype("int64"), pad], axis=1)


def causal_lm_loss(logits: paddle.Tensor, labels: paddle.Tensor) -> paddle.Tensor:
    """Mean cross-entropy of next-token prediction over the labelled positions only.

    ``logits`` ``[b, T, V]`` (or ``[n, V]`` rows with ``labels`` ``[n]`` already shifted),
    ``labels`` ``[b, T]`` (``IGNORE_INDEX`` = not learned). Normalised by the number of
    labelled tokens of the whole batch (Paddle's ``reduction="mean"`` with ``ignore_index``
    divides by all rows; PaddleMIX has that bug). A batch without labelled tokens gives 0
    (and no gradient) instead of NaN.
    """
    targets = shift_labels(labels) if logits.ndim == 3 else labels
    flat_logits = logits.reshape([-1, logits.shape[-1]]).astype("float32")
    flat_targets = targets.reshape([-1, 1]).astype("int64")
    total = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="sum")
    count = (flat_targets != IGNORE_INDEX).astype("float32").sum()
    return total / paddle.clip(count, min=1.0)


class InternLMXComposer2PretrainedModel(PretrainedModel):
    config_class = InternLMXComposer2Config
    base_model_prefix = "model"

    def _init_weights(self, layer: nn.Layer) -> None:
        """Normal(0, initializer_range) for linears/embeddings; PLoRA A as a default Linear
        (uniform ±1/sqrt(in)) and PLoRA B exactly zero, so a fresh PLoRA is a no-op."""
        std = self.config.initializer_range
        if isinstance(layer, PLoRALinear):
            # ``apply`` visits children first, so this overrides the nn.Linear branch below.
            layer.weight.set_value(paddle.normal(0.0, std, layer.weight.shape).astype(layer.weight.dtype))
            bound = 1.0 / math.sqrt(layer.in_features)
            a = layer.Plora_A.weight
            a.set_value(paddle.uniform(a.shape, min=-bound, max=bound).astype(a.dtype))
            layer.Plora_B.weight.set_value(paddle.zeros_like(layer.Plora_B.weight))
        elif isinstance(layer, (nn.Linear, nn.Embedding)):
            layer.weight.set_value(paddle.normal(0.0, std, layer.weight.shape).astype(layer.weight.dtype))
            if getattr(layer, "bias", None) is not None:
                layer.bias.set_value(paddle.zeros_like(layer.bias))


class InternLMXComposer2ForCausalLM(ChatMixin, OfficialAPIMixin, InternLMXComposer2PretrainedModel):
    """The official model's modules and parameter names: ``model.*``, ``output``, ``vit.*``,
    ``vision_proj.*``. The ViT is frozen as in the official model (``fix_vit``)."""

    def __init__(self, config: InternLMXComposer2Config) -> None:
        super().__init__(config)
        self.model = InternLM2Model(config)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias_attr=False)
        vision = config.vision
        self.vit = CLIPVisionTower(vision, config.image_grid)
        self.vision_proj = build_vision_projector(vision.hidden_size, config.hidden_size, config.projector_depth)
        for param in self.vit.parameters():
            param.stop_gradient = True
        self.tokenizer = None  # as officially: set it for encode_text (chat takes the tokenizer as an argument)

    # --- images ------------------------------------------------------------------------------
    def encode_img(self, image: Any) -> Optional[paddle.Tensor]:
        """Image(s) → projected patch embeddings ``[n, P, H]`` (``None`` → ``None``, as officially).

        ``image``: a pixel tensor ``[n,3,S,S]`` / ``[3,S,S]``, or anything the image processor
        accepts (path, URL, PIL image, bytes, or a list of them).
        """
        if image is None:
            return None
        if not isinstance(image, paddle.Tensor):
            processor = InternLMXComposer2ImageProcessor(img_size=self.config.img_size)
            image = paddle.to_tensor(processor(image, return_tensors="np")["pixel_values"])
        if image.ndim == 3:
            image = image.unsqueeze(0)
        expected = [3, self.config.img_size, self.config.img_size]
        if list(image.shape[1:]) != expected:
            raise ValueError(f"pixel_values must be [n, {', '.join(map(str, expected))}], got {list(image.shape)}")
        return self.vision_proj(self.vit(image.astype(self.vision_proj[0].weight.dtype)))

    def img2emb(self, image: paddle.Tensor):
        """Official helper: ``(embeds [n,P,H], attention ones [n,P], targets -100 [n,P])``."""
        embeds = self.encode_img(image)
        ones = paddle.ones(embeds.shape[:2], dtype="int64")
        return embeds, ones, ones * IGNORE_INDEX

    def embed_interleaved(
        self, input_ids: paddle.Tensor, im_mask: paddle.Tensor, pixel_values: Optional[paddle.Tensor] = None,
        image_embeds: Optional[paddle.Tensor] = None,
    ) -> paddle.Tensor:
        """Token embeddings with the ``im_mask`` rows replaced, in row-major order, by the
        patch embeddings of ``pixel_values`` (or precomputed ``image_embeds`` ``[n,P,H]``)."""
        mask = im_mask.astype("bool")
        safe_ids = paddle.where(mask, paddle.zeros_like(input_ids), input_ids)
        embeds = self.model.embed(safe_ids)
        if image_embeds is None:
            image_embeds = self.encode_img(pixel_values)
        feats = image_embeds.reshape([-1, embeds.shape[-1]]).astype(embeds.dtype)
        rows = paddle.nonzero(mask.reshape([-1])).reshape([-1])
        if rows.shape[0] != feats.shape[0]:
            raise ValueError(
                f"im_mask marks {rows.shape[0]} image rows but the images give {feats.shape[0]} "
                f"({image_embeds.shape[0]} image(s) × {image_embeds.shape[1]} tokens)"
            )
        flat = paddle.scatter(embeds.reshape([-1, embeds.shape[-1]]), rows, feats, overwrite=True)
        return flat.reshape(embeds.shape)

    def compose(self, tokenizer, instruction: str, images: Any = None, library: Any = None,
                num_images: Union[str, int] = "auto", **kwargs: Any):
        """Write an illustrated article for ``instruction``: the official composition demo's pipeline
        (article, where images go, captions, the model's choice among candidates), offline. ``images``:
        your own image paths (at most 10), placed where the model chooses; ``library``: a folder whose
        images are ranked for each caption by the model (features cached by file content). Returns a
        ``paddlemix.composition.Article``; other keywords as ``paddlemix.composition.compose``
        (``seed``, ``do_sample``, ``max_new_tokens``, ``on_text``, ``cache_dir``, ...)."""
        from paddlemix.composition import compose  # on first use: the model package never imports it at load

        return compose(self, tokenizer, instruction, images=images, library=library, num_images=num_images, **kwargs)

    # --- forward -----------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.tok_embeddings

    def forward(
        self,
        input_ids: Optional[paddle.Tensor] = None,
        inputs_embeds: Optional[paddle.Tensor] = None,
        attention_mask: Optional[paddle.Tensor] = None,
        im_mask: Optional[paddle.Tensor] = None,
        labels: Optional[paddle.Tensor] = None,
        past_key_values: Optional[KVCache] = None,
        use_cache: bool = False,
        pixel_values: Optional[paddle.Tensor] = None,
        position_ids: Optional[paddle.Tensor] = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        logits_to_keep: Optional[int] = None,
    ) -> Union[CausalLMOutputWithPast, tuple]:
        """As the official forward. ``im_mask`` counts only with ``inputs_embeds`` or
        ``pixel_values`` (with plain ``input_ids`` every row is text, as officially).

        In training mode with ``labels``, only the loss is computed (``logits`` is None): logits
        of unlabelled positions are never needed. Extensions: ``pixel_values`` fills the ``im_mask`` rows of ``input_ids`` with image
        embeddings (training batches); ``past_key_values`` is a :class:`KVCache` (created
        when ``use_cache`` and none is given); ``logits_to_keep=k`` computes logits for the
        last ``k`` positions only (generation).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            if pixel_values is not None:
                if im_mask is None:
                    raise ValueError("pixel_values needs im_mask to mark the image rows")
                inputs_embeds = self.embed_interleaved(input_ids, im_mask, pixel_values)
            else:
                inputs_embeds, im_mask = self.model.embed(input_ids), None
        cache = past_key_values
        if cache is None and use_cache:
            b, t = inputs_embeds.shape[:2]
            cfg = self.config
            cache = KVCache(cfg.num_hidden_layers, b, cfg.num_key_value_heads, cfg.head_dim, t, inputs_embeds.dtype)
        hidden, all_hidden = self.model(
            inputs_embeds,
            attention_mask=attention_mask,
            image_rows=ImageRows.from_mask(im_mask),
            cache=cache,
            position_ids=position_ids,
            output_hidden_states=output_hidden_states,
        )
        if labels is not None and self.training:
            # Training needs logits only where a label is: the [b, T, V] tensor (V = 92544)
            # would cost far more memory and time than the model itself on long samples.
            loss, logits = self._labelled_rows_loss(hidden, labels), None
        else:
            if logits_to_keep and logits_to_keep < hidden.shape[1]:
                hidden = hidden[:, -logits_to_keep:]
            logits = self._head(hidden)
            logits = logits if logits.dtype == paddle.float32 else logits.astype("float32")
            loss = causal_lm_loss(logits, labels) if labels is not None else None
        if not return_dict:
            return tuple(v for v in (loss, logits, cache, all_hidden) if v is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache, hidden_states=all_hidden)

    def _head(self, hidden: paddle.Tensor) -> paddle.Tensor:
        """``self.output(hidden)``; a single row (a decode step) on :mod:`.row_gemm`'s kernel, as
        the decoder's own linears, when the head is the plain bias-free linear it is built as."""
        head = self.output
        if (type(head) is nn.Linear and head.bias is None and not head._forward_pre_hooks
                and not head._forward_post_hooks and takes_host_gemm(hidden, head.weight)):
            return row_matmul(hidden, host_weight(head.weight, math.prod(hidden.shape[:-1])))
        return head(hidden)

    def decode_weights(self) -> List[paddle.Tensor]:
        """The weights every decoded token is multiplied by: each decoder layer's linears and the head."""
        weights = [layer._sub_layers[part]._sub_layers[name].weight for layer in self.model.layers
                   for part, name in DECODER_LINEARS]
        return [*weights, self.output.weight]

    def pack_for_batched_decoding(self, max_rows: int, min_bytes: int = MIN_WEIGHT_BYTES) -> int:
        """Copy the decode weights (:meth:`decode_weights`, float32 on a CPU) into oneDNN's packed
        layout, so that decoding 2 to ``max_rows`` sequences together reads each weight once per
        step (``row_gemm.py``); weights under ``min_bytes`` are left as they are; returns the bytes
        added. The copy does not follow later changes
        to the weights: call :meth:`unpack_for_batched_decoding` before training or loading."""
        weights = [w for w in self.decode_weights() if w.dtype == paddle.float32 and w.place.is_cpu_place()]
        return pack_weights(weights, max_rows, min_bytes)

    def unpack_for_batched_decoding(self) -> None:
        """Drop the copies :meth:`pack_for_batched_decoding` made."""
        unpack_weights(self.decode_weights())

    def _labelled_rows_loss(self, hidden: paddle.Tensor, labels: paddle.Tensor) -> paddle.Tensor:
        targets = shift_labels(labels).reshape([-1])
        rows = paddle.nonzero(targets != IGNORE_INDEX).reshape([-1])
        if rows.shape[0] == 0:
            return hidden.sum() * 0.0  # keeps the graph (and DataParallel's reducer) intact
        picked = paddle.gather(hidden.reshape([-1, hidden.shape[-1]]), rows)
        return causal_lm_loss(self.output(picked).astype("float32"), paddle.gather(targets, rows))

    # --- checkpoints -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str,
        *args: Any,
        config: Optional[InternLMXComposer2Config] = None,
        dtype: Optional[str] = None,
        from_aistudio: bool = False,
        from_hf_hub: bool = False,
        cache_dir: Optional[str] = None,
        subfolder: Optional[str] = None,
        **kwargs: Any,
    ) -> "InternLMXComposer2ForCausalLM":
        """Load a checkpoint in any supported layout (official HF safetensors / ``.bin`` /
        shards, PaddleMIX ``.pdparams``, or ours), strictly, tensor by tensor.

        ``pretrained_model_name_or_path``: a local directory, or a model id resolved like
        PaddleNLP's (cache, then PaddleNLP's store, AI Studio with ``from_aistudio``, or the
        Hugging Face Hub with ``from_hf_hub``; see :mod:`.hub`).
        ``dtype``: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``; weights are
        cast while loading. ``config`` replaces the directory's ``config.json``.
        """
        directory = resolve_pretrained(pretrained_model_name_or_path, purpose="model", from_aistudio=from_aistudio,
                                       from_hf_hub=from_hf_hub, cache_dir=cache_dir, subfolder=subfolder)
        config = config if config is not None else checkpoint.load_config(directory)
        dtype = dtype or "float32"
        files = checkpoint.open_weight_files(directory)
        layout = checkpoint.detect_layout(files)
        model = checkpoint.build_model(cls, config, dtype, lazy=True)
        checkpoint.load_weights(model, files, layout, dtype)
        model.eval()
        return model

    def save_pretrained(self, save_dir: str, *args: Any, **kwargs: Any) -> None:
        """PaddleNLP's ``save_pretrained`` (what the Trainer's checkpoints and resume expect:
        ``config.json`` + ``model_state.pdparams``, or ``model.safetensors`` with
        ``safe_serialization=True``; our names, Paddle layout), made crash-safe: everything is
        written to a temporary sibling directory first and then renamed into place file by
        file, so no final name ever holds a partial file; weight files of another format
        left from an earlier save are removed so a reload cannot pick a stale one."""
        checkpoint.save_atomically(lambda tmp: super(InternLMXComposer2ForCausalLM, self).save_pretrained(
            tmp, *args, **kwargs), save_dir, is_main_process=kwargs.get("is_main_process", True))
