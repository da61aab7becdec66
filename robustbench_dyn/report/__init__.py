"""Comparison reports: models against a baseline on ImageNet-C, from the results stores only.

    from robustbench_dyn.report import build_report
    files = build_report(["runs/"], baseline="resnet50", out="reports/binet-vs-resnet")

Reports read the stores (read-only) and :mod:`robustbench_dyn.metrics`, never models: tables
(:mod:`.tables`), figures (:mod:`.figures`, Fig. 3 of the Bi-volution paper and severity curves) and
the Markdown/HTML writer (:mod:`.render`).
"""

from __future__ import annotations

from robustbench_dyn.report.render import ReportFiles, write_report
from robustbench_dyn.report.tables import ReportData, compute_report

__all__ = ["ReportData", "ReportFiles", "build_report", "compute_report", "write_report"]


def build_report(sources, baseline, models=None, *, out, n_boot=2000, level=0.95, seed=0, command=None,
                 progress=True) -> ReportFiles:
    """Compute and write a report comparing ``models`` (default: every other run) with ``baseline``
    from the stores ``sources``; returns the :class:`ReportFiles` written into ``out``.
    See :func:`.tables.compute_report` and :func:`.render.write_report`."""
    data = compute_report(sources, baseline, models, n_boot=n_boot, level=level, seed=seed, progress=progress)
    return write_report(data, out, command=command)
