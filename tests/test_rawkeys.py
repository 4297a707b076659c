"""The memo of raw view keys (storage.rawkeys): same keys as hashing, reused only for unchanged files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from storage.keys import raw_view_key
from storage.rawkeys import MEMO_DIR, RawKeyMemo


@pytest.fixture
def raw(tmp_path) -> Path:
    root = tmp_path / "raw"
    for sample in ("neutral", "smile"):
        (root / "S0000" / sample).mkdir(parents=True)
        (root / "S0000" / sample / "sample.json").write_text(json.dumps({"expression": sample}))
        for view in ("left", "right"):
            d = root / "S0000" / sample / view
            d.mkdir()
            for i in range(3):
                (d / f"fringe_f0_n{i}.png").write_bytes(os.urandom(1000))
    return root


VIEWS = [(s, v) for s in ("neutral", "smile") for v in ("left", "right")]


def keys(store, raw, **kw):
    Path(store).mkdir(exist_ok=True)
    memo = RawKeyMemo(str(store), raw, "S0000", **kw)
    out = {sv: memo.key(*sv) for sv in VIEWS}
    memo.save()
    return out, memo


def test_memo_gives_the_hashed_keys_and_skips_unchanged_files(raw, tmp_path):
    store = tmp_path / "store"
    truth = {sv: raw_view_key(raw, "S0000", *sv) for sv in VIEWS}
    k1, m1 = keys(store, raw, racy_s=0.0)
    assert k1 == truth and (m1.hits, m1.misses) == (0, 4)
    assert (store / MEMO_DIR / "S0000.json").is_file()
    k2, m2 = keys(store, raw, racy_s=0.0)
    assert k2 == truth and (m2.hits, m2.misses) == (4, 0)

    # same size, same modification time, other bytes: the change time moved, so it is hashed again
    f = raw / "S0000" / "smile" / "left" / "fringe_f0_n1.png"
    st = f.stat()
    f.write_bytes(os.urandom(1000))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_mtime_ns == st.st_mtime_ns and f.stat().st_size == st.st_size
    k3, m3 = keys(store, raw, racy_s=0.0)
    assert (m3.hits, m3.misses) == (3, 1)
    assert k3[("smile", "left")] != truth[("smile", "left")] == k2[("smile", "left")]
    assert k3[("smile", "left")] == raw_view_key(raw, "S0000", "smile", "left")
    # an extra file and a removed one change the key too
    (raw / "S0000" / "neutral" / "right" / "extra.txt").write_text("x")
    (raw / "S0000" / "neutral" / "left" / "fringe_f0_n0.png").unlink()
    k4, m4 = keys(store, raw, racy_s=0.0)
    assert (m4.hits, m4.misses) == (2, 2)
    assert k4 == {sv: raw_view_key(raw, "S0000", *sv) for sv in VIEWS}


def test_recent_files_are_not_remembered(raw, tmp_path):
    store = tmp_path / "store"
    keys(store, raw)  # files written just now: within RACY_S of hashing
    _, m = keys(store, raw)
    assert (m.hits, m.misses) == (0, 4)


def test_foreign_corrupt_or_linked_memos_are_ignored(raw, tmp_path):
    store = tmp_path / "store"
    truth = {sv: raw_view_key(raw, "S0000", *sv) for sv in VIEWS}
    keys(store, raw, racy_s=0.0)
    path = store / MEMO_DIR / "S0000.json"
    memo = json.loads(path.read_text())
    # another raw root with the same layout (a copy): its files are other files, never the memo's keys
    other = tmp_path / "raw2"
    os.rename(raw, other)
    _, m = keys(store, other, racy_s=0.0)
    assert m.hits == 0
    os.rename(other, raw)
    for bad in ("not json", json.dumps({**memo, "version": 99}),
                json.dumps({**memo, "views": {k: {**v, "key": "../../etc"} for k, v in memo["views"].items()}})):
        path.write_text(bad)
        got, m = keys(tmp_path / "store", raw, racy_s=0.0)
        assert got == truth and m.hits == 0
    # a remembered wrong key for unchanged files would be used: the memo is trusted like the artifacts,
    # so a planted _cache link that leaves the store is never written through
    outside = tmp_path / "outside"
    outside.mkdir()
    store2 = tmp_path / "store2"
    store2.mkdir()
    (store2 / "_cache").symlink_to(outside, target_is_directory=True)
    got, _ = keys(store2, raw, racy_s=0.0)
    assert got == truth and not any(outside.iterdir())
    # remote / in-memory stores remember nothing
    got, m = keys_remote(raw)
    assert got == truth and m.path is None


def keys_remote(raw):
    memo = RawKeyMemo("s3://bucket/store", raw, "S0000", racy_s=0.0)
    out = {sv: memo.key(*sv) for sv in VIEWS}
    memo.save()
    return out, memo


def test_unsafe_subject_id_is_refused(raw, tmp_path):
    with pytest.raises(ValueError, match="subject"):
        RawKeyMemo(str(tmp_path / "store"), raw, "../S0000")
