"""Accuracy overall, per ``l2-category`` and per ``category``, as VLMEvalKit's ``report_acc`` lists it
(Overall, then the L2 abbreviations, then the categories, each block in sorted order of the raw
names), written as JSON and Markdown.

With circular evaluation a question counts once: right only if every pass was answered right
(VLMEvalKit's ``mcq_circular_eval`` with its ``exact_matching`` judge). Rows that could not be
asked (bad rows) are left out of every accuracy and counted apart; with circular evaluation a
question with any bad pass is left out whole.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .items import BadRow, EvalItem

__all__ = ["MMB_ABBREVIATIONS", "NO_CATEGORY", "markdown_table", "summarise", "write_summary"]

# VLMEvalKit's MMB_abbrs: the L2 ability names of MMBench as its report (and the IXC2 README) shows them.
MMB_ABBREVIATIONS = {
    "coarse_perception": "CP",
    "finegrained_perception (instance-level)": "FP-S",
    "finegrained_perception (cross-instance)": "FP-C",
    "logic_reasoning": "LR",
    "relation_reasoning": "RR",
    "attribute_reasoning": "AR",
}
NO_CATEGORY = "(no category)"
SUMMARY_JSON, SUMMARY_MD = "summary.json", "summary.md"


def _units(items: Sequence[EvalItem], circular: bool) -> "OrderedDict[str, List[EvalItem]]":
    units: "OrderedDict[str, List[EvalItem]]" = OrderedDict()
    for item in items:
        units.setdefault(item.group if circular else item.id, []).append(item)
    return units


def _score(n_right: int, n: int) -> Dict[str, Any]:
    return {"correct": n_right, "total": n, "accuracy": n_right / n if n else None}


def _table(outcomes: List[tuple], key: int, rename: Mapping[str, str]) -> "OrderedDict[str, Dict[str, Any]]":
    names = sorted({o[key] for o in outcomes if o[key] is not None})
    return OrderedDict((rename.get(n, n), _score(sum(o[0] for o in outcomes if o[key] == n),
                                                 sum(1 for o in outcomes if o[key] == n))) for n in names)


def summarise(items: Sequence[EvalItem], records: Mapping[str, Mapping[str, Any]], bad_rows: Sequence[BadRow],
              circular: bool = False, notes: Sequence[str] = ()) -> Dict[str, Any]:
    """The summary of ``items`` (each with a record in ``records``) plus the reader's ``bad_rows``."""
    bad = [row.as_dict() for row in bad_rows]
    bad_groups = {row.group for row in bad_rows if row.group is not None}
    outcomes = []  # (right, category, l2-category) per question
    for unit, members in _units(items, circular).items():
        failed = [m for m in members if records[m.id].get("error")]
        bad += [{"location": m.location, "reason": records[m.id]["error"]} for m in failed]
        if failed or (circular and unit in bad_groups):
            continue
        first = members[0]
        outcomes.append((all(records[m.id]["correct"] for m in members), first.category or NO_CATEGORY,
                         first.l2_category))
    summary: Dict[str, Any] = {"overall": _score(sum(o[0] for o in outcomes), len(outcomes))}
    if any(o[2] is not None for o in outcomes):
        summary["l2-category"] = _table(outcomes, 2, MMB_ABBREVIATIONS)
    summary["category"] = _table(outcomes, 1, {})
    answered = sum(1 for item in items if not records[item.id].get("error"))
    summary.update(questions=len(outcomes), rows_answered=answered,
                   circular=circular, bad_rows={"count": len(bad), "rows": bad}, notes=list(notes))
    return summary


def _percent(score: Mapping[str, Any]) -> str:
    return "n/a" if score["accuracy"] is None else f"{100 * score['accuracy']:.1f}%"


def markdown_table(summary: Mapping[str, Any], title: Optional[str] = None) -> str:
    """The summary as a Markdown table (also what the CLI prints)."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| split | name | correct | total | accuracy |", "|---|---|---:|---:|---:|"]
    rows = [("Overall", "Overall", summary["overall"])]
    for level in ("l2-category", "category"):
        rows += [(level, name, score) for name, score in summary.get(level, {}).items()]
    lines += [f"| {level} | {name} | {s['correct']} | {s['total']} | {_percent(s)} |" for level, name, s in rows]
    unit = "questions (circular: right only if every pass is right)" if summary["circular"] else "questions"
    lines += ["", f"{summary['questions']} {unit}; {summary['bad_rows']['count']} bad row(s) left out."]
    lines += [f"{note}." for note in summary["notes"]]
    return "\n".join(lines) + "\n"


def write_summary(summary: Mapping[str, Any], directory: str, title: Optional[str] = None) -> Dict[str, str]:
    """``summary.json`` and ``summary.md`` in ``directory``; returns their paths."""
    paths = {"json": os.path.join(directory, SUMMARY_JSON), "markdown": os.path.join(directory, SUMMARY_MD)}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
        f.write("\n")
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write(markdown_table(summary, title))
    return paths
