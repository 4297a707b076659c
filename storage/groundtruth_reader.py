"""Ground-truth reader: for tests and benchmarks only.

Nothing under ``flows/`` or ``tasks/`` may import this module (a test checks it): the
pipeline must never see ground truth.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kernels.camera import Camera
from storage.groundtruth import GT_FORMAT_NAME, GT_FORMAT_VERSION
from storage.ids import check_id, safe_join


@dataclass(frozen=True)
class GroundTruthSample:
    """One sample's ground truth: mesh arrays, the true and stored rig, per-view arrays."""

    subject_id: str
    sample_id: str
    mesh: dict[str, np.ndarray]
    rig_true: dict[str, dict[str, Camera]]    # group -> {"ir", "projector", "rgb"} -> Camera
    rig_stored: dict[str, dict[str, Camera]]
    views: dict[str, dict[str, np.ndarray]]


def _rig(d: dict) -> dict[str, dict[str, Camera]]:
    return {g["name"]: {k: Camera.from_dict(g[k]) for k in ("ir", "projector", "rgb")} for g in d["groups"]}


class GroundTruth:
    """Reader of a ground-truth root written by :mod:`storage.groundtruth`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        marker = json.loads((self.root / "gt-format.json").read_text())
        if marker != {"format": GT_FORMAT_NAME, "version": GT_FORMAT_VERSION}:
            raise ValueError(f"{self.root}: not a {GT_FORMAT_NAME} v{GT_FORMAT_VERSION} folder ({marker})")

    def subject(self, subject_id: str) -> dict:
        check_id(subject_id, "subject")
        return json.loads(safe_join(self.root, subject_id, "subject.json").read_text())

    def sample(self, subject_id: str, sample_id: str) -> GroundTruthSample:
        check_id(subject_id, "subject")
        check_id(sample_id, "sample")
        d = safe_join(self.root, subject_id, sample_id)
        with np.load(d / "mesh.npz") as z:
            mesh = {k: z[k] for k in z.files}
        rig = json.loads((d / "rig.json").read_text())
        views: dict[str, dict[str, np.ndarray]] = {}
        with np.load(d / "views.npz") as z:
            for key in z.files:
                view, name = key.split("/", 1)
                views.setdefault(view, {})[name] = z[key]
        return GroundTruthSample(subject_id, sample_id, mesh, _rig(rig["true"]), _rig(rig["stored"]), views)
