"""Ground-truth writer of the simulator (the pipeline never reads ground truth).

Layout (see ``docs/raw-format.md``, "Ground truth")::

    GT/gt-format.json
    GT/<subject>/subject.json            generator parameters of the subject
    GT/<subject>/<sample>/mesh.npz       the scanned mesh with dense correspondence (uv),
                                         albedo, part labels and exact 3D landmarks
    GT/<subject>/<sample>/rig.json       true and stored rig (every camera and projector)
    GT/<subject>/<sample>/views.npz      per view: noise-free landmark projections and visibility

The reader is :mod:`storage.groundtruth_reader`; only tests and benchmarks import it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from storage._publish import publish_dir
from storage.ids import check_id, safe_join

GT_FORMAT_NAME = "pixelface-gt"
GT_FORMAT_VERSION = 1


def _json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def init_gt_root(root: Path) -> None:
    """Create the ground-truth root with its format marker (idempotent)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    marker = root / "gt-format.json"
    if not marker.exists():
        _json(marker, {"format": GT_FORMAT_NAME, "version": GT_FORMAT_VERSION})


def write_gt_subject(root: Path, subject_id: str, record: dict) -> None:
    """Write ``GT/<subject>/subject.json`` (atomic rename)."""
    check_id(subject_id, "subject")
    init_gt_root(root)
    d = safe_join(Path(root), subject_id)
    d.mkdir(exist_ok=True)
    tmp = d / f".subject.json.{uuid.uuid4().hex}.tmp"
    _json(tmp, record)
    os.replace(tmp, d / "subject.json")


def write_gt_sample(root: Path, subject_id: str, sample_id: str, mesh: dict[str, np.ndarray],
                    rig: dict, views: dict[str, dict[str, np.ndarray]], overwrite: bool = False) -> Path:
    """Write one sample's ground truth; visible only once complete.

    Parameters
    ----------
    mesh : dict of str -> array
        At least ``vertices`` (n, 3) float64 mm and ``faces`` (m, 3) int; the simulator
        adds ``uv``, ``albedo_ir``, ``albedo_rgb``, ``parts``, ``landmarks``, ``landmark_uv``.
    rig : dict
        ``{"true": Rig.to_dict(), "stored": Rig.to_dict()}``.
    views : dict of view -> dict of str -> array
        Per-view arrays, stored as ``<view>/<name>`` in ``views.npz``.
    """
    check_id(subject_id, "subject")
    check_id(sample_id, "sample")
    for k in ("vertices", "faces"):
        if k not in mesh:
            raise ValueError(f"ground-truth mesh misses {k!r}")
    init_gt_root(root)
    subj = safe_join(Path(root), subject_id)
    subj.mkdir(exist_ok=True)
    final = subj / sample_id
    if final.exists() and not overwrite:
        raise FileExistsError(f"ground truth of subject {subject_id} / sample {sample_id} exists at {final}")
    tmp = subj / f".tmp-{sample_id}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        np.savez(tmp / "mesh.npz", **{k: np.asarray(v) for k, v in mesh.items()})
        _json(tmp / "rig.json", rig)
        flat = {}
        for view, arrays in views.items():
            check_id(view, "view")
            for name, arr in arrays.items():
                flat[f"{view}/{name}"] = np.asarray(arr)
        np.savez(tmp / "views.npz", **flat)
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
