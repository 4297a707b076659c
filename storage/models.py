"""Dataset-level outputs in the store: data matrices, morphable models, evaluations.

Layout (next to ``arrays/`` and ``tables/``, see :mod:`storage.store`)::

    STORE/
      models/<model_id>/                    published by one rename when complete
          card.json                         model card (counts, variance, inputs, code version, parameters)
          model.zarr/                       Zarr v3 group: mean, shape_basis, shape_variance, ...
          model.npz                         the same arrays for numpy users (no pickles)
          ply/mean.ply, ply/shape_00_plus3.ply, ...   the mean and +/-3 sigma of the first modes
      models/.work/<model_id>/<name>.zarr   data matrices the reduce flow streams (rows = samples)
      evaluations/<eval_id>/                published by one rename when complete
          card.json                         what was evaluated, with which model and parameters
          <table>.parquet                   result tables (one row per sample x variant, summaries, ...)

Ids are content-derived by the callers (a hash of the inputs' keys and the parameters), so a
rerun with the same inputs finds the same folder. Nothing here is unpickled: ``np.load`` runs
with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage._publish import publish_dir
from storage.ids import check_id

MODELS_DIR = "models"
EVALS_DIR = "evaluations"
WORK_DIR = ".work"
CARD_NAME = "card.json"


def _root(store_url: str | os.PathLike) -> Path:
    s = os.fspath(store_url)
    if "://" in s and not s.startswith("file://"):
        raise ValueError(f"store {s!r}: models and evaluations need a local store")
    root = Path(s.removeprefix("file://")).resolve()
    if not (root / "store-format.json").exists():
        raise FileNotFoundError(f"no pixelface store at {root} (missing store-format.json)")
    return root


def _staging(parent: Path) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".tmp-{os.getpid()}-{uuid.uuid4().hex}"
    tmp.mkdir()
    return tmp


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, datetime):
        return o.isoformat()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _write_json(path: Path, obj: Mapping) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True, default=_json_default) + "\n")


# -- data matrices -------------------------------------------------------------------------------

def matrix_path(store_url: str | os.PathLike, model_id: str, name: str) -> Path:
    """Where the data matrix ``name`` of model ``model_id`` lives (``models/.work/<id>/<name>.zarr``)."""
    check_id(model_id, "model")
    check_id(name, "matrix")
    return _root(store_url) / MODELS_DIR / WORK_DIR / model_id / f"{name}.zarr"


def create_matrix(path: Path, shape: tuple[int, int], chunks: tuple[int, int]):
    """A new float32 Zarr array (overwriting a leftover of an interrupted run) for rows of samples."""
    import zarr

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        shutil.rmtree(path)
    return zarr.create_array(store=str(path), shape=tuple(int(s) for s in shape), dtype="float32",
                             chunks=tuple(int(c) for c in chunks), overwrite=True)


def open_matrix(path: Path):
    """A data matrix, read-only (``zarr.Array``; ``dask.array.from_zarr`` streams it)."""
    import zarr

    if not Path(path).exists():
        raise FileNotFoundError(f"no data matrix at {path}")
    return zarr.open_array(store=str(path), mode="r")


def open_matrix_for_write(path: Path):
    """An existing data matrix opened for writing rows (writers must cover whole row chunks)."""
    import zarr

    if not Path(path).exists():
        raise FileNotFoundError(f"no data matrix at {path}")
    return zarr.open_array(store=str(path), mode="r+")


def remove_work(store_url: str | os.PathLike, model_id: str) -> None:
    """Delete the data matrices of a model (after it is published)."""
    check_id(model_id, "model")
    shutil.rmtree(_root(store_url) / MODELS_DIR / WORK_DIR / model_id, ignore_errors=True)


# -- PLY -----------------------------------------------------------------------------------------

def write_ply(path: str | os.PathLike, vertices: np.ndarray, faces: np.ndarray,
              scalars: np.ndarray | None = None) -> None:
    """Binary little-endian PLY: float32 vertices, int32 triangles, optional per-vertex float ``quality``."""
    V = np.ascontiguousarray(vertices, dtype="<f4")
    F = np.ascontiguousarray(faces, dtype="<i4")
    if V.ndim != 2 or V.shape[1] != 3 or F.ndim != 2 or F.shape[1] != 3:
        raise ValueError(f"write_ply {path}: expected (n, 3) vertices and (m, 3) faces, got {V.shape}, {F.shape}")
    head = ["ply", "format binary_little_endian 1.0", f"element vertex {len(V)}",
            "property float x", "property float y", "property float z"]
    if scalars is not None:
        S = np.ascontiguousarray(scalars, dtype="<f4").reshape(-1)
        if len(S) != len(V):
            raise ValueError(f"write_ply {path}: {len(S)} scalars for {len(V)} vertices")
        head.append("property float quality")
        vdata = np.empty(len(V), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("q", "<f4")])
        vdata["x"], vdata["y"], vdata["z"], vdata["q"] = V[:, 0], V[:, 1], V[:, 2], S
    else:
        vdata = V
    head += [f"element face {len(F)}", "property list uchar int vertex_indices", "end_header"]
    fdata = np.empty(len(F), dtype=[("n", "u1"), ("i", "<i4", (3,))])
    fdata["n"], fdata["i"] = 3, F
    with open(path, "wb") as f:
        f.write(("\n".join(head) + "\n").encode("ascii"))
        f.write(vdata.tobytes())
        f.write(fdata.tobytes())


def read_ply_binary(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read back a PLY written by :func:`write_ply` (vertices float64, faces int64)."""
    data = Path(path).read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    head = data[:end].decode("ascii").splitlines()
    nv = int(next(h for h in head if h.startswith("element vertex")).split()[-1])
    nf = int(next(h for h in head if h.startswith("element face")).split()[-1])
    nprop = sum(1 for h in head if h.startswith("property float"))
    V = np.frombuffer(data, dtype="<f4", count=nv * nprop, offset=end).reshape(nv, nprop)[:, :3]
    off = end + nv * nprop * 4
    rec = np.frombuffer(data, dtype=[("n", "u1"), ("i", "<i4", (3,))], count=nf, offset=off)
    if nf and not np.all(rec["n"] == 3):
        raise ValueError(f"{path}: not a triangle mesh")
    return V.astype(np.float64), rec["i"].astype(np.int64)


# -- models --------------------------------------------------------------------------------------

def model_dir(store_url: str | os.PathLike, model_id: str) -> Path:
    check_id(model_id, "model")
    return _root(store_url) / MODELS_DIR / model_id


def publish_model(store_url: str | os.PathLike, model_id: str, arrays: Mapping[str, np.ndarray], card: Mapping,
                  meshes: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> Path:
    """Write a model (Zarr group + npz + PLY files + card) and publish it by one rename.

    ``arrays`` are numeric arrays (no objects); ``meshes`` maps a file stem to (vertices,
    faces). An existing model of the same id is replaced atomically (same inputs, same id).
    """
    import zarr

    final = model_dir(store_url, model_id)
    tmp = _staging(final.parent)
    try:
        g = zarr.open_group(store=str(tmp / "model.zarr"), mode="w")
        clean = {}
        for name, a in arrays.items():
            a = np.asarray(a)
            if a.dtype == object:
                raise ValueError(f"model {model_id}: array {name!r} has dtype object")
            clean[name] = a
            if a.dtype.kind == "U":   # text (e.g. part names): a group attribute, Zarr v3 has no string spec
                g.attrs[name] = [str(x) for x in a.reshape(-1)]
                continue
            arr = g.create_array(name, shape=a.shape, dtype=a.dtype, overwrite=True)
            arr[...] = a
        np.savez(tmp / "model.npz", **clean)
        if meshes:
            (tmp / "ply").mkdir()
            for stem, (V, F) in meshes.items():
                check_id(stem, "mesh name")
                write_ply(tmp / "ply" / f"{stem}.ply", V, F)
        _write_json(tmp / CARD_NAME, {"model_id": model_id, **card,
                                      "published_at": datetime.now(timezone.utc).isoformat()})
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_model(store_url: str | os.PathLike, model_id: str | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Arrays and card of a model (``model_id=None``: the most recently published one)."""
    if model_id is None:
        model_id = _newest(list_models(store_url), store_url, "model", "pixelface model")
    d = model_dir(store_url, model_id)
    if not (d / CARD_NAME).exists():
        raise FileNotFoundError(f"no model {model_id!r} in the store {store_url}")
    card = json.loads((d / CARD_NAME).read_text())
    with np.load(d / "model.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, card


def _published(base: Path) -> list[str]:
    """Folder names under ``base`` holding a card, oldest first (by the card's ``published_at``)."""
    if not base.exists():
        return []
    out = []
    for d in base.iterdir():
        c = d / CARD_NAME
        if d.name.startswith(".") or not c.exists():
            continue
        out.append((json.loads(c.read_text()).get("published_at", ""), d.name))
    return [name for _, name in sorted(out)]


def _newest(ids: list[str], store_url, what: str, command: str) -> str:
    if not ids:
        raise FileNotFoundError(f"no {what} in the store {store_url} (run `{command}` first)")
    return ids[-1]


def list_models(store_url: str | os.PathLike) -> list[str]:
    """Published model ids, oldest first (by the card's ``published_at``)."""
    return _published(_root(store_url) / MODELS_DIR)


# -- evaluations ---------------------------------------------------------------------------------

def evaluation_dir(store_url: str | os.PathLike, eval_id: str) -> Path:
    check_id(eval_id, "evaluation")
    return _root(store_url) / EVALS_DIR / eval_id


def publish_evaluation(store_url: str | os.PathLike, eval_id: str, tables: Mapping[str, pa.Table],
                       card: Mapping) -> Path:
    """Write evaluation tables (Parquet) + card and publish them by one rename."""
    final = evaluation_dir(store_url, eval_id)
    tmp = _staging(final.parent)
    try:
        for name, t in tables.items():
            check_id(name, "table")
            pq.write_table(t, tmp / f"{name}.parquet", compression="zstd")
        _write_json(tmp / CARD_NAME, {"eval_id": eval_id, **card, "tables": sorted(tables),
                                      "published_at": datetime.now(timezone.utc).isoformat()})
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def list_evaluations(store_url: str | os.PathLike) -> list[str]:
    """Published evaluation ids, oldest first."""
    return _published(_root(store_url) / EVALS_DIR)


def read_evaluation(store_url: str | os.PathLike, eval_id: str | None = None) -> tuple[dict[str, pa.Table], dict]:
    """Tables and card of an evaluation (``None``: the most recently published one)."""
    if eval_id is None:
        eval_id = _newest(list_evaluations(store_url), store_url, "evaluation", "pixelface evaluate")
    d = evaluation_dir(store_url, eval_id)
    card = json.loads((d / CARD_NAME).read_text())
    tables = {name: pq.read_table(d / f"{name}.parquet") for name in card.get("tables", [])}
    return tables, card

