"""Bad-input corpus (issue 8, item 1): every defect of ``tests/_damage.py`` gets one clear message.

One clean sample is synthesised (``pixelface synth``, 96x80 views) and copied; the raw defects
are applied to one damaged raw root (one sample or subject per defect, next to clean copies of
the source sample), and **one** ``pixelface build`` runs over it (Prefect test harness,
in-process Dask cluster). Each defect is then checked in the ``stage_runs`` / ``samples``
tables (or, for a subject-level defect, in the build's error output), and every clean sample
must have completed. The same raw defects are checked directly against the reader; defects of
the raw root and of the command line each run one (fast, failing) command.

``docs/bad-input.md`` is rendered from the declarations; a normal run asserts the committed
file is current. Regenerate with ``PIXELFACE_WRITE_CORPUS_DOC=1``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from storage.raw import RawDataset, RawFormatError
from storage.store import open_store
from tests import _damage as dmg

SIZE = ["--width", "96", "--height", "80"]


def _stage_names() -> tuple[tuple[str, ...], tuple[str, ...]]:
    from tasks.view_stages import SAMPLE_STEPS, VIEW_STEPS

    return tuple(s.spec.name for s in VIEW_STEPS), tuple(s.spec.name for s in SAMPLE_STEPS)


VIEW_STAGES, SAMPLE_STAGES = _stage_names()
DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-input.md"
BY_LEVEL = {lvl: [d for d in dmg.RAW_DEFECTS if d.level == lvl] for lvl in ("view", "sample", "subject")}


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as c:
        yield c.scheduler_address


def cli(argv: list[str]) -> tuple[int, str, str]:
    """Run ``pixelface ARGV`` in process: (exit status, stdout, stderr); the environment is restored."""
    from flows.cli import main

    env = dict(os.environ)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        os.environ.clear()
        os.environ.update(env)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def clean_raw(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "raw"
    code, _, err = cli(["synth", "--out", str(out), "--subjects", "1", "--expressions", "1", "--mesh-vertices",
                        "20000", "--quiet", *SIZE])
    assert code == 0, err
    assert RawDataset(out).samples(dmg.SOURCE[0]) == [dmg.SOURCE[1]]
    return out


@pytest.fixture(scope="module")
def damaged(clean_raw, tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("damaged") / "raw"
    shutil.copytree(clean_raw, raw)
    dmg.apply_raw_defects(raw, raw.parent / "outside")
    return raw


@dataclass
class Built:
    code: int
    out: str
    err: str
    rows: list[dict]
    samples: dict[tuple[str, str], str]
    args: list[str]


def build_args(raw: Path, store: Path, cluster: str, tmp: Path) -> list[str]:
    from pixelface.config import StageParams

    conf = tmp / "stages.yaml"  # the tiny test views need a small surface mesh (and registration template)
    text = "build:\n  stages:\n    surface:\n      target_vertices: 3000\n"
    if "registration" in StageParams.model_fields:
        text += "    registration:\n      template:\n        n_vertices: 2000\n"
    conf.write_text(text)
    return ["--raw", str(raw), "--store", str(store), "--dask-address", cluster, "--quiet",
            "--prefect-home", str(tmp / "prefect"), "--config", str(conf)]


@pytest.fixture(scope="module")
def built(harness, cluster, damaged, tmp_path_factory) -> Built:
    """ONE build over the whole damaged raw root."""
    tmp = tmp_path_factory.mktemp("build")
    args = build_args(damaged, tmp / "store", cluster, tmp)
    code, out, err = cli(["build", *args])
    cat = open_store(tmp / "store", create=False).catalog
    samples = {(r["subject_id"], r["sample_id"]): r["status"] for r in cat.read("samples").to_pylist()}
    return Built(code, out, err, cat.read("stage_runs").to_pylist(), samples, args)


def _rows(b: Built, subject: str, sample: str) -> dict[tuple[str | None, str], dict]:
    return {(r["view_id"], r["stage"]): r for r in b.rows if (r["subject_id"], r["sample_id"]) == (subject, sample)}


def _located(msg: str | None, where: str, file: str | None, needle: str) -> list[str]:
    """Problems with ``msg``: it must start with ``where`` (after the error type), name ``file`` and the defect."""
    if not msg:
        return ["no message"]
    problems = []
    if not msg.removeprefix("RawFormatError: ").startswith(where):
        problems.append(f"does not start with {where!r}")
    if file and f"/{file}" not in msg:
        problems.append(f"does not name {file!r}")
    if needle not in msg:
        problems.append(f"does not say {needle!r}")
    return [f"{p}: {msg}" for p in problems]


# -- the one build ---------------------------------------------------------------------------------

def test_build_exit_status_says_some_samples_failed(built):
    assert built.code == 1, built.err
    n_subjects = 2 + len(BY_LEVEL["subject"]) + 1  # S0000, S0001, one per subject defect, the case twin
    assert f"built {n_subjects} subjects" in built.out, built.out


def test_clean_samples_complete_every_stage(built):
    for subject in ("S0000", dmg.DAMAGED_SUBJECT):
        rows = _rows(built, subject, "neutral")
        want = {(v, s) for v in dmg.VIEWS for s in VIEW_STAGES} | {(None, s) for s in SAMPLE_STAGES}
        assert set(rows) == want, subject
        assert {r["status"] for r in rows.values()} == {"completed"}, subject
        assert {r["outcome"] for r in rows.values()} == {"computed"}, subject
        assert built.samples[(subject, "neutral")] == "completed"
    sqc = dict(_rows(built, "S0000", "neutral")[(None, "surface")]["qc"])
    assert sqc["n_vertices"] > 2000


def test_view_defects_fail_only_their_view(built):
    problems = []
    for d in BY_LEVEL["view"]:
        rows = _rows(built, dmg.DAMAGED_SUBJECT, d.key)
        where = f"subject {dmg.DAMAGED_SUBJECT} / sample {d.key} / view {d.view} / file "
        dec = rows.get((d.view, "decode"))
        if dec is None or dec["outcome"] != "failed":
            problems.append(f"{d.key}: decode of {d.view} is {dec and dec['outcome']}")
            continue
        problems += [f"{d.key}: {p}" for p in _located(dec["error"], where, d.file, d.needle)]
        for (view, stage), r in rows.items():
            if view == d.view and stage != "decode" or view is None:
                ok = r["outcome"] == "upstream_failed" and r["status"] == "failed"
            elif view != d.view:
                ok = r["outcome"] == "computed" and r["status"] == "completed"
            else:
                continue
            if not ok:
                problems.append(f"{d.key}: {view}/{stage} is {r['outcome']}: {r['error']}")
        want = {(v, s) for v in dmg.VIEWS for s in VIEW_STAGES} | {(None, s) for s in SAMPLE_STAGES}
        if set(rows) != want:
            problems.append(f"{d.key}: stage rows {sorted(map(str, set(rows) ^ want))} differ")
        if built.samples.get((dmg.DAMAGED_SUBJECT, d.key)) != "failed":
            problems.append(f"{d.key}: samples row {built.samples.get((dmg.DAMAGED_SUBJECT, d.key))}")
    assert not problems, "\n".join(problems)


def test_sample_defects_fail_only_their_sample_at_planning(built):
    problems = []
    for d in BY_LEVEL["sample"]:
        for sample in (d.key, *d.extra_samples):
            rows = _rows(built, dmg.DAMAGED_SUBJECT, sample)
            if set(rows) != {(None, "plan")} or rows[(None, "plan")]["outcome"] != "failed":
                problems.append(f"{sample}: rows {sorted(map(str, rows))}")
                continue
            msg = rows[(None, "plan")]["error"]
            where = f"subject {dmg.DAMAGED_SUBJECT} / sample {sample} / file "
            if sample == d.key:
                problems += [f"{sample}: {p}" for p in _located(msg, where, d.file, d.needle)]
            elif "differs only in letter case" not in msg:
                problems.append(f"{sample}: {msg}")
            if built.samples.get((dmg.DAMAGED_SUBJECT, sample)) != "failed":
                problems.append(f"{sample}: samples row {built.samples.get((dmg.DAMAGED_SUBJECT, sample))}")
    assert not problems, "\n".join(problems)


def test_subject_defects_fail_only_their_subject(built):
    failed = [ln.strip() for ln in built.err.splitlines() if ln.strip().startswith("FAILED ")]
    problems = []
    for d in BY_LEVEL["subject"]:
        mine = [ln for ln in failed if ln.startswith(f"FAILED {d.key}: ")]
        if len(mine) != 1:
            problems.append(f"{d.key}: {len(mine)} FAILED lines")
            continue
        problems += [f"{d.key}: {p}" for p in _located(mine[0].split(": ", 1)[1], f"subject {d.key} / file ",
                                                       d.file, d.needle)]
        # nothing of it was built, and the stage-run table says why
        if any(r["subject_id"] == d.key and r["status"] == "completed" for r in built.rows):
            problems.append(f"{d.key}: has completed stage rows")
        plan = [r for r in built.rows if r["subject_id"] == d.key and r["stage"] == "plan"]
        if len(plan) != 1 or plan[0]["status"] != "failed":
            problems.append(f"{d.key}: expected one failed 'plan' row, got {plan}")
        else:
            problems += [f"{d.key} (row): {p}" for p in _located(plan[0]["error"], f"subject {d.key} / file ",
                                                                 d.file, d.needle)]
    assert any(ln.startswith("FAILED Subject-twin: ") and "letter case" in ln for ln in failed), failed
    assert not problems, "\n".join(problems)


def test_nothing_else_failed(built):
    """Failures are exactly the declared ones: every failed (subject, sample) is a defect's."""
    declared = {(dmg.DAMAGED_SUBJECT, s) for d in BY_LEVEL["view"] + BY_LEVEL["sample"]
                for s in (d.key, *d.extra_samples)}
    failed = {k for k, status in built.samples.items() if status == "failed"}
    assert failed == declared
    failed_subjects = {ln.split()[1].rstrip(":") for ln in built.err.splitlines() if ln.strip().startswith("FAILED ")}
    assert failed_subjects == {dmg.DAMAGED_SUBJECT, "Subject-twin"} | {d.key for d in BY_LEVEL["subject"]}


def test_clean_subject_rebuild_exits_0(built, cluster, tmp_path):
    """Only clean subjects selected: exit 0, every stage cached (failed units are never cached)."""
    code, out, err = cli(["build", *built.args, "--subjects", "S0000", "--json"])
    assert code == 0, err
    rec = json.loads(out.strip().splitlines()[-1])
    assert rec["failed"] == 0 and rec["cached"] == 3 * len(VIEW_STAGES) + len(SAMPLE_STAGES) and rec["computed"] == 0


# -- the reader, directly --------------------------------------------------------------------------

@pytest.mark.parametrize("d", BY_LEVEL["view"] + BY_LEVEL["sample"] + BY_LEVEL["subject"], ids=lambda d: d.key)
def test_reader_refuses(damaged, d):
    ds = RawDataset(damaged)
    with pytest.raises(RawFormatError) as ei:
        if d.level == "view":
            ds.read_view(dmg.DAMAGED_SUBJECT, d.key, d.view, ds.sample(dmg.DAMAGED_SUBJECT, d.key))
        elif d.level == "sample":
            ds.sample(dmg.DAMAGED_SUBJECT, d.key)
        else:
            ds.subject(d.key)
    e = ei.value
    assert e.subject == (d.key if d.level == "subject" else dmg.DAMAGED_SUBJECT)
    assert e.sample == (d.key if d.level != "subject" else None) and e.view == d.view
    assert e.file is not None and Path(e.file).name == d.file
    assert d.needle in e.defect, str(e)


def test_bomb_header_is_refused_before_decoding(damaged, monkeypatch):
    import storage.raw

    def no_decoding(*a, **k):
        raise AssertionError("a decoder was called: the header should have been refused")

    monkeypatch.setattr(storage.raw.Image, "open", no_decoding)
    monkeypatch.setattr(storage.raw.png, "decode", no_decoding)
    ds = RawDataset(damaged)
    with pytest.raises(RawFormatError, match="claims 100000x100000 pixels"):
        ds.read_view(dmg.DAMAGED_SUBJECT, "fringe-bomb", "left")


def test_clean_views_still_read(damaged):
    ds = RawDataset(damaged)
    for subject in ("S0000", dmg.DAMAGED_SUBJECT):
        meta = ds.sample(subject, "neutral")
        for v in meta.views:
            assert ds.read_view(subject, "neutral", v, meta).fringe.shape == (3, 4, 80, 96)


# -- the raw root and the command line --------------------------------------------------------------

def _one_line_error(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert needle in err, err


@pytest.mark.parametrize("d", dmg.DATASET_DEFECTS, ids=lambda d: d.key)
def test_dataset_defect_stops_the_build(clean_raw, tmp_path, d):
    raw = tmp_path / "raw"
    shutil.copytree(clean_raw, raw)
    d.setup(raw)
    code, _, err = cli(["build", "--raw", str(raw), "--store", str(tmp_path / "store"), "--quiet",
                        "--prefect-home", str(tmp_path / "prefect")])
    _one_line_error(code, err, d.needle)
    assert f"/{d.file}" in err
    assert not list((tmp_path / "store").rglob("*.zarr"))  # nothing was built


@pytest.mark.parametrize("d", dmg.BUILD_CLI_DEFECTS, ids=lambda d: d.key)
def test_bad_build_arguments(clean_raw, tmp_path, d):
    store = tmp_path / "store"
    code, _, err = cli(["build", "--raw", str(clean_raw), "--store", str(store), "--quiet",
                        "--prefect-home", str(tmp_path / "prefect"), *d.setup(clean_raw, store)])
    _one_line_error(code, err, d.needle)
    assert not list(store.rglob("*.zarr"))


@pytest.mark.parametrize("d", dmg.SCAN_CLI_DEFECTS, ids=lambda d: d.key)
def test_bad_scan_input(tmp_path, d):
    files = dmg.tiny_mesh_files(tmp_path / "files")
    out = tmp_path / "raw"
    code, _, err = cli(["scan", *d.setup(files, out), *SIZE])
    _one_line_error(code, err, d.needle)
    if d.file:
        assert f"/{d.file}" in err
    assert not out.exists() and not (tmp_path / "raw-gt").exists()


def _digest(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_scan_never_rewrites_what_exists(clean_raw, tmp_path):
    """Scanning into an existing sample, or an existing subject with other metadata, is refused up front."""
    files = dmg.tiny_mesh_files(tmp_path / "files")
    out = tmp_path / "raw"
    shutil.copytree(clean_raw, out)
    before = _digest(out)
    subject = dmg.SOURCE[0]
    code, _, err = cli(["scan", *dmg._scan(files, out, "--subject", subject, "--sample", dmg.SOURCE[1]), *SIZE])
    _one_line_error(code, err, f"subject {subject} / sample {dmg.SOURCE[1]}: already exists")
    have = RawDataset(out).subject(subject)
    other = "male" if have.gender != "male" else "female"
    code, _, err = cli(["scan", *dmg._scan(files, out, "--subject", subject, "--sample", "smile", "--gender", other,
                                           "--expression", "smile"), *SIZE])
    _one_line_error(code, err, "would rewrite its subject.json")
    assert _digest(out) == before and not (tmp_path / "raw-gt").exists()


# -- the document ----------------------------------------------------------------------------------

def test_corpus_doc_is_generated_from_the_declarations():
    keys = [d.key for d in dmg.RAW_DEFECTS + dmg.DATASET_DEFECTS + dmg.BUILD_CLI_DEFECTS + dmg.SCAN_CLI_DEFECTS]
    assert len(keys) == len(set(keys)) >= 20
    text = dmg.render_doc()
    if os.environ.get("PIXELFACE_WRITE_CORPUS_DOC") == "1":
        DOC.write_text(text)
    assert DOC.read_text() == text, "docs/bad-input.md is stale: rerun with PIXELFACE_WRITE_CORPUS_DOC=1"
