"""paddlemix.evaluation and tools/evaluate.py: formats, official prompts, answer extraction, circular
evaluation, summaries, resume; on the fixtures in tests/data/evaluation and the tiny official model."""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT

DATA = REPO_ROOT / "tests" / "data" / "evaluation"
MMBENCH, MMBENCH_CIRC = DATA / "mmbench_tiny.tsv", DATA / "mmbench_circular_tiny.tsv"
SQA_PROBLEMS, SQA_ROWS = DATA / "scienceqa_problems.json", DATA / "scienceqa_rows.jsonl"
CHATML = DATA / "chatml_seed.json"
EVALUATE = REPO_ROOT / "paddlemix" / "tools" / "evaluate.py"
U146, U145 = "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]"


def load(path, **kw):
    from paddlemix.evaluation import load_data

    return load_data(str(path), **kw)


def by_id(data):
    return {item.id: item for item in data.items}


# --- prompts: the official strings ------------------------------------------------------------
def test_mmbench_prompt_is_the_official_string():
    item = by_id(load(MMBENCH))["0"]
    assert item.prompt == (
        "[UNUSED_TOKEN_146]user\nQuestion: What colour is the square?\nContext: The image shows one square.\n"
        "Options: A. red B. green C. blue D. yellow[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\nThe answer is")


def test_official_example_from_the_ixc2_ai2d_prompts():
    """Copied from the official repo's evaluation/json_files/ai2d_test.jsonl (the MMBench format)."""
    from paddlemix.evaluation import mcq_prompt

    options = {"A": "rabbit", "B": "meadow grasses", "C": "deer", "D": "vole"}
    assert mcq_prompt("In the diagram shown, which is the producer?", options) == (
        "[UNUSED_TOKEN_146]user\nQuestion: In the diagram shown, which is the producer?\nContext: N/A\n"
        "Options: A. rabbit B. meadow grasses C. deer D. vole[UNUSED_TOKEN_145]\n"
        "[UNUSED_TOKEN_146]assistant\nThe answer is")


def test_official_style_writes_nan_for_empty_option_columns_vlmevalkit_drops_them():
    official, vlmevalkit = by_id(load(MMBENCH)), by_id(load(MMBENCH, style="vlmevalkit"))
    assert official["2"].prompt == (f"{U146}user\nQuestion: Is the picture bright?\nContext: N/A\n"
                                    f"Options: A. yes B. no C. nan D. nan{U145}\n{U146}assistant\nThe answer is")
    assert vlmevalkit["2"].prompt == (f"{U146}user\nQuestion: Is the picture bright?\nContext: N/A\n"
                                      f"Options: A. yes B. no{U145}\n{U146}assistant\nThe answer is")
    assert official["2"].options == vlmevalkit["2"].options == {"A": "yes", "B": "no"}  # what can be chosen
    assert "D. nan" in official["1"].prompt and "D." not in vlmevalkit["1"].prompt


def test_scienceqa_prompt_hint_as_context_all_choices_no_lecture():
    items = by_id(load(SQA_PROBLEMS, split="test"))
    assert items["2"].prompt == (f"{U146}user\nQuestion: Which word is a noun?\nContext: A noun names a thing.\n"
                                 f"Options: A. run B. table{U145}\n{U146}assistant\nThe answer is")
    assert items["3"].prompt.endswith(f"Options: A. circle B. square C. triangle D. star E. heart{U145}\n"
                                      f"{U146}assistant\nThe answer is")
    assert "Context: N/A" in items["1"].prompt  # ScienceQA's empty hint reads as NaN from a TSV: N/A
    assert all("Colours are" not in item.prompt for item in items.values())


def test_benchmark_layout_is_bos_then_image_then_the_prompt_without_bos(tiny_dir):
    from paddlemix.evaluation.answering import mcq_layout
    from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2Processor, InternLMXComposer2Tokenizer
    from paddlemix.models.internlm_xcomposer2.processor import IMAGE_SLOT

    tokenizer = InternLMXComposer2Tokenizer.from_pretrained(str(tiny_dir))
    processor = InternLMXComposer2Processor(tokenizer, None, num_image_tokens=256, max_length=4096)
    prompt = by_id(load(MMBENCH))["0"].prompt
    ids, mask = mcq_layout(processor, prompt, 1)
    text = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids == [1] + [IMAGE_SLOT] * 256 + text and mask == [0] + [1] * 256 + [0] * len(text)
    assert text[0] == tokenizer.im_start_id and tokenizer.decode(text) == prompt
    assert mcq_layout(processor, prompt, 0)[0] == [1] + text  # a text-only question: BOS and the prompt


# --- answer extraction ------------------------------------------------------------------------
CHOICES = {"A": "dog", "B": "cat", "C": "bird", "D": "fish"}
CAN_INFER_TABLE = [
    ("B", "B"), (" B", "B"), ("B.", "B"), ("B. cat", "B"), ("(B) cat", "B"), ("[B]", "B"), ("B B", "B"),
    ("The answer is B", "B"), ("The answer is B.", "B"), ("Answer: B", "B"), ("cat", "B"), ("Cat.", "B"),
    ("It is a cat", "B"),
    ("A or B", None),  # two letters, no single option text
    ("a cat and a dog", None),  # two option texts
    ("The answer is", None), ("xyzzy", None), ("", None), ("ab", None), ("b", None),
    ("A cat", "A"),  # VLMEvalKit's known quirk: the article counts as the letter A
    ("Cannot determine the answer", "Z"), ("Z", "Z"),
]


@pytest.mark.parametrize("raw,expected", CAN_INFER_TABLE)
def test_can_infer_on_real_looking_outputs(raw, expected):
    from paddlemix.evaluation import can_infer

    assert can_infer(raw, CHOICES) == expected


@pytest.mark.parametrize("raw,expected", [("B", "B"), ("The answer is B", "B"), ("(B) cat", "B"),
                                          ("cat", None), ("Cat", "C"), ("xyzzy", None), ("E", None)])
def test_official_letter_is_the_first_capital_a_to_d(raw, expected):
    from paddlemix.evaluation import official_letter

    assert official_letter(raw, CHOICES) == expected


def test_scoring_of_benchmark_chat_option_and_open_rows():
    from paddlemix.evaluation.scoring import score

    mcq = by_id(load(MMBENCH))["0"]  # answer A = red
    assert score(mcq, "The answer is A") == ("A", True) and score(mcq, "green") == ("B", False)
    assert score(mcq, "red", extract="official") == (None, False)  # the official rule wants a letter
    chat = by_id(load(CHATML))
    assert chat["c1"].options == {"A": "red", "B": "blue"} and chat["c1"].answer == "B"
    assert score(chat["c1"], "Blue.") == ("B", True) and score(chat["c1"], "it is red") == ("A", False)
    assert score(chat["c1"], "red or blue") == (None, False)
    assert score(chat["c2"], " Green. ") == (None, True) and score(chat["c2"], "green square") == (None, False)


# --- readers ----------------------------------------------------------------------------------
def test_mmbench_tsv_rows_categories_images_and_bad_rows():
    data = load(MMBENCH)
    assert data.format == "mmbench_tsv" and [i.id for i in data.items] == ["0", "1", "2", "3"]
    first = data.items[0]
    assert (first.category, first.l2_category, first.answer) == (
        "attribute_recognition", "finegrained_perception (instance-level)", "A")
    assert [(r.kind, len(r.source()) > 0) for r in first.images] == [("base64", True)]
    assert data.items[3].images[0].kind == "path" and data.items[3].images[0].value == str(DATA / "images" / "grey.png")
    assert [(b.location, b.reason) for b in data.bad_rows] == [
        (f"{MMBENCH}, row 4 (0-based; line 6), index 4", "missing image: the image cell is empty"),
        (f"{MMBENCH}, row 5 (0-based; line 7), index 5",
         "options missing: option B is empty but C is given; options must run A, B, C, ... without gaps"),
        (f"{MMBENCH}, row 6 (0-based; line 8), index 6", "answer 'D' is not among the options A, B, C")]


def test_scienceqa_problems_json_splits_text_only_and_bad_rows():
    data = load(SQA_PROBLEMS, split="test")
    items = by_id(data)
    assert data.format == "scienceqa" and list(items) == ["1", "2", "3"]
    assert data.notes == ["1 rows of other splits left out (--split test)"]
    assert items["1"].images[0].value == str(DATA / "images" / "test" / "1" / "image.png")  # ScienceQA's layout
    assert items["2"].images == [] and items["3"].answer == "E"
    assert (items["1"].category, items["1"].l2_category) == ("Colour", "natural science")
    reasons = {b.location: b.reason for b in data.bad_rows}
    assert reasons[f"{SQA_PROBLEMS}, problem '5'"] == "answer 2 is not among the options A, B"
    assert reasons[f"{SQA_PROBLEMS}, problem '6'"].startswith("missing image: 'image.png' not found")
    assert len(load(SQA_PROBLEMS).items) == 4  # without --split the train row is in


def test_scienceqa_jsonl_answers_as_letter_text_or_index_images_as_data_uri_base64_path():
    data = load(SQA_ROWS)
    items = by_id(data)
    assert [items[k].answer for k in ("q1", "q2", "q3")] == ["A", "B", "A"]
    assert [items[k].images[0].kind for k in ("q1", "q2", "q3")] == ["base64", "base64", "path"]
    assert items["q1"].images[0].source()[:4] == b"\x89PNG" == items["q2"].images[0].source()[:4]
    assert [(b.location, b.reason.split(" (")[0]) for b in data.bad_rows] == [
        (f"{SQA_ROWS}, line 3", "is not valid JSON"),
        (f"{SQA_ROWS}, line 5", "options missing: a question needs at least options A and B")]


def test_chatml_seed_rows_reference_is_the_last_answer_history_kept():
    data = load(CHATML)
    items = by_id(data)
    assert data.format == "chatml" and list(items) == ["c0", "c1", "c2", "c5"]
    assert items["c0"].prompt == "<ImageHere>\nWhich colour is the square?\nred\ngreen"  # stripped, as trained
    assert items["c2"].history == [("<ImageHere>What is this?", "A green square.")] and items["c2"].answer == "green"
    assert items["c5"].images == [] and items["c0"].category == "colour" and items["c5"].category == ""
    assert [(b.location, b.reason) for b in data.bad_rows] == [
        (f"{CHATML}, row 3 (0-based), id 'c3'", f"missing image: {DATA / 'images' / 'missing.png'} does not exist"),
        (f"{CHATML}, row 4 (0-based), id 'c4'", '"conversations" is []; it must be a non-empty list of turns')]


def test_format_detection_and_file_level_errors(tmp_path):
    from paddlemix.evaluation import detect_format

    assert [detect_format(str(p)) for p in (MMBENCH, SQA_PROBLEMS, SQA_ROWS, CHATML)] == [
        "mmbench_tsv", "scienceqa", "scienceqa", "chatml"]
    (tmp_path / "x.json").write_text('[{"foo": 1}]')
    with pytest.raises(ValueError, match="cannot tell the format.*--format"):
        detect_format(str(tmp_path / "x.json"))
    (tmp_path / "a.tsv").write_text("index\tquestion\tA\tB\timage\n0\tq\ta\tb\tx.png\n")
    with pytest.raises(ValueError, match="has no column.s. answer .an MMBench test split has no answers"):
        load(tmp_path / "a.tsv")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "missing.tsv")
    with pytest.raises(ValueError, match="--circular works on TSV files"):
        load(CHATML, circular=True)
    lines = MMBENCH.read_text().splitlines()
    (tmp_path / "dup.tsv").write_text("\n".join(lines[:3] + [lines[1]]) + "\n")
    (tmp_path / "images").symlink_to(DATA / "images")
    dup = load(tmp_path / "dup.tsv")
    assert [i.id for i in dup.items] == ["0", "1"] and [b.reason for b in dup.bad_rows] == [
        "duplicate index 0, already used by row 0"]


# --- circular evaluation ----------------------------------------------------------------------
def _passes(data, group):
    return [(i.id, i.options, i.answer) for i in data.items if i.group == group]


def test_circular_rotations_match_vlmevalkits_layout():
    built = load(MMBENCH, circular=True)
    shipped = load(MMBENCH_CIRC, circular=True)  # rotated copies written as VLMEvalKit ships them
    assert _passes(built, "0") == _passes(shipped, "0") == [
        ("0", {"A": "red", "B": "green", "C": "blue", "D": "yellow"}, "A"),
        ("1000000", {"A": "yellow", "B": "red", "C": "green", "D": "blue"}, "B"),
        ("2000000", {"A": "blue", "B": "yellow", "C": "red", "D": "green"}, "C"),
        ("3000000", {"A": "green", "B": "blue", "C": "yellow", "D": "red"}, "D")]
    assert [p[1] for p in _passes(built, "2")] == [{"A": "yes", "B": "no"}, {"A": "no", "B": "yes"}]
    assert [p[2] for p in _passes(built, "2")] == ["B", "A"]
    # "All of the above" keeps its letter; only A-C rotate
    assert [(p[1]["A"], p[1]["D"], p[2]) for p in _passes(built, "3")] == [
        ("a square", "All of the above", "A"), ("a star", "All of the above", "B"),
        ("a circle", "All of the above", "C")]
    assert len(_passes(built, "1")) == 3 and len(built.items) == 12
    assert [b.group for b in built.bad_rows] == ["4", "5", "6"]  # bad questions get no rotations


def test_shipped_copies_are_left_out_without_circular_and_resolve_their_image():
    plain, circ = load(MMBENCH_CIRC), load(MMBENCH_CIRC, circular=True)
    assert [i.id for i in plain.items] == ["0", "1"] and plain.notes == [
        "4 rotated copies left out (pass --circular to use them)"]
    copies = by_id(circ)
    assert copies["3000000"].images == copies["0"].images and copies["1000001"].group == "1"


def test_circular_rows_with_five_options_are_refused(tmp_path):
    (tmp_path / "e.tsv").write_text("index\tquestion\tA\tB\tC\tD\tE\tanswer\timage\n"
                                    "0\tq\ta\tb\tc\td\te\tA\tpic.png\n")
    (tmp_path / "pic.png").write_bytes((DATA / "images" / "red.png").read_bytes())
    with pytest.raises(ValueError, match="up to 4 options"):
        load(tmp_path / "e.tsv", circular=True)
    assert len(load(tmp_path / "e.tsv").items) == 1


# --- the run: selection, summary, resume (scripted answers) -----------------------------------
class Scripted:
    """Stands in for the model: answers each item with ``reply(item)``; counts what it was asked."""

    asked: list = []
    reply = staticmethod(lambda item: f"The answer is {item.answer}")
    stop_after = None  # raise KeyboardInterrupt after this many batches (an interrupted run)

    def __init__(self, model, tokenizer, options):
        self.options = options

    def answer(self, items):
        if Scripted.stop_after is not None and len(Scripted.asked) >= Scripted.stop_after:
            raise KeyboardInterrupt
        Scripted.asked.append([item.id for item in items])
        return [Scripted.reply(item) for item in items]


@pytest.fixture()
def scripted(monkeypatch):
    from paddlemix.evaluation import answering

    Scripted.asked, Scripted.stop_after = [], None
    Scripted.reply = staticmethod(lambda item: f"The answer is {item.answer}")
    monkeypatch.setattr(answering, "Answerer", Scripted)
    return Scripted


def run(out, data=MMBENCH, **kw):
    from paddlemix.evaluation import EvalConfig, run_evaluation

    kw.setdefault("num_beams", 1)
    config = EvalConfig(model="scripted", data=str(data), out=str(out), progress=False, **kw)
    return run_evaluation(config, lambda: (None, None))


def test_select_limit_shuffle_seed_keeps_circular_passes_together():
    from paddlemix.evaluation import select_items

    items = load(MMBENCH, circular=True).items
    assert [i.id for i in select_items(items, 2, False, 0, True)] == ["0", "1000000", "2000000", "3000000", "1",
                                                                       "1000001", "2000001"]
    shuffled = [i.group for i in select_items(items, None, True, 3, True)]
    assert sorted(shuffled) == sorted(i.group for i in items) and shuffled == [
        i.group for i in select_items(items, None, True, 3, True)]
    orders = {tuple(dict.fromkeys(i.group for i in select_items(items, None, True, s, True))) for s in range(6)}
    assert len(orders) > 1
    assert [i.id for i in select_items(load(MMBENCH).items, 3, True, 0, False)] == [
        i.id for i in select_items(load(MMBENCH).items, None, True, 0, False)][:3]


def test_circular_question_is_right_only_if_every_pass_is(scripted, tmp_path):
    scripted.reply = staticmethod(lambda item: "cat" if item.id == "2000000" else f"({item.answer})")
    result = run(tmp_path, circular=True, batch_size=5)
    s = result.summary
    assert s["overall"] == {"correct": 3, "total": 4, "accuracy": 0.75} and s["circular"] and s["questions"] == 4
    assert list(s["l2-category"]) == ["CP", "FP-S"] and s["l2-category"]["FP-S"]["correct"] == 1
    assert s["category"]["attribute_recognition"] == {"correct": 1, "total": 2, "accuracy": 0.5}
    assert s["bad_rows"]["count"] == 3 and s["rows_answered"] == 12
    assert [len(batch) for batch in scripted.asked] == [5, 5, 2]
    lines = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert {k for k in lines[0]} == {"id", "prompt", "answer", "raw", "choice", "correct"}
    assert [(r["id"], r["choice"], r["correct"]) for r in lines if r["id"].endswith("00000")] == [
        ("1000000", "B", True), ("2000000", None, False), ("3000000", "D", True)]


def test_summary_files_table_and_chart(scripted, tmp_path):
    result = run(tmp_path)
    assert result.summary["overall"]["accuracy"] == 1.0 and not result.summary["circular"]
    assert set(result.paths) == {"json", "markdown", "chart", "predictions"}
    assert json.loads((tmp_path / "summary.json").read_text())["overall"]["total"] == 4
    md = (tmp_path / "summary.md").read_text()
    assert md == result.table and "| Overall | Overall | 4 | 4 | 100.0% |" in md
    assert "| l2-category | FP-S | 2 | 2 | 100.0% |" in md and "| category | image_scene | 1 | 1 | 100.0% |" in md
    assert "3 bad row(s) left out." in md
    png = (tmp_path / "summary.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_resume_after_an_interruption_asks_only_the_rest_and_ends_identical(scripted, tmp_path):
    full = run(tmp_path / "full", circular=True, batch_size=3).summary
    scripted.asked, scripted.stop_after = [], 2
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", circular=True, batch_size=3)
    assert len((tmp_path / "cut" / "predictions.jsonl").read_text().splitlines()) == 6
    scripted.asked, scripted.stop_after = [], None
    resumed = run(tmp_path / "cut", circular=True, batch_size=3)
    assert sum(len(b) for b in scripted.asked) == 6 and resumed.answered_now == 6
    assert resumed.summary["overall"] == full["overall"] and resumed.summary["category"] == full["category"]
    scripted.asked = []
    again = run(tmp_path / "cut", circular=True, batch_size=3)  # finished: nothing asked, same summary
    assert scripted.asked == [] and again.answered_now == 0 and again.summary["overall"] == full["overall"]
    assert sorted((tmp_path / "cut" / "predictions.jsonl").read_text().splitlines()) == sorted(
        (tmp_path / "full" / "predictions.jsonl").read_text().splitlines())


def test_a_torn_last_line_is_cut_and_its_row_asked_again(scripted, tmp_path):
    run(tmp_path, limit=2)
    path = tmp_path / "predictions.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1][:20])  # killed in the middle of writing line 2
    scripted.asked = []
    run(tmp_path, limit=2)
    assert scripted.asked == [["1"]] and path.read_text().splitlines() == lines


def test_rows_that_failed_are_asked_again_only_with_retry_errors(scripted, tmp_path, caplog):
    scripted.reply = staticmethod(lambda item: ValueError("image gone") if item.id == "1" else f"({item.answer})")
    first = run(tmp_path, limit=2)
    assert scripted.asked == [["0", "1"]] and first.summary["overall"]["correct"] == 1
    scripted.reply = staticmethod(lambda item: f"({item.answer})")  # the cause was fixed
    scripted.asked = []
    with caplog.at_level("WARNING", logger="paddlemix.evaluation"):
        kept = run(tmp_path, limit=2)  # a plain resume keeps the error, and says how to retry
    assert scripted.asked == [] and kept.summary["overall"]["correct"] == 1
    assert "1 rows failed in the earlier run" in caplog.text and "--retry_errors" in caplog.text
    retried = run(tmp_path, limit=2, retry_errors=True)
    assert scripted.asked == [["1"]] and retried.answered_now == 1
    assert retried.summary["overall"] == {"correct": 2, "total": 2, "accuracy": 1.0}
    scripted.asked = []
    assert run(tmp_path, limit=2, retry_errors=True).answered_now == 0 and scripted.asked == []  # nothing left


def test_resuming_with_other_settings_or_changed_data_is_refused(scripted, tmp_path):
    data = tmp_path / "mmbench_tiny.tsv"
    shutil.copy(MMBENCH, data)
    shutil.copytree(DATA / "images", tmp_path / "images")
    run(tmp_path / "out", data=data, limit=1)
    with pytest.raises(ValueError, match="other settings .*max_new_tokens: 5 before, 7 now.*another --out"):
        run(tmp_path / "out", data=data, limit=1, max_new_tokens=7)
    data.write_text(MMBENCH.read_text().replace("What colour is the square?", "Which colour?"))
    with pytest.raises(ValueError, match="row 0 .*its prompt differs from the one in the predictions"):
        run(tmp_path / "out", data=data, limit=1)


def test_an_image_that_cannot_be_loaded_is_a_bad_row_not_a_crash(tiny_model_dir, tmp_path):
    from paddlemix.evaluation import EvalConfig, run_evaluation

    text = MMBENCH.read_text().splitlines()
    header, good = text[0], text[1].split("\t")
    broken = good[:]
    broken[0], broken[-1] = "7", "A" * 200  # long enough to be taken for base64, not an image
    (tmp_path / "t.tsv").write_text("\n".join([header, "\t".join(good), "\t".join(broken)]) + "\n")
    config = EvalConfig(model=str(tiny_model_dir), data=str(tmp_path / "t.tsv"), out=str(tmp_path / "out"),
                        num_beams=1, max_new_tokens=2, progress=False)
    result = run_evaluation(config, lambda: _tiny())
    bad = result.summary["bad_rows"]
    assert result.summary["overall"]["total"] == 1 and bad["count"] == 1
    assert bad["rows"][0]["location"] == f"{tmp_path / 't.tsv'}, row 1 (0-based; line 3), index 7"
    assert bad["rows"][0]["reason"].startswith("image cannot be loaded: <bytes of length 150> is not an image")


# --- the real model (tiny official fixture) -----------------------------------------------------
_TINY = {}


def _tiny():
    """The fixture model and tokenizer, loaded once for this module's tests."""
    if not _TINY:
        from conftest import TINY
        from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2ForCausalLM, InternLMXComposer2Tokenizer
        from paddlemix.models.internlm_xcomposer2.checkpoint import load_config
        from conftest import tiny_overrides

        config = load_config(str(TINY), **tiny_overrides())
        _TINY["model"] = InternLMXComposer2ForCausalLM.from_pretrained(str(TINY), config=config)
        _TINY["tokenizer"] = InternLMXComposer2Tokenizer.from_pretrained(str(TINY))
    return _TINY["model"], _TINY["tokenizer"]


def _answerer(**options):
    from paddlemix.evaluation.answering import Answerer, DecodeOptions

    model, tokenizer = _tiny()
    settings = dict(max_new_tokens=6, num_beams=1, repetition_penalty=1.0)
    settings.update(options)
    return Answerer(model, tokenizer, DecodeOptions(**settings))


def test_batched_answers_equal_one_by_one_for_every_kind_of_row():
    items = load(MMBENCH, circular=True).items[:6] + load(SQA_PROBLEMS, split="test").items  # with a text-only row
    answerer = _answerer()
    batched = answerer.answer(items)
    assert batched == [answerer.answer([item])[0] for item in items]
    assert all(isinstance(a, str) for a in batched) and len(set(batched)) > 1
    chat = load(CHATML).items
    for beams in (1, 3):
        chat_answerer = _answerer(repetition_penalty=1.005, meta_instruction="", num_beams=beams)
        assert chat_answerer.answer(chat) == [chat_answerer.answer([item])[0] for item in chat]


def test_a_prompt_over_max_length_fails_its_row_only():
    from paddlemix.evaluation.items import RowProblem

    good, long = load(MMBENCH).items[:2]
    long.prompt = long.prompt.replace("Which scene is shown?", "word " * 5000)
    answers = _answerer().answer([good, long])
    assert answers[0] == _answerer().answer([good])[0]
    assert isinstance(answers[1], RowProblem) and "more than max_length 4096" in str(answers[1])


def test_images_by_url_path_and_base64_give_the_same_answer(tmp_path, loopback_no_proxy):
    import http.server

    from conftest import loopback_server

    png = (DATA / "images" / "red.png").read_bytes()

    class Image(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args):
            pass

    with loopback_server(Image) as base:
        rows = [{"id": kind, "question": "Which colour is shown?", "choices": ["red", "green"], "answer": 0,
                 "image": image} for kind, image in (("url", f"{base}/red.png"), ("path", "red.png"),
                                                     ("base64", base64.b64encode(png).decode()))]
        (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp_path / "red.png").write_bytes(png)
        data = load(tmp_path / "rows.jsonl")
        assert [i.images[0].kind for i in data.items] == ["url", "path", "base64"]
        answers = _answerer().answer(data.items)
    assert all(isinstance(a, str) for a in answers) and len(set(answers)) == 1


def _official_embeds(item):
    """The official ``model_gen`` sequence, built as it builds it: encode '' with BOS, the image's
    embeddings, then the prompt encoded without special tokens, concatenated."""
    import paddle
    from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2ImageProcessor

    model, tokenizer = _tiny()
    def embed(text, bos):
        return model.model.embed(paddle.to_tensor([tokenizer(text, add_special_tokens=bos)["input_ids"]]))

    pixels = InternLMXComposer2ImageProcessor(img_size=model.config.img_size)(item.images[0].source())["pixel_values"]
    with paddle.no_grad():
        parts = [embed("", True), model.encode_img(paddle.to_tensor(pixels)), embed(item.prompt, False)]
    im_mask = paddle.to_tensor([[0] * parts[0].shape[1] + [1] * parts[1].shape[1] + [0] * parts[2].shape[1]],
                               dtype="bool")
    return paddle.concat(parts, axis=1), im_mask


def _decoded(ids, tokenizer):
    """The official decoding: drop the leading BOS, cut at the end of the turn, strip."""
    ids = [int(t) for t in ids]
    ids = ids[1:] if ids and ids[0] in (0, 1) else ids
    ids = ids[: next((i + 1 for i, t in enumerate(ids) if t == tokenizer.eos_token_id), len(ids))]
    return tokenizer.decode(ids, skip_special_tokens=True).split(U145)[0].strip()


def test_greedy_answer_equals_the_official_model_gen_sequence():
    from paddlemix.models.internlm_xcomposer2.generation import GenerationSettings, generate_tokens, seen_ids

    model, tokenizer = _tiny()
    item = load(MMBENCH).items[0]
    embeds, im_mask = _official_embeds(item)
    settings = GenerationSettings(max_new_tokens=6, do_sample=False, repetition_penalty=1.0,
                                  eos_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id)
    ids = [1] + [int(t[0]) for t, _ in generate_tokens(model, embeds, settings, seen_ids([[1]]), im_mask=im_mask)]
    assert _answerer().answer([item]) == [_decoded(ids, tokenizer)] and len(ids) > 1


def test_beam_search_as_the_official_scripts_call_generate():
    """num_beams=5 (the official setting) runs ``model.generate`` on the official sequence with the
    official arguments (no eos_token_id: the generation config's EOS)."""
    model, tokenizer = _tiny()
    items = load(MMBENCH).items
    expected = []
    for item in items:
        embeds, im_mask = _official_embeds(item)
        out = model.generate(inputs_embeds=embeds, im_mask=im_mask, temperature=1.0, max_new_tokens=5, num_beams=5,
                             do_sample=False, repetition_penalty=1.0)
        expected.append(_decoded(out.numpy()[0], tokenizer))
    assert _answerer(num_beams=5, max_new_tokens=5).answer(items) == expected


# --- the command line -------------------------------------------------------------------------
def _cli(*args, **kw):
    return subprocess.run([sys.executable, str(EVALUATE), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=300, **kw)


def test_cli_evaluates_mmbench_circular_prints_the_table_and_reports_bad_rows(tiny_model_dir, tmp_path):
    result = _cli("-m", tiny_model_dir, "--data", MMBENCH, "--circular", "--num_beams", "1", "--out", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| Overall | Overall |" in result.stdout and "| l2-category | CP |" in result.stdout
    assert "4 questions (circular: right only if every pass is right); 3 bad row(s) left out." in result.stdout
    assert f"bad row: {MMBENCH}, row 6 (0-based; line 8), index 6: answer 'D' is not among the options" in result.stderr
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 12
    assert {p.name for p in tmp_path.iterdir()} == {"predictions.jsonl", "run.json", "summary.json", "summary.md",
                                                    "summary.png"}
    assert json.loads((tmp_path / "run.json").read_text())["max_new_tokens"] == 5  # the official budget


@pytest.mark.parametrize("args,message", [
    (["--data", "missing.tsv"], "error: data file 'missing.tsv' does not exist"),
    (["--data", MMBENCH, "--format", "chatml"], "error: data file"),
    (["--data", CHATML, "--circular"], "error: --circular works on TSV files"),
    (["--data", MMBENCH, "--limit", "0", "--num_beams", "1"], "error: --limit must be a positive number"),
    (["--data", MMBENCH, "--batch_size", "0"], "error: --batch_size must be positive"),
])
def test_cli_bad_input_is_one_error_line(tiny_model_dir, tmp_path, capsys, args, message):
    """In-process (``main`` as the script runs it): exit 2 and one ``error:`` line, no traceback."""
    from paddlemix.tools.evaluate import main

    with pytest.raises(SystemExit) as exit_info:
        main(["-m", str(tiny_model_dir), "--out", str(tmp_path / "o"), *map(str, args)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.strip().splitlines()[-1].startswith(message), err
    assert "Traceback" not in err


def _long_tsv(path, rows):
    """``rows`` questions (distinct texts, so answers differ) on the fixture's first image."""
    header, first = MMBENCH.read_text().splitlines()[:2]
    cells = first.split("\t")
    lines = [header] + ["\t".join([str(i), f"Question {i}: {cells[1]}"] + cells[2:]) for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")


def test_cli_killed_mid_run_resumes_to_identical_results(tiny_model_dir, tmp_path):
    from paddlemix.evaluation import EvalConfig, run_evaluation

    rows, data = 40, tmp_path / "long.tsv"
    _long_tsv(data, rows)
    common = ["--data", data, "--num_beams", "1", "--max_new_tokens", "12", "--batch_size", "2", "--no_progress"]
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(EVALUATE), "-m", str(tiny_model_dir), "--out", str(out),
                             *map(str, common)], cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    predictions, deadline = out / "predictions.jsonl", time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if predictions.exists() and len(predictions.read_bytes().splitlines()) >= 4:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    written = len(predictions.read_bytes().splitlines())
    assert 4 <= written < rows
    result = _cli("-m", tiny_model_dir, "--out", out, *common)
    assert result.returncode == 0, result.stderr[-3000:]
    config = EvalConfig(model=str(tiny_model_dir), data=str(data), out=str(tmp_path / "whole"), num_beams=1,
                        max_new_tokens=12, batch_size=2, progress=False)
    whole = run_evaluation(config, _tiny)
    def records(directory):
        return sorted((directory / "predictions.jsonl").read_text().splitlines())

    assert records(out) == records(tmp_path / "whole") and len(records(out)) == rows
    resumed = json.loads((out / "summary.json").read_text())
    for key in ("overall", "category", "l2-category", "bad_rows", "questions"):
        assert resumed[key] == whole.summary[key]
