"""ChatML training data: reading both formats, every bad-data message, validation (local and URL
images, truncation), skip policies, the dataset, the collator, and the batched loss on the tiny model."""
from __future__ import annotations

import collections
import http.server
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import paddle
import pytest
from conftest import loopback_server
from PIL import Image

from paddlemix.datasets import (
    ChatMLDataset,
    DataCollatorForChatML,
    DatasetError,
    apply_policy,
    read_chatml,
    validate,
)
from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2ForCausalLM, InternLMXComposer2Tokenizer
from paddlemix.models.internlm_xcomposer2.processor import IMAGE_SLOT, InternLMXComposer2Processor

URL_TIMEOUT = 0.5  # seconds; the slow URL sleeps longer than this
SLOW_SECONDS = 2.0
GOLDEN_QUESTION = "What is the difference between these two images?"


@pytest.fixture(scope="module")
def processor(tiny_dir, tiny_config) -> InternLMXComposer2Processor:
    tokenizer = InternLMXComposer2Tokenizer.from_pretrained(str(tiny_dir))
    return InternLMXComposer2Processor.from_config(tokenizer, tiny_config)


@pytest.fixture()
def data_dir(tmp_path: Path, tiny_dir: Path) -> Path:
    """A data folder with img1.png / img2.png next to the data files, plus images/ for image_root."""
    for name in ("img1.png", "img2.png"):
        shutil.copy(tiny_dir / name, tmp_path / name)
    (tmp_path / "images").mkdir()
    Image.new("RGB", (1, 1), (255, 0, 0)).save(tmp_path / "images" / "dot.png")  # 1x1 is a valid image
    return tmp_path


def write(folder: Path, rows: Any, name: str = "train.json") -> Path:
    path = folder / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def golden_seed_row(golden_json: dict) -> dict:
    turns = golden_json["train"]["conversations"]
    question = turns[0]["value"].replace("<ImageHere> <ImageHere>", "<img>img1.png</img> <img>img2.png</img>")
    return {"id": "golden", "conversations": [[question, turns[1]["value"]], [turns[2]["value"], turns[3]["value"]]]}


# --- reading ---------------------------------------------------------------------------------
def test_seed_format_multi_turn_multi_image(data_dir: Path) -> None:
    rows = [{"id": 7, "conversations": [["<img>img1.png</img>A<img> img2.png </img>B", "x"],
                                        ["<img>https://h/a.png</img> C", "y"], ["D", "z"]]}]
    [sample] = read_chatml(str(write(data_dir, rows)))
    assert sample.id == "7" and sample.source == "train.json[0]"
    assert sample.conversation == [("<ImageHere>A<ImageHere>B", "x"), ("<ImageHere> C", "y"), ("D", "z")]
    assert sample.images == [str(data_dir / "img1.png"), str(data_dir / "img2.png"), "https://h/a.png"]


def test_image_only_questions_and_official_aliases(data_dir: Path) -> None:
    rows = [{"id": "s", "conversations": [["<img>img1.png</img>", "A red circle."]]},
            {"id": "o", "conversations": [{"from": "human", "value": "<ImageHere>"}, {"from": "gpt", "value": "Red."}],
             "image": "img1.png"}]
    seed, official = read_chatml(write(data_dir, rows))
    assert seed.conversation == [("<ImageHere>", "A red circle.")]
    assert official.conversation == [("<ImageHere>", "Red.")]
    assert seed.images == official.images == [str(data_dir / "img1.png")]


def test_relative_paths_resolve_against_image_root(data_dir: Path) -> None:
    path = write(data_dir, [{"id": "a", "conversations": [["<img>dot.png</img>What?", "Red."]]}])
    assert read_chatml(path)[0].images == [str(data_dir / "dot.png")]
    assert read_chatml([path], image_root=str(data_dir / "images"))[0].images == [str(data_dir / "images/dot.png")]


def test_official_format_golden_and_jsonl(data_dir: Path, golden_json: dict, golden: dict, processor) -> None:
    row = {"id": "g", "conversations": golden_json["train"]["conversations"], "image": ["img1.png", "img2.png"]}
    seed = golden_seed_row(golden_json)
    for path in (write(data_dir, [row, seed], "a.jsonl"), write(data_dir, [row, seed], "b.json"),
                 data_dir / "c.json"):  # c.json: JSON Lines without the .jsonl suffix is detected
        if path.name == "c.json":
            path.write_text((data_dir / "a.jsonl").read_text())
        official, from_seed = read_chatml(path)
        assert official.conversation == from_seed.conversation and official.images == from_seed.images
        layout = processor.training_layout(from_seed.conversation, len(from_seed.images))
        assert layout.labels == golden["train_labels"].tolist()
        assert layout.im_mask == golden["train_im_mask"].astype(int).tolist()
    assert read_chatml(data_dir / "a.jsonl")[1].source == "a.jsonl:2"


def test_several_files_in_order(data_dir: Path) -> None:
    a = write(data_dir, [{"id": "a", "conversations": [["q", "a"]]}], "a.json")
    b = write(data_dir, [{"conversations": [["q", "b"]]}], "b.jsonl")
    assert [s.id for s in read_chatml([a, b])] == ["a", "b.jsonl:1"]


GOOD = [["q", "a"]]
BAD_ROWS = {
    "row-not-object": ([3], "row 0 (0-based): is a JSON number, not an object"),
    "no-conversations": ([{"id": "x", "turns": GOOD}], 'id \'x\': has no "conversations"'),
    "conversations-empty": ([{"id": "x", "conversations": []}], "it must be a non-empty list of turns"),
    "conversations-not-list": ([{"id": "x", "conversations": "hi"}], '"conversations" is "hi"'),
    "turn-not-pair": ([{"id": "x", "conversations": [["q"]]}], 'turn 0 (0-based) is ["q"], not a [question, answer]'),
    "turn-not-strings": ([{"id": "x", "conversations": [["q", 1]]}], "not a [question, answer] pair of strings"),
    "empty-answer": ([{"id": "x", "conversations": [["q", "a"], ["q2", "  \n"]]}], "the answer of turn 1 is empty"),
    "empty-question": ([{"id": "x", "conversations": [[" ", "a"]]}], "the question of turn 0 is empty"),
    "unclosed-img": ([{"id": "x", "conversations": [["<img>a.png what", "a"]]}],
                     "has <img> at character 0 without a closing </img>"),
    "nested-img": ([{"id": "x", "conversations": [["<img>a<img>b</img></img>", "a"]]}], "nested <img> tags"),
    "close-without-open": ([{"id": "x", "conversations": [["a.png</img> what", "a"]]}],
                           "</img> at character 5 without an opening <img>"),
    "empty-img": ([{"id": "x", "conversations": [["<img> </img>what", "a"]]}], "an empty <img></img>"),
    "literal-placeholder": ([{"id": "x", "conversations": [["<ImageHere>what", "a"]]}],
                            "the question of turn 0 contains a literal <ImageHere>"),
    "unknown-role": ([{"id": "x", "conversations": [{"from": "system", "value": "q"}]}],
                     'turn 0 has unknown role "from": "system"'),
    "not-alternating": ([{"id": "x", "conversations": [{"from": "human", "value": "q"},
                                                       {"from": "user", "value": "a"}]}],
                        "turn 1 is from the user but should be from the assistant"),
    "no-last-answer": ([{"id": "x", "conversations": [{"from": "user", "value": "q"}]}],
                       "the last turn (0) is a user turn without an answer"),
    "official-empty": ([{"id": "x", "conversations": [{"from": "user", "value": "q"}, {"from": "gpt", "value": ""}]}],
                       "turn 1 (assistant) is empty"),
    "tag-count": ([{"id": "x", "conversations": [{"from": "user", "value": "<ImageHere>q"},
                                                 {"from": "gpt", "value": "a"}], "image": ["1.png", "2.png"]}],
                  '1 <ImageHere> tag(s) but "image" lists 2 path(s)'),
    "duplicate-id": ([{"id": "x", "conversations": GOOD}, {"id": "x", "conversations": GOOD}],
                     "row 1 (0-based), id 'x': duplicate id, already used by"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_are_named_precisely(tmp_path: Path, processor, case: str) -> None:
    rows, expected = BAD_ROWS[case]
    path = write(tmp_path, rows + [{"id": "fine", "conversations": GOOD}], "bad.json")
    samples = read_chatml(path)  # a bad row becomes an invalid sample, so the skip policy covers it too
    bad = len(rows) - 1
    report = validate(samples, processor)
    assert report.invalid == {bad} and report.num_valid == len(rows)
    [problem] = report.problems
    assert problem.id == samples[bad].id and problem.source == f"bad.json[{bad}]"
    with pytest.raises(DatasetError) as info:
        apply_policy(samples, report, skip_invalid_samples=False)
    for message in (problem.message, str(info.value)):
        assert expected in message and f"{path}, row {bad} (0-based)" in message
        assert "id 'x'" in message or not isinstance(rows[0], dict)
    if case == "duplicate-id":
        assert f"{path}, row 0 (0-based)" in problem.message
    assert [s.id for s in apply_policy(samples, report, skip_invalid_samples=True)][-1] == "fine"
    with pytest.raises(DatasetError, match="1 invalid row"):
        read_chatml(path, strict=True)
    with pytest.raises(DatasetError, match=re.escape(expected)):
        ChatMLDataset(samples, processor)  # never serves a broken row


@pytest.mark.parametrize("content,expected", [
    (b'[{"id": "caf\xe9"}]', "is not UTF-8: byte 0xe9 at byte offset 12"),
    (b'[{"id": 1,]', "is not valid JSON: Expecting property name enclosed in double quotes at line 1, column 11"),
    (b'{"id": "x", "conversations": []}', "holds a JSON object, not a list of samples"),
])
def test_bad_files(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match="bad.json") as info:
        read_chatml(path)
    assert expected in str(info.value)


def test_missing_file_and_bad_jsonl_line(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"data file '.*nope.json' does not exist"):
        read_chatml(str(tmp_path / "nope.json"))
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "conversations": [["q", "a"]]}\n{"id": "b", \n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"bad.jsonl, line 2: is not valid JSON: .* at column"):
        read_chatml(path, strict=True)
    assert [s.problem is None for s in read_chatml(path)] == [True, False]


# --- validation ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def http_base(tiny_dir: Path) -> Iterator[tuple]:
    """Loopback server: /ok.png (PNG), /page (HTML), /slow (answers after SLOW_SECONDS); counts hits."""
    png, hits = (tiny_dir / "img1.png").read_bytes(), collections.Counter()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            hits[self.path] += 1
            if self.path == "/slow":
                time.sleep(SLOW_SECONDS)
            body, kind = (png, "image/png") if self.path != "/page" else (b"<html></html>", "text/html")
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with loopback_server(Handler) as base:
        yield base, hits


pytestmark = pytest.mark.usefixtures("loopback_no_proxy")


def test_validate_images_local_and_url(data_dir: Path, processor, http_base: tuple) -> None:
    base, hits = http_base
    (data_dir / "notes.png").write_text("not an image")
    rows = [{"id": f"r{i}", "conversations": [[f"<img>{src}</img>What?", "This."]]}
            for i, src in enumerate(["images/dot.png", f"{base}/ok.png", f"{base}/ok.png", f"{base}/page",
                                     f"{base}/slow", "missing.png", "notes.png"])]
    samples = read_chatml(write(data_dir, rows))
    started = time.monotonic()
    report = validate(samples, processor, timeout=URL_TIMEOUT)
    assert time.monotonic() - started < SLOW_SECONDS + 1
    assert hits[("/ok.png")] == 1  # each URL is checked once
    assert report.num_samples == 7 and report.num_valid == 3 and report.invalid == {3, 4, 5, 6}
    messages = {issue.id: issue.message for issue in report.problems}
    assert "not an image" in messages["r3"] and "text/html" in messages["r3"]
    assert f"timed out after {URL_TIMEOUT} s" in messages["r4"]
    assert "does not exist" in messages["r5"] and "train.json, row 5 (0-based), id 'r5': image 0" in messages["r5"]
    assert "is not an image PIL can read" in messages["r6"]
    assert report.num_images == 7 and report.min_supervised > 0
    summary = report.summary()
    assert "7 sample(s): 3 valid, 4 invalid" in summary and "r3" in summary
    with pytest.raises(DatasetError, match="4 invalid"):
        report.raise_if_problems()
    with pytest.raises(DatasetError, match="skip_invalid_samples"):
        apply_policy(samples, report, skip_invalid_samples=False)
    assert [s.id for s in apply_policy(samples, report, skip_invalid_samples=True)] == ["r0", "r1", "r2"]


def test_truncation_problem_and_warning(tmp_path: Path, processor) -> None:
    small = InternLMXComposer2Processor(processor.tokenizer, processor.image_processor,
                                        processor.num_image_tokens, max_length=64)
    long_question = "tell me " * 60
    rows = [{"id": "cut", "conversations": [[long_question, "An answer."]]},
            {"id": "partly", "conversations": [["Hi?", "Hello."], [long_question, "Bye."]]},
            {"id": "fits", "conversations": [["Hi?", "Hello."]]}]
    samples = read_chatml(write(tmp_path, rows))
    report = validate(samples, small)
    assert [(i.id, "no answer token is left to learn after truncation to max_length=64" in i.message)
            for i in report.problems] == [("cut", True)]
    assert [i.id for i in report.warnings] == ["partly"] and "cut to max_length=64" in report.warnings[0].message
    kept = apply_policy(samples, report, skip_invalid_samples=True)
    assert [s.id for s in kept] == ["partly", "fits"]
    dataset = ChatMLDataset(kept, small)
    assert len(dataset[0]["input_ids"]) == 64
    with pytest.raises(DatasetError, match="id 'cut': no answer token is left"):
        ChatMLDataset(samples[:1], small)  # never trains on a sample with nothing to learn


def test_an_image_cut_away_is_not_loaded(data_dir: Path, processor) -> None:
    small = InternLMXComposer2Processor(processor.tokenizer, processor.image_processor,
                                        processor.num_image_tokens, max_length=processor.num_image_tokens + 40)
    turns = [["<img>img1.png</img>What?", "Red."], ["<img>img2.png</img>This?", "No."]]
    rows = [{"id": "two", "conversations": turns}]
    samples = read_chatml(write(data_dir, rows))
    report = validate(samples, small)
    assert not report.problems and "1 of 2 image(s) are kept" in report.warnings[0].message
    item = ChatMLDataset(samples, small)[0]
    assert item["pixel_values"].shape[0] == 1 == item["im_mask"].sum() // processor.num_image_tokens


# --- dataset + collator ----------------------------------------------------------------------
def _mixed_dataset(data_dir: Path, golden_json: dict, processor, **kwargs: Any) -> ChatMLDataset:
    rows = [golden_seed_row(golden_json), {"id": "text", "conversations": [["Hi there?", "Hello, how can I help?"]]},
            {"id": "one", "conversations": [["<img>img2.png</img>Colour?", "Yellow."], ["Sure?", "Yes."]]}]
    samples = read_chatml(write(data_dir, rows))
    report = validate(samples, processor)
    kept = apply_policy(samples, report, skip_invalid_samples=False)
    return ChatMLDataset(kept, processor, layouts=report.layouts, **kwargs)


def test_dataset_items_reuse_validated_layouts(data_dir: Path, golden_json: dict, golden: dict, processor,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real = processor.training_layout
    calls = []
    monkeypatch.setattr(processor, "training_layout", lambda *a: calls.append(a) or real(*a))
    dataset = _mixed_dataset(data_dir, golden_json, processor)
    assert len(calls) == 3  # once per sample, in validate(); the dataset reuses report.layouts
    item = dataset[0]
    assert {k: (v.dtype, v.shape[0]) for k, v in item.items()} == {
        "input_ids": (np.int64, 568), "labels": (np.int64, 568), "im_mask": (np.int64, 568),
        "pixel_values": (np.float32, 2)}
    assert item["pixel_values"].shape == (2, 3, 224, 224) and IMAGE_SLOT not in item["input_ids"]
    assert (item["input_ids"][item["im_mask"] == 1] == processor.tokenizer.pad_token_id).all()
    np.testing.assert_array_equal(item["labels"], golden["train_labels"])
    np.testing.assert_allclose(item["pixel_values"][1], golden["img2_pixel_values"], atol=1e-6)
    assert "pixel_values" not in dataset[1]


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_image_deleted_after_validation(data_dir: Path, golden_json: dict, processor, policy: str) -> None:
    dataset = _mixed_dataset(data_dir, golden_json, processor, on_image_error=policy)
    (data_dir / "img2.png").unlink()
    if policy == "raise":
        with pytest.raises(DatasetError, match=r"train.json, row 0 \(0-based\), id 'golden': image 1 failed .*img2"):
            dataset[0]
        return
    text = dataset[1]
    np.testing.assert_array_equal(dataset[0]["input_ids"], text["input_ids"])  # golden -> the next sample
    assert dataset.skipped_at_runtime == 1
    np.testing.assert_array_equal(dataset[2]["input_ids"], text["input_ids"])  # one -> wraps, golden -> text
    assert dataset.skipped_at_runtime == 3
    only_images = ChatMLDataset([dataset.samples[0], dataset.samples[2]], processor, on_image_error="skip")
    with pytest.raises(DatasetError, match="no sample could load its images"):
        only_images[1]


def test_collator_pads_a_mixed_batch(data_dir: Path, golden_json: dict, processor) -> None:
    dataset = _mixed_dataset(data_dir, golden_json, processor)
    items = [dataset[1], dataset[0], dataset[2]]  # text, two images, one image
    lengths = [len(i["input_ids"]) for i in items]
    batch = DataCollatorForChatML(pad_token_id=2, pad_to_multiple_of=64, return_tensors="np")(items)
    width = -(-max(lengths) // 64) * 64
    assert {k: v.shape for k, v in batch.items()} == {
        "input_ids": (3, width), "labels": (3, width), "im_mask": (3, width), "attention_mask": (3, width),
        "pixel_values": (3, 3, 224, 224)}
    for row, n in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert (batch["labels"][row, n:] == -100).all() and (batch["im_mask"][row, n:] == 0).all()
        assert (batch["input_ids"][row, n:] == 2).all()
    np.testing.assert_array_equal(batch["pixel_values"][2], items[2]["pixel_values"][0])  # batch order
    text_only = DataCollatorForChatML(pad_token_id=2)([dataset[1], dataset[1]])
    assert "pixel_values" not in text_only and isinstance(text_only["input_ids"], paddle.Tensor)


def test_batched_loss_is_the_token_weighted_mean(tiny_dir, tiny_config, data_dir: Path, golden_json: dict,
                                                 golden: dict, processor) -> None:
    model = InternLMXComposer2ForCausalLM.from_pretrained(str(tiny_dir), config=tiny_config)
    model.eval()
    dataset = _mixed_dataset(data_dir, golden_json, processor)
    collate = DataCollatorForChatML(pad_token_id=processor.tokenizer.pad_token_id)
    items = [dataset[i] for i in range(3)]
    with paddle.no_grad():
        losses = [float(model(**collate([item])).loss) for item in items]
        batch_loss = float(model(**collate(items)).loss)
    assert abs(losses[0] - float(golden["train_loss"])) < 1e-4  # the golden sample, read from a data file
    counts = [int((item["labels"][1:] != -100).sum()) for item in items]
    expected = sum(l * n for l, n in zip(losses, counts)) / sum(counts)
    assert abs(batch_loss - expected) < 1e-5, (batch_loss, expected, losses, counts)
