"""The ``pixelface`` command line.

Every command loads the one configuration tree (defaults <- ``--config FILE`` <- options),
validates it, and runs. Any bad argument or input ends with a one-line ``error: ...`` on
stderr and exit status 2; a run that finished with some failed samples exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message} (see --help)\n")


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _one_line(exc: BaseException) -> str:
    """A one-line message for ``exc`` (pydantic errors keep their field path)."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        parts = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e["loc"])
            msg = e["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {msg}" if loc else msg)
        return "invalid configuration: " + "; ".join(parts)
    return " ".join(str(exc).split())


def _overrides(args: argparse.Namespace, mapping: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attr, path in mapping.items():
        value = getattr(args, attr, None)
        if value is None:
            continue
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


_SYNTH_OPTIONS = {
    "subjects": ("synth", "subjects"),
    "expressions": ("synth", "expressions"),
    "neutral_subjects": ("synth", "neutral_subjects"),
    "seed": ("synth", "seed"),
    "width": ("synth", "rig", "width"),
    "height": ("synth", "rig", "height"),
    "steps": ("synth", "fringe", "steps"),
    "frequencies": ("synth", "fringe", "frequencies"),
    "mesh_vertices": ("synth", "mesh_vertices"),
}


def _add_synth_options(p: argparse.ArgumentParser, counts: bool = True) -> None:
    if counts:
        p.add_argument("--subjects", type=int, help="number of subjects (default from config: 8)")
        p.add_argument("--expressions", type=int, help="expressions per subject, 1..22 (default 6)")
        p.add_argument("--neutral-subjects", dest="neutral_subjects", type=int,
                       help="further subjects captured in the neutral expression only (default 0)")
    p.add_argument("--width", type=int, help="camera width in pixels (default 1280)")
    p.add_argument("--height", type=int, help="camera height in pixels (default 1024)")
    p.add_argument("--seed", type=int, help="top-level seed (default 0)")
    p.add_argument("--steps", type=int, help="phase steps N >= 3 (default 4)")
    p.add_argument("--frequencies", type=_int_list, help="increasing fringe frequencies, e.g. 1,8,64")
    p.add_argument("--mesh-vertices", dest="mesh_vertices", type=int,
                   help="vertex count of the scanned ground-truth mesh (default 150000)")
    p.add_argument("--config", type=Path, help="YAML/TOML/JSON file overriding the defaults")
    p.add_argument("--gt", type=Path, help="ground-truth output folder (default: <out>-gt, a separate tree)")
    p.add_argument("--overwrite", action="store_true", help="replace existing samples")


def _default_gt(out: Path) -> Path:
    return out.parent / (out.name + "-gt")


def _check_counts(args: argparse.Namespace) -> None:
    if args.subjects is not None and args.subjects < 1:
        raise ValueError(f"--subjects must be >= 1, got {args.subjects}")
    if args.expressions is not None and not 1 <= args.expressions <= 22:
        raise ValueError(f"--expressions must be in 1..22, got {args.expressions}")
    if getattr(args, "neutral_subjects", None) is not None and args.neutral_subjects < 0:
        raise ValueError(f"--neutral-subjects must be >= 0, got {args.neutral_subjects}")


def cmd_synth(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from flows.synthesize import synthesize
    from pixelface.config import load_config

    _check_counts(args)
    cfg = load_config(args.config, _overrides(args, _SYNTH_OPTIONS)).synth
    out = Path(args.out)
    gt = args.gt or _default_gt(out)
    t0 = time.perf_counter()
    with Progress(TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), disable=args.quiet, transient=False) as bar:
        task = bar.add_task("", total=cfg.subjects + cfg.neutral_subjects)
        summary = synthesize(cfg, out, gt, workers=args.workers, overwrite=args.overwrite,
                             on_subject=lambda sid, n: bar.update(task, advance=1, description=f"{sid}: {n} samples"))
    dt = time.perf_counter() - t0
    record = {"raw": str(summary.raw_root), "gt": str(summary.gt_root), "subjects": len(summary.subjects),
              "samples": summary.samples, "views": summary.views, "eval_subjects": list(summary.eval_subjects),
              "seconds": round(dt, 2)}
    print(json.dumps(record) if args.json else
          f"wrote {summary.samples} samples ({summary.views} views) of {len(summary.subjects)} subjects "
          f"to {summary.raw_root} (ground truth: {summary.gt_root}) in {dt:.1f} s")
    return EXIT_OK


def cmd_scan(args: argparse.Namespace) -> int:
    from flows.synthesize import scan_mesh_file
    from pixelface.config import load_config

    cfg = load_config(args.config, _overrides(args, _SYNTH_OPTIONS)).synth
    out = Path(args.out)
    gt = args.gt or _default_gt(out)
    path = scan_mesh_file(cfg, args.mesh, args.landmarks, out, gt, args.subject, args.sample, units=args.units,
                          expression=args.expression, gender=args.gender, age=args.age, overwrite=args.overwrite)
    print(f"wrote {path} (ground truth: {gt / args.subject / args.sample})")
    return EXIT_OK


def cmd_config(args: argparse.Namespace) -> int:
    from pixelface.config import dump_config, load_config

    sys.stdout.write(dump_config(load_config(args.config)))
    return EXIT_OK


def _store_config(args: argparse.Namespace):
    """Config for the dataset-level commands: defaults <- ``--config`` <- ``--store`` / Dask options."""
    from pixelface.config import load_config

    build: dict[str, Any] = {"store": str(args.store)}
    for attr in ("dask_address", "workers", "prefect_home"):
        v = getattr(args, attr, None)
        if v is not None:
            build[attr] = str(v) if isinstance(v, Path) else v
    cfg = load_config(args.config, {"build": build})
    if not (Path(cfg.build.store) / "store-format.json").exists():
        raise FileNotFoundError(f"--store {cfg.build.store}: no pixelface store there (run `pixelface build` first)")
    return cfg


def _add_store_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", type=Path, required=True, help="store root written by `pixelface build`")
    p.add_argument("--config", type=Path, help="YAML/TOML/JSON file (the one the build used, if any)")
    p.add_argument("--dask-address", dest="dask_address", help="tcp://HOST:PORT of an existing Dask scheduler")
    p.add_argument("--workers", type=int, help="LocalCluster worker processes (default: CPU count)")
    p.add_argument("--prefect-home", dest="prefect_home", type=Path, help="PREFECT_HOME (default work/prefect)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def cmd_model(args: argparse.Namespace) -> int:
    from flows.prefect_env import configure_environment

    cfg = _store_config(args)
    configure_environment(Path(cfg.build.prefect_home))
    from flows.model import run_model

    s = run_model(cfg.build, cfg.model)
    if args.json:
        print(s.model_dump_json())
    else:
        print(f"model {s.model_id} ({'reused' if s.reused else 'built'} in {s.seconds:.1f} s): "
              f"{s.n_shape_components} shape components from {s.n_shape_samples} neutral registrations "
              f"(99% at {s.shape_components_99}), {s.n_expression_components} expression components from "
              f"{s.n_expression_samples} residuals (99% at {s.expression_components_99})\n  {s.path}")
        if s.skipped:
            print(f"  skipped (subject without a neutral registration): {', '.join(s.skipped)}", file=sys.stderr)
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from flows.prefect_env import configure_environment

    cfg = _store_config(args)
    configure_environment(Path(cfg.build.prefect_home))
    from flows.evaluate import run_evaluate

    s = run_evaluate(cfg.build, cfg.model, cfg.evaluate)
    if args.json:
        print(s.model_dump_json())
    else:
        print(f"evaluation {s.eval_id}: {s.n_samples} eval scans x {len(s.variants)} model variants in "
              f"{s.seconds:.1f} s ({s.n_failed_rows} failed rows)\n  {s.path}")
        for r in s.by_variant:
            arm = ", ".join(f"{k.removeprefix('armse_')}: {v:.4f}" for k, v in r.items()
                            if k.startswith("armse_") and not k.endswith("_mm") and v is not None)
            print(f"  {r['variant']:<15} n={r['n']:<4} NME {r['nme']:.4f}  ARMSE(r) {arm}")
    return EXIT_PARTIAL if s.n_failed_rows else EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from flows.report import write_report

    cfg = _store_config(args)
    path = write_report(cfg.build.store, Path(args.out), model_id=args.model, eval_id=args.eval)
    print(f"report written to {path}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.demo import run_demo

    return run_demo(Path(args.work), quiet=args.quiet, config=args.config)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pixelface", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("synth", help="synthesise faces and scan them with the simulated rig")
    p.add_argument("--out", type=Path, required=True, help="raw capture folder to write")
    _add_synth_options(p)
    p.add_argument("--workers", type=int, default=1, help="processes (output does not depend on it)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("scan", help="scan any triangle mesh (PLY/OBJ) with the simulated rig")
    p.add_argument("--mesh", type=Path, required=True, help=".ply or .obj triangle mesh in the head frame")
    p.add_argument("--landmarks", type=Path, required=True, help="106 rows of x y z (NaN rows for unknown)")
    p.add_argument("--out", type=Path, required=True, help="raw capture folder to write into")
    p.add_argument("--subject", required=True, help="subject id")
    p.add_argument("--sample", required=True, help="sample id")
    p.add_argument("--units", choices=("mm", "cm", "m"), default="mm", help="units of the mesh and landmarks")
    p.add_argument("--expression", default="neutral", help="expression name recorded in sample.json")
    p.add_argument("--gender", default="unknown", choices=("female", "male", "unknown"))
    p.add_argument("--age", type=int, default=None)
    _add_synth_options(p, counts=False)
    p.set_defaults(func=cmd_scan)

    from flows.build_cli import add_build_arguments, cmd_build

    p = sub.add_parser("build", help="build raw captures into the store (Prefect flows on Dask)")
    add_build_arguments(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("model", help="build the PCA morphable model from a store's registrations")
    _add_store_arguments(p)
    p.set_defaults(func=cmd_model)

    p = sub.add_parser("evaluate", help="fit model variants to the eval split: NME / ARMSE tables")
    _add_store_arguments(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("report", help="write the static HTML QC report of a store")
    p.add_argument("--store", type=Path, required=True, help="store root")
    p.add_argument("--out", type=Path, required=True, help="folder to write index.html and the PNG plots into")
    p.add_argument("--model", help="model id (default: the evaluation's full model, else the newest)")
    p.add_argument("--eval", help="evaluation id (default: the newest)")
    p.add_argument("--config", type=Path, help="YAML/TOML/JSON file (the one the build used, if any)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("config", help="print the effective configuration as YAML")
    p.add_argument("--config", type=Path, help="YAML/TOML/JSON file overriding the defaults")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("demo", help="the main job on the embedded default (what `make demo` runs)")
    p.add_argument("--work", type=Path, default=Path("work/demo"), help="working folder")
    p.add_argument("--config", type=Path, help="YAML/TOML/JSON file overriding the demo defaults")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileExistsError, FileNotFoundError, PermissionError, OSError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        if os.environ.get("PIXELFACE_TRACEBACK"):
            raise
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
