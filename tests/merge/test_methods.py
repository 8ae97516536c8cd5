"""Every method end to end on real sharded transformers checkpoints, against float64 references."""

from __future__ import annotations

import json

import pytest
import torch
from oracles import elect64, linear64, slerp64, task_arithmetic64, ties64
from references import assert_matches, load_state

from cpift.kernels.dare import keep_mask, tensor_seed
from cpift.merge import methods

FAMILIES = [("llama", torch.float32), ("llama", torch.bfloat16), ("qwen2", torch.float32),
            ("qwen2", torch.bfloat16)]
IDS = [f"{a}-{str(d).removeprefix('torch.')}" for a, d in FAMILIES]


@pytest.fixture(params=FAMILIES, ids=IDS)
def fam(request, families):
    return families[request.param]


def _states(fam, *names):
    return [load_state(fam[n]) for n in names]


def _check_all(out, refs_fn, inputs):
    """Every output tensor against its float64 reference; ``inputs`` are all the input states (their
    summed magnitudes bound the float32 rounding of intermediates)."""
    got = load_state(out)
    assert set(got) == set(inputs[0]), "output must hold exactly the input tensor names"
    for name, tensor in got.items():
        assert tensor.dtype == inputs[0][name].dtype and tensor.shape == inputs[0][name].shape
        scale = sum(s[name].double().abs() for s in inputs)
        assert_matches(tensor, refs_fn(name), name, scale)


def test_slerp(fam, tmp_path):
    a, b = _states(fam, "task1", "task2")
    r = methods.slerp(fam["task1"], fam["task2"], tmp_path / "out", t=0.3, progress=False)
    _check_all(tmp_path / "out", lambda n: slerp64(a[n], b[n], 0.3), [a, b])
    assert r.tensors == len(a) and r.bytes_read > 0


@pytest.mark.parametrize("t", [0.0, 1.0])
def test_slerp_endpoints_are_exact(llama, tmp_path, t):
    methods.slerp(llama["task1"], llama["task2"], tmp_path / "out", t=t, progress=False)
    want = load_state(llama["task1" if t == 0 else "task2"])
    for name, tensor in load_state(tmp_path / "out").items():
        assert torch.equal(tensor, want[name]), name


def test_linear(fam, tmp_path):
    xs = _states(fam, "task1", "task2", "task3")
    ws = [1.0, 2.0, 0.5]
    methods.linear([fam["task1"], fam["task2"], fam["task3"]], tmp_path / "out", weights=ws, progress=False)
    _check_all(tmp_path / "out", lambda n: linear64([x[n] for x in xs], ws), xs)


def test_task_arithmetic(fam, tmp_path):
    b, *xs = _states(fam, "base", "task1", "task2")
    methods.task_arithmetic(fam["base"], [fam["task1"], fam["task2"]], tmp_path / "out",
                            weights=[0.5, 0.7], lam=0.8, progress=False)
    _check_all(tmp_path / "out", lambda n: task_arithmetic64(b[n], [x[n] for x in xs], [0.5, 0.7], 0.8), [b, *xs])


@pytest.mark.parametrize("density", [0.3, 1.0])
def test_ties(fam, tmp_path, density):
    b, *xs = _states(fam, "base", "task1", "task2", "task3")
    # weights exact in binary: with 0.8, a weighted sum that is 0 in real arithmetic rounds to a tiny
    # value of a different sign in float32 and float64, so the elected sign legitimately differs
    ws = [1.0, 0.5, 0.75]
    methods.ties(fam["base"], [fam["task1"], fam["task2"], fam["task3"]], tmp_path / "out",
                 weights=ws, density=density, lam=1.2, progress=False)
    _check_all(tmp_path / "out", lambda n: ties64(b[n], [x[n] for x in xs], ws, density, 1.2), [b, *xs])


@pytest.mark.parametrize("elect", [False, True], ids=["dare-linear", "dare-ties"])
def test_dare(fam, tmp_path, elect):
    b, *xs = _states(fam, "base", "task1", "task2")
    ws, density, seed = [1.0, 0.625], 0.4, 7
    fn = methods.dare_ties if elect else methods.dare_linear
    fn(fam["base"], [fam["task1"], fam["task2"]], tmp_path / "out", weights=ws, density=density, seed=seed,
       progress=False)

    def ref(n):
        base = b[n].double().reshape(-1)
        deltas = []
        for i, x in enumerate(xs):
            keep = keep_mask(tensor_seed(seed, n, i), 0, base.numel(), density)
            deltas.append(torch.where(keep, (x[n].double().reshape(-1) - base) / density, 0.0))
        if elect:
            return elect64(b[n], deltas, ws, 1.0)
        return base + sum(w * d for w, d in zip(ws, deltas))

    # kept deltas are scaled by 1/density: intermediates are that much larger
    _check_all(tmp_path / "out", ref, [b, *({n: v / density for n, v in x.items()} for x in xs)])


def test_dare_is_seeded(llama, tmp_path):
    args = (llama["base"], [llama["task1"], llama["task2"]])
    methods.dare_ties(*args, tmp_path / "a", density=0.3, seed=1, progress=False)
    methods.dare_ties(*args, tmp_path / "b", density=0.3, seed=1, progress=False)
    methods.dare_ties(*args, tmp_path / "c", density=0.3, seed=2, progress=False)
    a, b, c = (load_state(tmp_path / x) for x in "abc")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    # the drop mask keeps about `density` of the entries
    big = max(a, key=lambda n: a[n].numel())
    kept = keep_mask(tensor_seed(1, big, 0), 0, 200_000, 0.3).float().mean().item()
    assert abs(kept - 0.3) < 0.01


def test_output_layout_and_loading(llama, tmp_path):
    """Sharded like transformers, index consistent, side files copied, loads and generates."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    methods.slerp(llama["task1"], llama["task2"], out, t=0.5, max_shard_size="30000", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 1 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in out.glob("*.safetensors")) == files
    state = load_state(out)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in state.values())
    assert (out / "config.json").read_text() == (llama["task1"] / "config.json").read_text()
    assert not list(tmp_path.glob(".*"))  # no partial directory left behind
    model = AutoModelForCausalLM.from_pretrained(out)
    for name, p in model.state_dict().items():
        assert torch.equal(p, state[name].to(p.dtype)), name
    ids = torch.tensor([[1, 5, 9, 3]])
    gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 8)
    assert torch.isfinite(model(ids).logits).all()


def test_ties_global_trim(fam, tmp_path):
    """One threshold over the whole model: the reference sorts every float32 score of the model at once
    (tensors in name order, stable, so ties go to the lowest flat index)."""
    b, *xs = _states(fam, "base", "task1", "task2")
    ws, density = [1.0, 0.75], 0.2
    methods.ties(fam["base"], [fam["task1"], fam["task2"]], tmp_path / "out", weights=ws, density=density,
                 global_trim=True, progress=False)
    names = sorted(b)
    kept = []
    for x in xs:
        scores = torch.cat([(x[n].float() - b[n].float()).abs().reshape(-1) for n in names]).double()
        k = int(density * scores.numel())
        keep = torch.zeros(scores.numel(), dtype=torch.bool)
        keep[torch.sort(scores, descending=True, stable=True).indices[:k]] = True
        kept.append(dict(zip(names, keep.split([b[n].numel() for n in names]))))

    def ref(n):
        base = b[n].double().reshape(-1)
        deltas = [torch.where(kept[i][n], x[n].double().reshape(-1) - base, 0.0) for i, x in enumerate(xs)]
        return elect64(b[n], deltas, ws, 1.0)

    _check_all(tmp_path / "out", ref, [b, *xs])


def test_ties_global_trim_with_heavy_ties(tmp_path):
    """bf16 deltas drawn from four values: the global threshold falls inside a run of ties spanning
    tensors, so the tie placement across tensors is exercised."""
    from safetensors.torch import save_file

    from cpift.merge.tools.synthetic import PRESETS, make_checkpoint

    base = make_checkpoint(tmp_path / "base", PRESETS["tiny"])
    state = load_state(base)
    g = torch.Generator().manual_seed(3)
    paths = []
    for i in range(2):
        d = tmp_path / f"t{i}"
        tensors = {k: (v.float() + torch.tensor([-2.0, -1.0, 1.0, 2.0])[torch.randint(0, 4, v.shape, generator=g)]
                           * 2 ** -6).to(v.dtype) for k, v in state.items()}
        d.mkdir()
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text((base / "config.json").read_text())
        paths.append(d)
    methods.ties(base, paths, tmp_path / "out", density=0.37, global_trim=True, progress=False)
    xs = [load_state(p) for p in paths]
    names = sorted(state)
    got = load_state(tmp_path / "out")
    kept = []
    for x in xs:
        scores = torch.cat([(x[n].float() - state[n].float()).abs().reshape(-1) for n in names]).double()
        keep = torch.zeros(scores.numel(), dtype=torch.bool)
        keep[torch.sort(scores, descending=True, stable=True).indices[:int(0.37 * scores.numel())]] = True
        kept.append(dict(zip(names, keep.split([state[n].numel() for n in names]))))
    for n in names:
        base_n = state[n].double().reshape(-1)
        deltas = [torch.where(kept[i][n], x[n].double().reshape(-1) - base_n, 0.0) for i, x in enumerate(xs)]
        assert_matches(got[n], elect64(state[n], deltas, [1.0, 1.0], 1.0), n)
