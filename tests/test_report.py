"""The QC report (``pixelface report``): a fabricated store with catalog rows, registration artifacts, a
published model and evaluation -> one static index.html with readable PNGs, a correct Table 2 and the
failures; a store without model / evaluation still gets a report that says what is missing."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from flows.report import write_report
from storage.keys import ArtifactRef
from storage.models import publish_evaluation, publish_model
from storage.store import open_store

VIEWS = ("left", "middle", "right")
EXPRESSIONS = (("neutral", "neutral"), ("smile", "positive"), ("anger", "negative"))
SUBJECTS = {"S00": (25, "train"), "S01": (40, "train"), "S02": (55, "train"), "S03": (70, "train"),
            "S04": (28, "eval"), "S05": (63, "eval")}
VARIANTS = ("full", "shape-20%", "expression-20%", "both-20%")
RADII = (0.6, 0.7, 0.8, 0.9, 1.0)
DECODE_ERROR = "RawFormatError: S05/anger/right: fringe_03.png is truncated (1024 of 65536 bytes)"
OLD_ERROR = "ValueError: an old registration failure that a later build fixed"
EVAL_ERROR = "S04/anger (both-20%): fit diverged: 3 landmarks left"


def _key(*parts) -> str:
    import hashlib

    return hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=20).hexdigest()


def _grid_face(nu: int = 24, nv: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """A half ellipsoid facing +z (mm), counter-clockwise seen from the front."""
    th, ph = np.meshgrid(np.linspace(-1.3, 1.3, nu), np.linspace(-1.1, 1.0, nv))
    V = np.stack([75 * np.cos(ph) * np.sin(th), 100 * np.sin(ph), 95 * np.cos(ph) * np.cos(th)], -1).reshape(-1, 3)
    idx = np.arange(nu * nv).reshape(nv, nu)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    F = np.concatenate([np.stack([a, b, d], 1), np.stack([a, d, c], 1)]).astype(np.int32)
    return V, F


def _fabricate(root: Path, *, model: bool, evaluation: bool) -> dict:
    """A store with two builds' catalog rows, registration artifacts, optionally a model and an evaluation."""
    st = open_store(root)
    rng = np.random.default_rng(7)
    V, F = _grid_face()
    t_old = datetime.now(timezone.utc) - timedelta(days=1)
    cat = st.catalog
    cat.append("subjects", [dict(build_id="b-new", subject_id=s, gender="f", age=a, split=sp, n_samples=3,
                                 status="completed") for s, (a, sp) in SUBJECTS.items()])
    cat.append("samples", [dict(build_id="b-new", subject_id=s, sample_id=e, expression=e, category=c,
                                views=list(VIEWS), width=64, height=48, status="completed", n_failed=0)
                           for s in SUBJECTS for e, c in EXPRESSIONS])
    # an older build whose registration of S00/neutral failed (a later build fixed it: not a failure now)
    cat.append("stage_runs", [dict(build_id="b-old", subject_id="S00", sample_id="neutral", stage="registration",
                                   status="failed", outcome="failed", error=OLD_ERROR, recorded_at=t_old)])
    rows, reg_means = [], {}
    for s in SUBJECTS:
        for e, _ in EXPRESSIONS:
            broken = (s, e) == ("S05", "anger")
            for v in VIEWS:
                bad = broken and v == "right"
                rows.append(dict(build_id="b-new", subject_id=s, sample_id=e, view_id=v, stage="decode",
                                 artifact_key=None if bad else _key(s, e, v), status="failed" if bad else "completed",
                                 outcome="failed" if bad else ("cached" if s == "S00" else "computed"),
                                 error=DECODE_ERROR if bad else None,
                                 qc={} if bad else {"valid_fraction": float(rng.uniform(0.3, 0.6)),
                                                    "mean_confidence": float(rng.uniform(0.7, 0.9))}))
            if broken:
                rows += [dict(build_id="b-new", subject_id=s, sample_id=e, stage=stg, status="failed",
                              outcome="upstream_failed", error="input decode/right failed")
                         for stg in ("fusion", "surface", "registration")]
                continue
            fq = {"n_points": 5e4}
            for side in ("left", "right"):
                fq[f"{side}_rmse_mm"] = float(rng.uniform(0.02, 0.08))
                fq[f"{side}_fitness"] = float(rng.uniform(0.6, 0.9))
                fq[f"{side}_converged"] = 1.0
            mean_d = float(rng.uniform(0.05, 1.0))
            reg_means[(s, e)] = mean_d
            rows += [dict(build_id="b-new", subject_id=s, sample_id=e, stage="fusion", artifact_key=_key(s, e, "f"),
                          status="completed", outcome="computed", qc=fq),
                     dict(build_id="b-new", subject_id=s, sample_id=e, stage="surface", artifact_key=_key(s, e, "s"),
                          status="completed", outcome="computed",
                          qc={"min_angle_30_fraction": float(rng.uniform(0.8, 0.95)),
                              "holes": float(rng.integers(0, 4)), "n_vertices": float(rng.integers(2800, 3200))}),
                     dict(build_id="b-new", subject_id=s, sample_id=e, stage="registration",
                          artifact_key=_key(s, e, "r"), status="completed", outcome="computed",
                          qc={"mean_distance_mm": mean_d, "valid_fraction": 0.97,
                              "n_flipped": float(rng.integers(0, 3))})]
            pattern = 1.0 + np.abs(V[:, 0]) / 75.0  # larger at the sides
            valid = np.ones(len(V), bool)
            valid[rng.choice(len(V), 10, replace=False)] = False
            d = mean_d * pattern / pattern[valid].mean()
            st.artifacts.write(ArtifactRef("registration", s, e, None, _key(s, e, "r")),
                               {"vertices": (V + rng.normal(0, 0.2, V.shape)).astype(np.float32),
                                "distance": d.astype(np.float32), "valid": valid})
    cat.append("stage_runs", rows)
    out = {"store": root, "reg_means": reg_means}
    if model:
        n = len(V)
        ratio_s = np.array([0.6, 0.25, 0.1, 0.035, 0.01])
        ratio_e = np.array([0.7, 0.2, 0.085])
        arrays = {"mean": V, "faces": F, "shape_basis": np.linalg.qr(rng.normal(size=(3 * n, 5)))[0],
                  "shape_variance": 40 * ratio_s, "expression_basis": np.linalg.qr(rng.normal(size=(3 * n, 3)))[0],
                  "expression_variance": 20 * ratio_e}

        def part(ratio, n_samples, n99):
            return {"n_samples": n_samples, "n_components": len(ratio), "n_requested": 199, "n_components_99": n99,
                    "explained_ratio": ratio.tolist(), "variances_mm2": (40 * ratio).tolist(),
                    "total_variance_mm2": 40.0, "truncated_reason": "rank", "solver": "eigh"}

        card = {"label": "full", "n_vertices": n, "parameters": {"variance_target": 0.99},
                "shape": part(ratio_s, 4, 5), "expression": part(ratio_e, 8, None),
                "quality": {"shape_generalisation_mm": 0.42, "shape_specificity_mm": 1.3,
                            "shape_generalisation_curve_mm": [2.0, 1.2, 0.8, 0.5, 0.42]}, "skipped": []}
        publish_model(root, "mfull", arrays, card)
        publish_model(root, "mboth", arrays, {**card, "label": "both-20%"})  # newer, but not the full model
        out["model_id"] = "mfull"
    if evaluation:
        per = []
        for s in ("S04", "S05"):
            for e, c in EXPRESSIONS:
                for i, var in enumerate(VARIANTS):
                    row = {"variant": var, "subject_id": s, "sample_id": e, "expression": e, "category": c,
                           "age_group": "18-30" if s == "S04" else "61-80", "error": None,
                           "nme": float(0.01 * (1 + i) + rng.uniform(0, 0.004))}
                    for r in RADII:
                        row[f"armse_{r:.1f}"] = float(0.02 * (1 + 0.5 * i) * (1 + r) + rng.uniform(0, 0.002))
                        row[f"armse_{r:.1f}_mm"] = row[f"armse_{r:.1f}"] * 63.0
                    if (s, e, var) == ("S04", "anger", "both-20%"):
                        row = {**{k: None for k in row}, "variant": var, "subject_id": s, "sample_id": e,
                               "expression": e, "category": c, "age_group": "18-30", "error": EVAL_ERROR}
                    per.append(row)
        # the shape-20% variant is made best on ARMSE at r = 1.0 only: bold must follow each column
        for r in per:
            if r["variant"] == "shape-20%" and r["armse_1.0"] is not None:
                r["armse_1.0"] = 0.001
        metrics = ["nme", *[f"armse_{r:.1f}" for r in RADII], *[f"armse_{r:.1f}_mm" for r in RADII]]

        def means(keys):
            groups = {}
            for r in per:
                if not r["error"]:
                    groups.setdefault(tuple(r[k] for k in keys), []).append(r)
            return [{**dict(zip(keys, g)), "n": len(rs), **{m: float(np.mean([x[m] for x in rs])) for m in metrics}}
                    for g, rs in sorted(groups.items())]

        tables = {"per_sample": per, "by_variant": means(("variant",)), "by_age_group": means(("variant", "age_group")),
                  "by_category": means(("variant", "category")), "by_expression": means(("variant", "expression"))}
        publish_evaluation(root, "etest", {k: pa.Table.from_pylist(v) for k, v in tables.items()},
                           {"variants": {"full": "mfull", "shape-20%": "ms", "expression-20%": "me",
                                         "both-20%": "mboth"}, "n_samples": 6, "reference": "fused scans"})
        out["by_variant"] = tables["by_variant"]
    return out


class _Tables(HTMLParser):
    """Tables of a page: id -> rows of (text, bold) cells; and every img src."""

    def __init__(self):
        super().__init__()
        self.tables, self.imgs, self._tid, self._row, self._cell, self._bold = {}, [], None, None, None, False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._tid = a.get("id") or f"t{len(self.tables)}"
            self.tables[self._tid] = []
        elif tag == "tr" and self._tid is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell, self._bold = "", False
        elif tag == "b" and self._cell is not None:
            self._bold = True
        elif tag == "img":
            self.imgs.append(a["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append((self._cell.strip(), self._bold))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._tid].append(self._row)
            self._row = None
        elif tag == "table":
            self._tid = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _parse(path: Path) -> tuple[str, _Tables]:
    text = path.read_text()
    p = _Tables()
    p.feed(text)
    return text, p


def _check_pngs(out: Path, imgs: list[str]) -> None:
    files = sorted(p.name for p in out.glob("*.png"))
    assert sorted(imgs) == files, "index.html must reference exactly the PNGs of its folder"
    for name in files:
        assert "/" not in name and not name.startswith(("http", "file:"))
        with Image.open(out / name) as im:
            im.verify()
        with Image.open(out / name) as im:
            assert im.format == "PNG"
            w, h = im.size
            assert 500 <= w <= 2000 and 250 <= h <= 1500, (name, im.size)
            colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
            assert colours is not None and len(colours) > 20, f"{name} looks blank"


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report") / "store"
    info = _fabricate(root, model=True, evaluation=True)
    out = root.parent / "out"
    path = write_report(root, out)
    return info, out, path


def test_report_references_readable_pngs_and_states_its_inputs(full_report):
    info, out, path = full_report
    assert path == out / "index.html" and path.exists()
    text, p = _parse(path)
    _check_pngs(out, p.imgs)
    assert {"variance.png", "model_quality.png", "nme.png", "armse_variant.png", "armse_age.png",
            "armse_category.png", "armse_expression.png", "outcomes.png", "qc_decode.png", "qc_fusion.png",
            "qc_surface.png", "qc_registration.png", "heatmaps.png"} <= set(p.imgs)
    assert "could not be drawn" not in text and "<script" not in text.lower()
    meta = {row[0][0]: row[1][0] for row in p.tables["meta"]}
    assert meta["store"] == str(Path(info["store"]).resolve())
    assert meta["builds"] == "b-old, b-new"
    assert meta["model"] == "mfull"  # the evaluation's full variant, not the newer 20% model
    assert meta["evaluation"] == "etest"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", meta["made"])
    made = datetime.strptime(meta["made"], "%Y-%m-%d %H:%M:%S UTC").replace(tzinfo=timezone.utc)
    assert abs(datetime.now(timezone.utc) - made) < timedelta(minutes=5)
    # the model section states the component counts reaching 99% (5 for shape, "> 3" for expression)
    model_rows = next(t for t in p.tables.values() if t[0][0][0] == "part")
    assert [r[3][0] for r in model_rows[1:]] == ["5", "> 3"]


def test_table2_bolds_the_true_minimum_of_each_column(full_report):
    info, out, path = full_report
    from tasks.report import fmt

    _, p = _parse(path)
    t = p.tables["table2"]
    head = [c[0] for c in t[0]]
    assert head[:4] == ["variant", "model", "n", "NME"]
    assert head[4:] == [f"ARMSE r={r:.1f}" for r in RADII]
    assert [r[0][0] for r in t[1:]] == list(VARIANTS)
    by = {r["variant"]: r for r in info["by_variant"]}
    assert [int(r[2][0]) for r in t[1:]] == [by[v]["n"] for v in VARIANTS] == [6, 6, 6, 5]
    for j, col in enumerate(["nme", *[f"armse_{r:.1f}" for r in RADII]], start=3):
        vals = [by[v][col] for v in VARIANTS]
        best = int(np.argmin(vals))
        cells = [r[j] for r in t[1:]]
        assert [c[0] for c in cells] == [fmt(v) for v in vals]
        assert [i for i, c in enumerate(cells) if c[1]] == [best], col
    assert t[1 + VARIANTS.index("shape-20%")][-1][1]  # the column where full is not best
    assert t[1][3][1] and t[1][4][1]  # full is best on NME and ARMSE(0.6)


def test_failures_are_the_newest_failed_rows_with_their_messages(full_report):
    info, out, path = full_report
    text, p = _parse(path)
    fail = next(t for t in p.tables.values() if [c[0] for c in t[0]][:4] == ["subject", "sample", "view", "stage"])
    rows = [[c[0] for c in r] for r in fail[1:]]
    assert rows[0][:5] == ["S05", "anger", "right", "decode", "failed"] and rows[0][6] == DECODE_ERROR
    assert [r[3] for r in rows[1:]] == ["fusion", "surface", "registration"]  # pipeline order
    assert all(r[4] == "upstream_failed" for r in rows[1:])
    assert OLD_ERROR not in text  # superseded by the newer build's completed row
    assert EVAL_ERROR in text
    counts = next(t for t in p.tables.values() if [c[0] for c in t[0]][:2] == ["stage", "computed"])
    by_stage = {r[0][0]: [c[0] for c in r[1:]] for r in counts[1:]}
    head = [c[0] for c in counts[0]]
    assert by_stage["decode"][head.index("cached") - 1] == "9"  # S00: 3 samples x 3 views
    assert by_stage["decode"][head.index("failed") - 1] == "1"
    assert by_stage["registration"][head.index("upstream_failed") - 1] == "1"


def test_heat_maps_show_best_median_worst_registration(full_report):
    info, out, path = full_report
    _, p = _parse(path)
    heat = next(t for t in p.tables.values() if t[0][0][0] == "pick")
    ranked = sorted(info["reg_means"].items(), key=lambda kv: kv[1])
    expect = [ranked[0], ranked[(len(ranked) - 1) // 2], ranked[-1]]
    got = [(r[0][0], (r[1][0], r[2][0])) for r in heat[1:]]
    assert got == [(pick, k) for pick, (k, _) in zip(("best", "median", "worst"), expect)]
    # the worst mesh is drawn brighter (viridis: yellow = large distance) than the best one
    with Image.open(out / "heatmaps.png") as im:
        a = np.asarray(im.convert("RGB"), dtype=float)
    w = a.shape[1]
    cols = [a[:, int(w * f[0]):int(w * f[1])] for f in ((0.0, 0.28), (0.56, 0.84))]

    def yellow(x):
        return int(((x[..., 0] > 180) & (x[..., 1] > 180) & (x[..., 2] < 100)).sum())

    def purple(x):
        return int(((x[..., 0] > 50) & (x[..., 0] < 110) & (x[..., 2] > 90) & (x[..., 1] < 60)).sum())

    assert purple(cols[0]) > purple(cols[1]) and yellow(cols[1]) > yellow(cols[0])


def test_store_without_model_or_evaluation_says_what_is_missing(tmp_path, full_report):
    _, out_full, _ = full_report
    root = tmp_path / "store"
    _fabricate(root, model=False, evaluation=False)
    out = tmp_path / "out"
    path = write_report(root, out)
    text, p = _parse(path)
    _check_pngs(out, p.imgs)
    assert "No model in this store yet" in text and "No evaluation in this store yet" in text
    assert "table2" not in p.tables
    assert {"outcomes.png", "qc_decode.png", "qc_registration.png", "heatmaps.png"} <= set(p.imgs)
    assert "variance.png" not in p.imgs and "nme.png" not in p.imgs
    assert "as points" in text  # no model faces: the registered vertices are drawn as points
    # a store with nothing at all still gets a page
    empty = tmp_path / "empty"
    open_store(empty)
    text, p = _parse(write_report(empty, tmp_path / "out-empty"))
    assert "no stage_runs rows" in text and not p.imgs
    # rewriting a folder of a richer report drops the PNGs this report does not have
    import shutil

    reuse = tmp_path / "reuse"
    shutil.copytree(out_full, reuse)
    text, p = _parse(write_report(root, reuse))
    _check_pngs(reuse, p.imgs)
    assert not (reuse / "variance.png").exists()


def test_unknown_ids_and_missing_store_are_refused(tmp_path, full_report):
    info, _, _ = full_report
    with pytest.raises(FileNotFoundError, match="no model 'nope'"):
        write_report(info["store"], tmp_path / "o1", model_id="nope")
    with pytest.raises(FileNotFoundError, match="no evaluation 'nope'"):
        write_report(info["store"], tmp_path / "o2", eval_id="nope")
    with pytest.raises(FileNotFoundError, match="no pixelface store"):
        write_report(tmp_path / "nothing", tmp_path / "o3")
    assert not (tmp_path / "nothing").exists()
