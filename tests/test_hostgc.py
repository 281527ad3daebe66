"""Python's garbage collector around the timed steps (yxanul.hostgc)."""
from __future__ import annotations

import gc

import pytest

from yxanul.errors import YxanulError
from yxanul.hostgc import GcWatch, release, settle


class _Cycle:
    def __init__(self):
        self.me = self


def test_settle_freezes_survivors_and_release_returns_them():
    keep = [_Cycle() for _ in range(100)]
    try:
        settle("freeze")
        assert gc.get_freeze_count() >= 100
        release()
        assert gc.get_freeze_count() == 0
        settle("default")
        assert gc.get_freeze_count() == 0
    finally:
        release()
    del keep


def test_settle_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="freeze, default"):
        settle("off")


def test_watch_counts_collections_and_time():
    with GcWatch() as w:
        gc.collect(0)
        gc.collect(2)
    assert w.counts[0] >= 1 and w.counts[2] >= 1 and w.seconds > 0
    s = w.summary(4)
    assert s["gc_collections"] == w.counts and s["gc_ms_per_step"] == round(w.seconds * 1000 / 4, 3)
    before = list(w.counts)
    gc.collect()
    assert w.counts == before  # no longer registered


def test_train_config_validates_host_gc():
    from yxanul.train_config import TrainConfig
    with pytest.raises(YxanulError, match="host_gc"):
        TrainConfig(host_gc="never").validate()
    assert TrainConfig().host_gc == "freeze"


def test_bench_rows_record_gc_and_reject_a_bad_mode(tmp_path):
    from yxanul.bench.throughput import run_throughput
    with pytest.raises(YxanulError, match="--host-gc"):
        run_throughput(model="tiny", modes="bf16", host_gc="sometimes", device="cpu", compile=False)
    res = run_throughput(model="tiny", batch=2, seq=32, steps=2, warmup=1, modes="bf16", device="cpu",
                         compile=False, log=lambda s: None, host_gc="default")
    row = res["rows"][0]
    assert res["host_gc"] == "default"
    assert row["gc_ms_per_step"] >= 0 and len(row["gc_collections"]) == 3
    run_throughput(model="tiny", batch=2, seq=32, steps=2, warmup=1, modes="bf16", device="cpu", compile=False,
                   log=lambda s: None, host_gc="freeze")
    assert gc.get_freeze_count() == 0  # released when the benchmark returns

