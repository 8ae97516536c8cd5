"""Per-rank memory formula (training/memory.py): exact arithmetic, docs/training.md's table, the committed CPU check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cpift.training.memory import memory_table, rank_memory

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("params, world, fsdp, frozen", [(1001, 8, True, 77), (1001, 8, False, 77), (7, 1, True, 0),
                                                         (6_738_415_616, 2, True, 269_536_624)],
                         ids=["fsdp-uneven", "ddp", "one", "7b"])
def test_bytes_per_rank(params, world, fsdp, frozen):
    m = rank_memory(params, world=world, fsdp=fsdp, frozen=frozen)
    share = (params + world - 1) // world if fsdp else params  # the largest rank's shard
    frozen_share = (frozen + world - 1) // world if fsdp else frozen
    assert (m.weights, m.grads, m.adam, m.freeze) == (4 * share, 4 * share, 8 * share, 12 * frozen_share)
    assert m.total == 16 * share + 12 * frozen_share and m.peak == m.total + 4 * share


def test_out_of_range_refused():
    for kwargs in ({"world": 0}, {"frozen": 11}, {"frozen": -1}):
        with pytest.raises(ValueError, match="rank_memory"):
            rank_memory(10, **kwargs)


def test_readme_table_is_the_formula():
    assert memory_table() in (ROOT / "docs" / "training.md").read_text()


def test_committed_cpu_measurement_agrees_with_the_formula():
    result = json.loads((ROOT / "benchmarks" / "results" / "memory_per_rank.json").read_text())
    measured = {}
    for row in result["rows"]:
        fsdp = row["config"] == "fsdp2"
        m = rank_memory(row["params"], world=row["world"], fsdp=fsdp, frozen=row["frozen"])
        assert row["predicted"]["total"] == m.total and row["predicted"]["peak"] == m.peak  # the same formula
        assert len(row["ranks"]) == row["world"]
        assert 0.8 <= row["measured_max_bytes"] / m.peak <= 1.3, row["config"]
        measured[row["config"], row["world"]] = row["measured_max_bytes"]
    # sharding over two ranks frees at least three quarters of what the formula says it does
    saved = measured["fsdp2", 1] - measured["fsdp2", 2]
    n = result["rows"][0]["params"]
    predicted = rank_memory(n, fsdp=True).peak - rank_memory(n, world=2, fsdp=True).peak
    assert saved >= 0.75 * predicted
