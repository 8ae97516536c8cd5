"""The five declared methods (merge/methods/declare.py: arcee_fusion, ram, ramplus_tl, consensus_ta,
consensus_ties) from their commands and from mergekit YAML: the output is the per-tensor kernel's on
every tensor, the YAML and the command give the same bytes, the recipe replays, bad input is one line
with exit code 2."""

from __future__ import annotations

import math

import pytest
import torch
from references import load_state
from test_bad_input import assert_user_error, digest, no_output, run_cli

from cpift.kernels.arcee_fusion import arcee_fusion
from cpift.kernels.ram import ram_blend, ram_counts, ramplus_scales
from cpift.kernels.select import magnitude_cut
from cpift.kernels.tall import tall_merge

W = [1.0, 0.5, 0.8]


def _ram(b, xs, name):
    return ram_blend(b, xs, 1e-3, out=torch.empty_like(b), backend="torch")


def _ramplus(b, xs, name):
    s, u = ram_counts(b, xs, 1e-3, backend="torch")
    return ram_blend(b, xs, 1e-3, ramplus_scales(s, u, 0.5, 0.4, 1e-3), out=torch.empty_like(b), backend="torch")


def _ta(b, xs, name):
    return tall_merge(b, xs, W, [0.8] * 3, 2, out=torch.empty_like(b), backend="torch")


def _ties(b, xs, name):
    cuts = [magnitude_cut(x, b, math.floor(0.5 * x.numel()), backend="torch") for x in xs]
    return tall_merge(b, xs, W, [1.0, 0.7, 1.5], 1, cuts=cuts, elect_sign=True, normalize=True,
                      out=torch.empty_like(b), backend="torch")


# command, its arguments besides the inputs, the YAML parameters (per model, shared), the per-tensor expectation
CASES = {
    "ram": (["--epsilon", "1e-3"], "", "{epsilon: 0.001}", _ram),
    "ramplus-tl": (["--epsilon", "1e-3", "--r", "0.5", "--alpha", "0.4"], "", "{epsilon: 0.001, r: 0.5, alpha: 0.4}",
                   _ramplus),
    "consensus-ta": (["--weights", "1,0.5,0.8", "--tall-lambda", "0.8", "--k", "2"], "{{weight: {w}}}",
                     "{lambda: 0.8, k: 2}", _ta),
    "consensus-ties": (["--weights", "1,0.5,0.8", "--density", "0.5", "--tall-lambda", "1,0.7,1.5"],
                       "{{weight: {w}, density: 0.5, lambda: {lam}}}", "{k: 1}", _ties),
}
LAMS = [1.0, 0.7, 1.5]


def _yaml(command: str, llama) -> str:
    _, per, shared, _ = CASES[command]
    models = "".join(f"  - model: {llama[f'task{i + 1}']}\n" + (f"    parameters: {per.format(w=W[i], lam=LAMS[i])}\n"
                                                                 if per else "") for i in range(3))
    return (f"merge_method: {command.replace('-', '_')}\nbase_model: {llama['base']}\nmodels:\n{models}"
            f"parameters: {shared}\n")


@pytest.mark.parametrize("command", list(CASES))
def test_command_yaml_and_recipe_give_the_kernels_output(capsys, llama, tmp_path, command):
    args, _, _, expect = CASES[command]
    tasks = [llama[f"task{i}"] for i in (1, 2, 3)]
    before = digest(llama["base"], *tasks)
    code, _, err = run_cli(capsys, command, "--base", llama["base"], *tasks, *args, "-o", tmp_path / "cli", "-q",
                           "--backend", "cpu")
    assert code == 0, err
    assert digest(llama["base"], *tasks) == before
    out, base = load_state(tmp_path / "cli"), load_state(llama["base"])
    states = [load_state(t) for t in tasks]
    for name, b in base.items():
        if b.is_floating_point():
            want = expect(b.reshape(-1), [s[name].reshape(-1) for s in states], name)
            assert torch.equal(out[name].reshape(-1), want), name
    (tmp_path / "merge.yml").write_text(_yaml(command, llama))
    for src, dst in ((tmp_path / "merge.yml", "yaml"), (tmp_path / "cli" / "cpift_recipe.yml", "replay")):
        code, _, err = run_cli(capsys, "config", src, "-o", tmp_path / dst, "-q")
        assert code == 0, err
        again = load_state(tmp_path / dst)
        assert all(torch.equal(again[n], t) for n, t in out.items()), (dst, command)


def test_arcee_fusion_command_and_yaml(capsys, llama, tmp_path):
    code, _, err = run_cli(capsys, "arcee-fusion", llama["base"], llama["task1"], "-o", tmp_path / "cli", "-q")
    assert code == 0, err
    out, a, b = load_state(tmp_path / "cli"), load_state(llama["base"]), load_state(llama["task1"])
    for name, x in a.items():
        if x.is_floating_point():
            want = arcee_fusion(x.reshape(-1), b[name].reshape(-1), x.shape, out=torch.empty(x.numel(), dtype=x.dtype))
            assert torch.equal(out[name].reshape(-1), want), name
    (tmp_path / "merge.yml").write_text(f"merge_method: arcee_fusion\nbase_model: {llama['base']}\nmodels:\n"
                                        f"  - model: {llama['task1']}\n")
    code, _, err = run_cli(capsys, "config", tmp_path / "merge.yml", "-o", tmp_path / "yaml", "-q")
    assert code == 0, err
    assert load_state(tmp_path / "yaml").keys() == out.keys()
    assert all(torch.equal(load_state(tmp_path / "yaml")[n], t) for n, t in out.items())


@pytest.mark.parametrize("argv, fragment", [
    (["ram", "--epsilon", "-1"], "epsilon: -1.0 is outside [0.0, inf]"),
    (["ramplus-tl", "--alpha", "-0.5"], "alpha: -0.5 is outside [0.0, inf]"),
    (["consensus-ta", "--k", "1.5"], "--k"),
    (["consensus-ta", "--weights", "1,2"], "weights: got 2 values for 3 models"),
    (["consensus-ties", "--density", "0"], "density: 0.0 is outside (0.0, 1.0]"),
    (["consensus-ties", "--tall-lambda", "1,-1,1"], "tall_lambda[1]: -1.0 is outside [0.0, inf]"),
])
def test_bad_parameters_are_one_line_and_exit_2(capsys, llama, tmp_path, argv, fragment):
    tasks = [llama[f"task{i}"] for i in (1, 2, 3)]
    assert_user_error(capsys, [argv[0], "--base", llama["base"], *tasks, *argv[1:], "-o", tmp_path / "out"],
                      fragment, inputs=[llama["base"], *tasks])
    no_output(tmp_path)


@pytest.mark.parametrize("text, fragment", [
    ("merge_method: arcee_fusion\nbase_model: {base}\nmodels:\n  - model: {task1}\n  - model: {task2}\n",
     "arcee_fusion merges exactly two models"),
    ("merge_method: ram\nmodels:\n  - model: {task1}\n  - model: {task2}\n", "base_model: missing"),
    ("merge_method: consensus_ties\nbase_model: {base}\nmodels:\n  - model: {task1}\n    parameters: {{weight: 1}}\n"
     "parameters: {{rescale: true}}\n", "parameters.rescale: true is not supported for consensus_ties"),
    ("merge_method: consensus_ta\nbase_model: {base}\nmodels:\n  - model: {task1}\n"
     "    parameters: {{weight: 1, k: 2}}\n", "'k' applies to the whole merge"),
    ("merge_method: ramplus_tl\nbase_model: {base}\nmodels:\n  - model: {task1}\nparameters: {{r: -1}}\n",
     "r: -1.0 is outside [0.0, inf]"),
])
def test_bad_yaml_is_one_line_and_exit_2(capsys, llama, tmp_path, text, fragment):
    cfg = tmp_path / "merge.yml"
    cfg.write_text(text.format(**{k: str(v) for k, v in llama.items()}))
    assert_user_error(capsys, ["config", cfg, "-o", tmp_path / "out"], fragment, inputs=list(llama.values()))
    no_output(tmp_path)


def test_arcee_fusion_takes_exactly_two_models(capsys, llama, tmp_path):
    code, _, err = run_cli(capsys, "arcee-fusion", llama["base"], llama["task1"], llama["task2"], "-o", tmp_path / "o")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
