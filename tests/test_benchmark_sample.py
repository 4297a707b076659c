"""``python -m benchmarks.sample`` at small size: every stage of the sample chain is measured and the
CPU accounting adds up (process CPU of the sample >= the sum of its stages). Speed is not asserted."""

from __future__ import annotations

import json

import pytest

from benchmarks import sample as bench
from tasks.view_stages import SAMPLE_CHAIN

TOL_S = 0.05  # getrusage vs per-thread clocks


@pytest.fixture(scope="module")
def res(tmp_path_factory):
    work = tmp_path_factory.mktemp("sample_bench")
    out = work / "small.json"
    assert bench.main(["--size", "small", "--work", str(work), "--no-warmup", "--no-cached-run",
                       "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_every_stage_of_the_chain_is_measured_per_view(res):
    assert list(res["stage_cpu_s"]) == list(SAMPLE_CHAIN.stage_names)
    assert res["views"] == ["left", "middle", "right"] and res["image_size"] == [320, 256]
    for st in SAMPLE_CHAIN.steps:
        per_view = res["stage_cpu_s_per_view"][st.spec.name]
        assert list(per_view) == (res["views"] if st.spec.level == "view" else ["_sample"])
        assert all(v > 0 for v in per_view.values()), (st.spec.name, per_view)
        assert res["stage_cpu_s"][st.spec.name] == pytest.approx(sum(per_view.values()), abs=1e-9)
        assert res["stage_cpu_s"][st.spec.name] == pytest.approx(
            res["stage_kernel_cpu_s"][st.spec.name] + res["io_cpu_s"][st.spec.name], abs=1e-9)
    assert res["biggest_stage"] == max(res["stage_cpu_s"], key=res["stage_cpu_s"].get)


def test_sample_cpu_covers_the_stages_and_derived_numbers_follow(res):
    total = sum(res["stage_cpu_s"].values())
    assert res["sum_stage_cpu_s"] == pytest.approx(total)
    assert res["sample_cpu_s"] >= total + res["plan_cpu_s"] - TOL_S
    assert res["other_threads_cpu_s"] >= -TOL_S and res["bookkeeping_cpu_s"] >= -TOL_S
    assert res["samples_per_hour_per_core"] == pytest.approx(3600 / res["sample_cpu_s"])
    assert res["hours_for_24525_samples_on_64_cores"] == pytest.approx(24525 * res["sample_cpu_s"] / 64 / 3600)
    assert res["template_prep_cpu_s"] > 0 and res["import_cpu_s"] > 0
    assert 0 < res["peak_rss_gb"] < 8
    assert set(res["targets_met"]) == {"sample_cpu_s<=15", "peak_rss_gb<=4"}
    assert res["targets_met"]["peak_rss_gb<=4"] == (res["peak_rss_gb"] <= 4)
    # the configured small sizes reached the kernels
    assert 2000 <= res["template_vertices"] <= 5000
    assert abs(res["surface_vertices"] - 20_000) <= 0.05 * 20_000
    assert all(n > 10_000 for n in res["decode_points"].values())
