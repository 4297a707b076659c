"""Tasks of the reduce flow (``flows/model.py``): pick the registrations, stream them into data
matrices, run the exact PCA out of core, measure the model, publish it.

The registrations come from the catalog (the newest completed ``registration`` row of each
sample) joined with the ``samples`` (expression) and ``subjects`` (split, age) tables. Rows of
the data matrices are flattened registered meshes (x0, y0, z0, x1, ...; mm, float32):

* **shape**: one neutral registration per training subject. A subject with several neutral
  samples contributes the first by sample id (deterministic; the others are listed in the card
  as unused);
* **expression**: ``expression - neutral`` of the same subject, for every other sample of a
  training subject that has a neutral; the expressions of a subject without a neutral are
  skipped and listed.

Heavy work runs on the build's Dask cluster (a ``distributed.Client`` the flow passes in): the
matrices are filled by row blocks in parallel (each block writes whole chunks), and the PCA
streams column blocks (:mod:`tasks.pca`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Sequence

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from storage.keys import ArtifactRef
from storage.store import open_store

REGISTRATION_STAGE = "registration"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RegRef(_Frozen):
    """One registration artifact and what it is."""

    subject: str
    sample: str
    key: str
    expression: str | None
    category: str | None
    split: str | None
    age: int | None
    gender: str | None

    @property
    def ref(self) -> ArtifactRef:
        return ArtifactRef(REGISTRATION_STAGE, self.subject, self.sample, None, self.key)


class ModelInputs(_Frozen):
    """The registrations a model is built from, and those it is evaluated on."""

    param_hash: str
    train_neutral: tuple[RegRef, ...]
    train_expression: tuple[tuple[RegRef, RegRef], ...]
    """(expression sample, the same subject's neutral)."""
    eval_neutral: tuple[RegRef, ...]
    eval_expression: tuple[tuple[RegRef, RegRef], ...]
    unused_neutral: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    """``subject/sample`` of expressions skipped because their subject has no neutral registration."""

    def input_id(self, params: dict, code_version: str) -> str:
        """Content id of a model built from these inputs with ``params``."""
        body = json.dumps({"keys": sorted(r.key for r in (*self.train_neutral, *(e for e, _ in self.train_expression))),
                           "params": params, "code": code_version, "reg": self.param_hash}, sort_keys=True)
        return "m" + hashlib.blake2b(body.encode(), digest_size=10).hexdigest()


class TopologyError(ValueError):
    """Registrations of different templates (or template parameters) cannot share one model."""


def select_inputs(store: str, neutral_expression: str = "neutral") -> ModelInputs:
    """Read the catalog and split the completed registrations into model inputs.

    Raises
    ------
    ValueError
        No completed registration in the store.
    TopologyError
        Registrations made with different registration parameters / templates.
    """
    cat = open_store(store, create=False).catalog
    runs = cat.latest("stage_runs").to_pylist()
    samples = {(r["subject_id"], r["sample_id"]): r for r in cat.latest("samples").to_pylist()}
    subjects = {r["subject_id"]: r for r in cat.latest("subjects").to_pylist()}
    regs = [r for r in runs if r["stage"] == REGISTRATION_STAGE and r["status"] == "completed" and r["artifact_key"]]
    if not regs:
        raise ValueError(f"store {store}: no completed registration (run `pixelface build` with the registration "
                         "stage first)")
    hashes: dict[str, list[str]] = {}
    for r in regs:
        hashes.setdefault(r["param_hash"] or "", []).append(f"{r['subject_id']}/{r['sample_id']}")
    if len(hashes) > 1:
        parts = "; ".join(f"{h[:12]}: {len(v)} samples (e.g. {v[0]})" for h, v in sorted(hashes.items()))
        raise TopologyError(f"store {store}: registrations were made with {len(hashes)} different templates or "
                            f"registration parameters ({parts}); rebuild them with one configuration")
    refs = []
    for r in regs:
        s = samples.get((r["subject_id"], r["sample_id"]), {})
        subj = subjects.get(r["subject_id"], {})
        refs.append(RegRef(subject=r["subject_id"], sample=r["sample_id"], key=r["artifact_key"],
                           expression=s.get("expression"), category=s.get("category"), split=subj.get("split"),
                           age=subj.get("age"), gender=subj.get("gender")))
    refs.sort(key=lambda x: (x.subject, x.sample))
    by_subject: dict[str, list[RegRef]] = {}
    for x in refs:
        by_subject.setdefault(x.subject, []).append(x)
    out = {"train": ([], []), "eval": ([], [])}
    unused, skipped = [], []
    for subject, rs in sorted(by_subject.items()):
        split = "eval" if rs[0].split == "eval" else "train"
        neutrals = [x for x in rs if x.expression == neutral_expression]
        if not neutrals:
            skipped += [f"{x.subject}/{x.sample}" for x in rs]
            continue
        n0 = neutrals[0]
        unused += [f"{x.subject}/{x.sample}" for x in neutrals[1:]]
        out[split][0].append(n0)
        out[split][1].extend((x, n0) for x in rs if x.expression != neutral_expression)
    return ModelInputs(param_hash=next(iter(hashes)), train_neutral=tuple(out["train"][0]),
                       train_expression=tuple(out["train"][1]), eval_neutral=tuple(out["eval"][0]),
                       eval_expression=tuple(out["eval"][1]), unused_neutral=tuple(unused), skipped=tuple(skipped))


def read_registration(store: str, r: RegRef) -> np.ndarray:
    """(n, 3) float64 registered vertices of one sample."""
    return open_store(store, create=False).artifacts.read(r.ref, ["vertices"])["vertices"].astype(np.float64)


def _fill_block(store: str, path: str, i0: int, rows: Sequence[tuple[RegRef, RegRef | None]], n_cols: int) -> int:
    """Write rows ``i0 ..`` of the matrix at ``path``: ``a - b`` (or ``a``) flattened (runs on a Dask worker)."""
    from pathlib import Path

    from storage.models import open_matrix_for_write

    block = np.empty((len(rows), n_cols), np.float32)
    for j, (a, b) in enumerate(rows):
        v = read_registration(store, a)
        if b is not None:
            v = v - read_registration(store, b)
        if v.size != n_cols:
            raise TopologyError(f"registration {a.subject}/{a.sample} has {v.size // 3} vertices, expected "
                                f"{n_cols // 3} (another template?)")
        block[j] = v.reshape(-1)
    open_matrix_for_write(Path(path))[i0:i0 + len(rows)] = block
    return len(rows)


@task(name="gather-matrix", cache_policy=NO_CACHE, persist_result=False)
def gather_matrix(store: str, model_id: str, name: str, rows: Sequence[tuple[RegRef, RegRef | None]],
                  n_vertices: int, row_block: int, column_block: int, client) -> str:
    """Fill the data matrix ``name`` (one row per entry of ``rows``) on the Dask cluster; returns its path."""
    from storage.models import create_matrix, matrix_path

    path = matrix_path(store, model_id, name)
    n_cols = 3 * n_vertices
    create_matrix(path, (len(rows), n_cols), (row_block, min(column_block, n_cols)))
    futures = [client.submit(_fill_block, store, str(path), i0, list(rows[i0:i0 + row_block]), n_cols, pure=False)
               for i0 in range(0, len(rows), row_block)]
    done = client.gather(futures)
    if sum(done) != len(rows):
        raise RuntimeError(f"matrix {name}: {sum(done)} of {len(rows)} rows written")
    return str(path)


# -- the model --------------------------------------------------------------------------------------

def _rows(pairs) -> list[tuple[RegRef, RegRef | None]]:
    return [(p, None) if isinstance(p, RegRef) else (p[0], p[1]) for p in pairs]


def _pca(path: str, k: int, center: bool, precision: str):
    import dask.array as da

    from storage.models import open_matrix
    from tasks.pca import exact_pca_dask

    return exact_pca_dask(da.from_zarr(open_matrix(path)), k, center=center, precision=precision)


def _matrix(path: str):
    from storage.models import open_matrix

    return open_matrix(path)


def _part_card(res, rows: int) -> dict:
    return {"n_samples": rows, "n_components": int(res.n_components), "n_requested": int(res.n_requested),
            "n_components_99": res.n_components_99, "explained_ratio": [float(x) for x in res.explained_ratio],
            "variances_mm2": [float(x) for x in res.variances], "total_variance_mm2": float(res.total_variance),
            "truncated_reason": res.truncated_reason, "solver": res.solver}


def build_or_reuse_model(store: str, cfg, registration_params, code_version: str, client, *,
                         shape_subjects: Sequence[str] | None = None,
                         expression_subjects: Sequence[str] | None = None, label: str = "full") -> dict:
    """Select inputs, gather matrices, PCA, quality, publish (or find the published model).

    ``cfg`` is a :class:`pixelface.config.ModelConfig`; ``registration_params`` the
    :class:`pixelface.config.RegistrationStageParams` the registrations were made with (its
    template gives the model's triangles, landmarks and parts; its hash must match theirs).
    ``shape_subjects`` / ``expression_subjects`` restrict the training subjects of each part
    (the reduced models of the evaluation); ``label`` names the variant in the card.
    """
    from storage.keys import params_hash
    from storage.models import model_dir, publish_model, read_model, remove_work
    from tasks.sample_stages import load_template

    inputs = select_inputs(store, cfg.neutral_expression)
    expected = params_hash(registration_params)
    if inputs.param_hash != expected:
        raise TopologyError(f"store {store}: the registrations were made with registration parameters "
                            f"{inputs.param_hash[:12]}, the configuration gives {expected[:12]}; pass the "
                            "configuration (--config) the build used")
    if len(inputs.train_neutral) < 2:
        raise ValueError(f"store {store}: {len(inputs.train_neutral)} training subject(s) with a neutral registration; "
                         "a shape model needs at least 2")
    template = load_template(registration_params.template)
    n_vertices = template.n_vertices
    if shape_subjects is not None or expression_subjects is not None:
        keep_s = set(shape_subjects) if shape_subjects is not None else None
        keep_e = set(expression_subjects) if expression_subjects is not None else None
        inputs = inputs.model_copy(update={
            "train_neutral": tuple(r for r in inputs.train_neutral if keep_s is None or r.subject in keep_s),
            "train_expression": tuple(p for p in inputs.train_expression if keep_e is None or p[0].subject in keep_e)})
        if len(inputs.train_neutral) < 2:
            raise ValueError(f"model {label}: {len(inputs.train_neutral)} training subject(s) in the subset; a shape "
                             "model needs at least 2")
    model_id = inputs.input_id({**cfg.model_dump(mode="json"), "label": label}, code_version)
    if (model_dir(store, model_id) / "card.json").exists():
        _, card = read_model(store, model_id)
        return {"model_id": model_id, "path": str(model_dir(store, model_id)), "reused": True, "card": card}

    shape_rows, expr_rows = _rows(inputs.train_neutral), _rows(inputs.train_expression)
    eval_shape_rows, eval_expr_rows = _rows(inputs.eval_neutral), _rows(inputs.eval_expression)
    gather = lambda name, rows: gather_matrix.fn(store, model_id, name, rows, n_vertices, cfg.row_block,  # noqa: E731
                                                 cfg.column_block, client)
    shape_path = gather("shape", shape_rows)
    shape = _pca(shape_path, cfg.shape_components, center=True, precision=cfg.pca_precision)
    expr = None
    if len(expr_rows) >= 1:
        expr_path = gather("expression", expr_rows)
        expr = _pca(expr_path, cfg.expression_components, center=False, precision=cfg.pca_precision)
    quality = model_quality(store, model_id, cfg, shape, expr, shape_path,
                            gather("eval_shape", eval_shape_rows) if eval_shape_rows else None,
                            gather("eval_expression", eval_expr_rows) if eval_expr_rows else None)

    import numpy as np

    mean = shape.mean.reshape(-1, 3)
    E = expr.components if expr is not None else np.zeros((3 * n_vertices, 0))
    ev = expr.variances if expr is not None else np.zeros(0)
    arrays = {"mean": mean, "shape_basis": shape.components, "shape_variance": shape.variances,
              "expression_basis": E, "expression_variance": ev, "faces": template.faces.astype(np.int32),
              "landmark_faces": template.landmark_faces, "landmark_bary": template.landmark_bary,
              "parts": template.parts.astype(np.uint8), "part_names": np.array(template.part_names, dtype="U32")}
    meshes = {"mean": (mean, template.faces)}
    for name, res in (("shape", shape), ("expression", expr)):
        if res is None:
            continue
        for i in range(min(cfg.ply_modes, res.n_components)):
            d = 3.0 * np.sqrt(res.variances[i]) * res.components[:, i].reshape(-1, 3)
            meshes[f"{name}_{i:02d}_plus3sd"] = (mean + d, template.faces)
            meshes[f"{name}_{i:02d}_minus3sd"] = (mean - d, template.faces)
    card = {
        "code_version": code_version, "parameters": cfg.model_dump(mode="json"), "label": label,
        "registration_param_hash": inputs.param_hash, "n_vertices": n_vertices,
        "template": registration_params.template.model_dump(mode="json"),
        "shape": _part_card(shape, len(shape_rows)),
        "expression": _part_card(expr, len(expr_rows)) if expr is not None else
        {"n_samples": 0, "n_components": 0, "n_requested": cfg.expression_components, "n_components_99": None,
         "explained_ratio": [], "variances_mm2": [], "total_variance_mm2": 0.0,
         "truncated_reason": "no expression registration of a training subject with a neutral", "solver": ""},
        "inputs": {"shape": [f"{r.subject}/{r.sample}:{r.key}" for r, _ in shape_rows],
                   "expression": [f"{a.subject}/{a.sample}:{a.key}-{b.subject}/{b.sample}:{b.key}"
                                  for a, b in expr_rows],
                   "eval_shape": [f"{r.subject}/{r.sample}" for r, _ in eval_shape_rows],
                   "eval_expression": [f"{a.subject}/{a.sample}" for a, _ in eval_expr_rows]},
        "neutral_choice": "first neutral sample of a subject by sample id",
        "unused_neutral": list(inputs.unused_neutral), "skipped": list(inputs.skipped),
        "expression_centered": False, "quality": quality,
    }
    path = publish_model(store, model_id, arrays, card, meshes)
    remove_work(store, model_id)
    _, card = read_model(store, model_id)
    return {"model_id": model_id, "path": str(path), "reused": False, "card": card}


QUALITY_MAX_ROWS = 500
"""Quality measures read at most this many rows of a matrix into memory (a seeded subsample)."""


def _rows_sample(path: str, max_rows: int, seed: int) -> np.ndarray:
    z = _matrix(path)
    n = z.shape[0]
    idx = np.arange(n) if n <= max_rows else np.sort(np.random.default_rng(seed).choice(n, max_rows, replace=False))
    return np.asarray(z.oindex[idx, :], dtype=np.float64)


def _curve(c) -> dict:
    return {"n_components": [int(k) for k in c.n_components], "mean_mm": [float(x) for x in c.mean_mm],
            "std_mm": [float(x) for x in c.std_mm], "n_meshes": int(c.n_meshes)}


def specificity_grid(k_max: int) -> list[int]:
    """Component counts of the specificity curve: 1, 2, 5, 10, 20, 50, ... below ``k_max``, then ``k_max``.

    Specificity is an exhaustive nearest-mesh search per count (``n_samples * t * 3 v`` per
    count, ~2e10 at 100 samples, 600 meshes of 30k vertices), so the curve is sampled on a
    1-2-5 grid instead of at every count (the generalisation curve, incremental, has them all).
    ``k_max = 0`` (a model without components) gives ``[0]``.
    """
    if k_max <= 0:
        return [0]
    return [k for e in range(7) for k in (10 ** e, 2 * 10 ** e, 5 * 10 ** e) if k < k_max] + [k_max]


def model_quality(store: str, model_id: str, cfg, shape, expr, shape_path: str, eval_shape_path: str | None,
                  eval_expr_path: str | None) -> dict:
    """Compactness, generalisation (eval split) and specificity of the shape (and expression) model.

    Matrices larger than :data:`QUALITY_MAX_ROWS` rows are subsampled (seeded) for these
    measures only; the PCA itself always uses every row.
    """
    from kernels.model_quality import compactness, generalisation, specificity

    out: dict = {"max_rows": QUALITY_MAX_ROWS,
                 "shape_compactness": [float(x) for x in compactness(shape.variances, shape.total_variance)]}
    ks = sorted({0, *range(1, min(cfg.generalisation_components, shape.n_components) + 1)})
    if eval_shape_path is not None:
        g = generalisation(shape, _rows_sample(eval_shape_path, QUALITY_MAX_ROWS, cfg.seed), ks)
        out["shape_generalisation"] = _curve(g)
        out["shape_generalisation_mm"] = float(g.mean_mm[-1])
    train = _rows_sample(shape_path, QUALITY_MAX_ROWS, cfg.seed)
    sp = specificity(shape, train, specificity_grid(ks[-1]), n_samples=cfg.specificity_samples, rng=cfg.seed)
    out["shape_specificity"] = _curve(sp)
    out["shape_specificity_mm"] = float(sp.mean_mm[-1])
    if expr is not None:
        out["expression_compactness"] = [float(x) for x in compactness(expr.variances, expr.total_variance)]
        if eval_expr_path is not None:
            ke = sorted({0, *range(1, min(cfg.generalisation_components, expr.n_components) + 1)})
            g = generalisation(expr, _rows_sample(eval_expr_path, QUALITY_MAX_ROWS, cfg.seed), ke)
            out["expression_generalisation"] = _curve(g)
            out["expression_generalisation_mm"] = float(g.mean_mm[-1])
    return out
