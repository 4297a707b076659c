"""Synthetic raw captures for benchmarks, reused only while they are what the code would write.

A benchmark's captures take minutes to synthesise, so they are kept under its ``--work``
folder. Reusing them by name alone once measured a stale dataset: after the simulator gained
skin detail, ``benchmarks.pipeline`` went on building captures written before it
(``docs/orchestration.md``). :func:`synthetic_raw` therefore names the folder by a digest of
the synthesis configuration and of the simulator's and raw writer's source files, and marks
a folder complete only after the synthesis returned.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
_SOURCES = ("kernels/synth", "flows/synthesize.py", "storage/raw.py", "storage/groundtruth.py")
_DONE = ".complete"


def source_digest() -> str:
    """sha256 over the simulator's and the raw writers' source files (sorted paths and bytes)."""
    h = hashlib.sha256()
    for rel in _SOURCES:
        p = _ROOT / rel
        for f in sorted(p.rglob("*.py")) if p.is_dir() else [p]:
            h.update(str(f.relative_to(_ROOT)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def synthetic_raw(work: Path, name: str, synth_cfg) -> Path:
    """``work/<name>-<digest>``: the captures of ``synth_cfg`` (a ``SynthConfig``), synthesised
    unless a complete folder of the same configuration and simulator code is there; its ground
    truth next to it (``-gt``). Older folders of the same name are left alone."""
    from flows.synthesize import synthesize

    h = hashlib.sha256((synth_cfg.model_dump_json() + source_digest()).encode()).hexdigest()[:12]
    raw = Path(work) / f"{name}-{h}"
    gt = raw.parent / (raw.name + "-gt")
    if (raw / _DONE).exists():
        return raw
    shutil.rmtree(raw, ignore_errors=True)
    shutil.rmtree(gt, ignore_errors=True)
    synthesize(synth_cfg, raw, gt)
    (raw / _DONE).write_text(h + "\n")
    return raw
