"""Evaluation against hand computations: the loss by an unbatched forward, exact match by a plain argmax loop."""

from __future__ import annotations

import json

import pytest
import torch
from training_helpers import arithmetic_rows, write_jsonl

from cpift.training.data import load_dataset
from cpift.training.evaluate import evaluate, evaluate_model, load_model, load_tokenizer

PROMPTS = ["1+2=", "13+4=", "7=", "20+19=", "5+5="]  # different lengths: the generation batch is left-padded


def hand_greedy(model, tokenizer, prompt: str, n: int) -> str:
    """Argmax decoding without cache or padding, stopping at EOS: the reference for exact match."""
    ids = tokenizer(prompt)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if t == tokenizer.eos_token_id:
                break
            out.append(t)
    return tokenizer.decode(out, skip_special_tokens=True)


def test_exact_match_and_loss_by_hand(tiny, tmp_path):
    tokenizer = load_tokenizer(tiny)
    model, _ = load_model(tiny, torch.device("cpu"))
    greedy = [hand_greedy(model, tokenizer, p, 4) for p in PROMPTS]
    assert all(g.strip() for g in greedy), greedy  # the case needs non-blank continuations
    # hits: the greedy text itself, once wrapped in whitespace (stripped before comparing); misses: one more char
    responses = [greedy[0], f"  {greedy[1]}\n", greedy[2] + "z", greedy[3], "q" + greedy[4]]
    path = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": p, "response": r} for p, r in zip(PROMPTS, responses)])
    data = load_dataset(path, tokenizer, max_length=64, for_eval=True)
    result = evaluate_model(model, tokenizer, data, batch_size=3, max_new_tokens=4, progress=False)

    total, count = 0.0, 0
    with torch.no_grad():
        for p, r in zip(PROMPTS, responses):
            ids = tokenizer(p + r)["input_ids"] + [tokenizer.eos_token_id]
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            for t in range(len(p), len(ids)):  # one token per character: response positions start at len(p)
                total -= float(logp[t - 1, ids[t]])
                count += 1
    assert result["n"] == 5 and result["exact_match"] == pytest.approx(3 / 5)
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)


def test_public_evaluate_reads_a_saved_model(tiny, tmp_path):
    path = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "1+1=", "response": "2"},
                                                 {"prompt": "2+2=", "response": "4"}])
    a = evaluate(tiny, path, batch_size=1, progress=False)
    b = evaluate(tiny, path, batch_size=2, progress=False)
    assert set(a) == {"loss", "exact_match", "n"} and a["n"] == 2
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    json.dumps(a)  # plain floats and ints


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "chat-template"])
def half_trained(request, tiny, tiny_chat, tmp_path_factory):
    """A tiny Llama trained briefly on sums: it gets some right and some wrong (so the test can fail)."""
    from cpift.training.sft import sft

    work = tmp_path_factory.mktemp("half")
    train = write_jsonl(work / "train.jsonl", arithmetic_rows(256, seed=1))
    sft(tiny_chat if request.param else tiny, train, work / "model", steps=60, lr=3e-3, batch_size=32,
        progress=False)
    return work / "model"


def test_teacher_forced_exact_match_equals_greedy_generation(half_trained, tmp_path):
    tokenizer = load_tokenizer(half_trained)
    model, _ = load_model(half_trained, torch.device("cpu"))
    rows = arithmetic_rows(48, seed=7)
    path = write_jsonl(tmp_path / "eval.jsonl", rows)
    data = load_dataset(path, tokenizer, max_length=64, for_eval=True)
    greedy = evaluate_model(model, tokenizer, data, batch_size=5, progress=False, per_item=True)
    forced = evaluate_model(model, tokenizer, data, batch_size=7, progress=False, per_item=True,
                            exact_match="teacher-forced")
    assert [i["hit"] for i in forced["items"]] == [i["hit"] for i in greedy["items"]]
    assert 0 < greedy["exact_match"] < 1, greedy["exact_match"]  # hits and misses both present
    assert forced["loss"] == pytest.approx(greedy["loss"], rel=1e-6)
    assert [i["where"] for i in forced["items"]] == [f"{path}:{n}" for n in range(1, len(rows) + 1)]
    assert sum(i["loss"] for i in forced["items"]) / sum(i["tokens"] for i in forced["items"]) == \
        pytest.approx(forced["loss"], rel=1e-5)


def test_exact_match_mode_is_checked_before_loading(tmp_path):
    from cpift.errors import ParameterError

    with pytest.raises(ParameterError, match="exact_match: 'beam'"):
        evaluate(tmp_path / "no-model", tmp_path / "no.jsonl", exact_match="beam")
