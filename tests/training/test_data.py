"""JSONL → token ids and labels: labels cover exactly the response tokens; bad lines name file:line."""

from __future__ import annotations

import pytest
import torch
from training_helpers import make_tokenizer, write_jsonl

from cpift.errors import DataError
from cpift.training.data import IGNORE, collate, load_dataset

M = IGNORE


def ids(tok, text: str) -> list[int]:
    """Hand tokenization for the character tokenizer: one id per character."""
    return [tok.convert_tokens_to_ids(c) for c in text]


def test_prompt_response_labels_by_hand(tmp_path):
    tok = make_tokenizer()
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "2+3=", "response": "5"},
                                             {"prompt": "ab ", "response": "cd", "id": 7}])
    ds = load_dataset(path, tok, max_length=64)
    eos = tok.eos_token_id
    first, second = ds.examples
    assert first.input_ids == ids(tok, "2+3=5") + [eos]
    assert first.labels == [M, M, M, M] + ids(tok, "5") + [eos]
    assert (first.prompt_len, first.reference, first.targets) == (4, "5", 2)
    assert second.input_ids == ids(tok, "ab cd") + [eos]
    assert second.labels == [M, M, M] + ids(tok, "cd") + [eos]
    assert ds.truncated == 0


def test_chat_template_labels_by_hand(tmp_path):
    tok = make_tokenizer(chat=True)
    u, a, end = (tok.convert_tokens_to_ids(t) for t in ("<|user|>", "<|assistant|>", "<|end|>"))
    conv = {"messages": [{"role": "system", "content": "be"}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "yo"}, {"role": "user", "content": "2+2"},
                         {"role": "assistant", "content": "4"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ab", "response": "cd"}, conv])
    plain, multi = load_dataset(path, tok, max_length=64).examples
    assert plain.input_ids == [u] + ids(tok, "ab") + [end, a] + ids(tok, "cd") + [end]
    assert plain.labels == [M] * 5 + ids(tok, "cd") + [end]
    assert plain.prompt_len == 5
    system = [tok.convert_tokens_to_ids("<|system|>")] + ids(tok, "be") + [end]
    want_ids = system + [u] + ids(tok, "hi") + [end, a] + ids(tok, "yo") + [end, u] + ids(tok, "2+2") + [end, a] \
        + ids(tok, "4") + [end]
    want_labels = [M] * (len(system) + 5) + ids(tok, "yo") + [end] + [M] * 6 + ids(tok, "4") + [end]
    assert multi.input_ids == want_ids
    assert multi.labels == want_labels
    assert multi.reference == "4" and multi.prompt_len == len(want_ids) - 2


def test_truncation_keeps_the_start_and_counts(tmp_path):
    tok = make_tokenizer()
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "abc", "response": "defgh"},
                                             {"prompt": "a", "response": "b"}])
    ds = load_dataset(path, tok, max_length=5)
    assert ds.examples[0].input_ids == ids(tok, "abcde") and ds.examples[0].labels == [M, M, M] + ids(tok, "de")
    assert ds.examples[0].truncated and not ds.examples[1].truncated and ds.truncated == 1


def test_collate_pads_right_and_ignores_padding(tmp_path):
    tok = make_tokenizer()
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "abc", "response": "d"}])
    batch = collate(load_dataset(path, tok, max_length=16).examples, pad_id=0)
    eos = tok.eos_token_id
    assert batch["input_ids"].tolist() == [ids(tok, "ab") + [eos, 0, 0], ids(tok, "abcd") + [eos]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert batch["labels"].tolist() == [[M] + ids(tok, "b") + [eos, M, M], [M, M, M] + ids(tok, "d") + [eos]]
    assert batch["labels"].dtype == torch.long


@pytest.mark.parametrize("lines,line,message", [
    (['{"prompt": "a", "response": "b"}', "", '{"prompt": "a", "response": }'], 3, "not valid JSON"),
    (['{"prompt": "a", "response": "b"}', '{"prompt": "a"}'], 2, "no 'response' field"),
    (['{"prompt": "a", "response": ""}'], 1, "'response' is empty"),
    (['{"prompt": "a", "response": 5}'], 1, "'response' must be a string"),
    (['{"text": "a"}'], 1, "expected 'prompt' and 'response', or 'messages'"),
    (['[1, 2]'], 1, "expected a JSON object"),
    (['{"messages": [{"role": "user", "content": "a"}]}'], 1, "no non-empty assistant message"),
    (['{"messages": [{"role": "user"}]}'], 1, "messages\\[0\\] needs a string 'role' and a string 'content'"),
    (['{"messages": [], "prompt": "a", "response": "b"}'], 1, "not both"),
    (['{"prompt": "abcdefgh", "response": "x"}'], 1, "prompt takes 8 tokens.*leaves no response token"),
], ids=["bad-json", "no-response", "empty-response", "non-string", "unknown-keys", "not-object",
        "no-assistant", "bad-message", "both-formats", "prompt-too-long"])
def test_bad_lines_name_file_and_line(tmp_path, lines, line, message):
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(DataError, match=f"^{path}:{line}: .*{message}"):
        load_dataset(path, make_tokenizer(), max_length=6)


@pytest.mark.parametrize("content", ["", "\n\n  \n"], ids=["empty", "blank-lines"])
def test_empty_dataset(tmp_path, content):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="no examples"):
        load_dataset(path, make_tokenizer(), max_length=16)


def test_missing_file_and_bad_utf8(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(tmp_path / "nope.jsonl", make_tokenizer(), max_length=16)
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=f"{path}:2: not valid UTF-8"):
        load_dataset(path, make_tokenizer(), max_length=16)


def test_eval_needs_the_assistant_turn_last(tmp_path):
    conv = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                         {"role": "user", "content": "c"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [conv])
    assert len(load_dataset(path, make_tokenizer(chat=True), max_length=64)) == 1
    with pytest.raises(DataError, match=f"{path}:1: the last message must be the assistant's"):
        load_dataset(path, make_tokenizer(chat=True), max_length=64, for_eval=True)


def test_chat_template_that_refuses_a_conversation(tmp_path):
    tok = make_tokenizer(chat=True)
    tok.chat_template = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}"
                         "{% endif %}{{ m.content }}{% endfor %}")
    conv = {"messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "b"},
                         {"role": "assistant", "content": "c"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, conv])
    with pytest.raises(DataError, match=f"^{path}:2: the tokenizer's chat template refused .*no system role"):
        load_dataset(path, tok, max_length=64)
