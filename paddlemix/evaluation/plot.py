"""A bar chart of the summary: accuracy per category (and per L2 ability when the data has them),
with the overall accuracy as a line. Drawn on a bare ``matplotlib.figure.Figure`` (Agg canvas): no
display, and no change to pyplot's global backend in the caller's process."""
from __future__ import annotations

from typing import Any, List, Mapping, Optional, Tuple

__all__ = ["plot_summary"]

BAR_HEIGHT_INCHES = 0.32  # per bar: the figure grows with the number of categories
MIN_PANEL_INCHES = 1.6
FIGURE_WIDTH_INCHES = 8.0
BAR_COLOUR, L2_COLOUR, OVERALL_COLOUR = "#3b6fb6", "#6a9f4a", "#c0392b"
DPI = 120


def _bars(scores: Mapping[str, Mapping[str, Any]]) -> List[Tuple[str, float, str]]:
    return [(name, 100 * s["accuracy"], f"{100 * s['accuracy']:.1f}% ({s['correct']}/{s['total']})")
            for name, s in scores.items() if s["accuracy"] is not None]


def _panel(axis, bars, colour: str, overall: Optional[float], heading: str) -> None:
    names = [b[0] for b in bars][::-1]  # matplotlib draws bottom-up; keep the table's order top-down
    values = [b[1] for b in bars][::-1]
    axis.barh(names, values, color=colour)
    for y, (_, value, label) in enumerate(bars[::-1]):
        axis.text(min(value, 100) + 1, y, label, va="center", fontsize=8)
    if overall is not None:  # named in the heading: a legend box would cover bar labels
        axis.axvline(overall, color=OVERALL_COLOUR, linestyle="--", linewidth=1)
        heading += f"  (dashed: overall {overall:.1f}%)"
    axis.set_xlim(0, 125)
    axis.set_xticks(range(0, 101, 20))
    axis.set_xlabel("accuracy (%)")
    axis.set_title(heading, fontsize=10, loc="left")
    axis.tick_params(axis="y", labelsize=8)


def plot_summary(summary: Mapping[str, Any], path: str, title: str) -> str:
    """Write the chart to ``path`` (PNG) and return it."""
    from matplotlib.figure import Figure

    overall = summary["overall"]["accuracy"]
    overall = None if overall is None else 100 * overall
    panels = [(_bars(summary.get(level, {})), colour, heading) for level, colour, heading in (
        ("l2-category", L2_COLOUR, "per L2 ability"), ("category", BAR_COLOUR, "per category"))]
    panels = [p for p in panels if p[0]] or [([("Overall", overall or 0.0, _percent_label(summary))],
                                                BAR_COLOUR, "overall")]
    heights = [max(MIN_PANEL_INCHES, BAR_HEIGHT_INCHES * len(p[0]) + 0.8) for p in panels]
    figure = Figure(figsize=(FIGURE_WIDTH_INCHES, sum(heights) + 0.6))
    axes = figure.subplots(len(panels), 1, gridspec_kw={"height_ratios": heights}, squeeze=False)
    for axis, (bars, colour, heading) in zip(axes[:, 0], panels):
        _panel(axis, bars, colour, overall, heading)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    return path


def _percent_label(summary: Mapping[str, Any]) -> str:
    s = summary["overall"]
    return "n/a" if s["accuracy"] is None else f"{100 * s['accuracy']:.1f}% ({s['correct']}/{s['total']})"
