"""The one typed configuration tree of pixelface.

Defaults live in one place: the frozen parameter dataclasses next to the kernels that use
them (``FaceModelParams``, ``RigParams``, ``FringeParams``, ``PhotometryParams``, ...)
and the pydantic models below, which compose them. The tree is loaded once at the entry
point (:func:`load_config`: defaults <- optional YAML/TOML file <- command-line
overrides), validated, frozen and passed down. Nothing here reads the environment or
runs at import time.

``pixelface config`` prints the effective tree as YAML; that output is a valid config file.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from kernels.decode import DecodeParams
from kernels.depth import DepthParams
from kernels.fusion import FusionParams
from kernels.gridmesh import GridMeshParams
from kernels.landmarks import LandmarkParams
from kernels.meshing import MeshingParams
from kernels.registration import RegistrationParams
from kernels.synth.face import FaceModelParams
from kernels.synth.rig import RigParams
from kernels.synth.scanner import FringeParams, PhotometryParams
from kernels.texture import TextureParams


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SynthConfig(_Frozen):
    """The synthetic dataset: which subjects and expressions, and how they are scanned."""

    subjects: int = Field(8, ge=1, le=100_000, description="Number of synthetic subjects (ids S0000, S0001, ...).")
    expressions: int = Field(6, ge=1, le=22, description="Expressions per subject: the first K of the 22, neutral first.")
    neutral_subjects: int = Field(0, ge=0, le=100_000,
                                  description="Further subjects (ids after the first `subjects`) captured in the neutral "
                                              "expression only: identity data for the shape model, which the paper "
                                              "builds from many more neutral scans than the expression model's subjects.")
    seed: int = Field(0, ge=0, description="Top-level seed; every random draw derives from it and the ids involved.")
    mesh_vertices: int = Field(150_000, ge=2_000, le=2_000_000,
                               description="Vertex count of the ground-truth face mesh that is scanned.")
    eval_fraction: float = Field(0.25, ge=0.0, le=1.0,
                                 description="Share of subjects in the eval split (by a hash of the subject id).")
    png_compress_level: int = Field(1, ge=0, le=9, description="zlib level of the PNG files (1: fast).")
    face: FaceModelParams = Field(default_factory=FaceModelParams, description="Synthetic face generator.")
    rig: RigParams = Field(default_factory=RigParams, description="Camera groups, lenses and calibration error.")
    fringe: FringeParams = Field(default_factory=FringeParams, description="Phase-shifting patterns.")
    photometry: PhotometryParams = Field(default_factory=PhotometryParams,
                                         description="Light, albedo response, noise, annotator noise.")


class TemplateConfig(_Frozen):
    """The registration template: the synthetic mean face (default) or a user template from files."""

    n_vertices: int = Field(25_000, ge=1_000, le=500_000,
                            description="Vertices of the default template (the mean face cropped to the scanned region).")
    margin_deg: float = Field(12.0, ge=10.0, le=30.0,
                              description="Default template: margin around the face region (degrees in theta, phi).")
    mesh: str | None = Field(None, description="User template mesh (PLY/OBJ, mm); needs `landmarks` and `parts`.")
    landmarks: str | None = Field(None, description="User template landmarks (JSON, docs/registration.md).")
    parts: str | None = Field(None, description="User template part labels (JSON, docs/registration.md).")
    jaw: str | None = Field(None, description="Optional jaw rig of a user template (JSON, docs/registration.md); "
                                              "without it the jaw stage is skipped.")
    sha256: str | None = Field(None, description="Hash of the user files; set by the build, part of the "
                                                 "stage key (do not set by hand).")

    @model_validator(mode="after")
    def _all_or_none(self):
        given = [x is not None for x in (self.mesh, self.landmarks, self.parts)]
        if any(given) and not all(given):
            raise ValueError("template: give all of mesh, landmarks and parts, or none (default template)")
        if self.jaw is not None and self.mesh is None:
            raise ValueError("template: a jaw file belongs to a user template (give mesh, landmarks and parts too)")
        return self


class RegistrationStageParams(_Frozen):
    """Registration to the template (sample level): which template, and the kernel's parameters."""

    template: TemplateConfig = Field(default_factory=TemplateConfig)
    registration: RegistrationParams = Field(default_factory=RegistrationParams,
                                             description="Landmark similarity + per-part NICP.")
    seed: int = Field(0, ge=0, description="Seed of the landmark RANSAC.")


class StageParams(_Frozen):
    """Parameters of every stage (each stage's artifact key hashes only its own entry)."""

    decode: DecodeParams = Field(default_factory=DecodeParams, description="Phase decoding and triangulation.")
    depth: DepthParams = Field(default_factory=DepthParams, description="RGB-aligned depth image.")
    texture: TextureParams = Field(default_factory=TextureParams, description="Per-point colour (occlusion test).")
    mesh: GridMeshParams = Field(default_factory=GridMeshParams, description="Per-view grid mesh.")
    landmarks: LandmarkParams = Field(default_factory=LandmarkParams, description="2D -> 3D landmark lifting.")
    fusion: FusionParams = Field(default_factory=FusionParams, description="Multi-view fusion (sample level).")
    surface: MeshingParams = Field(default_factory=MeshingParams,
                                   description="CVT surface mesh of the fused cloud (sample level).")
    registration: RegistrationStageParams = Field(default_factory=RegistrationStageParams,
                                                  description="Template registration (sample level).")


class BuildConfig(_Frozen):
    """A dataset build: where from, where to, on what cluster, with which stage parameters."""

    raw: str = Field("work/raw", description="Raw capture root (docs/raw-format.md).")
    store: str = Field("work/store", description="Store root: local path or fsspec URL (only local is tested).")
    subjects: list[str] | None = Field(None, description="Subject ids to build (default: all in the raw root).")
    dask_address: str | None = Field(None, description="tcp://HOST:PORT of an existing Dask scheduler; "
                                                       "default: a LocalCluster sized to the machine.")
    workers: int | None = Field(None, ge=1, le=1024, description="LocalCluster worker processes "
                                                                 "(default: CPU count).")
    threads_per_worker: int = Field(1, ge=1, le=64, description="Threads per LocalCluster worker.")
    max_concurrent_subjects: int | None = Field(None, ge=1, le=4096,
                                                description="Subject flow runs in flight (default 2 x workers).")
    register_from_neutral: bool = Field(
        True, description="Register each expression sample from the same subject's neutral registration "
                          "(kernels.registration.StartParams; docs/registration.md): the neutral sample runs "
                          "first, the others then start; a subject without a (successful) neutral sample is "
                          "registered from the template. Off: every sample from the template's mean face, "
                          "as the paper does.")
    neutral_expression: str = Field("neutral", description="Expression name of a subject's neutral sample.")
    subject_heartbeat_s: int | None = Field(
        None, ge=30, description="Prefect heartbeat interval of the subject flow runs (seconds; None: none). "
                                 "The build-dataset run keeps Prefect's own setting. Prefect's flow engine waits "
                                 "up to 1 s for its heartbeat thread when a flow run ends: ~1 s per subject "
                                 "(docs/orchestration.md).")
    dask_local_directory: str = Field("work/dask", description="Dask scratch space of a LocalCluster.")
    prefect_home: str = Field("work/prefect", description="PREFECT_HOME when the environment does not set it.")
    stages: StageParams = Field(default_factory=StageParams)


def with_template_hash(cfg: "BuildConfig") -> "BuildConfig":
    """``cfg`` with ``stages.registration.template.sha256`` set from a user template's files (no-op for the
    default template): the hash is part of the registration stage's key, so changed files give new keys."""
    t = cfg.stages.registration.template
    if t.mesh is None:
        return cfg
    from storage.template_io import template_files_sha256

    sha = template_files_sha256(t.mesh, t.landmarks, t.parts, jaw_path=t.jaw)
    reg = cfg.stages.registration.model_copy(update={"template": t.model_copy(update={"sha256": sha})})
    return cfg.model_copy(update={"stages": cfg.stages.model_copy(update={"registration": reg})})


class BuildOptions(_Frozen):
    """What one subject flow run needs (a reference-only parameter: well below Prefect's 512 kB cap)."""

    raw: str
    store: str
    build_id: str = ""
    stages: StageParams = Field(default_factory=StageParams)
    register_from_neutral: bool = True
    neutral_expression: str = "neutral"

    @classmethod
    def from_config(cls, cfg: BuildConfig, build_id: str = "") -> "BuildOptions":
        return cls(raw=cfg.raw, store=cfg.store, build_id=build_id, stages=cfg.stages,
                   register_from_neutral=cfg.register_from_neutral, neutral_expression=cfg.neutral_expression)


class ModelConfig(_Frozen):
    """The reduce flow (``pixelface model``): a PCA morphable model from the registrations in a store."""

    shape_components: int = Field(199, ge=1, le=5000, description="Shape components (fewer when the data's rank is lower).")
    expression_components: int = Field(99, ge=1, le=5000,
                                       description="Expression components (fewer when the data's rank is lower).")
    variance_target: float = Field(0.99, gt=0.0, le=1.0, description="Reported: components needed for this share.")
    pca_precision: Literal["double", "mixed"] = Field(
        "mixed", description="Exact PCA arithmetic (kernels.pca.pca_from_blocks): 'mixed' = float32 Gram matrix + a "
                             "certified float64 Rayleigh-Ritz step (falls back to 'double' when not certified); "
                             "'double' = float64 Gram matrix.")
    neutral_expression: str = Field("neutral", description="Expression name of the neutral scans.")
    row_block: int = Field(64, ge=1, le=4096, description="Rows (samples) per chunk of the data matrices.")
    column_block: int = Field(8192, ge=256, le=1 << 22, description="Columns per chunk of the data matrices.")
    specificity_samples: int = Field(200, ge=1, le=100_000, description="Random model instances for specificity.")
    generalisation_components: int = Field(40, ge=1, le=5000,
                                           description="Largest component count of the generalisation curve.")
    ply_modes: int = Field(3, ge=0, le=20, description="First modes exported as +/-3 sigma PLY files.")
    seed: int = Field(0, ge=0, description="Seed of the random model instances (specificity).")


class EvaluateConfig(_Frozen):
    """The evaluation flow (``pixelface evaluate``): 3DMM fitting to the eval split, NME and ARMSE."""

    radii: tuple[float, ...] = Field((0.6, 0.7, 0.8, 0.9, 1.0), description="ARMSE crop radii (interocular = 1).")
    subset_fraction: float = Field(0.2, gt=0.0, lt=1.0,
                                   description="Share of training subjects of the reduced models (Table 2).")
    seed: int = Field(0, ge=0, description="Seed of the training-subject subset.")
    age_groups: tuple[tuple[int, int], ...] = Field(((18, 30), (31, 45), (46, 60), (61, 80)),
                                                    description="Inclusive age ranges of the breakdown.")
    max_samples: int | None = Field(None, ge=1, description="Evaluate at most this many eval-split samples.")
    fit_landmark_weight: float = Field(
        10.0, ge=0.0, description="kernels.fitting.FitParams.dense_landmark_weight of the fits: one fused landmark's "
                                  "squared residual against one model vertex's squared distance (docs/evaluation.md).")


class Config(_Frozen):
    """Root of the configuration tree."""

    synth: SynthConfig = Field(default_factory=SynthConfig)
    build: BuildConfig = Field(default_factory=BuildConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML (``.yaml``/``.yml``), TOML (``.toml``) or JSON file into a dict."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ValueError(f"config file {p}: cannot read ({exc.strerror})") from None
    try:
        if p.suffix == ".toml":
            data = tomllib.loads(text)
        elif p.suffix == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text) or {}
    except (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"config file {p}: not valid {p.suffix or 'YAML'}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {p}: the top level must be a mapping")
    return data


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Build the validated, frozen configuration.

    Parameters
    ----------
    path : path, optional
        A YAML/TOML/JSON file with any subset of the tree.
    overrides : dict, optional
        A nested dict applied last (e.g. from command-line options).

    Raises
    ------
    ValueError
        For unreadable files; ``pydantic.ValidationError`` (a ValueError) for bad values,
        naming the field path.
    """
    data: dict[str, Any] = read_config_file(path) if path else {}
    if overrides:
        data = _deep_merge(data, overrides)
    return Config.model_validate(data)


def dump_config(cfg: Config) -> str:
    """YAML text of the whole tree (valid input for :func:`load_config`)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
