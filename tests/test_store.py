"""One contract, two backends: the Zarr/Parquet store and its in-memory twin (zarr StoreTests pattern)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from storage.artifacts import (ArtifactConflictError, ArtifactNotFoundError, MemoryArtifactStore,
                               ZarrArtifactStore, array_digest, chunk_shape, digest_matches)
from storage.catalog import CatalogError, MemoryCatalog, ParquetCatalog
from storage.keys import ArtifactRef, artifact_key, canonical_json, hash_bytes, params_hash, raw_view_key
from storage.store import StoreFormatError, open_store

ROOT = Path(__file__).resolve().parents[1]
K1 = "a" * 40
K2 = "b" * 40


def ref(stage="decode", subject="S0000", sample="neutral", view="middle", key=K1):
    return ArtifactRef(stage, subject, sample, view, key)


def arrays(rng=0, h=20, w=16):
    g = np.random.default_rng(rng)
    pts = g.normal(size=(h, w, 3)).astype(np.float32)
    pts[0, 0] = np.nan
    return {"points": pts, "valid": g.random((h, w)) > 0.3, "flags": g.integers(0, 8, (h, w), dtype=np.uint8)}


# ------------------------------------------------------------------------------------ keys

def test_artifact_key_depends_on_every_ingredient():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class P:
        a: float = 1.0
        b: tuple = (1, 2)

    base = artifact_key("decode", 1, P(), {"raw": K1})
    assert base == artifact_key("decode", "1", P(), {"raw": K1})
    assert len(base) == 40 and int(base, 16) >= 0
    others = [artifact_key("texture", 1, P(), {"raw": K1}), artifact_key("decode", 2, P(), {"raw": K1}),
              artifact_key("decode", 1, P(a=1.5), {"raw": K1}), artifact_key("decode", 1, P(), {"raw": K2}),
              artifact_key("decode", 1, P(), {"other": K1})]
    assert len({base, *others}) == 6
    assert canonical_json({"b": 1, "a": (1, 2)}) == canonical_json({"a": [1, 2], "b": 1})
    assert params_hash(P()) != params_hash(P(b=(2, 1)))
    with pytest.raises(TypeError):
        canonical_json({"x": float("nan")})
    with pytest.raises(ValueError, match="40 lowercase hex"):
        artifact_key("decode", 1, None, {"raw": "xyz"})


def test_raw_view_key_hashes_bytes(tmp_path):
    v = tmp_path / "S0" / "s1" / "middle"
    v.mkdir(parents=True)
    (tmp_path / "S0" / "s1" / "sample.json").write_text("{}")
    (v / "rgb.png").write_bytes(b"123")
    k = raw_view_key(tmp_path, "S0", "s1", "middle")
    assert k == raw_view_key(tmp_path, "S0", "s1", "middle")
    (v / "rgb.png").write_bytes(b"124")
    assert raw_view_key(tmp_path, "S0", "s1", "middle") != k
    os.utime(v / "rgb.png", (0, 0))  # times do not matter
    k2 = raw_view_key(tmp_path, "S0", "s1", "middle")
    (v / ".hidden").write_bytes(b"x")
    assert raw_view_key(tmp_path, "S0", "s1", "middle") == k2
    assert hash_bytes(b"a", b"b") == hash_bytes(b"ab")


def test_ref_validates_ids_and_layout():
    r = ref()
    assert r.path() == f"arrays/S0000/neutral/middle/decode/{K1}.zarr"
    assert ArtifactRef.from_path(r.path()) == r
    s = ArtifactRef("mesh", "S0000", "neutral", None, K2)
    assert s.path() == f"arrays/S0000/neutral/_sample/mesh/{K2}.zarr"
    assert ArtifactRef.from_path(s.path()) == s
    for bad in [dict(subject="../x"), dict(view=".."), dict(stage="Decode"), dict(key="0" * 39)]:
        with pytest.raises(ValueError):
            ref(**bad)


def test_chunks_are_whole_rows_of_about_2mib():
    assert chunk_shape((1024, 1280, 3), 4) == (136, 1280, 3)
    assert chunk_shape((10, 4), 8) == (10, 4)
    assert chunk_shape((0, 3), 4) == (1, 3)
    assert chunk_shape((), 4) == ()


def test_array_digest_names_its_algorithm_and_sees_dtype_shape_and_every_byte():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    d = array_digest(a)
    assert d.startswith("xxh3_128:") and len(d) == len("xxh3_128:") + 32
    assert array_digest(a.copy()) == d and array_digest(np.asfortranarray(a)) == d   # C-ordered bytes
    b = a.copy()
    b.view(np.uint32)[2, 3] ^= 1                                                    # one bit of one value
    others = {array_digest(b), array_digest(a.reshape(4, 3)), array_digest(a.astype(np.int32).view(np.float32)),
              array_digest(a.view(np.int32)), array_digest(np.zeros((0, 4), np.float32))}
    assert d not in others and len(others) == 5
    assert digest_matches(a, d) and not digest_matches(b, d)
    # a manifest written before the switch holds a bare blake2b digest (20 bytes, 40 hex)
    import hashlib

    legacy = hashlib.blake2b(f"{a.dtype.str}{a.shape}".encode() + a.tobytes(), digest_size=20).hexdigest()
    assert digest_matches(a, legacy) and not digest_matches(b, legacy)


def test_direct_writes_equal_zarrs(tmp_path, monkeypatch):
    """The store's own writer gives the files Zarr's writer gives, for every dtype and edge case."""
    import storage.artifacts as sa

    rng = np.random.default_rng(5)
    arrays = {"grid": rng.normal(size=(600, 700, 3)).astype(np.float32),        # 3 row chunks, the last partial
              "flags": (rng.random((300, 700)) < 0.1).astype(np.uint8),
              "mask": rng.random((1001,)) < 0.5, "ids": rng.integers(-5, 10**12, (777, 2)),
              "faces": rng.integers(0, 10**6, (200_000, 3)).astype(np.int32), "small": np.eye(4),
              "halves": rng.normal(size=(9, 5)).astype(np.float16), "empty": np.zeros((0, 3), np.float32)}

    def files(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file() and p.name != "pixelface.json"}

    r = ref()
    ZarrArtifactStore(tmp_path / "direct").write(r, arrays)
    monkeypatch.setattr(sa, "_direct_chunks_ok", lambda a, chunks: False)
    ZarrArtifactStore(tmp_path / "zarr").write(r, arrays)
    a, b = files(tmp_path / "direct" / r.path()), files(tmp_path / "zarr" / r.path())
    assert sorted(a) == sorted(b) and len([k for k in a if "/c/" in k]) >= 10 and "grid/c/2/0/0" in a
    chunks = [k for k in a if not k.endswith("zarr.json")]
    assert {k: a[k] for k in chunks} == {k: b[k] for k in chunks}
    assert {k: json.loads(a[k]) for k in a if k not in chunks} == {k: json.loads(b[k]) for k in b if k not in chunks}
    back = ZarrArtifactStore(tmp_path / "direct").read(r)
    for name, x in arrays.items():
        assert back[name].dtype == x.dtype and np.array_equal(back[name], x), name


# ------------------------------------------------------------------------------ artifacts

class ArtifactStoreContract:
    """The shared suite; subclasses provide the ``store`` fixture."""

    def test_roundtrip_and_manifest(self, store):
        a = arrays()
        r = ref()
        assert not store.exists(r) and store.manifest(r) is None
        res = store.write(r, a, {"qc": {"valid": 0.5}})
        assert res.created
        got = store.read(r)
        assert set(got) == set(a)
        for k in a:
            np.testing.assert_array_equal(got[k], a[k])
            assert got[k].dtype == a[k].dtype
        m = store.manifest(r)
        assert m.ref == r and m.attrs == {"qc": {"valid": 0.5}} and m.write_id == res.manifest.write_id
        assert m.arrays["points"].shape == (20, 16, 3) and m.arrays["points"].dtype == "<f4"
        assert store.read(r, ["valid"]).keys() == {"valid"}
        with pytest.raises(KeyError):
            store.read(r, ["nope"])

    def test_missing(self, store):
        with pytest.raises(ArtifactNotFoundError, match="no artifact with key"):
            store.read(ref())
        assert store.delete(ref()) is False

    def test_create_once_same_schema_is_kept(self, store):
        r = ref()
        first = store.write(r, arrays(0))
        again = store.write(r, arrays(1))
        assert not again.created and again.manifest.write_id == first.manifest.write_id
        np.testing.assert_array_equal(store.read(r)["flags"], arrays(0)["flags"])

    def test_refuses_silent_schema_change(self, store):
        r = ref()
        store.write(r, arrays())
        with pytest.raises(ArtifactConflictError, match="different schema"):
            store.write(r, arrays(h=21))
        with pytest.raises(ArtifactConflictError):
            store.write(r, {**arrays(), "extra": np.zeros(3)}, mode="replace")
        bad = arrays()
        bad["points"] = bad["points"].astype(np.float64)
        with pytest.raises(ArtifactConflictError):
            store.write(r, bad)

    def test_replace_gives_new_write(self, store):
        r = ref()
        w1 = store.write(r, arrays(0)).manifest.write_id
        res = store.write(r, arrays(1), mode="replace")
        assert res.created and res.manifest.write_id != w1
        np.testing.assert_array_equal(store.read(r)["flags"], arrays(1)["flags"])

    def test_list_and_delete(self, store):
        refs = [ref(), ref(view="left"), ref(sample="smile"), ref(subject="S0001"),
                ArtifactRef("mesh", "S0000", "neutral", None, K2), ref(stage="texture", key=K2)]
        for r in refs:
            store.write(r, {"x": np.arange(3)})
        assert store.list() == sorted(refs)
        assert store.list(subject="S0001") == [ref(subject="S0001")]
        assert store.list(subject="S0000", sample="neutral", stage="decode") == sorted([ref(), ref(view="left")])
        assert store.delete(ref()) is True
        assert not store.exists(ref()) and ref() not in store.list()

    def test_rejects_bad_arrays(self, store):
        with pytest.raises(ValueError, match="array name"):
            store.write(ref(), {"Bad": np.zeros(2)})
        with pytest.raises(ValueError, match="dtype"):
            store.write(ref(), {"s": np.array(["a"])})
        with pytest.raises(ValueError, match="at least one"):
            store.write(ref(), {})
        with pytest.raises(ValueError):
            store.write(ref(), {"x": np.zeros(2)}, {"nan": float("nan")})
        assert not store.exists(ref())

    def test_empty_and_scalar_arrays(self, store):
        store.write(ref(), {"e": np.zeros((0, 3), np.float32), "s": np.float64(2.5)})
        got = store.read(ref())
        assert got["e"].shape == (0, 3) and float(got["s"]) == 2.5

    def test_concurrent_writers_of_one_key(self, store):
        r = ref()
        results, errors = [], []

        def go(i):
            try:
                results.append(store.write(r, arrays(i)))
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=go, args=(i,)) for i in range(6)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert not errors
        ids = {x.manifest.write_id for x in results}
        assert len(ids) == 1 and sum(x.created for x in results) == 1
        assert store.list() == [r]


class TestMemoryArtifactStore(ArtifactStoreContract):
    @pytest.fixture
    def store(self):
        return MemoryArtifactStore()


class TestZarrArtifactStore(ArtifactStoreContract):
    @pytest.fixture
    def store(self, tmp_path):
        return ZarrArtifactStore(tmp_path / "store")

    def test_layout_on_disk(self, store, tmp_path):
        store.write(ref(), arrays())
        d = tmp_path / "store" / "arrays" / "S0000" / "neutral" / "middle" / "decode" / f"{K1}.zarr"
        assert (d / "pixelface.json").is_file() and (d / "zarr.json").is_file()
        assert sorted(p.name for p in d.iterdir()) == ["flags", "pixelface.json", "points", "valid", "zarr.json"]
        meta = json.loads((d / "points" / "zarr.json").read_text())
        assert meta["shape"] == [20, 16, 3]
        codecs = json.dumps(meta["codecs"])
        assert "blosc" in codecs and "lz4" in codecs
        assert not any((tmp_path / "store" / ".staging").iterdir())  # nothing left behind
        import zarr
        assert zarr.open_group(str(d), mode="r")["points"].shape == (20, 16, 3)  # plain Zarr for others

    def test_partial_without_manifest_is_invisible(self, store, tmp_path):
        store.write(ref(), arrays())
        (tmp_path / "store" / ref().path() / "pixelface.json").unlink()
        assert not store.exists(ref()) and store.list() == []
        store.write(ref(), arrays())  # the rerun replaces the partial folder
        assert store.exists(ref())

    def test_read_only(self, tmp_path):
        ZarrArtifactStore(tmp_path / "s").write(ref(), arrays())
        ro = ZarrArtifactStore(tmp_path / "s", read_only=True)
        assert ro.exists(ref())
        with pytest.raises(PermissionError):
            ro.write(ref(key=K2), arrays())
        with pytest.raises(PermissionError):
            ro.delete(ref())


_KILL_WRITER = textwrap.dedent("""
    import sys, numpy as np
    from storage.artifacts import ZarrArtifactStore
    from storage.keys import ArtifactRef
    st = ZarrArtifactStore(sys.argv[1], cname="zstd", clevel=9)  # slow on purpose
    g = np.random.default_rng(0)
    arrays = {f"a{i}": g.normal(size=(1024, 1280, 3)).astype(np.float32) for i in range(6)}
    print("ready", flush=True)
    st.write(ArtifactRef("decode", "S0000", "neutral", "middle", "a" * 40), arrays)
    print("done", flush=True)
""")


def test_sigkill_mid_write_leaves_nothing_visible_and_rerun_completes(tmp_path):
    root = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_WRITER, str(root)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        staging = root / ".staging"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # kill once the first array has some chunks on disk
            if staging.is_dir() and any(staging.glob("*/a0/c/*")):
                break
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    store = ZarrArtifactStore(root)
    r = ref()
    assert not store.exists(r) and store.list() == []
    assert not (root / r.path()).exists()
    leftovers = store.clean_partial()
    assert len(leftovers) == 1 and not any((root / ".staging").iterdir())
    store.write(r, {"a0": np.ones((4, 5, 3), np.float32)})
    assert store.exists(r)


# -------------------------------------------------------------------------------- catalog

def run_row(**kw):
    row = dict(build_id="b1", subject_id="S0000", sample_id="neutral", view_id="middle", stage="decode",
               artifact_key=K1, input_keys={"raw": K2}, param_hash=K2, code_version="1", status="completed",
               outcome="computed", error=None, started_at=datetime(2026, 1, 1, tzinfo=timezone.utc),
               finished_at=datetime(2026, 1, 1, 0, 0, 1, tzinfo=timezone.utc), duration_s=1.0,
               kernel_cpu_s=0.5, qc={"valid_fraction": 0.5})
    row.update(kw)
    return row


class CatalogContract:
    def test_append_read_schema(self, catalog):
        assert catalog.read("stage_runs").num_rows == 0
        assert catalog.append("stage_runs", [run_row(), run_row(view_id="left")]) == 2
        t = catalog.read("stage_runs")
        assert t.schema.names[:3] == ["row_id", "build_id", "recorded_at"]
        assert t.num_rows == 2
        rows = t.to_pylist()
        assert dict(rows[0]["qc"]) == {"valid_fraction": 0.5} and dict(rows[0]["input_keys"]) == {"raw": K2}

    def test_schema_is_enforced(self, catalog):
        with pytest.raises(CatalogError, match="unknown column"):
            catalog.append("stage_runs", [run_row(bogus=1)])
        with pytest.raises(CatalogError, match="required"):
            catalog.append("stage_runs", [run_row(stage=None)])
        with pytest.raises(CatalogError, match="status"):
            catalog.append("stage_runs", [run_row(status="weird")])
        with pytest.raises(CatalogError, match="declared schema"):
            catalog.append("stage_runs", [run_row(duration_s="slow")])
        with pytest.raises(CatalogError, match="unknown table"):
            catalog.append("nope", [{}])
        assert catalog.read("stage_runs").num_rows == 0

    def test_concurrent_appends_lose_and_duplicate_nothing(self, catalog):
        def go(i):
            for j in range(5):
                catalog.append("stage_runs", [run_row(sample_id=f"s{i}", view_id=f"v{j}")])

        threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        t = catalog.read("stage_runs")
        assert t.num_rows == 40 and len(set(t.column("row_id").to_pylist())) == 40
        assert catalog.compact("stage_runs") == 40
        assert catalog.n_parts("stage_runs") == 1
        assert catalog.read("stage_runs").num_rows == 40
        catalog.append("stage_runs", [run_row()])
        assert catalog.read("stage_runs").num_rows == 41

    def test_latest_keeps_newest_per_natural_key(self, catalog):
        catalog.append("stage_runs", [run_row(outcome="computed")])
        catalog.append("stage_runs", [run_row(outcome="cached", build_id="b2")])
        catalog.append("stage_runs", [run_row(view_id=None, stage="mesh")])
        t = catalog.latest("stage_runs")
        assert t.num_rows == 2
        got = {(r["view_id"], r["stage"]): r["build_id"] for r in t.to_pylist()}
        assert got == {("middle", "decode"): "b2", (None, "mesh"): "b1"}

    def test_subjects_and_samples(self, catalog):
        catalog.append("subjects", [dict(build_id="b", subject_id="S0", gender="female", age=30, split="train",
                                         n_samples=2, status="completed", error=None)])
        catalog.append("samples", [dict(build_id="b", subject_id="S0", sample_id="neutral", expression="neutral",
                                        category="neutral", views=["left", "middle"], width=8, height=6,
                                        raw_keys={"left": K1}, status="completed", n_failed=0)])
        assert catalog.latest("subjects").column("age").to_pylist() == [30]
        assert catalog.read("samples").column("views").to_pylist() == [["left", "middle"]]


class TestMemoryCatalog(CatalogContract):
    @pytest.fixture
    def catalog(self):
        return MemoryCatalog()


class TestParquetCatalog(CatalogContract):
    @pytest.fixture
    def catalog(self, tmp_path):
        return ParquetCatalog(tmp_path / "store")

    def test_layout_and_reader_during_compaction(self, catalog, tmp_path):
        catalog.append("stage_runs", [run_row()])
        catalog.append("stage_runs", [run_row(view_id="left")])
        d = tmp_path / "store" / "tables" / "stage_runs"
        parts = sorted(p.name for p in d.iterdir())
        assert len(parts) == 2 and all(p.startswith("part-") and p.endswith(".parquet") for p in parts)
        import pyarrow.parquet as pq
        assert pq.read_schema(d / parts[0]).names == catalog.read("stage_runs").schema.names
        # a compaction that crashed after writing the merged file but before deleting the parts:
        merged = pa.concat_tables([pq.read_table(d / p) for p in parts])
        pq.write_table(merged, d / "compacted-00000000T000000000000Z-x.parquet")
        assert catalog.read("stage_runs").num_rows == 2  # no duplicates
        assert catalog.compact("stage_runs") == 3
        assert [p.name.split("-")[0] for p in d.iterdir()] == ["compacted"]
        assert catalog.read("stage_runs").num_rows == 2


def test_open_store_marker(tmp_path):
    s = open_store(tmp_path / "st")
    assert json.loads((tmp_path / "st" / "store-format.json").read_text())["format"] == "pixelface-store"
    s.artifacts.write(ref(), arrays())
    assert open_store(tmp_path / "st", create=False).artifacts.exists(ref())
    with pytest.raises(FileNotFoundError):
        open_store(tmp_path / "none", create=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(StoreFormatError):
        open_store(tmp_path / "other")


def test_builds_creating_one_store_at_once_all_open_it(tmp_path):
    """Another creator's marker, or the temporary file it is written through, is not foreign content."""
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "store-format.json.4242-0af3.tmp").write_text("{")
    assert open_store(tmp_path / "half").url.endswith("half")
    errors = []

    def create():
        try:
            open_store(tmp_path / "raced")
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(p.name for p in (tmp_path / "raced").iterdir()) == [".staging", "store-format.json"]
