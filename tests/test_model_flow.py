"""The dataset-level chain on a tiny real build: registration stage -> build-model -> evaluate.

One build of 6 subjects x 2 expressions at 160 x 128 (shared by the tests of this module), then
the reduce flow and the evaluation flow on a local Dask cluster under a Prefect test server.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone

import numpy as np
import pytest

from storage.store import open_store
from tests.test_build import build, cluster, config, harness, stage_params  # noqa: F401 (fixtures)

N_SUBJECTS, EXPRESSIONS = 6, 2


@pytest.fixture(scope="module")
def built(harness, cluster, tmp_path_factory):
    from flows.synthesize import synthesize
    from pixelface.config import load_config

    cfg = load_config(overrides={"synth": {"subjects": N_SUBJECTS, "expressions": EXPRESSIONS, "mesh_vertices": 20000,
                                           "eval_fraction": 0.34, "rig": {"width": 160, "height": 128}}})
    base = tmp_path_factory.mktemp("modelflow")
    raw = base / "raw"
    s = synthesize(cfg.synth, raw, base / "gt")
    assert 1 <= len(s.eval_subjects) <= N_SUBJECTS - 3, s.eval_subjects
    bcfg = config(raw, base / "store", cluster)
    summary = build(bcfg)
    assert summary.failed == 0
    return bcfg, s


def model_cfg(**kw):
    from pixelface.config import ModelConfig

    return ModelConfig(**{"specificity_samples": 20, **kw})


def test_model_from_registrations(built):
    from flows.model import build_model
    from kernels.model import MorphableModel, instance
    from storage.models import model_dir, read_model, read_ply_binary
    from tasks.evaluate import load_model

    bcfg, synth = built
    n_train = N_SUBJECTS - len(synth.eval_subjects)
    s = build_model(build=bcfg, model=model_cfg())
    assert not s.reused and s.n_shape_samples == n_train and s.n_expression_samples == n_train
    # too few subjects for 199 / 99 components: fewer, with the reason recorded
    assert s.n_shape_components == n_train - 1 and s.n_expression_components == n_train
    arrays, card = read_model(bcfg.store, s.model_id)
    assert "199" in card["shape"]["truncated_reason"] or "rank" in card["shape"]["truncated_reason"]
    assert card["n_vertices"] == arrays["mean"].shape[0]
    assert abs(sum(card["shape"]["explained_ratio"]) - 1.0) < 1e-6   # n - 1 components explain everything
    m = load_model(bcfg.store, s.model_id)
    assert isinstance(m, MorphableModel) and m.n_shape == n_train - 1
    # the mean is the mean of the neutral registrations it was built from
    st = open_store(bcfg.store, create=False)
    from storage.keys import ArtifactRef

    regs = []
    for entry in card["inputs"]["shape"]:
        where, key = entry.split(":")
        subj, samp = where.split("/")
        regs.append(st.artifacts.read(ArtifactRef("registration", subj, samp, None, key), ["vertices"])["vertices"])
    np.testing.assert_allclose(m.mean, np.mean(regs, axis=0), atol=1e-4)
    # a training registration is reproduced exactly by the full shape model (it is in the span)
    c = m.shape_basis.T @ (regs[0].astype(np.float64) - m.mean).reshape(-1)
    np.testing.assert_allclose(instance(m, c, None), regs[0], atol=1e-3)
    # exports: npz without pickles, PLY files of the mean and the first modes, a card
    d = model_dir(bcfg.store, s.model_id)
    with np.load(d / "model.npz", allow_pickle=False) as z:
        assert set(z.files) >= {"mean", "shape_basis", "shape_variance", "expression_basis", "faces", "parts"}
    V, F = read_ply_binary(d / "ply" / "mean.ply")
    np.testing.assert_allclose(V, m.mean, atol=1e-3)
    assert (d / "ply" / "shape_00_plus3sd.ply").exists()
    q = card["quality"]
    assert q["shape_generalisation_mm"] > 0 and q["shape_specificity_mm"] > 0
    from tasks.model import specificity_grid
    assert q["shape_specificity"]["n_components"] == specificity_grid(m.n_shape)  # 1-2-5 grid, then the largest
    assert specificity_grid(19) == [1, 2, 5, 10, 19] and specificity_grid(0) == [0]
    # a rerun on the same registrations finds the published model
    s2 = build_model(build=bcfg, model=model_cfg())
    assert s2.reused and s2.model_id == s.model_id


def _fake_rows(store, rows):
    cat = open_store(store, create=False).catalog
    now = datetime.now(timezone.utc)
    cat.append("stage_runs", [{"build_id": "test", "status": "completed", "outcome": "computed", "started_at": now,
                               "finished_at": now, **r} for r in rows])


def test_subject_without_neutral_is_skipped_and_listed(built, tmp_path):
    from tasks.model import select_inputs

    bcfg, synth = built
    store = tmp_path / "store"
    shutil.copytree(bcfg.store, store)
    before = select_inputs(str(store))
    victim = before.train_neutral[0]
    _fake_rows(store, [{"subject_id": victim.subject, "sample_id": victim.sample, "view_id": None,
                        "stage": "registration", "artifact_key": None, "status": "failed", "outcome": "failed",
                        "error": "ValueError: test"}])
    after = select_inputs(str(store))
    assert victim.subject not in {r.subject for r in after.train_neutral}
    assert len(after.train_neutral) == len(before.train_neutral) - 1
    skipped = [x for x in after.skipped if x.startswith(victim.subject + "/")]
    assert skipped and all(x.split("/")[1] != victim.sample for x in skipped)
    assert victim.subject not in {a.subject for a, _ in after.train_expression}


def test_registrations_of_another_template_are_refused(built, tmp_path):
    from tasks.model import TopologyError, select_inputs

    bcfg, _ = built
    store = tmp_path / "store"
    shutil.copytree(bcfg.store, store)
    r = select_inputs(str(store)).train_neutral[0]
    _fake_rows(store, [{"subject_id": r.subject, "sample_id": r.sample, "view_id": None, "stage": "registration",
                        "artifact_key": r.key, "param_hash": "0" * 40}])
    with pytest.raises(TopologyError, match="different templates"):
        select_inputs(str(store))


def test_evaluate_ranks_variants(built):
    from flows.evaluate import VARIANTS, evaluate
    from pixelface.config import EvaluateConfig
    from storage.models import read_evaluation

    bcfg, synth = built
    s = evaluate(build=bcfg, model=model_cfg(), evaluation=EvaluateConfig(subset_fraction=0.5))
    assert set(s.variants) == set(VARIANTS) and s.n_samples == len(synth.eval_subjects) * EXPRESSIONS
    assert s.n_failed_rows == 0
    tables, card = read_evaluation(bcfg.store, s.eval_id)
    rows = tables["per_sample"].to_pylist()
    assert len(rows) == s.n_samples * len(VARIANTS)
    for r in rows:
        assert r["nme"] is not None and 0 < r["nme"] < 0.1, r
        assert all(r[f"armse_{x:.1f}"] is not None and r[f"armse_{x:.1f}"] >= 0 for x in (0.6, 0.8, 1.0))
    by = {r["variant"]: r for r in tables["by_variant"].to_pylist()}
    assert by["full"]["armse_1.0"] <= by["both-20%"]["armse_1.0"] + 1e-9
    assert {r["age_group"] for r in tables["by_age_group"].to_pylist()} <= {"18-30", "31-45", "46-60", "61-80"}
    assert json.loads(json.dumps(card))["n_samples"] == s.n_samples
