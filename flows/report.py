"""Flow ``report``: a static QC report of a store (``pixelface report --store STORE --out DIR``).

:func:`report` (Prefect flow) and :func:`write_report` (the same without Prefect) run the three
tasks of :mod:`tasks.report`: gather (catalog, model card, evaluation tables, three registration
artifacts; read-only), render the PNG plots, write ``DIR/index.html``. The page opens from disk:
no server, no script, CSS inline, PNGs linked relatively from the same folder. The flow also
publishes a Prefect markdown artifact (key ``qc-report``) with the report's path and its
``file://`` link. See ``docs/report.md``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict


class ReportSummary(BaseModel):
    """What a ``report`` run wrote."""

    model_config = ConfigDict(frozen=True)

    path: str
    plots: list[str]
    missing: list[str]
    """What the store does not hold yet (no model, no evaluation, no registration)."""
    plot_errors: dict[str, str] = {}
    model_id: str | None = None
    eval_id: str | None = None
    build_ids: list[str] = []
    n_failed_runs: int = 0
    seconds: float = 0.0


def _summary(data, plots, path: Path, seconds: float) -> ReportSummary:
    from tasks.report import failed_rows

    missing = [t for t in (data.model_note, data.eval_note, data.heat_note) if t]
    return ReportSummary(path=str(path), plots=sorted(plots.files.values()), missing=missing,
                         plot_errors=dict(plots.errors), model_id=data.model_id, eval_id=data.eval_id,
                         build_ids=data.build_ids, n_failed_runs=len(failed_rows(data)), seconds=seconds)


def write_report(store: str | os.PathLike, out_dir: str | os.PathLike, model_id: str | None = None,
                 eval_id: str | None = None) -> Path:
    """Write the QC report of ``store`` into ``out_dir`` without Prefect; returns ``out_dir/index.html``.

    Raises
    ------
    FileNotFoundError
        No store at ``store``, or ``model_id`` / ``eval_id`` is not published in it.
    """
    from tasks.report import gather_report, render_plots, write_html

    data = gather_report.fn(os.fspath(store), model_id, eval_id)
    plots = render_plots.fn(data, out_dir)
    return write_html.fn(data, plots, out_dir)


@flow(name="report", persist_result=False, validate_parameters=True)
def report(store: str, out: str, model_id: str | None = None, eval_id: str | None = None) -> ReportSummary:
    """Write the QC report of ``store`` into the folder ``out`` and link it from a Prefect artifact."""
    from tasks.report import gather_report, render_plots, write_html

    t0 = time.perf_counter()
    log = get_run_logger()
    data = gather_report(store, model_id, eval_id)
    plots = render_plots(data, out)
    path = write_html(data, plots, out)
    summary = _summary(data, plots, Path(path), time.perf_counter() - t0)
    uri = Path(path).resolve().as_uri()
    lines = [f"# QC report of `{data.store}`", "", f"[open the report]({uri})", "", f"`{Path(path).resolve()}`", "",
             f"- model: `{data.model_id or 'none'}`", f"- evaluation: `{data.eval_id or 'none'}`",
             f"- builds: {', '.join(f'`{b}`' for b in data.build_ids) or 'none'}",
             f"- {len(summary.plots)} plots; {summary.n_failed_runs} failed stage runs"]
    lines += [f"- missing: {m}" for m in summary.missing]
    lines += [f"- plot `{k}` could not be drawn: {v}" for k, v in summary.plot_errors.items()]
    create_markdown_artifact("\n".join(lines), key="qc-report", description=f"QC report {Path(path).resolve()}")
    for k, v in summary.plot_errors.items():
        log.error("report plot %s could not be drawn: %s", k, v)
    log.info("QC report: %s (%d plots, %.1f s)", path, len(summary.plots), summary.seconds)
    return summary
