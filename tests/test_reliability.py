"""Faults and bad input end to end: failed checkpoint writes, images vanishing mid-training,
half-written checkpoints, configs that cannot describe a model, mismatched tokenizers."""
from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import paddle
import pytest
from PIL import Image

from paddlemix.finetune.arguments import parse_arguments
from paddlemix.finetune.checkpoints import COMPLETE_MARKER, last_complete_checkpoint, set_aside_incomplete
from paddlemix.finetune.run import run_sft
from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2Config, InternLMXComposer2Tokenizer
from paddlemix.models.internlm_xcomposer2.checkpoint import load_config
from conftest import REPO_ROOT

CONFIG = REPO_ROOT / "paddlemix" / "config" / "internlm_xcomposer2" / "sft_argument.json"


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    rows = []
    for i, colour in enumerate(["red", "blue"] * 4):
        Image.new("RGB", (32, 32), colour).save(tmp_path / f"{i}.png")
        rows.append({"id": f"r{i}", "conversations": [[f"<img>{i}.png</img>Colour?", colour]]})
    (tmp_path / "train.json").write_text(json.dumps(rows))
    return tmp_path


def _args(model_dir: Path, data: Path, out: Path, *extra: str):
    dataset = json.dumps({"train": [{"name": "chatml_dataset", "data_files": str(data / "train.json")}]})
    return parse_arguments([str(CONFIG), "--model_name_or_path", str(model_dir), "--output_dir", str(out),
                            "--dataset", dataset, "--max_steps", "6", "--save_steps", "2", "--do_eval", "false",
                            "--gradient_accumulation_steps", "1", "--max_length", "512", "--disable_tqdm", "true",
                            "--save_total_limit", "3", *extra])


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_failed_checkpoint_write_is_clear_and_loses_nothing(tiny_model_dir, data, tmp_path, monkeypatch, code):
    real_save = paddle.save

    def failing_save(obj, path, *args, **kwargs):
        if "checkpoint-4" in str(path) and "optimizer" in str(path):
            raise OSError(code, os.strerror(code), str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(paddle, "save", failing_save)
    out = tmp_path / "out"
    with pytest.raises(OSError, match=rf"could not write checkpoint-4 .*\({os.strerror(code)}\).*checkpoint-2"):
        run_sft(*_args(tiny_model_dir, data, out))
    assert last_complete_checkpoint(str(out)) == str(out / "checkpoint-2")
    monkeypatch.setattr(paddle, "save", real_save)
    metrics = run_sft(*_args(tiny_model_dir, data, out))  # the same command again: resumes and finishes
    assert metrics["progress_or_epoch"] > 0 and last_complete_checkpoint(str(out)) == str(out / "checkpoint-6")
    assert any(name.startswith("checkpoint-4.incomplete-") for name in os.listdir(out))


@pytest.mark.parametrize("workers", ["0", "2"])
def test_image_vanishing_mid_training_is_skipped_and_counted(tiny_model_dir, data, tmp_path, caplog, monkeypatch,
                                                            workers):
    import paddlemix.finetune.run as run_module

    validate = run_module.validate

    def validate_then_delete(*args, **kwargs):
        report = validate(*args, **kwargs)
        os.remove(data / "3.png")  # the file disappears after validation, before training reads it
        return report

    monkeypatch.setattr(run_module, "validate", validate_then_delete)
    args = _args(tiny_model_dir, data, tmp_path / "out", "--on_image_error", "skip", "--save_steps", "100",
                 "--dataloader_num_workers", workers, "--per_device_train_batch_size", "2", "--logging_steps", "4",
                 "--max_steps", "4")  # exactly one epoch: the broken row is met once
    with caplog.at_level(logging.INFO, logger="paddlemix"):
        run_sft(*args)
    counted = [r.getMessage() for r in caplog.records if "skipped_samples" in r.getMessage()]
    assert counted and "skipped_samples 1" in counted[-1], counted


def test_image_vanishing_with_the_raise_policy_names_the_sample(tiny_model_dir, data, tmp_path, monkeypatch):
    import paddlemix.finetune.run as run_module
    from paddlemix.datasets import DatasetError

    validate = run_module.validate

    def validate_then_delete(*args, **kwargs):
        report = validate(*args, **kwargs)
        os.remove(data / "3.png")
        return report

    monkeypatch.setattr(run_module, "validate", validate_then_delete)
    with pytest.raises(DatasetError, match=r"train.json, row 3 \(0-based\), id 'r3'.*3.png"):
        run_sft(*_args(tiny_model_dir, data, tmp_path / "out", "--save_steps", "100", "--max_steps", "8"))


def test_half_written_checkpoint_is_never_resumed(tmp_path):
    for step, complete in ((2, True), (4, False)):
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        for name in ("trainer_state.json", "optimizer.pdopt", "scheduler.pdparams", "model_state.pdparams"):
            (path / name).write_text("x")
        if complete:
            (path / COMPLETE_MARKER).write_text(str(step))
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    moved = set_aside_incomplete(str(tmp_path))
    assert len(moved) == 1 and "checkpoint-4.incomplete-" in moved[0] and os.path.isdir(moved[0])


def test_config_errors(tiny_dir, tmp_path):
    config = json.loads((tiny_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama' is not an InternLM-XComposer2 config"):
        load_config(str(tmp_path))
    with pytest.raises(ValueError, match="img_size 230 is not a positive multiple of the vision patch size 14"):
        InternLMXComposer2Config(img_size=230)


def test_tokenizer_larger_than_the_model_is_refused(tiny_dir, tiny_config):
    from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2ForCausalLM

    small = InternLMXComposer2Config(**{**tiny_config.to_dict(), "vocab_size": 1000})
    model = InternLMXComposer2ForCausalLM(small)
    tokenizer = InternLMXComposer2Tokenizer.from_pretrained(str(tiny_dir))
    with pytest.raises(ValueError, match="tokenizer has 92544 tokens but the model only 1000"):
        model.chat(tokenizer, "Hi")


def test_loader_thread_errors_reach_the_training_loop():
    """Paddle's single-process DataLoader thread swallows exceptions (the epoch just ends early):
    wrapped, a bad row and a collator bug both surface in the main thread."""
    import numpy as np

    from paddlemix.datasets import DatasetError
    from paddlemix.finetune.safe_loading import ErrorCarryingCollator, ErrorCarryingDataset, raise_carried_error

    class Rows(paddle.io.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            if index == 2:
                raise DatasetError("train.json, row 2: bad")
            return {"x": np.ones(3, np.int64)}

    def buggy_collate(features):
        if len(features) == 1:
            raise KeyError("a bug")
        return {"x": np.stack([f["x"] for f in features])}

    seen = []
    for batch_size, expected in ((2, DatasetError), (1, RuntimeError)):
        loader = paddle.io.DataLoader(ErrorCarryingDataset(Rows()), batch_size=batch_size,
                                      collate_fn=ErrorCarryingCollator(buggy_collate))
        with pytest.raises(expected) as err:
            for batch in loader:
                raise_carried_error(batch)
                seen.append(batch_size)
        seen.append(str(err.value))
    assert "row 2: bad" in seen[1] and "KeyError: 'a bug'" in seen[-1]


def test_worker_batches_are_numpy_and_arrive_as_equal_tensors(tiny_dir, tiny_config, data):
    """The Trainer's collator returns numpy (a worker returning paddle Tensors can segfault: its queue
    pickles a borrowed view after the Tensor is freed); 2 workers still deliver the same batches."""
    import numpy as np

    from paddlemix.datasets import ChatMLDataset, read_chatml
    from paddlemix.finetune.run import build_collator
    from paddlemix.finetune.safe_loading import ErrorCarryingDataset
    from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2Processor

    processor = InternLMXComposer2Processor.from_config(InternLMXComposer2Tokenizer.from_pretrained(str(tiny_dir)),
                                                        tiny_config)
    dataset = ErrorCarryingDataset(ChatMLDataset(read_chatml([str(data / "train.json")]), processor))
    collate = build_collator(processor.tokenizer.pad_token_id)
    expected = [collate([dataset[i], dataset[i + 1]]) for i in range(0, len(dataset), 2)]
    assert all(isinstance(v, np.ndarray) for batch in expected for v in batch.values())
    for _ in range(3):  # fresh workers each epoch
        loader = paddle.io.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate)
        got = list(loader)
        assert len(got) == len(expected)
        for batch, want in zip(got, expected):
            assert batch.keys() == want.keys()
            for key, value in want.items():
                assert isinstance(batch[key], paddle.Tensor) and np.array_equal(batch[key].numpy(), value), key
