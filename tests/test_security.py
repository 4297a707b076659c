"""Security of the store and the code (issue 8, item 6; ids and raw paths: tests/test_bad_input.py).

* no path can leave the store: ids are validated before any path is built, and a symbolic link
  planted inside the store is never written, deleted or cleaned through;
* nothing from the inputs (raw files, the store, configuration) is unpickled or evaluated: an AST
  scan of every package, Prefect task results are JSON, and the artifact reader opens only Zarr v3
  numeric arrays (a tampered artifact carrying a pickle is refused without unpickling it);
* a read-only store (chmod) stops `pixelface build` before any work with exit status 2 and a clear
  message, and leaves the store as it was; a full store (ENOSPC injected into the writes) fails the
  stage that hit it with a clear message, commits nothing partial, and keeps what exists.

Binding to 127.0.0.1 is checked on a running build in ``tests/test_reliability.py``.
"""

from __future__ import annotations

import ast
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from storage.artifacts import ArtifactError, ZarrArtifactStore, array_digest
from storage.catalog import CatalogError, ParquetCatalog
from storage.keys import ArtifactRef
from storage.store import open_store

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "storage", "tasks", "flows", "pixelface", "benchmarks")
K1, K2, K3 = "a" * 40, "b" * 40, "c" * 40


def ref(subject="S0000", key=K1, stage="decode", view="middle"):
    return ArtifactRef(stage, subject, "neutral", view, key)


def arrays(seed=0):
    g = np.random.default_rng(seed)
    return {"points": g.normal(size=(64, 48, 3)).astype(np.float32), "flags": g.integers(0, 8, (64, 48), np.uint8)}


# -- nothing unpickled or evaluated --------------------------------------------------------------

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib", "jsonpickle"}
UNSAFE_CALLS = {"eval", "exec", "compile"}
UNSAFE_ATTRS = {("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"), ("yaml", "load_all"),
                ("pd", "read_pickle"), ("pandas", "read_pickle"), ("torch", "load"), ("os", "system"),
                ("os", "popen")}


def unsafe_uses(source: str, name: str = "<code>") -> list[str]:
    """Lines that could unpickle or evaluate data: imports of pickle-like modules, eval/exec/compile,
    ``__import__``/``import_module`` of a computed name, ``np.load(allow_pickle=...)`` not literally
    False, unsafe YAML loaders, ``read_pickle``, ``os.system``, ``shell=True``."""
    out = []
    for node in ast.walk(ast.parse(source, name)):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            out += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            out.append(f"{where} from {node.module} import")
        elif isinstance(node, ast.Call):
            f = node.func
            literal_args = all(isinstance(a, ast.Constant) for a in node.args)
            if isinstance(f, ast.Name) and f.id in UNSAFE_CALLS:
                out.append(f"{where} {f.id}()")
            elif isinstance(f, ast.Name) and f.id == "__import__" and not literal_args:
                out.append(f"{where} __import__ of a computed name")
            elif isinstance(f, ast.Attribute):
                base = f.value.id if isinstance(f.value, ast.Name) else None
                if (base, f.attr) in UNSAFE_ATTRS:
                    out.append(f"{where} {base}.{f.attr}()")
                if f.attr == "import_module" and not literal_args:
                    out.append(f"{where} import_module of a computed name")
                if f.attr == "load" and base in ("np", "numpy"):
                    for kw in node.keywords:
                        if kw.arg == "allow_pickle" and not (isinstance(kw.value, ast.Constant)
                                                             and kw.value.value is False):
                            out.append(f"{where} np.load(allow_pickle=...)")
            for kw in node.keywords:
                if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    out.append(f"{where} shell=True")
    return out


def test_the_scanner_finds_what_it_looks_for():
    bad = ("import pickle\nfrom cloudpickle import loads\nimport numpy as np\nimport yaml, os, subprocess\n"
           "eval(s)\nexec(s)\nnp.load(p, allow_pickle=True)\nyaml.load(t)\nos.system(c)\n"
           "subprocess.run(c, shell=True)\n__import__(name)\n")
    assert [int(u.split(":")[1].split()[0]) for u in unsafe_uses(bad)] == [1, 2, 5, 6, 7, 8, 9, 10, 11]
    ok = ("import json, re, yaml\nimport numpy as np\njson.loads(t)\nyaml.safe_load(t)\nre.compile('x')\n"
          "np.load(p, allow_pickle=False)\nnp.load(p)\n__import__('open3d')\n")
    assert unsafe_uses(ok) == []


def test_no_code_unpickles_or_evaluates_anything():
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 40
    found = [u for p in files for u in unsafe_uses(p.read_text(), str(p.relative_to(ROOT)))]
    assert found == []


def test_prefect_task_results_are_json():
    """Cached unit results are read back by Prefect with the serializer of the task: JSON, never pickle."""
    from prefect.serializers import JSONSerializer

    from flows.build import UNIT_TASKS

    for t in UNIT_TASKS.values():
        assert t.persist_result and (t.result_serializer == "json" or isinstance(t.result_serializer, JSONSerializer))


def test_reader_refuses_tampered_artifacts_without_unpickling(tmp_path):
    """A manifest claiming an object dtype, or an array replaced by a Zarr v2 array whose pickle
    payload would create a file when unpickled: both refused, the file never appears."""
    import pickle

    st = ZarrArtifactStore(tmp_path / "store")
    st.write(ref(), arrays())
    st.write(ref(key=K2), arrays(1))
    final = tmp_path / "store" / ref().path()
    m = json.loads((final / "pixelface.json").read_text())
    m["arrays"]["points"]["dtype"] = "|O"
    (final / "pixelface.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="only bool, integer and float"):
        st.read(ref(), ["points"])

    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    obj = np.empty(1, dtype=object)
    obj[0] = Payload()
    target = tmp_path / "store" / ref(key=K2).path() / "points"
    shutil.rmtree(target)
    target.mkdir()
    (target / ".zarray").write_text(json.dumps({
        "zarr_format": 2, "shape": [1], "chunks": [1], "dtype": "|O", "compressor": None,
        "filters": [{"id": "pickle", "protocol": 5}], "fill_value": None, "order": "C"}))
    (target / "0").write_bytes(pickle.dumps(obj, protocol=5))
    with pytest.raises(Exception):
        st.read(ref(key=K2), ["points"])
    assert not marker.exists()
    assert st.read(ref(key=K2), ["flags"])["flags"].shape == (64, 48)  # the untouched array still reads


# -- no path leaves the store --------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["..", "../S0000", "a/b", "/etc", "S0000/../..", "", ".hidden", "x\\y", "a\0b"])
def test_ids_with_separators_or_dots_never_reach_a_path(bad):
    for kw in ({"subject": bad}, {"view": bad}):
        with pytest.raises(ValueError):
            ref(**kw)
    with pytest.raises(ValueError):
        ArtifactRef("decode", "S0000", bad, None, K1)
    with pytest.raises(ValueError):
        ArtifactRef.from_path(f"arrays/{bad}/neutral/middle/decode/{K1}.zarr")


def test_stage_keys_and_table_names_are_checked(tmp_path):
    for stage in ("../decode", "Decode", "a/b", ""):
        with pytest.raises(ValueError):
            ref(stage=stage)
    for key in ("../" + "a" * 37, "A" * 40, "a" * 39):
        with pytest.raises(ValueError):
            ref(key=key)
    with pytest.raises(CatalogError):
        ParquetCatalog(tmp_path).table_dir("../stage_runs")


def test_a_link_inside_the_store_is_never_written_or_deleted_through(tmp_path):
    root, outside = tmp_path / "store", tmp_path / "outside"
    st = open_store(root)
    st.artifacts.write(ref("S0001"), arrays())
    outside.mkdir()
    (root / "arrays" / "S0000").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ArtifactError, match="leaves the store"):
        st.artifacts.write(ref("S0000"), arrays())
    assert list(outside.iterdir()) == []
    # an artifact moved out and linked back in: readable, but not deleted through the link
    shutil.move(root / "arrays" / "S0001", outside / "S0001")
    (root / "arrays" / "S0001").symlink_to(outside / "S0001", target_is_directory=True)
    assert st.artifacts.exists(ref("S0001"))
    with pytest.raises(ArtifactError, match="leaves the store"):
        st.artifacts.delete(ref("S0001"))
    assert (outside / "S0001" / "neutral" / "middle" / "decode" / f"{K1}.zarr" / "pixelface.json").is_file()


def test_cleaning_removes_only_staging_entries_and_never_follows_links(tmp_path):
    root, outside = tmp_path / "store", tmp_path / "outside"
    st = open_store(root)
    staging = root / ".staging"
    dead = staging / f"{st.artifacts._host}-999999999-{'0' * 32}"  # a writer that is not alive
    dead.mkdir()
    (staging / "notes.txt").write_text("not ours")
    removed = st.clean_partial(max_age_s=0)
    assert removed == [str(dead)] and (staging / "notes.txt").exists()
    # a .staging that is a link: nothing is removed through it, whatever the names and ages
    outside.mkdir()
    victim = outside / f"{st.artifacts._host}-999999999-{'1' * 32}"
    victim.mkdir()
    shutil.rmtree(staging)
    staging.symlink_to(outside, target_is_directory=True)
    assert st.clean_partial(max_age_s=0) == [] and victim.is_dir()
    (root / "tables").mkdir()
    (root / "tables" / "stage_runs").symlink_to(outside, target_is_directory=True)
    (outside / ".tmp-x-999999999-part").write_text("x")
    assert st.catalog.clean_partial(max_age_s=0) == [] and (outside / ".tmp-x-999999999-part").exists()


# -- read-only and full stores -------------------------------------------------------------------

def _tree_state(root: Path) -> dict[str, tuple]:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        body = hashlib.blake2b(p.read_bytes()).hexdigest() if p.is_file() else None
        out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, body)
    return out


def _small_store(root: Path) -> None:
    st = open_store(root)
    st.artifacts.write(ref(), arrays())
    st.artifacts.write(ref(key=K2, view=None, stage="fusion"), arrays(1))
    st.catalog.append("subjects", [dict(build_id="b0", subject_id="S0000", status="completed")])


def test_read_only_store_stops_the_build_before_any_work(tmp_path):
    """chmod -R a-w on a store: `pixelface build` exits 2 with a message naming the store, before
    starting Prefect or Dask; nothing in the store changes. (As root, which ignores file modes, the
    build runs without the capabilities that let it.)"""
    store, raw = tmp_path / "store", tmp_path / "raw"
    _small_store(store)
    raw.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: file modes cannot be enforced")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]
    subprocess.run(["chmod", "-R", "a-w", str(store)], check=True)
    try:
        before = _tree_state(store)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "prefect")}
        env.pop("PREFECT_API_URL", None)
        r = subprocess.run([*prefix, sys.executable, "-m", "flows.cli", "build", "--raw", str(raw), "--store",
                            str(store), "--quiet"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stdout + r.stderr
        assert f"error: store {store} is not writable (Permission denied)" in r.stderr
        assert "Traceback" not in r.stderr and not (tmp_path / "prefect").exists()  # refused before any work
        assert _tree_state(store) == before
        ro = open_store(store, create=False, read_only=True)  # still readable
        assert len(ro.artifacts.list()) == 2 and ro.catalog.read("subjects").num_rows == 1
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(store)], check=True)


@pytest.fixture
def disk_fills_after(monkeypatch):
    """``fill(n)``: the store's file writes (Zarr's metadata and the store's own chunk writes) succeed ``n``
    more times, then write half their bytes and raise ENOSPC."""
    import zarr.storage._local as zlocal

    import storage.artifacts as sa

    real_put, real_write = zlocal._put, sa._write_file
    budget = {"n": None}

    def full(path, data: bytes) -> None:
        if budget["n"] is not None:
            if budget["n"] <= 0:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.with_suffix(".partial").write_bytes(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            budget["n"] -= 1

    def put(path, value, exclusive=False):
        full(path, bytes(value.as_buffer_like()))
        return real_put(path, value, exclusive)

    def write_file(path, data):
        full(path, bytes(data))
        return real_write(path, data)

    monkeypatch.setattr(zlocal, "_put", put)
    monkeypatch.setattr(sa, "_write_file", write_file)
    return lambda n: budget.__setitem__("n", n)


def test_full_store_fails_the_write_clearly_and_keeps_what_exists(tmp_path, disk_fills_after, monkeypatch):
    store = tmp_path / "store"
    _small_store(store)
    st = open_store(store)
    before = {r: st.artifacts.manifest(r) for r in st.artifacts.list()}
    for n in (0, 3):  # no byte written / the group and some chunks written
        disk_fills_after(n)
        with pytest.raises(OSError, match="No space left on device") as exc:
            st.artifacts.write(ref(key=K3), arrays(2))
        assert exc.value.errno == errno.ENOSPC
        assert f"store {store}: cannot write decode S0000/neutral/middle" in str(exc.value)
        assert "nothing was committed" in str(exc.value)
        assert not st.artifacts.exists(ref(key=K3)) and not (store / ref(key=K3).path()).exists()
        assert list((store / ".staging").iterdir()) == []  # the partial write is gone
    disk_fills_after(None)
    assert {r: st.artifacts.manifest(r) for r in st.artifacts.list()} == before
    for r, m in before.items():
        assert all(array_digest(a) == m.arrays[n].digest for n, a in st.artifacts.read(r).items())

    # the catalog: the append fails clearly, no part file or temporary file is left, old rows stay
    import pyarrow.parquet as pq

    real_write = pq.write_table

    def full(table, where, **kw):
        where.write(b"PAR1")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pq, "write_table", full)
    files = sorted((store / "tables" / "subjects").iterdir())
    with pytest.raises(OSError, match=f"catalog {store}: cannot write subjects rows .No space left on device.; "
                                      "nothing was recorded"):
        st.catalog.append("subjects", [dict(build_id="b1", subject_id="S0001", status="completed")])
    assert sorted((store / "tables" / "subjects").iterdir()) == files
    monkeypatch.setattr(pq, "write_table", real_write)
    assert st.catalog.read("subjects").column("build_id").to_pylist() == ["b0"]


def test_full_store_in_a_unit_fails_that_stage_only(tmp_path, disk_fills_after, monkeypatch):
    """The disk fills during a view unit: the stage that hit it fails with the message (no retry
    helps), its dependants do not run, what was committed before stays complete and readable."""
    from flows.synthesize import synthesize
    from pixelface.config import load_config
    from tasks.stage import Target, run_chain
    from tasks.view_stages import VIEW_CHAIN

    cfg = load_config(overrides={"synth": {"subjects": 1, "expressions": 1, "mesh_vertices": 20000,
                                           "rig": {"width": 128, "height": 96}}})
    synthesize(cfg.synth, tmp_path / "raw", tmp_path / "gt")
    st = open_store(tmp_path / "store")
    first = VIEW_CHAIN.stage_names[0]
    writes = []
    real_write = st.artifacts.write

    def counting(r, a, attrs=None, **kw):
        if writes:  # after the first stage's artifact: the disk is full
            disk_fills_after(0)
        writes.append(r.stage)
        return real_write(r, a, attrs, **kw)

    monkeypatch.setattr(st.artifacts, "write", counting)
    rec = run_chain(VIEW_CHAIN, Target(raw=str(tmp_path / "raw"), store=str(tmp_path / "store"), subject="S0000",
                                       sample="neutral", view="middle"), load_config().build.stages,
                    store=st, retry_delay_s=0.0)
    disk_fills_after(None)
    out = {s.stage: s for s in rec.stages}
    assert out[first].outcome == "computed"
    hit = [s for s in rec.stages if s.outcome == "failed"]
    assert hit and all("No space left on device" in s.error and "nothing was committed" in s.error for s in hit)
    assert all(s.outcome in ("computed", "failed", "upstream_failed") for s in rec.stages)
    assert [r.stage for r in st.artifacts.list()] == [s.stage for s in rec.stages if s.outcome == "computed"]
    for r in st.artifacts.list():
        m = st.artifacts.manifest(r)
        assert all(array_digest(a) == m.arrays[n].digest for n, a in st.artifacts.read(r).items())
    assert list((tmp_path / "store" / ".staging").iterdir()) == []
