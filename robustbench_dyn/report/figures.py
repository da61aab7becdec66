"""The report's figures (matplotlib, Agg canvas, no pyplot state): Fig. 3 of the Bi-volution paper
(delta top-1 per corruption with intervals) and severity curves; and the one way figures are saved.

Figures are saved as PNG and SVG with no time stamp and a fixed SVG hash salt, so the same numbers
give the same files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from robustbench_dyn.corruptions import CATEGORIES

FIGURE_STYLE = {
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "svg.fonttype": "none",  # text stays text: smaller, searchable SVG
    "svg.hashsalt": "dynrobust",  # stable ids inside the SVG
}
PNG_DPI = 150
BASELINE_COLOUR = "#222222"


def new_figure(width: float, height: float):
    """A matplotlib Figure of ``width`` x ``height`` inches on an Agg canvas, with a constrained layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path_stem) -> list:
    """Write ``figure`` to ``<path_stem>.png`` (150 dpi) and ``<path_stem>.svg``; return the two paths."""
    import matplotlib

    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    png, svg = stem.with_suffix(".png"), stem.with_suffix(".svg")
    with matplotlib.rc_context(FIGURE_STYLE):
        figure.savefig(png, dpi=PNG_DPI, metadata={"Software": None})
        figure.savefig(svg, metadata={"Date": None})
    return [png, svg]


def model_colours(count: int) -> list:
    """``count`` distinct colours (matplotlib's tab10), one per compared model, in order."""
    import matplotlib

    palette = matplotlib.colormaps["tab10"]
    return [palette(i % 10) for i in range(count)]


def delta_figure(data, path_stem) -> list:
    """Fig. 3 (see :func:`draw_delta_figure`), written as PNG and SVG; returns their paths."""
    return save_figure(draw_delta_figure(data), path_stem)


def draw_delta_figure(data):
    """Fig. 3: grouped bars of each model's delta top-1 over the baseline per corruption (mean over
    severities), per category mean and over all corruptions, in percentage points, with the paired
    bootstrap intervals as error bars. Returns the Figure: one bar container per model, in order,
    labelled with the model's label."""
    import matplotlib

    corruptions, categories = [], []
    for m in data.models:
        rows = m.paired
        corruptions += [n for n in rows.loc[rows["scope"] == "corruption", "name"] if n not in corruptions]
        categories += [n for n in rows.loc[rows["scope"] == "category", "name"] if n not in categories]
    from robustbench_dyn.corruptions import CORRUPTION_NAMES

    corruptions = [n for n in CORRUPTION_NAMES if n in corruptions]
    categories = [n for n in CATEGORIES if n in categories]
    groups = [("corruption", n) for n in corruptions] + [("category", n) for n in categories] + [("mean", "all")]
    labels = corruptions + [f"{n} (mean)" for n in categories] + ["all (mean)"]
    positions = np.arange(len(groups), dtype=float)
    positions[len(corruptions):] += 0.8  # a gap before the means
    width = 0.8 / max(1, len(data.models))

    with matplotlib.rc_context(FIGURE_STYLE):
        figure = new_figure(max(7.0, 0.42 * len(groups) * max(1, len(data.models)) ** 0.5 + 2.0), 4.4)
        axis = figure.add_subplot()
        for k, (m, colour) in enumerate(zip(data.models, model_colours(len(data.models)))):
            table = m.paired.set_index(["scope", "name"])
            values, low, high = [], [], []
            for key in groups:
                if key in table.index:
                    row = table.loc[key]
                    values.append(row["delta_top1"])
                    low.append(row["delta_top1"] - row["ci_low"])
                    high.append(row["ci_high"] - row["delta_top1"])
                else:
                    values.append(np.nan)
                    low.append(np.nan)
                    high.append(np.nan)
            offset = (k - (len(data.models) - 1) / 2.0) * width
            axis.bar(positions + offset, values, width * 0.92, color=colour, label=m.run.label,
                     yerr=np.array([np.nan_to_num(low), np.nan_to_num(high)]), capsize=2.0,
                     error_kw={"elinewidth": 0.8, "ecolor": "#444444"})
        axis.axhline(0.0, color=BASELINE_COLOUR, lw=0.9)
        if categories:
            axis.axvline((positions[len(corruptions) - 1] + positions[len(corruptions)]) / 2.0,
                         color="#999999", lw=0.8, ls="--")
        axis.set_xticks(positions, labels, rotation=55, ha="right", rotation_mode="anchor")
        axis.set_xlim(positions[0] - 0.7, positions[-1] + 0.7)
        axis.set_ylabel(f"Δ top-1 over {data.baseline.run.label} (percentage points)")
        axis.set_title(
            f"Δ top-1 accuracy over {data.baseline.run.label} on ImageNet-C, mean over severities; "
            f"error bars: {100 * data.level:.0f}% paired bootstrap intervals ({data.n_boot} replicates)"
        )
        axis.grid(True, axis="y", alpha=0.3)
        axis.legend(loc="best", fontsize=8, frameon=False)
        return figure


def severity_figure(data, path_stem) -> list:
    """Top-1 accuracy (%) against severity, one panel per corruption, one line per run (the baseline
    in black), the clean accuracy at severity 0 when the store has it. Writes PNG and SVG."""
    import matplotlib

    from robustbench_dyn.corruptions import CORRUPTION_NAMES

    everyone = data.everyone
    present = set()
    for m in everyone:
        present |= set(m.cells["corruption"])
    corruptions = [n for n in CORRUPTION_NAMES if n in present]
    columns = min(5, max(1, len(corruptions)))
    rows = -(-len(corruptions) // columns)
    colours = [BASELINE_COLOUR] + model_colours(len(data.models))
    top = max(float(m.cells["top1_acc"].max()) for m in everyone) * 100.0
    with matplotlib.rc_context(FIGURE_STYLE):
        figure = new_figure(2.3 * columns, 1.9 * rows + 0.6)
        axes = figure.subplots(rows, columns, squeeze=False, sharex=True, sharey=True)
        for axis, name in zip(axes.flat, corruptions):
            for m, colour in zip(everyone, colours):
                cells = m.cells[m.cells["corruption"] == name]
                clean = m.cells[m.cells["corruption"] == "clean"]
                x = list(cells["severity"])
                y = list(100.0 * cells["top1_acc"])
                if len(clean):
                    x, y = [0] + x, [100.0 * float(clean["top1_acc"].iloc[0])] + y
                axis.plot(x, y, marker="o", ms=2.5, lw=1.1, color=colour,
                          ls="--" if m.role == "baseline" else "-", label=m.run.label)
            axis.set_title(name)
            axis.grid(True, alpha=0.3)
            axis.set_xticks(range(0, 6), ["c", "1", "2", "3", "4", "5"])
        for k in range(len(corruptions), rows * columns):
            axes.flat[k].set_visible(False)
            if k >= columns:  # the panel above it is the last of its column: it shows the severities
                above = axes.flat[k - columns]
                above.xaxis.set_tick_params(labelbottom=True)
                above.set_xlabel("severity (c = clean)")
        axes[0, 0].set_ylim(0.0, max(1.0, top * 1.08))
        for axis in axes[:, 0]:
            axis.set_ylabel("top-1 (%)")
        for axis in axes[-1, :]:
            axis.set_xlabel("severity (c = clean)")
        handles, names = axes.flat[0].get_legend_handles_labels()
        figure.legend(handles, names, loc="outside upper center", ncols=min(6, len(names)), frameon=False)
        return save_figure(figure, path_stem)
