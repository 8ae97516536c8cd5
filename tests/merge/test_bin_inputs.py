""".bin (PyTorch pickle) inputs: read with weights_only and mmap, merged bit-identically to the same
weights in safetensors, tied weights, mixed inputs, bad pickles as one-line errors, and ``pull`` of
a repo that has only .bin weights (loopback Hub)."""

from __future__ import annotations

import datetime
import json
import os
import zipfile
from pathlib import Path

import pytest
import torch
from references import load_state
from safetensors.torch import load_file, save_file
from test_bad_input import assert_user_error, digest, run_cli
from test_hub import cpift_merge_each  # noqa: F401 - hub: the loopback Hub fixture
from test_hub import hub as hub

from cpift.merge.io.checkpoint import Checkpoint

SHAPES = {"model.embed_tokens.weight": (37, 24), "model.layers.0.self_attn.q_proj.weight": (24, 24),
          "model.layers.0.mlp.up_proj.weight": (41, 24), "model.layers.0.input_layernorm.weight": (24,),
          "model.norm.weight": (24,), "lm_head.weight": (37, 24)}
CONFIG = {"model_type": "llama", "hidden_size": 24, "torch_dtype": "bfloat16"}


def make_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in SHAPES.items()}
    state["model.norm.weight"] = state["model.norm.weight"].float()  # a second dtype
    state["model.rotary_emb.position_ids"] = torch.arange(7)  # an integer buffer: copied
    # Storage shared under several names, as torch.save keeps it: tied, an offset slice, a transpose.
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    state["model.layers.0.self_attn.k_proj.weight"] = state["model.layers.0.self_attn.q_proj.weight"][12:]
    state["model.layers.0.mlp.down_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"].t()
    return state


def save_bin(state: dict[str, torch.Tensor], path: Path, shards: int = 1, **save_kw) -> Path:
    """``pytorch_model.bin``, or ``shards`` files with ``pytorch_model.bin.index.json`` (transformers' names)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(CONFIG))
    if shards == 1:
        torch.save(state, path / "pytorch_model.bin", **save_kw)
        return path
    names, weight_map = list(state), {}
    for i in range(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[i::shards]}
        torch.save(part, path / fname, **save_kw)
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    return path


def save_st(state: dict[str, torch.Tensor], path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(CONFIG))
    save_file({n: t.clone().contiguous() for n, t in state.items()}, path / "model.safetensors")
    return path


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def assert_bit_identical(a: Path, b: Path) -> None:
    sa, sb = load_state(a), load_state(b)
    assert sa.keys() == sb.keys()
    assert all(same_bits(sa[n], sb[n]) for n in sa), [n for n in sa if not same_bits(sa[n], sb[n])]


def merge(capsys, method: str, models: list[Path], out: Path) -> str:
    base = ["--base", models[0], *models[1:]] if method != "linear" else models
    extra = ["--density", "0.4"] if method == "ties" else []
    code, stdout, err = run_cli(capsys, method, *base, *extra, "--threads", "1", "-o", out)
    assert code == 0, err
    return err


@pytest.fixture
def states():
    return [make_state(i) for i in range(3)]


@pytest.mark.parametrize("method", ["linear", "ties"])
@pytest.mark.parametrize("shards", [1, 3], ids=["single", "sharded"])
def test_bin_merge_is_bit_identical_to_safetensors(capsys, tmp_path, states, method, shards):
    bins = [save_bin(s, tmp_path / f"bin{i}", shards) for i, s in enumerate(states)]
    sts = [save_st(s, tmp_path / f"st{i}") for i, s in enumerate(states)]
    before = digest(*bins)
    err = merge(capsys, method, bins, tmp_path / "from-bin")
    merge(capsys, method, sts, tmp_path / "from-st")
    assert_bit_identical(tmp_path / "from-bin", tmp_path / "from-st")
    assert digest(*bins) == before, "inputs were modified"
    assert all(f"note: reading .bin checkpoints of {p} (slower than safetensors" in err for p in bins), err
    assert sorted(p.name for p in (tmp_path / "from-bin").glob("*.safetensors")) == ["model.safetensors"]
    assert not list((tmp_path / "from-bin").glob("*.bin"))


def test_mixed_bin_and_safetensors_inputs(capsys, tmp_path, states):
    mixed = [save_bin(states[0], tmp_path / "b0", 2), save_st(states[1], tmp_path / "s1"),
             save_bin(states[2], tmp_path / "b2")]
    sts = [save_st(s, tmp_path / f"st{i}") for i, s in enumerate(states)]
    merge(capsys, "task-arithmetic", mixed, tmp_path / "mixed")
    merge(capsys, "task-arithmetic", sts, tmp_path / "plain")
    assert_bit_identical(tmp_path / "mixed", tmp_path / "plain")


def test_safetensors_preferred_and_legacy_format_read(tmp_path, states):
    both = save_st(states[0], tmp_path / "both")
    torch.save(states[1], both / "pytorch_model.bin")
    ckpt = Checkpoint(both)
    assert not ckpt.notes and torch.equal(ckpt.get("lm_head.weight"), states[0]["lm_head.weight"])
    legacy = Checkpoint(save_bin(states[1], tmp_path / "legacy", 2, _use_new_zipfile_serialization=False))
    assert any("cannot be memory-mapped (torch.save's legacy format" in n for n in legacy.notes)
    assert all(torch.equal(legacy.get(n), t) for n, t in states[1].items())


def test_a_big_endian_zip_is_loaded_not_mapped(tmp_path, states):
    """torch byte-swaps such a shard as it loads it: a private map's swapped pages must not be released."""
    path = save_bin({**states[0], "big": torch.randn(64, 256)}, tmp_path / "be")  # pages wholly inside it
    f = path / "pytorch_model.bin"
    with zipfile.ZipFile(f) as src:
        records = [(i, src.read(i)) for i in src.infolist()]
    with zipfile.ZipFile(f, "w") as dst:
        for info, data in records:
            dst.writestr(info, b"big" if info.filename.endswith("/byteorder") else data)
    ckpt = Checkpoint(path)
    assert any("big-endian" in n for n in ckpt.notes)
    want = torch.load(f, weights_only=True)
    for n in want:
        ckpt.populate(n)
        ckpt.release(n)
        assert same_bits(ckpt.get(n), want[n]), n  # swapped bytes: NaNs among them


def test_cores_of_bin_inputs(capsys, tmp_path, states):
    """The CPI steps read .bin models too: the same masks as from safetensors, and the note."""
    for kind, save in (("bin", lambda s, d: save_bin(s, d, 2)), ("st", save_st)):
        dirs = [save(s, tmp_path / f"{kind}{i}") for i, s in enumerate(states[:2])]
        code, _, err = run_cli(capsys, "cores", "--base", dirs[0], "--model", f"t={dirs[1]}", "--p", "5",
                               "--threads", "1", "-o", tmp_path / f"cores-{kind}")
        assert code == 0, err
        assert ("note: reading .bin checkpoints" in err) == (kind == "bin")
    masks = [load_file(tmp_path / f"cores-{kind}" / "t.safetensors") for kind in ("bin", "st")]
    assert masks[0].keys() == masks[1].keys() and all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])


def _mapped_files() -> list[tuple[int, int, str]]:
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            spans.append((lo, hi, fields[5]))
    return spans


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="Linux /proc")
def test_bin_tensors_are_views_of_a_map_of_the_file(tmp_path, states):
    """mmap=True on the zip format torch.save writes: tensors are not copied into memory."""
    path = save_bin(states[0], tmp_path / "m", 2)
    ckpt = Checkpoint(path)
    t = ckpt.get("model.layers.0.mlp.up_proj.weight")
    file = os.path.realpath(ckpt.info("model.layers.0.mlp.up_proj.weight").file)
    assert any(lo <= t.data_ptr() < hi and name == file for lo, hi, name in _mapped_files())
    ckpt.populate("model.layers.0.mlp.up_proj.weight")
    ckpt.release("model.layers.0.mlp.up_proj.weight")
    assert torch.equal(t, states[0]["model.layers.0.mlp.up_proj.weight"])  # read again from the file


def test_tied_weights_are_one_tensor_per_name(capsys, tmp_path):
    """A transformers model with tied embeddings, torch.save'd as its state dict (both names share
    one storage, as transformers' .bin files have them): each name reads as a tensor, the merge
    writes both, and transformers loads the output."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=33, max_position_embeddings=16, tie_word_embeddings=True)
    dirs = []
    for i in range(2):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_config(config)
        state = model.state_dict()
        assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
        dirs.append(tmp_path / f"tied{i}")
        dirs[-1].mkdir()
        model.config.save_pretrained(dirs[-1])
        torch.save(state, dirs[-1] / "pytorch_model.bin")
    ckpt = Checkpoint(dirs[0])
    assert torch.equal(ckpt.get("lm_head.weight"), ckpt.get("model.embed_tokens.weight"))
    merge(capsys, "linear", dirs, tmp_path / "out")
    out = load_state(tmp_path / "out")
    assert torch.equal(out["lm_head.weight"], out["model.embed_tokens.weight"])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(merged.lm_head.weight.detach(), out["lm_head.weight"])


def _truncated(tmp_path, states) -> tuple[Path, Path]:
    path = save_bin(states[1], tmp_path / "bad")
    f = path / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return path, f


def _missing_shard(tmp_path, states) -> tuple[Path, Path]:
    path = save_bin(states[1], tmp_path / "bad", 3)
    (path / "pytorch_model-00002-of-00003.bin").unlink()
    return path, path / "pytorch_model.bin.index.json"


def _refused_pickle(tmp_path, states) -> tuple[Path, Path]:
    path = save_bin({**states[1], "when": datetime.datetime(2026, 1, 1)}, tmp_path / "bad")
    return path, path / "pytorch_model.bin"


def _not_a_tensor(tmp_path, states) -> tuple[Path, Path]:
    path = save_bin({**states[1], "step": 7}, tmp_path / "bad")
    return path, path / "pytorch_model.bin"


@pytest.mark.parametrize("damage, fragment", [
    (_truncated, "truncated or corrupt: the zip archive torch.save writes cannot be read"),
    (_missing_shard, "names shard 'pytorch_model-00002-of-00003.bin', which is missing"),
    (_refused_pickle, "does not allow (Unsupported global: GLOBAL datetime.datetime"),
    (_not_a_tensor, "entry 'step' is of type int, not a tensor"),
], ids=["truncated", "missing-shard", "weights-only-refusal", "not-a-tensor"])
def test_bad_bin_is_a_one_line_error(capsys, tmp_path, states, damage, fragment):
    good = save_bin(states[0], tmp_path / "good")
    bad, file = damage(tmp_path, states)
    err = assert_user_error(capsys, ["linear", good, bad, "-o", tmp_path / "out"], str(file), fragment,
                            inputs=[good, bad])
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_pull_a_bin_only_repo(hub, tmp_path, states, capsys):
    """No safetensors in the repo: pull fetches the .bin shards and their index (not optimizer.bin or
    training_args.bin); with safetensors there, no .bin file is fetched. The pulled model merges offline."""
    src = save_bin(states[0], tmp_path / "src", 2)
    extra = {"optimizer.bin": b"not wanted", "training_args.bin": b"not wanted", "README.md": b"# card\n"}
    hub.commit("org/binonly", {**{p.name: p.read_bytes() for p in src.iterdir()}, **extra})
    both = save_st(states[1], tmp_path / "both")
    hub.commit("org/both", {**{p.name: p.read_bytes() for p in both.iterdir()}, "pytorch_model.bin": b"not wanted"})
    bin_pull, st_pull = cpift_merge_each(tmp_path, hub, ["pull", "org/binonly"], ["pull", "org/both"])
    assert bin_pull.returncode == 0 and st_pull.returncode == 0, (bin_pull.stderr, st_pull.stderr)
    snap = Path(bin_pull.stdout.strip())
    assert {p.name for p in snap.iterdir()} == {p.name for p in src.iterdir()}
    assert all((snap / p.name).read_bytes() == p.read_bytes() for p in src.iterdir())
    assert {p.name for p in Path(st_pull.stdout.strip()).iterdir()} == {"config.json", "model.safetensors"}

    out = tmp_path / "merged"
    (merged,) = cpift_merge_each(tmp_path, hub, ["linear", "org/binonly", save_st(states[2], tmp_path / "s2"),
                                                 "-o", out, "--threads", "1"], offline=True)
    assert merged.returncode == 0, merged.stderr
    assert "note: reading .bin checkpoints of" in merged.stderr
    merge(capsys, "linear", [save_st(states[0], tmp_path / "s0"), tmp_path / "s2"], tmp_path / "local")
    assert_bit_identical(out, tmp_path / "local")
