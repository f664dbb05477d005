"""LoRA fine-tuning with ``paddlenlp.peft`` that keeps the Partial-LoRA branch.

``LoRAModel`` replaces every targeted ``nn.Linear`` by a fresh ``LoRALinear`` that copies
only ``weight``/``bias`` and whose ``forward`` ignores extra arguments: applied to this
model's PLoRA linears as they are, it would silently drop ``Plora_A``/``Plora_B`` and the
image-row routing. :class:`PLoRALoRAModel` replaces a PLoRA linear by
:class:`PLoRAWithLoRA` instead: a ``LoRALinear`` (so peft's training marks, adapter
saving and ``merge`` all apply) that also carries the PLoRA branch under its official
names. ``merge_and_unload`` folds the LoRA delta into ``weight`` and gives back plain
PLoRA linears, i.e. a normal checkpoint.
"""
from __future__ import annotations

import logging
import os
import re
from typing import List, Optional, Sequence

import paddle
import paddle.nn as nn
from paddlenlp.peft import LoRAConfig, LoRAModel
from paddlenlp.peft.lora import LoRALinear

from ..models.internlm_xcomposer2.plora import ImageRows, PLoRALinear, add_plora_branch

logger = logging.getLogger(__name__)

__all__ = ["OFFICIAL_LORA_TARGETS", "PLoRAWithLoRA", "PLoRALoRAModel", "build_lora_config", "load_adapter",
           "merge_and_unload"]

# The official fine-tuning script's LoRA targets (its ``lora_target_modules`` default).
OFFICIAL_LORA_TARGETS = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


class PLoRAWithLoRA(LoRALinear):
    """``x W + LoRA(x)`` on every row, ``+ PLoRA(x)`` on image rows. Parameter names:
    ``weight``, ``lora_A``, ``lora_B`` (peft) and ``Plora_A.weight``, ``Plora_B.weight``."""

    def __init__(self, plora: PLoRALinear, r: int, lora_alpha: float, lora_dropout: float, **kwargs) -> None:
        with paddle.LazyGuard():  # don't allocate a random full-size weight only to discard it
            LoRALinear.__init__(self, plora.in_features, plora.out_features, r=r, lora_alpha=lora_alpha,
                                lora_dropout=lora_dropout, bias_attr=False, **kwargs)
        self.lora_A.initialize()
        self.lora_B.initialize()
        self.weight = plora.weight
        self.bias = plora.bias
        self.Plora_A, self.Plora_B = plora.Plora_A, plora.Plora_B
        self.plora_dropout = plora.plora_dropout
        self.lora_scaling = plora.lora_scaling
        self.in_features, self.out_features = plora.in_features, plora.out_features

    def forward(self, x: paddle.Tensor, image_rows: Optional[ImageRows] = None) -> paddle.Tensor:
        return add_plora_branch(self, x, LoRALinear.forward(self, x), image_rows)

    def to_plora(self) -> PLoRALinear:
        """A plain PLoRA linear with this layer's (merged) weight and PLoRA branch."""
        if not self.merged:
            raise ValueError("merge() the LoRA weights before unloading them")
        with paddle.LazyGuard():
            plain = PLoRALinear(self.in_features, self.out_features, bias=self.bias is not None,
                                lora_r=self.Plora_A.weight.shape[1], lora_alpha=1)
        plain.weight, plain.bias = self.weight, self.bias
        plain.Plora_A, plain.Plora_B = self.Plora_A, self.Plora_B
        plain.plora_dropout, plain.lora_scaling = self.plora_dropout, self.lora_scaling
        return plain


class PLoRALoRAModel(LoRAModel):
    """``paddlenlp.peft.LoRAModel`` that wraps PLoRA linears without losing their branch."""

    def _find_and_replace_module(self, model, module_name, lora_config, enable_lora):
        parent = model
        *path, leaf = module_name.split(".")
        for name in path:
            parent = getattr(parent, name)
        module = getattr(parent, leaf)
        if not isinstance(module, PLoRALinear):
            return super()._find_and_replace_module(model, module_name, lora_config, enable_lora)
        setattr(parent, leaf, PLoRAWithLoRA(module, r=lora_config.r, lora_alpha=lora_config.lora_alpha,
                                            lora_dropout=lora_config.lora_dropout, rslora=lora_config.rslora))

    def mark_only_lora_as_trainable(self) -> None:
        super().mark_only_lora_as_trainable()
        # peft unfreezes every parameter with "lora" in its name inside a LoRA layer, which
        # would include "Plora_A.weight": PLoRA stays frozen unless trainable_modules says so.
        patterns = self.lora_config.trainable_modules or []
        for name, param in self.model.named_parameters():
            if ".Plora_" in name and not any(re.fullmatch(p, name) for p in patterns):
                param.stop_gradient = True


def build_lora_config(targets: Sequence[str], r: int, alpha: float, dropout: float, dtype: str,
                      base_model_name_or_path: str = "", trainable_modules: Optional[List[str]] = None) -> LoRAConfig:
    """A ``LoRAConfig`` whose target patterns match the named linears in every layer."""
    patterns = [f".*{re.escape(t)}" if not any(c in t for c in "*[]()^$") else t for t in targets]
    return LoRAConfig(target_modules=patterns, r=r, lora_alpha=alpha, lora_dropout=dropout, dtype=dtype,
                      base_model_name_or_path=base_model_name_or_path, trainable_modules=trainable_modules)


def merge_and_unload(lora_model: LoRAModel) -> nn.Layer:
    """Fold every LoRA delta into its base weight and return the base model with plain
    (PLoRA) linears, ready for ``save_pretrained``. The PLoRA branch is untouched."""
    lora_model.merge()
    base = lora_model.model
    for name, layer in list(base.named_sublayers()):
        if isinstance(layer, PLoRAWithLoRA):
            replacement = layer.to_plora()
        elif isinstance(layer, LoRALinear):
            replacement = nn.Linear(layer.weight.shape[0], layer.weight.shape[1], bias_attr=layer.bias is not None)
            replacement.weight, replacement.bias = layer.weight, layer.bias
        else:
            continue
        parent = base
        *path, leaf = name.split(".")
        for part in path:
            parent = getattr(parent, part)
        setattr(parent, leaf, replacement)
    logger.info("merged LoRA weights into the base model")
    return base


ADAPTER_CONFIG = "lora_config.json"
ADAPTER_WEIGHTS = "lora_model_state.pdparams"


def load_adapter(model: nn.Layer, lora_path: str) -> PLoRALoRAModel:
    """Wrap ``model`` as the adapter in ``lora_path`` says and load its weights strictly:
    an adapter trained on another base model (other sizes or layers) is an error listing
    what does not fit, not a silent partial load (peft's own loader is non-strict)."""
    from ..models.internlm_xcomposer2.readers import CheckpointError, PdparamsFile

    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not os.path.isfile(os.path.join(lora_path, name)):
            raise FileNotFoundError(f"{name} not found in LoRA adapter directory {lora_path}")
    lora_model = PLoRALoRAModel(model, LoRAConfig.from_pretrained(lora_path))
    weights = PdparamsFile(os.path.join(lora_path, ADAPTER_WEIGHTS))
    state = lora_model.model.state_dict()
    infos = weights.infos()
    lora_keys = [n for n in state if n.endswith((".lora_A", ".lora_B"))]
    problems = [f"unexpected {n}" for n in infos if n not in state]
    problems += [f"{n}: adapter {list(i.shape)}, model {list(state[n].shape)}" for n, i in infos.items()
                 if n in state and list(i.shape) != list(state[n].shape)]
    problems += [f"missing {n}" for n in lora_keys if n not in infos]
    if problems:
        raise CheckpointError(f"LoRA adapter {lora_path} does not fit this base model ({len(problems)} problem(s): "
                              + "; ".join(problems[:10]) + "); was it trained on another model?")
    for name in infos:
        state[name].set_value(paddle.to_tensor(weights.read(name)).astype(state[name].dtype))
    lora_model.mark_only_lora_as_trainable()
    return lora_model
