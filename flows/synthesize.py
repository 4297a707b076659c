"""Synthetic capture jobs: generate faces, scan them with the simulated rig, write raw + GT.

This is the simulator's driver (the stand-in for a real scanner session), not part of the
pipeline: it is the only code under ``flows/`` that touches ground truth, and it only
writes it (through :mod:`storage.groundtruth`).
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from kernels.synth.face import EXPRESSIONS, FaceMesh, Subject, face_mesh, sample_subject
from kernels.synth.rig import Rig, build_rig, perturb_rig
from kernels.synth.scanner import SceneMesh, ViewRender, scan
from kernels.synth.seeding import derive_rng
from pixelface.config import SynthConfig
from storage import groundtruth as gtw
from storage import raw
from storage.ids import check_id


@dataclass(frozen=True)
class SynthSummary:
    """What a synthesis run wrote."""

    raw_root: Path
    gt_root: Path
    subjects: tuple[str, ...]
    samples: int
    views: int
    eval_subjects: tuple[str, ...]


def subject_ids(n: int) -> list[str]:
    """The synthetic subject ids ``S0000 .. S{n-1:04d}``."""
    return [f"S{i:04d}" for i in range(n)]


def assign_split(subject_id: str, eval_fraction: float) -> str:
    """Deterministic train/eval split by a hash of the subject id (stable as a dataset grows)."""
    from kernels.synth.seeding import key_words

    u = key_words("pixelface-split", subject_id)[-1] / 2**32
    return "eval" if u < eval_fraction else "train"


def _views_from_renders(renders: dict[str, ViewRender], rig_stored: Rig) -> dict[str, raw.RawView]:
    out = {}
    for name, r in renders.items():
        g = rig_stored.group(name)
        calib = raw.ViewCalibration(name, g.ir, g.projector, g.rgb)
        out[name] = raw.RawView(r.fringe, r.rgb, calib, r.landmarks_px, r.landmark_visible)
    return out


def write_capture(raw_root: Path, gt_root: Path, meta: raw.SampleMeta, mesh: dict[str, np.ndarray],
                  renders: dict[str, ViewRender], rig_true: Rig, rig_stored: Rig, cfg: SynthConfig,
                  overwrite: bool) -> None:
    """Write one simulated capture: raw files (what a scanner gives) and its ground truth."""
    raw.write_sample(raw_root, meta, _views_from_renders(renders, rig_stored), overwrite=overwrite,
                     png_compress_level=cfg.png_compress_level)
    views_gt = {}
    for name, r in renders.items():
        views_gt[name] = {"landmark_visible": r.landmark_visible}
    gtw.write_gt_sample(gt_root, meta.subject_id, meta.sample_id, mesh,
                        {"true": rig_true.to_dict(), "stored": rig_stored.to_dict()}, views_gt, overwrite=overwrite)


def _sample_meta(cfg: SynthConfig, subject_id: str, sample_id: str, expression: str, category: str,
                 rig: Rig) -> raw.SampleMeta:
    g0 = rig.groups[0]
    return raw.SampleMeta(
        subject_id, sample_id, expression, category, tuple(g.name for g in rig.groups),
        raw.FringeSpec(cfg.fringe.steps, tuple(cfg.fringe.frequencies), g0.projector.width),
        g0.ir.width, g0.ir.height)


def _mesh_record(m: FaceMesh) -> dict[str, np.ndarray]:
    return {"vertices": m.vertices, "faces": m.faces, "uv": m.uv, "albedo_ir": m.albedo_ir,
            "albedo_rgb": m.albedo_rgb, "parts": m.parts, "landmarks": m.landmarks, "landmark_uv": m.landmark_uv}


def synthesize_subject(cfg: SynthConfig, subject_id: str, raw_root: Path, gt_root: Path,
                       overwrite: bool = False, expressions: int | None = None) -> int:
    """Generate, scan and write the first ``expressions`` expressions (default
    ``cfg.expressions``) of one subject; returns the sample count.

    Every random draw derives from ``cfg.seed`` and the ids (subject, expression, view),
    so any subject can be regenerated alone with identical bytes.
    """
    check_id(subject_id, "subject")
    subject: Subject = sample_subject(subject_id, derive_rng(cfg.seed, "subject", subject_id), cfg.face)
    split = assign_split(subject_id, cfg.eval_fraction)
    raw.write_subject(raw_root, raw.SubjectMeta(subject_id, subject.gender, int(subject.age), split))
    gtw.write_gt_subject(gt_root, subject_id, {
        "subject_id": subject_id, "gender": subject.gender, "age": int(subject.age), "split": split,
        "identity": np.asarray(subject.identity).tolist(),
        "expression_intensity": dict(zip((e.name for e in EXPRESSIONS),
                                         np.asarray(subject.expression_intensity).tolist())),
        "seed": cfg.seed,
    })
    rig_true = build_rig(cfg.rig)
    # One calibration per subject session: the side groups drift between sessions.
    rig_stored = perturb_rig(rig_true, cfg.rig, derive_rng(cfg.seed, "calibration", subject_id))
    n = 0
    for expr in EXPRESSIONS[: cfg.expressions if expressions is None else expressions]:
        mesh = face_mesh(subject, expr.name, cfg.mesh_vertices, cfg.face)
        scene = SceneMesh(mesh.vertices, mesh.faces, mesh.albedo_ir, mesh.albedo_rgb, mesh.landmarks)
        renders = scan(scene, rig_true, cfg.fringe, cfg.photometry,
                       derive_rng(cfg.seed, "scan", subject_id, expr.name))
        meta = _sample_meta(cfg, subject_id, expr.name, expr.name, expr.category, rig_true)
        write_capture(raw_root, gt_root, meta, _mesh_record(mesh), renders, rig_true, rig_stored, cfg, overwrite)
        n += 1
    return n


def _check_separate(raw_root: Path, gt_root: Path) -> None:
    """Refuse a ground-truth tree that is, contains or lies inside the raw tree."""
    r, g = raw_root.resolve(), gt_root.resolve()
    if r == g or g in r.parents or r in g.parents:
        raise ValueError(f"ground truth ({gt_root}) must be a separate tree from the raw captures ({raw_root})")


def _subject_job(args) -> tuple[str, int]:
    cfg, sid, raw_root, gt_root, overwrite, n_expr = args
    return sid, synthesize_subject(cfg, sid, raw_root, gt_root, overwrite, n_expr)


def synthesize(cfg: SynthConfig, raw_root: str | os.PathLike, gt_root: str | os.PathLike, *,
               workers: int = 1, overwrite: bool = False,
               on_subject: Callable[[str, int], None] | None = None) -> SynthSummary:
    """Synthesise ``cfg.subjects`` subjects x ``cfg.expressions`` expressions, then
    ``cfg.neutral_subjects`` further subjects in the neutral expression only.

    Parameters
    ----------
    cfg : SynthConfig
    raw_root, gt_root : path
        Output folders for the raw captures and the ground truth (must differ).
    workers : int
        Processes to use (subjects are independent; output does not depend on it).
    overwrite : bool
        Replace existing samples instead of refusing.
    on_subject : callable, optional
        Called as ``on_subject(subject_id, n_samples)`` when a subject is complete.
    """
    raw_root, gt_root = Path(raw_root), Path(gt_root)
    _check_separate(raw_root, gt_root)
    raw.init_root(raw_root)
    gtw.init_gt_root(gt_root)
    ids = subject_ids(cfg.subjects + cfg.neutral_subjects)
    jobs = [(cfg, sid, raw_root, gt_root, overwrite, None if i < cfg.subjects else 1) for i, sid in enumerate(ids)]
    total = 0
    if workers <= 1:
        results = map(_subject_job, jobs)
        for sid, n in results:
            total += n
            if on_subject:
                on_subject(sid, n)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for sid, n in pool.map(_subject_job, jobs):
                total += n
                if on_subject:
                    on_subject(sid, n)
    evals = tuple(s for s in ids if assign_split(s, cfg.eval_fraction) == "eval")
    return SynthSummary(raw_root, gt_root, tuple(ids), total, total * len(cfg.rig.yaw_deg), evals)


def scan_mesh_file(cfg: SynthConfig, mesh_path: str | os.PathLike, landmarks_path: str | os.PathLike,
                   raw_root: str | os.PathLike, gt_root: str | os.PathLike, subject_id: str, sample_id: str, *,
                   units: str = "mm", expression: str = "neutral", gender: str = "unknown", age: int | None = None,
                   ir_albedo: float = 0.7, overwrite: bool = False) -> Path:
    """Scan any triangle mesh (in the head frame of docs/conventions.md) with the simulated rig.

    The mesh's vertex colours, when present, become its RGB albedo (and their mean its IR
    albedo); otherwise a constant albedo is used. Landmarks given as NaN rows are written
    as missing in every view, never invented.

    Returns
    -------
    Path
        The written raw sample folder.
    """
    from storage.meshio import read_landmarks_3d, read_mesh

    check_id(subject_id, "subject")
    check_id(sample_id, "sample")
    names = {e.name: e for e in EXPRESSIONS}
    if expression not in names:
        raise ValueError(f"expression: unknown {expression!r}; expected one of {sorted(names)}")
    if not 0.0 < ir_albedo <= 1.0:
        raise ValueError(f"ir_albedo: must be in (0, 1], got {ir_albedo}")
    raw_root, gt_root = Path(raw_root), Path(gt_root)
    _check_separate(raw_root, gt_root)
    # everything is validated before anything is written (SubjectMeta checks gender and age)
    subject_meta = raw.SubjectMeta(subject_id, gender, age, assign_split(subject_id, cfg.eval_fraction))
    if (raw_root / subject_id / sample_id).exists() and not overwrite:
        raise FileExistsError(f"subject {subject_id} / sample {sample_id}: already exists in {raw_root} "
                              "(pass --overwrite to replace it)")
    if (raw_root / subject_id / "subject.json").exists():
        have = raw.RawDataset(raw_root).subject(subject_id)
        if have != subject_meta:
            raise ValueError(f"subject {subject_id}: exists with gender {have.gender!r}, age {have.age!r}; "
                             f"scanning it as gender {gender!r}, age {age!r} would rewrite its subject.json")
    vertices, faces, colors = read_mesh(mesh_path, units)
    landmarks = read_landmarks_3d(landmarks_path, units)
    if colors is not None:
        albedo_rgb = np.clip(colors, 0.0, 1.0).astype(np.float32)
        albedo_ir = np.clip(albedo_rgb.mean(axis=1) * ir_albedo / max(float(albedo_rgb.mean()), 1e-6),
                            0.0, 1.0).astype(np.float32)
    else:
        albedo_rgb = None
        albedo_ir = np.full(len(vertices), ir_albedo, np.float32)
    raw.init_root(raw_root)
    raw.write_subject(raw_root, subject_meta)
    gtw.write_gt_subject(gt_root, subject_id, {"subject_id": subject_id, "gender": gender, "age": age,
                                               "split": subject_meta.split,
                                               "source_mesh": str(Path(mesh_path).resolve())})
    rig_true = build_rig(cfg.rig)
    rig_stored = perturb_rig(rig_true, cfg.rig, derive_rng(cfg.seed, "calibration", subject_id))
    scene = SceneMesh(vertices, faces, albedo_ir, albedo_rgb, landmarks)
    renders = scan(scene, rig_true, cfg.fringe, cfg.photometry, derive_rng(cfg.seed, "scan", subject_id, sample_id))
    meta = _sample_meta(cfg, subject_id, sample_id, expression, names[expression].category, rig_true)
    mesh_rec = {"vertices": vertices, "faces": faces, "albedo_ir": albedo_ir, "landmarks": landmarks}
    if albedo_rgb is not None:
        mesh_rec["albedo_rgb"] = albedo_rgb
    write_capture(raw_root, gt_root, meta, mesh_rec, renders, rig_true, rig_stored, cfg, overwrite)
    return raw_root / subject_id / sample_id
