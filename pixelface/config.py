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
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from kernels.decode import DecodeParams
from kernels.depth import DepthParams
from kernels.fusion import FusionParams
from kernels.gridmesh import GridMeshParams
from kernels.landmarks import LandmarkParams
from kernels.meshing import MeshingParams
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
    dask_local_directory: str = Field("work/dask", description="Dask scratch space of a LocalCluster.")
    prefect_home: str = Field("work/prefect", description="PREFECT_HOME when the environment does not set it.")
    stages: StageParams = Field(default_factory=StageParams)


class BuildOptions(_Frozen):
    """What one subject flow run needs (a reference-only parameter: well below Prefect's 512 kB cap)."""

    raw: str
    store: str
    build_id: str = ""
    stages: StageParams = Field(default_factory=StageParams)

    @classmethod
    def from_config(cls, cfg: BuildConfig, build_id: str = "") -> "BuildOptions":
        return cls(raw=cfg.raw, store=cfg.store, build_id=build_id, stages=cfg.stages)


class Config(_Frozen):
    """Root of the configuration tree."""

    synth: SynthConfig = Field(default_factory=SynthConfig)
    build: BuildConfig = Field(default_factory=BuildConfig)


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
