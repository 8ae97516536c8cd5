"""Evaluation against hand computations: the loss by an unbatched forward, exact match by a plain argmax loop."""

from __future__ import annotations

import json

import pytest
import torch

from cpift.training.data import load_dataset
from cpift.training.evaluate import evaluate, evaluate_model, load_model, load_tokenizer

from training_helpers import write_jsonl

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
