"""The prefetch (merge/io/stream.py) runs ahead of the math only as far as its byte budget allows: the
input bytes it has mapped and the caller not yet released never exceed the budget (a tensor larger than
the budget is mapped alone), it does run ahead when tensors are small, and it hints the read-ahead
of the tensors past its window."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from cpift.merge.io.stream import Prefetcher


class CountingSource:
    """A source whose populate is slow (a cold disk) and which records how many bytes it holds mapped."""

    def __init__(self, sizes: dict[str, int], log: dict, delay: float = 0.002):
        self.tensors = {n: SimpleNamespace(nbytes=b) for n, b in sizes.items()}
        self.log, self.delay = log, delay

    def populate(self, name: str) -> None:
        self.log.setdefault("hinted_before_first", len(self.log["hinted"]))
        time.sleep(self.delay)
        with self.log["lock"]:
            self.log["mapped"] += self.tensors[name].nbytes
            self.log["peak"] = max(self.log["peak"], self.log["mapped"])
            self.log["ahead"] = max(self.log["ahead"], len(self.log["held"]) + 1)
            self.log["held"].add(name)

    def release(self, name: str) -> None:
        with self.log["lock"]:
            self.log["mapped"] -= self.tensors[name].nbytes
            self.log["held"].discard(name)

    def hint(self, name: str) -> None:
        self.log["hinted"].append(name)


def consume(sizes: list[int], budget: int, hint_budget: int = 0, work: float = 0.003) -> dict:
    names = [f"t{i}" for i in range(len(sizes))]
    log = {"lock": threading.Lock(), "mapped": 0, "peak": 0, "ahead": 0, "held": set(), "hinted": []}
    pre = Prefetcher([CountingSource(dict(zip(names, sizes)), log)], None, names, budget=budget,
                     hint_budget=hint_budget)
    try:
        for j in range(len(names)):
            pre.wait(j)
            assert names[j] in log["held"]  # mapped before the math reads it
            time.sleep(work)  # the math
            pre.done(j)
    finally:
        pre.stop()
    assert log["mapped"] == 0 and pre.mapped == 0
    return log


@pytest.mark.parametrize("budget", [1000, 3500, 10_000])
def test_mapped_bytes_stay_within_the_budget(budget):
    sizes = [700, 300, 1000, 50, 50, 50, 900, 400, 400, 1000, 20] * 3
    log = consume(sizes, budget)
    assert log["peak"] <= budget


def test_small_tensors_are_prefetched_several_ahead_and_a_large_one_alone():
    log = consume([10] * 40, budget=100, work=0.01)  # slow math: the prefetch fills its window
    assert 5 <= log["ahead"] <= 10 and log["peak"] <= 100
    log = consume([10, 5000, 10, 10], budget=100)  # larger than the budget: mapped with nothing else
    assert log["peak"] == 5000


def test_the_read_ahead_hints_go_past_the_window_in_order():
    sizes = [100] * 20
    log = consume(sizes, budget=200, hint_budget=300)
    assert log["hinted"] == [f"t{i}" for i in range(20)]  # every tensor, once, in order
    # Before the first read, the window and the hints cover budget + hint budget = 5 tensors.
    assert consume(sizes[:10], budget=200, hint_budget=300)["hinted_before_first"] == 5
