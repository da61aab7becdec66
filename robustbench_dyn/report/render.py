"""Write a report: ``report.md``, a self-contained ``report.html``, figures (PNG, SVG), numbers (CSV, JSON).

The document is built once as a list of blocks (headings, paragraphs, tables, figures) and written
twice, as Markdown and as HTML, so the two always say the same thing.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from robustbench_dyn import __version__
from robustbench_dyn.errors import DynrobustError
from robustbench_dyn.report.figures import delta_figure, severity_figure
from robustbench_dyn.report.tables import (
    ReportData,
    delta_table,
    per_corruption_table,
    runs_table,
    severity_table,
    summary_table,
)

DELTA_FIGURE = "fig3_delta_top1"
SEVERITY_FIGURE = "severity_curves"


@dataclass
class ReportFiles:
    """The files a report wrote, by kind; all paths are inside the report folder."""

    out: Path
    markdown: Path
    html: Path
    json: Path
    figures: list = field(default_factory=list)
    tables: list = field(default_factory=list)


# -- number formats --------------------------------------------------------------------------------


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt_pct(value, digits: int = 2) -> str:
    """A percentage for the tables ('12.34'); '–' when absent."""
    return "–" if _missing(value) else f"{value:.{digits}f}"


def fmt_pp(value) -> str:
    """A difference in percentage points, signed ('+1.20'); '–' when absent."""
    return "–" if _missing(value) else f"{value:+.2f}"


def fmt_ci(low, high) -> str:
    """An interval in percentage points ('[-0.50, +2.10]')."""
    return "–" if _missing(low) or _missing(high) else f"[{low:+.2f}, {high:+.2f}]"


def fmt_p(value) -> str:
    """A p-value: four decimals, or scientific notation under 1e-4."""
    if _missing(value):
        return "–"
    return f"{value:.1e}" if value < 1e-4 else f"{value:.4f}"


# -- blocks ----------------------------------------------------------------------------------------


@dataclass
class Table:
    header: list
    rows: list
    numeric: tuple = ()  # column indices aligned right


def _inline_html(text: str) -> str:
    """Escape text for HTML and turn `code` and **bold** into tags."""
    escaped = html.escape(text)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)


def _markdown_cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks) -> str:
    """The blocks as GitHub-flavoured Markdown."""
    parts = []
    for kind, *content in blocks:
        if kind in ("h1", "h2", "h3"):
            parts.append("#" * int(kind[1]) + " " + content[0])
        elif kind == "p":
            parts.append(content[0])
        elif kind == "warn":
            parts.append("> **Warning.** " + content[0])
        elif kind == "code":
            parts.append("```\n" + content[0] + "\n```")
        elif kind == "list":
            parts.append("\n".join(f"- {item}" for item in content[0]))
        elif kind == "table":
            table = content[0]
            lines = ["| " + " | ".join(_markdown_cell(h) for h in table.header) + " |"]
            lines.append("|" + "|".join("---:" if i in table.numeric else "---" for i in range(len(table.header))) + "|")
            lines += ["| " + " | ".join(_markdown_cell(c) for c in row) + " |" for row in table.rows]
            parts.append("\n".join(lines))
        elif kind == "figure":
            stem, caption = content
            parts.append(f"![{caption}]({stem}.png)\n\n*{caption}* ([SVG]({stem}.svg))")
    return "\n\n".join(parts) + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1180px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:0.8em 0;font-size:0.86em}
th,td{border:1px solid #ccc;padding:0.25em 0.55em;text-align:left;vertical-align:top}
th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fafafa}
.warn{background:#fff3f0;border-left:4px solid #c0392b;padding:0.6em 1em;margin:1em 0}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:0.9em;color:#555}code,pre{background:#f5f5f5;font-size:0.92em}
pre{padding:0.6em;overflow-x:auto}
"""


def to_html(blocks, title: str, out: Path) -> str:
    """The blocks as one HTML page; figures are embedded as base64 SVG, so the page stands alone."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
    ]
    for kind, *content in blocks:
        if kind in ("h1", "h2", "h3"):
            parts.append(f"<{kind}>{_inline_html(content[0])}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{_inline_html(content[0])}</p>")
        elif kind == "warn":
            parts.append(f'<div class="warn"><strong>Warning.</strong> {_inline_html(content[0])}</div>')
        elif kind == "code":
            parts.append(f"<pre><code>{html.escape(content[0])}</code></pre>")
        elif kind == "list":
            parts.append("<ul>" + "".join(f"<li>{_inline_html(item)}</li>" for item in content[0]) + "</ul>")
        elif kind == "table":
            table = content[0]
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in table.header)
            body = []
            for row in table.rows:
                cells = "".join(
                    f'<td class="num">{html.escape(str(c))}</td>' if i in table.numeric else f"<td>{_inline_html(str(c))}</td>"
                    for i, c in enumerate(row)
                )
                body.append(f"<tr>{cells}</tr>")
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")
        elif kind == "figure":
            stem, caption = content
            svg = (out / f"{stem}.svg").read_bytes()
            data = base64.b64encode(svg).decode("ascii")
            parts.append(
                f'<figure><img alt="{html.escape(caption)}" src="data:image/svg+xml;base64,{data}">'
                f"<figcaption>{_inline_html(caption)}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# -- the document ----------------------------------------------------------------------------------


def _short_sha(value: str) -> str:
    """The first 16 hex digits of a SHA-256; other markers (random-init-seed0) whole."""
    return value[:16] if re.fullmatch(r"[0-9a-f]{64}", value or "") else str(value)


def _document(data: ReportData, command: str | None) -> tuple:
    baseline = data.baseline.run.label
    compared = [m.run.label for m in data.models]
    title = f"Robustness report: {', '.join(compared)} vs {baseline}"
    level = f"{100 * data.level:.0f}%"
    blocks = [("h1", title)]
    blocks.append((
        "p",
        f"ImageNet-C robustness of {len(compared)} run(s) against the baseline **{baseline}**, computed from the "
        f"per-image records of {len(data.stores)} results store(s) by dynrobust {__version__}.",
    ))
    if command:
        blocks.append(("code", command))
    for note in data.notes:
        blocks.append(("warn", note))

    summary = summary_table(data)
    blocks.append(("h2", "Summary"))
    blocks.append((
        "p",
        "Errors and accuracies in %; mCE and relative mCE normalised by AlexNet (Hendrycks & Dietterich 2019) over "
        "the 15 standard corruptions; mean corruption accuracy over the corruptions present (and over the 75 "
        f"standard cells). Δ top-1: over all corruptions present, in percentage points, with its {level} paired "
        "bootstrap interval and the sign-test p-value (see Method).",
    ))
    rows = []
    for r in summary.itertuples():
        rows.append([
            r.label, r.role, r.images, fmt_pct(r.clean_err_pct),
            f"{fmt_pct(r.mean_corruption_acc_pct)} ({r.corruptions})", fmt_pct(r.mean_corruption_acc_standard_pct),
            fmt_pct(r.mce_pct, 1), fmt_pct(r.relative_mce_pct, 1),
            fmt_pp(r.delta_top1_pp), fmt_ci(r.ci_low_pp, r.ci_high_pp), fmt_p(r.p_value),
        ])
    blocks.append(("table", Table(
        ["run", "role", "images", "clean error", "mean corr. acc. (corruptions)", "mean acc., 15 standard",
         "mCE", "relative mCE", "Δ top-1 (pp)", f"{level} interval", "p"],
        rows, numeric=(2, 3, 4, 5, 6, 7, 8, 9, 10),
    )))

    deltas = delta_table(data)
    blocks.append(("h2", "Δ top-1 per corruption (Fig. 3)"))
    blocks.append(("figure", DELTA_FIGURE,
                   f"Δ top-1 accuracy over {baseline} per corruption, mean over severities, and category means "
                   f"(standard corruptions); error bars: {level} paired bootstrap intervals over images."))
    header = ["corruption", "category"]
    for label in compared:
        header += [f"{label}: Δ (pp)", f"{level} interval", "p", "p (Holm)"]
    scopes = deltas[deltas["scope"].isin(["clean", "corruption", "category", "mean"])]
    keys = list(dict.fromkeys(zip(scopes["scope"], scopes["name"])))
    order = {"clean": 0, "corruption": 1, "category": 2, "mean": 3}
    keys.sort(key=lambda k: order[k[0]])
    rows = []
    for scope, name in keys:
        shown = {"corruption": name, "clean": "clean images", "category": f"**{name} (mean)**",
                 "mean": f"**{name} (mean)**"}[scope]
        first = scopes[(scopes["scope"] == scope) & (scopes["name"] == name)].iloc[0]
        category = first["category"] if isinstance(first["category"], str) else ""
        row = [shown, category if scope == "corruption" else ""]
        for label in compared:
            match = scopes[(scopes["label"] == label) & (scopes["scope"] == scope) & (scopes["name"] == name)]
            if len(match):
                r = match.iloc[0]
                row += [fmt_pp(r["delta_top1_pp"]), fmt_ci(r["ci_low_pp"], r["ci_high_pp"]), fmt_p(r["p_value"]),
                        fmt_p(r["p_holm"])]
            else:
                row += ["–"] * 4
        rows.append(row)
    blocks.append(("table", Table(header, rows, numeric=tuple(range(2, len(header))))))
    blocks.append((
        "p",
        "Category means average the standard corruptions of the category; 'standard' the 15 standard, 'all' every "
        "corruption present. p: exact two-sided sign test over images (McNemar's exact test for one cell); "
        "Holm: adjusted over the corruptions of one comparison.",
    ))

    blocks.append(("h3", "Paired tests"))
    rows = []
    for r in deltas[deltas["scope"].isin(["clean", "category", "mean"])].itertuples():
        rows.append([r.label, r.name, r.images, r.cells, fmt_pct(r.model_top1_pct), fmt_pct(r.baseline_top1_pct),
                     r.n_better, r.n_worse, fmt_p(r.p_value)])
    blocks.append(("table", Table(
        ["run", "compared on", "images", "cells", "top-1 (%)", f"{baseline} top-1 (%)",
         "images better", "images worse", "p"],
        rows, numeric=(2, 3, 4, 5, 6, 7, 8),
    )))
    blocks.append((
        "p",
        "An image is 'better' when its mean top-1 outcome over the compared cells is higher for the run than for "
        "the baseline. Under the null hypothesis that the two models are exchangeable on each image, better and "
        "worse are equally likely; p is the exact binomial probability of a split at least this uneven.",
    ))

    per_corruption = per_corruption_table(data)
    blocks.append(("h2", "Corruption errors"))
    blocks.append((
        "p",
        "Top-1 error (%) averaged over the severities present, CE and relative CE (% of AlexNet's; given only with "
        "all 5 severities; relative CE needs the clean error). Extra corruptions are never in mCE.",
    ))
    labels = [m.run.label for m in data.everyone]
    header = ["corruption", "category", "standard"]
    for label in labels:
        header += [f"{label}: error", "CE", "rel. CE"]
    rows = []
    for name in dict.fromkeys(per_corruption["corruption"]):
        members = per_corruption[per_corruption["corruption"] == name]
        first = members.iloc[0]
        row = [name, first["category"], "yes" if first["standard"] else "extra"]
        for label in labels:
            match = members[members["label"] == label]
            if len(match):
                r = match.iloc[0]
                row += [fmt_pct(r["mean_top1_err_pct"]), fmt_pct(r["ce_pct"], 1), fmt_pct(r["relative_ce_pct"], 1)]
            else:
                row += ["–"] * 3
        rows.append(row)
    blocks.append(("table", Table(header, rows, numeric=tuple(range(3, len(header))))))

    severity = severity_table(data)
    blocks.append(("h2", "Severity curves"))
    blocks.append(("figure", SEVERITY_FIGURE,
                   "Top-1 accuracy (%) against severity per corruption (c: clean images); baseline dashed."))
    rows = []
    clean = severity[severity["corruption"] == "clean"].set_index("label")["top1_acc_pct"]
    for name in dict.fromkeys(severity.loc[severity["corruption"] != "clean", "corruption"]):
        for label in labels:
            cells = severity[(severity["label"] == label) & (severity["corruption"] == name)]
            if not len(cells):
                continue
            by_severity = dict(zip(cells["severity"], cells["top1_acc_pct"]))
            rows.append([name, label, fmt_pct(clean.get(label)), *(fmt_pct(by_severity.get(s)) for s in range(1, 6)),
                         int(cells["images"].min())])
    blocks.append(("table", Table(["corruption", "run", "clean", "s1", "s2", "s3", "s4", "s5", "images per cell"],
                                  rows, numeric=tuple(range(2, 9)))))

    runs = runs_table(data)
    blocks.append(("h2", "Runs"))
    rows = [[r.label, r.role, r.weights, _short_sha(r.weights_sha256), r.preprocessing, r.device or "?",
             r.torch or "?", r.records, r.stores] for r in runs.itertuples()]
    blocks.append(("table", Table(["run", "role", "weights", "weights SHA-256", "clean preprocessing", "device",
                                   "torch", "records", "stores"], rows, numeric=(7,))))
    bad = [(m.run.label, b) for m in data.everyone for b in m.bad_images.itertuples()]
    if bad:
        blocks.append(("h3", f"Bad images ({len(bad)})"))
        rows = [[label, f"{b.corruption}/{b.severity}", b.path, b.reason] for label, b in bad[:50]]
        blocks.append(("table", Table(["run", "cell", "file", "reason"], rows)))
        if len(bad) > 50:
            blocks.append(("p", f"… and {len(bad) - 50} more, all in bad_images.csv."))

    blocks.append(("h2", "Method"))
    blocks.append(("list", [
        "CE_c = Σ_s E(s, c) / Σ_s E_AlexNet(s, c); mCE = mean CE over the 15 standard corruptions; relative CE_c = "
        "Σ_s (E(s, c) − E_clean) / Σ_s (E_AlexNet(s, c) − E_AlexNet,clean) (Hendrycks & Dietterich 2019).",
        "Δ top-1 of a corruption = mean over severities of top-1(model) − top-1(baseline), on the images both runs "
        "have (Fig. 3 of the Bi-volution paper, AAAI 2022).",
        f"Intervals: {level} percentile intervals of {data.n_boot} paired bootstrap replicates (seed {data.seed}); "
        "each replicate resamples images with replacement, the same images for both models and for every cell.",
        "p-values: exact two-sided sign test over images of the mean per-image difference (McNemar's exact test on a "
        "single cell); Holm's step-down adjustment over the corruptions of each comparison.",
        "Numbers: summary.csv, per_corruption.csv, delta_top1.csv, severity.csv, runs.csv and report.json in this "
        "folder (accuracies and errors in %, differences in percentage points). docs/report.md in the dynrobust "
        "repository explains the choices.",
    ]))
    return title, blocks


def _json_ready(frame: pd.DataFrame) -> list:
    frame = frame.astype(object).where(frame.notna(), None)
    return frame.to_dict(orient="records")


def write_report(data: ReportData, out, command: str | None = None) -> ReportFiles:
    """Write the report of ``data`` into the folder ``out``; returns the :class:`ReportFiles`.

    ``command``: the command line that made it, quoted at the top. Raises DynrobustError when
    ``out`` cannot be a folder or cannot be written.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DynrobustError(f"--out {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        figures = delta_figure(data, out / DELTA_FIGURE) + severity_figure(data, out / SEVERITY_FIGURE)
        tables = {
            "summary": summary_table(data),
            "per_corruption": per_corruption_table(data),
            "delta_top1": delta_table(data),
            "severity": severity_table(data),
            "runs": runs_table(data),
        }
        bad = [m.bad_images.assign(label=m.run.label) for m in data.everyone if len(m.bad_images)]
        if bad:
            tables["bad_images"] = pd.concat(bad, ignore_index=True)
        table_paths = []
        for name, frame in tables.items():
            path = out / f"{name}.csv"
            frame.to_csv(path, index=False, float_format="%.12g")
            table_paths.append(path)
        title, blocks = _document(data, command)
        payload = {
            "title": title,
            "dynrobust_version": __version__,
            "command": command,
            "baseline": data.baseline.run.label,
            "models": [m.run.label for m in data.models],
            "stores": [str(p) for p in data.stores],
            "bootstrap": {"replicates": data.n_boot, "level": data.level, "seed": data.seed,
                          "method": "paired percentile bootstrap over images"},
            "test": "exact two-sided sign test over images (McNemar exact on a single cell); Holm over corruptions",
            "units": "accuracies, errors, CE, relative CE in % (_pct); differences in percentage points (_pp)",
            "notes": data.notes,
            **{name: _json_ready(frame) for name, frame in tables.items()},
        }
        json_path = out / "report.json"
        json_path.write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n", encoding="utf-8")
        markdown = out / "report.md"
        markdown.write_text(to_markdown(blocks), encoding="utf-8")
        page = out / "report.html"
        page.write_text(to_html(blocks, title, out), encoding="utf-8")
    except OSError as exc:
        raise DynrobustError(f"cannot write the report into {out}: {exc.strerror or exc}") from None
    return ReportFiles(out=out, markdown=markdown, html=page, json=json_path, figures=figures, tables=table_paths)
