"""Fine-tuning: golden loss/gradients through the data path, LoRA that keeps PLoRA, merging,
recompute, arguments, and the real CLI (learning, shipped configs, resume, two processes)."""
from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List

import numpy as np
import paddle
import pytest
from PIL import Image, ImageDraw

from conftest import REPO_ROOT, loopback_server
from paddlemix.datasets import ChatMLDataset, DataCollatorForChatML, read_chatml, validate
from paddlemix.finetune.arguments import ArgumentError, parse_arguments
from paddlemix.finetune.lora import OFFICIAL_LORA_TARGETS, PLoRALoRAModel, build_lora_config, load_adapter, merge_and_unload
from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2ForCausalLM, InternLMXComposer2Tokenizer
from paddlemix.models.internlm_xcomposer2.processor import InternLMXComposer2Processor
from paddlemix.models.internlm_xcomposer2.readers import CheckpointError

SFT = REPO_ROOT / "paddlemix" / "tools" / "supervised_finetune.py"
CONFIGS = REPO_ROOT / "paddlemix" / "config" / "internlm_xcomposer2"
ATOL = 1e-4
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220)}


# --- data -------------------------------------------------------------------------------------
def _shape_image(path: Path, colour: str) -> None:
    image = Image.new("RGB", (96, 96), (255, 255, 255))
    ImageDraw.Draw(image).rectangle([20, 20, 76, 76], fill=COLOURS[colour])
    image.save(path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_dir) -> Path:
    """Single-image, multi-turn and two-image rows about coloured squares (seed format)."""
    root = tmp_path_factory.mktemp("sft-data")
    for colour in COLOURS:
        _shape_image(root / f"{colour}.png", colour)
    for name in ("img1.png", "img2.png"):
        shutil.copy(tiny_dir / name, root / name)
    rows = []
    for i in range(12):
        colour = list(COLOURS)[i % 3]
        other = list(COLOURS)[(i + 1) % 3]
        rows.append({"id": f"one-{i}", "conversations": [[f"<img>{colour}.png</img>What colour is the square?",
                                                          f"The square is {colour}."]]})
        if i % 4 == 0:
            rows.append({"id": f"turns-{i}", "conversations": [
                [f"<img>{colour}.png</img>What colour is the square?", f"The square is {colour}."],
                ["Is it a circle?", "No, it is a square."]]})
        if i % 4 == 1:
            rows.append({"id": f"two-{i}", "conversations": [
                [f"<img>{colour}.png</img> <img>{other}.png</img>Which colours are these?", f"{colour} and {other}."]]})
    (root / "train.json").write_text(json.dumps(rows), encoding="utf-8")
    (root / "eval.json").write_text(json.dumps(rows[:3]), encoding="utf-8")
    return root


def _sft(args: List[str], env_extra: dict = None, timeout: int = 300, module: str = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}))
    command = [sys.executable, str(SFT)] if module is None else [sys.executable, "-m", module]
    return subprocess.run(command + args, capture_output=True, text=True, env=env, timeout=timeout)


def _losses(stderr: str) -> List[float]:
    return [float(x) for x in re.findall(r"step \d+/\d+: loss ([0-9.e+-]+)", stderr)]


def _common(model_dir: Path, data_dir: Path, out: Path, steps: int) -> List[str]:
    dataset = {"train": [{"name": "chatml_dataset", "data_files": str(data_dir / "train.json")}],
               "eval": [{"name": "chatml_dataset", "data_files": str(data_dir / "eval.json")}]}
    return ["--model_name_or_path", str(model_dir), "--output_dir", str(out), "--dataset", json.dumps(dataset),
            "--max_steps", str(steps), "--gradient_accumulation_steps", "1", "--max_length", "1024",
            "--disable_tqdm", "true", "--warmup_ratio", "0"]


# --- golden through the data path --------------------------------------------------------------
def test_golden_loss_and_gradients_through_dataset_and_collator(tiny_dir, tiny_config, golden, golden_json, tmp_path):
    for name in ("img1.png", "img2.png"):
        shutil.copy(tiny_dir / name, tmp_path / name)
    turns = [c["value"] for c in golden_json["train"]["conversations"]]
    first = turns[0].replace("<ImageHere> <ImageHere>", "<img>img1.png</img> <img>img2.png</img>")
    text = [c["value"] for c in golden_json["train_text_only"]["conversations"]]
    rows = [{"id": "golden", "conversations": [[first, turns[1]], [turns[2], turns[3]]]},
            {"id": "text", "conversations": [text]}]
    (tmp_path / "train.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    model = InternLMXComposer2ForCausalLM.from_pretrained(str(tiny_dir), config=tiny_config)
    tokenizer = InternLMXComposer2Tokenizer.from_pretrained(str(tiny_dir))
    processor = InternLMXComposer2Processor.from_config(tokenizer, tiny_config)
    samples = read_chatml(str(tmp_path / "train.json"))
    dataset = ChatMLDataset(samples, processor, layouts=validate(samples, processor).layouts)
    collate = DataCollatorForChatML(tokenizer.pad_token_id)
    model.eval()  # the golden run: dropout off
    out = model(**collate([dataset[0]]))
    np.testing.assert_allclose(float(out.loss), float(golden["train_loss"]), atol=ATOL, rtol=0)
    out.loss.backward()
    params = dict(model.named_parameters())
    for key in [k for k in golden if k.startswith("grad__")]:
        np.testing.assert_allclose(params[key[6:]].grad.numpy().T, golden[key], atol=ATOL, rtol=0, err_msg=key)
    text_loss = model(**collate([dataset[1]])).loss
    np.testing.assert_allclose(float(text_loss), float(golden["train_text_loss"]), atol=ATOL, rtol=0)


# --- LoRA ---------------------------------------------------------------------------------------
def _chat_logits(model, golden) -> np.ndarray:
    with paddle.no_grad():
        return model(inputs_embeds=paddle.to_tensor(golden["chat_inputs_embeds"])[None],
                     im_mask=paddle.to_tensor(golden["chat_im_mask"])[None]).logits.numpy()


def test_lora_keeps_plora_and_merges(tiny_model, golden, tmp_path):
    before = _chat_logits(tiny_model, golden)
    lora = PLoRALoRAModel(tiny_model, build_lora_config(OFFICIAL_LORA_TARGETS, 4, 8, 0.0, "float32"))
    np.testing.assert_array_equal(_chat_logits(lora, golden), before)  # zero-init B: identical, PLoRA intact
    trainable = {n for n, p in lora.model.named_parameters() if not p.stop_gradient}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert len(trainable) == 2 * 5 * tiny_model.config.num_hidden_layers
    for name, param in lora.model.named_parameters():
        if name.endswith("lora_B"):
            param.set_value(paddle.randn(param.shape) * 0.1)
    unmerged = _chat_logits(lora, golden)
    assert np.abs(unmerged - before).max() > 1e-3
    lora.save_pretrained(str(tmp_path / "adapter"))
    merged = merge_and_unload(lora)
    # W + BA vs the branch: another float32 summation order (CI saw 1 of 37.7 M logits 1.01e-5 off)
    np.testing.assert_allclose(_chat_logits(merged, golden), unmerged, atol=1e-4, rtol=0)
    merged.save_pretrained(str(tmp_path / "merged"))
    reloaded = InternLMXComposer2ForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert any(".Plora_A." in n for n in reloaded.state_dict())
    np.testing.assert_allclose(_chat_logits(reloaded, golden), unmerged, atol=1e-4, rtol=0)


def test_adapter_loads_strictly(tiny_dir, tiny_config, tiny_model, golden, tmp_path):
    lora = PLoRALoRAModel(tiny_model, build_lora_config(OFFICIAL_LORA_TARGETS, 4, 8, 0.0, "float32"))
    for name, param in lora.model.named_parameters():
        if name.endswith("lora_B"):
            param.set_value(paddle.randn(param.shape) * 0.1)
    lora.save_pretrained(str(tmp_path / "adapter"))
    fresh = InternLMXComposer2ForCausalLM.from_pretrained(str(tiny_dir), config=tiny_config)
    np.testing.assert_allclose(_chat_logits(load_adapter(fresh, str(tmp_path / "adapter")), golden),
                               _chat_logits(lora, golden), atol=1e-6, rtol=0)
    other = InternLMXComposer2ForCausalLM(type(tiny_config)(**{**tiny_config.to_dict(), "intermediate_size": 32}))
    with pytest.raises(CheckpointError, match="does not fit this base model"):
        load_adapter(other, str(tmp_path / "adapter"))


def test_recompute_gives_identical_gradients(tiny_dir, tiny_config, golden):
    grads = []
    for recompute in (False, True):
        model = InternLMXComposer2ForCausalLM.from_pretrained(str(tiny_dir), config=tiny_config)
        model.train()
        for layer in model.sublayers():
            if isinstance(layer, paddle.nn.Dropout):
                layer.p = 0.0
        model.model.enable_recompute = recompute
        loss = model(inputs_embeds=paddle.to_tensor(golden["train_inputs_embeds"])[None],
                     im_mask=paddle.to_tensor(golden["train_im_mask"])[None],
                     labels=paddle.to_tensor(golden["train_labels"])[None]).loss
        loss.backward()
        grads.append({n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for name in grads[0]:
        np.testing.assert_allclose(grads[1][name], grads[0][name], atol=1e-6, rtol=0, err_msg=name)


# --- arguments ----------------------------------------------------------------------------------
def _config(tmp_path: Path, **changes) -> str:
    values = json.loads((CONFIGS / "sft_argument.json").read_text())
    values.update(output_dir=str(tmp_path / "out"), **changes)
    path = tmp_path / "args.json"
    path.write_text(json.dumps(values))
    return str(path)


@pytest.mark.parametrize("changes,match", [
    ({"lerning_rate": 1e-4}, r"unknown key 'lerning_rate' \(did you mean 'learning_rate'\?\)"),
    ({"max_len": 64}, r"unknown key 'max_len' \(did you mean 'max_length'\?\)"),
    ({"max_length": "long"}, r"key 'max_length' must be int"),
    ({"do_train": "yes please"}, r"key 'do_train' must be bool"),
    ({"mixtoken": True}, r"mixtoken: true is not supported"),
    ({"fp16": True}, r"fp16.*bf16|bf16.*fp16"),
])
def test_bad_argument_files(tmp_path, changes, match):
    with pytest.raises(ArgumentError, match=match):
        parse_arguments([_config(tmp_path, **changes)])


def test_unwritable_output_dir(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ArgumentError, match="is not writable"):
        parse_arguments([_config(tmp_path), "--output_dir", str(tmp_path / "a_file" / "out")])


def test_command_line_overrides_the_file(tmp_path):
    model, data, training = parse_arguments([_config(tmp_path), "--learning_rate", "0.5", "--lora", "true"])
    assert training.learning_rate == 0.5 and model.lora and data.max_length == 4096


# --- the real CLI --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def url_server(data_dir):
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(data_dir), **k)  # noqa: E731
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    with loopback_server(handler) as base:
        yield base


@pytest.mark.parametrize("config,extra,ratio", [
    ("sft_argument.json", ["--learning_rate", "0.005"], 0.5),
    # LoRA on the 16-wide fixture cannot move the frozen 92544-row embedding/output tables: it learns less
    ("sft_lora_argument.json", ["--learning_rate", "0.02", "--lora_rank", "8", "--lora_alpha", "16"], 0.85),
])
def test_shipped_config_trains_and_loss_falls(config, extra, ratio, tiny_model_dir, data_dir, url_server, tmp_path):
    rows = json.loads((data_dir / "train.json").read_text())
    rows.append({"id": "url", "conversations": [[f"<img>{url_server}/red.png</img>What colour is the square?",
                                                 "The square is red."]]})
    (tmp_path / "train.json").write_text(json.dumps(rows))
    for colour in COLOURS:
        (tmp_path / f"{colour}.png").symlink_to(data_dir / f"{colour}.png")
    args = _common(tiny_model_dir, tmp_path, tmp_path / "out", 40)
    args[args.index("--dataset") + 1] = json.dumps({"train": [{"name": "chatml_dataset",
                                                               "data_files": str(tmp_path / "train.json")}]})
    result = _sft([str(CONFIGS / config)] + args + ["--per_device_train_batch_size", "2", "--do_eval", "false",
                                                    "--save_steps", "1000", "--lr_scheduler_type", "constant"] + extra)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = _losses(result.stderr)
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < ratio * np.mean(losses[:5]), losses  # learning is real
    weights = "lora_model_state.pdparams" if "lora" in config else "model_state.pdparams"
    assert (tmp_path / "out" / weights).is_file()


def test_resume_after_kills_equals_uninterrupted(tiny_model_dir, data_dir, tmp_path):
    """SIGKILL at several points (some mid-save), rerun the same command each time: the final
    weights equal an uninterrupted run's, bit for bit (seeded data order, dropout RNG restored)."""
    def args(out: Path) -> List[str]:
        return [str(CONFIGS / "sft_argument.json")] + _common(tiny_model_dir, data_dir, out, 12) + [
            "--per_device_train_batch_size", "2", "--save_steps", "2", "--learning_rate", "0.001",
            "--do_eval", "false", "--num_train_epochs", "3", "--save_total_limit", "2"]

    reference = _sft(args(tmp_path / "ref"))
    assert reference.returncode == 0, reference.stderr[-2000:]
    rng = np.random.default_rng(0)
    out = tmp_path / "killed"
    for _ in range(3):
        process = subprocess.Popen([sys.executable, str(SFT)] + args(out), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        try:
            process.wait(timeout=float(rng.uniform(4.5, 7.5)))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    final = _sft(args(out))
    assert final.returncode == 0, final.stderr[-2000:]
    a = paddle.load(str(tmp_path / "ref" / "model_state.pdparams"))
    b = paddle.load(str(out / "model_state.pdparams"))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)
    assert len([d for d in os.listdir(out) if re.fullmatch(r"checkpoint-\d+", d)]) <= 2  # save_total_limit


def test_two_processes_data_parallel(tiny_model_dir, data_dir, tmp_path):
    args = ["--nproc_per_node", "2", "--log_dir", str(tmp_path / "logs"), str(SFT),
            str(CONFIGS / "sft_argument.json")] + _common(tiny_model_dir, data_dir, tmp_path / "out", 2) + [
        "--per_device_train_batch_size", "2", "--save_steps", "2", "--do_eval", "false"]
    # faulthandler: a worker that aborts leaves its Python stack in its log.
    result = _sft(args, env_extra={"PYTHONFAULTHANDLER": "1"}, module="paddle.distributed.launch")
    logs = "".join(f"--- workerlog.{rank}\n" + (tmp_path / "logs" / f"workerlog.{rank}").read_text()[-2000:]
                   for rank in range(2))
    assert result.returncode == 0, result.stderr[-1000:] + logs
    assert (tmp_path / "out" / "checkpoint-2" / "rng_state_2.pth").is_file()  # saved by a 2-process run
    assert (tmp_path / "out" / "model_state.pdparams").is_file()


def test_merge_tool_exports_a_checkpoint_chat_demo_loads(tiny_model_dir, tiny_dir, data_dir, tmp_path):
    train = _sft([str(CONFIGS / "sft_lora_argument.json")] + _common(tiny_model_dir, data_dir, tmp_path / "lora", 3) +
                 ["--save_steps", "1000", "--do_eval", "false", "--lora_rank", "4"])
    assert train.returncode == 0, train.stderr[-2000:]
    merge = subprocess.run([sys.executable, str(REPO_ROOT / "paddlemix" / "tools" / "merge_lora_params.py"),
                            "--model_name_or_path", str(tiny_model_dir), "--lora_path", str(tmp_path / "lora"),
                            "--output_dir", str(tmp_path / "merged")], capture_output=True, text=True)
    assert merge.returncode == 0, merge.stderr[-2000:]
    chat = subprocess.run([sys.executable, "-m", "paddlemix.examples.internlm_xcomposer2.chat_demo",
                           "--from_pretrained", str(tmp_path / "merged"), "--image_path", str(tiny_dir / "img1.png"),
                           "--text", "What is it?", "--no-do_sample", "--max_new_tokens", "4"],
                          capture_output=True, text=True)
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr[-2000:]


def test_cli_bad_data_is_one_error_line(tiny_model_dir, data_dir, tmp_path):
    (tmp_path / "train.json").write_text(json.dumps([{"id": "x", "conversations": [["<img>missing.png</img>Hi", "Ho"]]}]))
    args = _common(tiny_model_dir, tmp_path, tmp_path / "out", 2)
    args[args.index("--dataset") + 1] = json.dumps({"train": [{"name": "chatml_dataset",
                                                               "data_files": str(tmp_path / "train.json")}]})
    result = _sft([str(CONFIGS / "sft_argument.json")] + args + ["--do_eval", "false"])
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "missing.png" in errors[0] and "train.json" in errors[0] and "'x'" in errors[0]
    assert "Traceback" not in result.stderr


def test_eval_with_do_generation_reports_accuracy(tiny_model_dir, data_dir, tmp_path):
    from paddlemix.finetune.run import run_sft

    args = parse_arguments([str(CONFIGS / "sft_argument.json")] + _common(tiny_model_dir, data_dir, tmp_path / "o", 2) +
                           ["--do_eval", "true", "--eval_with_do_generation", "true", "--save_steps", "1000"])
    metrics = run_sft(*args)
    assert "eval_loss" in metrics and 0.0 <= metrics["eval_generation_accuracy"] <= 1.0
    saved = json.loads((tmp_path / "o" / "sft_metrics.json").read_text())
    assert saved["eval_generation_accuracy"] == metrics["eval_generation_accuracy"]


# --- the PaddleMIX README's example, verbatim -----------------------------------------------------
PADDLEMIX_README_JSON = REPO_ROOT / "tests" / "data" / "paddlemix_readme_sft_argument.json"


def _scienceqa_rows(root: Path, tiny_dir: Path) -> None:
    """Rows in the PaddleMIX README's ScienceQA style: ``<img>train/N/image.png</img>``, the
    question, its options on the following lines, the answer."""
    for n, name in enumerate(("img1.png", "img2.png")):
        (root / "train" / str(n)).mkdir(parents=True)
        shutil.copy(tiny_dir / name, root / "train" / str(n) / "image.png")
    rows = [{"id": f"identity_{i}", "conversations": [[
        f"<img>train/{i % 2}/image.png</img>\nWhich is this organism's scientific name?\nCastor canadensis\n"
        "North American beaver\n", "Castor canadensis"]]} for i in range(4)]
    (root / "train.json").write_text(json.dumps(rows, indent=4), encoding="utf-8")
    (root / "eval.json").write_text(json.dumps(rows[:2], indent=4), encoding="utf-8")


def test_paddlemix_readme_sft_json_runs_verbatim_with_visualdl(tiny_model_dir, tiny_dir, tmp_path):
    """PaddleMIX's own README example (bf16 + O1, evaluation and saving per epoch, no
    ``report_to``, so the Trainer reports to VisualDL) with only the model path and data files
    pointed at the fixture and a step limit added: it trains on a CPU, and VisualDL logs the loss
    (protobuf 7 crashed it at the first log)."""
    from visualdl import LogReader

    values = json.loads(PADDLEMIX_README_JSON.read_text(encoding="utf-8"))
    assert values["bf16"] is True and values["fp16_opt_level"] == "O1" and "report_to" not in values
    _scienceqa_rows(tmp_path, tiny_dir)
    values["model_name_or_path"] = str(tiny_model_dir)
    values["dataset"]["train"][0]["data_files"] = str(tmp_path / "train.json")
    values["dataset"]["eval"][0]["data_files"] = str(tmp_path / "eval.json")
    values["max_steps"] = 2
    (tmp_path / "sft_argument.json").write_text(json.dumps(values, indent=4), encoding="utf-8")
    result = subprocess.run([sys.executable, str(SFT), "sft_argument.json"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(_losses(result.stderr)) == 2
    assert "reporting to VisualDL" in result.stderr and "training in float32" in result.stderr
    records = list((tmp_path / "checkpoints" / "internlm_xcomposer_sft_ckpts" / "runs").glob("*/vdlrecords.*.log"))
    assert len(records) == 1
    reader = LogReader(file_path=str(records[0]))
    assert len(reader.get_data("scalar", "train/loss")) == 2


def test_visualdl_that_cannot_log_is_switched_off_with_one_warning(monkeypatch, caplog, tmp_path):
    from paddlemix.finetune import reporting
    from paddlenlp.trainer import TrainingArguments

    assert reporting.visualdl_problem() is None  # the locked protobuf takes VisualDL's bool hparams
    args = TrainingArguments(output_dir=str(tmp_path), report_to=["visualdl"])
    monkeypatch.setattr(reporting, "visualdl_problem", lambda: "protobuf 7.36.2 refuses the bool hparams")
    with caplog.at_level("WARNING", logger="paddlemix.finetune.reporting"):
        reporting.check_reporting(args)
    assert args.report_to == []
    assert [r.getMessage() for r in caplog.records if "VisualDL" in r.getMessage()] == [
        "not reporting to VisualDL: protobuf 7.36.2 refuses the bool hparams; pip install -c constraints.txt protobuf "
        'visualdl fixes it, or set "report_to": "none"']
