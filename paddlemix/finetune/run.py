"""Supervised fine-tuning of InternLM-XComposer2: model + data + PaddleNLP Trainer."""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Dict, List, Optional, Tuple

import paddle
from paddlenlp.trainer import TrainingArguments

from ..datasets.chatml_dataset import ChatMLDataset, apply_policy, read_chatml, validate
from ..datasets.collator import DataCollatorForChatML
from ..models.internlm_xcomposer2 import InternLMXComposer2ForCausalLM, InternLMXComposer2Tokenizer
from ..models.internlm_xcomposer2.checkpoint import load_config
from ..models.internlm_xcomposer2.hub import resolve_pretrained
from ..models.internlm_xcomposer2.processor import InternLMXComposer2Processor
from .arguments import ArgumentError, DataArguments, ModelArguments
from .checkpoints import CheckpointCompleteCallback, last_complete_checkpoint, set_aside_incomplete
from .lora import PLoRALoRAModel, build_lora_config, load_adapter
from .reporting import check_reporting
from .safe_loading import ErrorCarryingCollator, ErrorCarryingDataset
from .trainer import SFTTrainer

logger = logging.getLogger(__name__)

__all__ = ["run_sft", "source_kwargs", "training_dtype"]

DATASET_NAMES = ("chatml_dataset",)


def source_kwargs(model_args: ModelArguments) -> Dict[str, Any]:
    """``from_pretrained`` keyword arguments for the chosen download source."""
    kwargs: Dict[str, Any] = {"cache_dir": model_args.cache_dir}
    if model_args.source == "aistudio":
        kwargs["from_aistudio"] = True
    elif model_args.source == "huggingface":
        kwargs["from_hf_hub"] = True
    return kwargs


def training_dtype(training: TrainingArguments) -> str:
    """Weights dtype to load. CPU: float32 always (no bf16/fp16 kernels), said once. GPU:
    bf16/fp16 weights under O2 (master weights in the optimizer), float32 under O1 (autocast)."""
    on_gpu = paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    half = "bfloat16" if training.bf16 else "float16" if training.fp16 else None
    if half and not on_gpu:
        logger.warning("training in float32: this machine has no GPU and Paddle's CPU kernels have no %s compute", half)
        training.bf16 = training.fp16 = False
        return "float32"
    return half if half and training.fp16_opt_level == "O2" else "float32"


def _dataset_files(spec: str, split: str) -> List[str]:
    try:
        parsed = json.loads(spec) if isinstance(spec, str) else spec
    except json.JSONDecodeError as err:
        raise ArgumentError(f"dataset is not valid JSON ({err.msg}): {spec!r}") from None
    entries = parsed.get(split, []) if isinstance(parsed, dict) else None
    if entries is None or not isinstance(entries, list):
        raise ArgumentError(f'dataset must look like {{"{split}": [{{"name": "chatml_dataset", "data_files": ...}}]}}')
    files: List[str] = []
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("name") not in DATASET_NAMES or "data_files" not in entry:
            raise ArgumentError(f"dataset.{split} entry {entry!r}: expected name one of {DATASET_NAMES} and data_files")
        data_files = entry["data_files"]
        files += data_files if isinstance(data_files, list) else [data_files]
    return files


def _load_split(files: List[str], processor, data_args: DataArguments, split: str) -> Optional[ChatMLDataset]:
    if not files:
        return None
    samples = read_chatml(files, image_root=data_args.image_root)
    report = validate(samples, processor, check_images=data_args.check_images, timeout=data_args.image_timeout)
    kept = apply_policy(samples, report, data_args.skip_invalid_samples)
    return ChatMLDataset(kept, processor, layouts=report.layouts, on_image_error=data_args.on_image_error)


def _freeze(model: paddle.nn.Layer, model_args: ModelArguments) -> None:
    """Full fine-tuning: everything but the frozen parts trains. ``freeze_include`` freezes
    more; ``freeze_exclude`` keeps matching parameters trainable whatever else says."""
    for name, param in model.named_parameters():
        frozen = (model_args.fix_vit and name.startswith("vit.")) or (
            model_args.fix_vision_proj and name.startswith("vision_proj.")
        ) or any(re.search(p, name) for p in model_args.freeze_include)
        param.stop_gradient = frozen
    _unfreeze_excluded(model, model_args)


def _unfreeze_excluded(model: paddle.nn.Layer, model_args: ModelArguments) -> None:
    for name, param in model.named_parameters():
        if any(re.search(p, name) for p in model_args.freeze_exclude):
            param.stop_gradient = False


def _log_trainable(model: paddle.nn.Layer) -> Tuple[int, int]:
    trainable = sum(int(p.numel()) for p in model.parameters() if not p.stop_gradient)
    total = sum(int(p.numel()) for p in model.parameters())
    logger.warning("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return trainable, total


def build_model(model_args: ModelArguments, data_args: DataArguments, training: TrainingArguments):
    """Tokenizer, processor and the (possibly LoRA-wrapped) model, ready for the Trainer."""
    kwargs = source_kwargs(model_args)
    model_dir = resolve_pretrained(model_args.model_name_or_path, purpose="model", **kwargs)
    tokenizer = InternLMXComposer2Tokenizer.from_pretrained(model_args.tokenizer_name_or_path or model_dir, **kwargs)
    config = load_config(model_dir, max_length=data_args.max_length)
    model = InternLMXComposer2ForCausalLM.from_pretrained(model_dir, config=config, dtype=training_dtype(training))
    if config.vocab_size < len(tokenizer):
        raise ArgumentError(f"the tokenizer has {len(tokenizer)} tokens but the model only {config.vocab_size} "
                            "embeddings; use the tokenizer that belongs to this checkpoint")
    model.train()
    if model_args.gradient_checkpointing or training.recompute:
        model.model.enable_recompute = True
    if model_args.lora:
        model = _wrap_lora(model, model_args, model_dir)
    else:
        _freeze(model, model_args)
    _log_trainable(model)
    processor = InternLMXComposer2Processor.from_config(tokenizer, config)
    return tokenizer, processor, model


def _wrap_lora(model, model_args: ModelArguments, model_dir: str):
    dtype = str(model.model.tok_embeddings.weight.dtype).replace("paddle.", "")
    if model_args.lora_path:
        lora_model = load_adapter(model, model_args.lora_path)
    else:
        config = build_lora_config(model_args.lora_target_modules, model_args.lora_rank, model_args.lora_alpha,
                                   model_args.lora_dropout, dtype, base_model_name_or_path=model_dir)
        lora_model = PLoRALoRAModel(model, config)
    if not model_args.fix_vit:
        for param in lora_model.model.vit.parameters():
            param.stop_gradient = False
    _unfreeze_excluded(lora_model.model, model_args)
    return lora_model


def resume_checkpoint(training: TrainingArguments) -> Optional[str]:
    """Explicit ``resume_from_checkpoint``, else the last *complete* checkpoint of the output
    directory (rerunning the same command continues an interrupted run), unless
    ``overwrite_output_dir``."""
    if training.resume_from_checkpoint:
        return training.resume_from_checkpoint
    if training.overwrite_output_dir or not training.do_train:
        return None
    if training.should_save:
        set_aside_incomplete(training.output_dir)
    checkpoint = last_complete_checkpoint(training.output_dir)
    if checkpoint:
        logger.warning("resuming from %s", checkpoint)
    return checkpoint


def run_sft(model_args: ModelArguments, data_args: DataArguments, training: TrainingArguments) -> Dict[str, Any]:
    """Train (and/or evaluate) as the arguments say; returns the metrics.

    Runs under a fresh ``unique_name`` scope: the Trainer keys optimizer state by Paddle's
    generated names (``embedding_0.w_0_moment1_0``...), which otherwise depend on what the
    process created before, so a resume in the same process (a notebook, a retry loop)
    would find none of its optimizer state."""
    with paddle.utils.unique_name.guard():
        return _run_sft(model_args, data_args, training)


def build_collator(pad_token_id: int) -> ErrorCarryingCollator:
    """The Trainer's collator. Batches leave it as numpy arrays and the DataLoader makes the tensors:
    a worker process that returns paddle Tensors hands only a borrowed view of each to its queue's
    feeder thread, which can pickle it after the Tensor is freed (a SIGSEGV in the worker)."""
    return ErrorCarryingCollator(DataCollatorForChatML(pad_token_id, return_tensors="np"))


def _run_sft(model_args: ModelArguments, data_args: DataArguments, training: TrainingArguments) -> Dict[str, Any]:
    tokenizer, processor, model = build_model(model_args, data_args, training)
    train_set = _load_split(_dataset_files(data_args.dataset, "train"), processor, data_args, "train") \
        if training.do_train else None
    eval_set = _load_split(_dataset_files(data_args.dataset, "eval"), processor, data_args, "eval") \
        if training.do_eval else None
    if training.do_train and train_set is None:
        raise ArgumentError('do_train is set but dataset has no "train" files')
    carry = lambda dataset: ErrorCarryingDataset(dataset) if dataset is not None else None  # noqa: E731
    check_reporting(training)
    trainer = SFTTrainer(model=model, args=training, train_dataset=carry(train_set), eval_dataset=carry(eval_set),
                         tokenizer=tokenizer, data_collator=build_collator(tokenizer.pad_token_id),
                         callbacks=[CheckpointCompleteCallback()])
    metrics: Dict[str, Any] = {}
    if training.do_train:
        result = trainer.train(resume_from_checkpoint=resume_checkpoint(training))
        trainer.save_model()
        trainer.save_state()
        metrics.update(result.metrics)
    if training.do_eval and eval_set is not None:
        metrics.update(trainer.evaluate())
        if data_args.eval_with_do_generation:
            from .evaluation import generation_accuracy

            base = model.model if isinstance(model, PLoRALoRAModel) else model
            metrics["eval_generation_accuracy"] = generation_accuracy(base, tokenizer, eval_set.samples)
    if training.should_save:
        with open(os.path.join(training.output_dir, "sft_metrics.json"), "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2, default=float)
    if training.world_size > 1:
        # No rank may leave while another is still inside a collective (the last save): a peer
        # that disappears makes the other's communication abort the process (SIGABRT).
        paddle.distributed.barrier()
    return metrics
