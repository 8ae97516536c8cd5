"""The pipeline recipe: one YAML file naming the base model, the tasks and every phase's settings.

Layout (paths relative to the recipe file; every key but ``base`` and ``tasks`` has a default)::

    base: base-model                  # Hugging Face model directory (safetensors + tokenizer)
    seed: 0                           # data order of every SFT, stage order, calibration sample, random split
    tasks:                            # two or more
      - {name: math, train: math.jsonl, eval: math-eval.jsonl}
    probe: {steps: 100, lr: 1.0e-5, batch_size: 8}   # SFT of each probe (one task, from base)
    p: 1.0                            # core size, % of all entries, in (0, 100]
    granularity: element              # element | row | block:N
    tau: 0.1                          # Jaccard link threshold, in [0, 1]
    order: random                     # stage order: random (seeded) | given (groups by first task in the list)
    train: {steps_per_task: 100, lr: 1.0e-5, batch_size: 8, schedule: restart}  # staged / full SFT
    calibration: {examples: 64, steps_per_task: 10, lr: 1.0e-6, batch_size: 8, data: mixed, schedule: restart}
    fuse: {overlap: last, omega: null}  # overlap: last | largest (|θ_i − θ_base| decides)
    baselines:
      stages: 2                       # K of multistage-random (--stages overrides)
      groups: [[math], [code, chat]]  # stages of multistage-heuristic, in order
      task_arithmetic: {lam: 1.0}
      ties: {density: 0.2, lam: 1.0}
    eval: {batch_size: 8, max_length: 1024, max_new_tokens: null, exact_match: greedy, per_item: false}
    intermediate_dtype: float32       # probes, stages, fused, calibration: float32 | bfloat16 | float16 | auto

SFT sections take sft()'s options: steps (probe) or steps_per_task (train, calibration), lr,
weight_decay, batch_size, grad_accum, max_length, warmup, max_grad_norm; train and calibration
also take ``schedule``: ``restart`` (each stage warms up and decays on its own) or ``continue`` (one
warm-up and cosine laid over all stages of the phase, each stage taking its share). Calibration
``data``: ``mixed`` (the paper's: every stage trains on a balanced sample of all tasks) or ``group``
(each stage on a balanced sample of its own group's tasks). A stage of g tasks runs
g × steps_per_task optimizer steps, so every staged method (CPI-FT, full SFT, both multi-stage
baselines) spends N × steps_per_task steps on its main training whatever its grouping: comparable
budgets by construction.

``intermediate_dtype``: the dtype every model but the final one is saved in. float32 (the default)
keeps each update exact: saved in bf16, most of a small-lr probe's update rounds to zero and its
core marks where the weights are large. ``auto``: each model in its input checkpoint's dtype.
The final model is saved in the base checkpoint's dtype whatever this says.

``eval.exact_match``: ``greedy`` (generate) or ``teacher-forced`` (the same verdict from one forward
pass); ``eval.per_item``: eval.json also holds each example's hit and loss (for paired tests).

Every error is a ConfigError "FILE: FIELD: what is wrong", raised before anything is written.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cpift.errors import ConfigError, ParameterError
from cpift.merge.io.safe_parse import load_yaml_file
from cpift.numbers import parse_number

SFT_KEYS = ("lr", "weight_decay", "batch_size", "grad_accum", "max_length", "warmup", "max_grad_norm")
SFT_DEFAULTS = {"lr": 2e-5, "weight_decay": 0.0, "batch_size": 8, "grad_accum": 1, "max_length": 1024,
                "warmup": 0.03, "max_grad_norm": 1.0}
SCHEDULES = ("restart", "continue")  # of a staged phase's learning rate: per stage, or one over all stages
TOP_KEYS = ("base", "seed", "tasks", "probe", "p", "granularity", "tau", "order", "train", "calibration", "fuse",
            "baselines", "eval", "intermediate_dtype")
DTYPES = ("float32", "bfloat16", "float16", "auto")


@dataclass
class Task:
    name: str
    train: Path
    eval: Path


@dataclass
class Recipe:
    path: Path
    base: Path
    tasks: list[Task]
    seed: int = 0
    probe: dict = field(default_factory=dict)  # sft() keyword arguments, steps included
    p: float = 1.0
    granularity: str = "element"
    tau: float = 0.1
    order: str = "random"
    train: dict = field(default_factory=dict)  # sft() options + steps_per_task
    calibration: dict = field(default_factory=dict)  # sft() options + steps_per_task + examples
    overlap: str = "last"
    omega: float | None = None
    stages: int = 2  # K of multistage-random
    groups: list[list[str]] | None = None  # multistage-heuristic
    ta_lam: float = 1.0
    ties_density: float = 0.2
    ties_lam: float = 1.0
    eval: dict = field(default_factory=dict)  # evaluate() options
    intermediate_dtype: str = "float32"  # sft()'s save_dtype for every model but the final one

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def to_json(self) -> dict:
        d = asdict(self)
        d["path"], d["base"] = str(self.path), str(self.base)
        d["tasks"] = [{"name": t.name, "train": str(t.train), "eval": str(t.eval)} for t in self.tasks]
        return d


class _Fields:
    """Reads one mapping of the recipe, naming ``FILE: section.key`` in every error."""

    def __init__(self, file: Path, where: str, raw, allowed: tuple[str, ...]):
        self.file, self.where = file, where
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            self.fail("", f"expected a mapping of {', '.join(allowed)}, got {type(raw).__name__}")
        unknown = [k for k in raw if k not in allowed]
        if unknown:
            self.fail(str(unknown[0]), f"unknown key (expected one of: {', '.join(allowed)})")
        self.raw = raw

    def fail(self, key: str, message: str):
        name = ".".join(x for x in (self.where, key) if x)
        raise ConfigError(f"{self.file}: {name or 'recipe'}: {message}")

    def num(self, key: str, default, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
            integer: bool = False, optional: bool = False):
        v = self.raw.get(key, default)
        if v is None and optional:
            return None
        name = ".".join(x for x in (self.where, key) if x)
        return parse_number(v, f"{self.file}: {name}", integer=integer, lo=lo, hi=hi, lo_open=lo_open,
                            what="an integer" if integer else "a number")

    def choice(self, key: str, default: str, options: tuple[str, ...]) -> str:
        v = self.raw.get(key, default)
        if v not in options:
            self.fail(key, f"expected one of {', '.join(options)}, got {v!r}")
        return v


def _sft(file: Path, where: str, raw, steps_key: str, extra: tuple[str, ...] = ()) -> dict:
    f = _Fields(file, where, raw, (steps_key, *SFT_KEYS, *extra))
    out = {steps_key: f.num(steps_key, 10, lo=1, integer=True),
           "lr": f.num("lr", SFT_DEFAULTS["lr"], lo=0, lo_open=True),
           "weight_decay": f.num("weight_decay", 0.0, lo=0),
           "batch_size": f.num("batch_size", 8, lo=1, integer=True),
           "grad_accum": f.num("grad_accum", 1, lo=1, integer=True),
           "max_length": f.num("max_length", 1024, lo=2, integer=True),
           "warmup": f.num("warmup", 0.03, lo=0, hi=0.999999),
           "max_grad_norm": f.num("max_grad_norm", 1.0, lo=0, optional=True)}
    if out["batch_size"] < out["grad_accum"]:
        f.fail("batch_size", f"{out['batch_size']} examples cannot fill grad_accum={out['grad_accum']} micro-batches")
    return out


def _existing(f: _Fields, key: str, base_dir: Path, *, directory: bool = False) -> Path:
    v = f.raw.get(key)
    if not isinstance(v, str) or not v:
        f.fail(key, f"expected a path, got {v!r}")
    path = (base_dir / os.path.expanduser(v)).resolve()
    if not (path.is_dir() if directory else path.is_file()):
        f.fail(key, f"{path}: {'directory' if directory else 'file'} does not exist")
    return path


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Parse and validate a pipeline recipe; ConfigError naming the file and field on any problem."""
    file = Path(path)
    raw = load_yaml_file(file, what="recipe")
    top = _Fields(file, "", raw, TOP_KEYS)
    here = file.resolve().parent
    if "base" not in top.raw:
        top.fail("base", "missing (the pre-trained model directory)")
    base = _existing(top, "base", here, directory=True)

    tasks_raw = top.raw.get("tasks")
    if not isinstance(tasks_raw, list) or len(tasks_raw) < 2:
        top.fail("tasks", "give a list of at least two tasks, each {name, train, eval}")
    tasks: list[Task] = []
    for i, t in enumerate(tasks_raw):
        f = _Fields(file, f"tasks[{i}]", t, ("name", "train", "eval"))
        for key in ("name", "train", "eval"):
            if key not in f.raw:
                f.fail(key, "missing")
        name = f.raw["name"]
        from cpift.merge.cpi.names import check_task_names

        try:
            check_task_names([str(name)], "name")
        except ParameterError as e:
            f.fail("", str(e))
        if name in (x.name for x in tasks):
            f.fail("name", f"duplicate task name '{name}'")
        tasks.append(Task(name, _existing(f, "train", here), _existing(f, "eval", here)))
    names = [t.name for t in tasks]

    r = Recipe(path=file.resolve(), base=base, tasks=tasks)
    r.seed = top.num("seed", 0, lo=0, integer=True)
    r.probe = _sft(file, "probe", top.raw.get("probe"), "steps")
    r.p = top.num("p", 1.0, lo=0, lo_open=True, hi=100)
    from cpift.merge.cpi.masks import parse_granularity

    try:
        r.granularity = parse_granularity(top.raw.get("granularity", "element"))
    except ParameterError as e:
        top.fail("", str(e))
    r.tau = top.num("tau", 0.1, lo=0, hi=1)
    r.order = top.choice("order", "random", ("random", "given"))
    r.intermediate_dtype = top.choice("intermediate_dtype", "float32", DTYPES)
    r.train = _sft(file, "train", top.raw.get("train"), "steps_per_task", ("schedule",))
    r.train["schedule"] = _Fields(file, "train", top.raw.get("train"), ("steps_per_task", "schedule", *SFT_KEYS)
                                  ).choice("schedule", "restart", SCHEDULES)
    cal_keys = ("examples", "data", "schedule")
    r.calibration = _sft(file, "calibration", top.raw.get("calibration"), "steps_per_task", cal_keys)
    cal = _Fields(file, "calibration", top.raw.get("calibration"), ("steps_per_task", *cal_keys, *SFT_KEYS))
    r.calibration["examples"] = cal.num("examples", 16, lo=1, integer=True)
    r.calibration["data"] = cal.choice("data", "mixed", ("mixed", "group"))
    r.calibration["schedule"] = cal.choice("schedule", "restart", SCHEDULES)
    fz = _Fields(file, "fuse", top.raw.get("fuse"), ("overlap", "omega"))
    r.overlap = fz.choice("overlap", "last", ("last", "largest"))
    r.omega = fz.num("omega", None, lo=0, hi=1, optional=True)

    bl = _Fields(file, "baselines", top.raw.get("baselines"), ("stages", "groups", "task_arithmetic", "ties"))
    r.stages = bl.num("stages", min(2, len(tasks)), lo=1, hi=len(tasks), integer=True)
    groups = bl.raw.get("groups")
    if groups is not None:
        if not isinstance(groups, list) or not all(isinstance(g, list) and g for g in groups):
            bl.fail("groups", "expected a list of non-empty lists of task names, e.g. [[math], [code, chat]]")
        flat = [n for g in groups for n in g]
        for n in flat:
            if n not in names:
                bl.fail("groups", f"'{n}' is not a task of this recipe ({', '.join(names)})")
        if sorted(flat) != sorted(names):
            bl.fail("groups", "must name every task exactly once")
        r.groups = [list(g) for g in groups]
    ta = _Fields(file, "baselines.task_arithmetic", bl.raw.get("task_arithmetic"), ("lam",))
    r.ta_lam = ta.num("lam", 1.0)
    ti = _Fields(file, "baselines.ties", bl.raw.get("ties"), ("density", "lam"))
    r.ties_density = ti.num("density", 0.2, lo=0, lo_open=True, hi=1)
    r.ties_lam = ti.num("lam", 1.0)

    ev = _Fields(file, "eval", top.raw.get("eval"), ("batch_size", "max_length", "max_new_tokens", "exact_match",
                                                     "per_item"))
    r.eval = {"batch_size": ev.num("batch_size", 8, lo=1, integer=True),
              "max_length": ev.num("max_length", 1024, lo=2, integer=True),
              "max_new_tokens": ev.num("max_new_tokens", None, lo=1, integer=True, optional=True),
              "exact_match": ev.choice("exact_match", "greedy", ("greedy", "teacher-forced")),
              "per_item": ev.choice("per_item", False, (False, True))}
    return r
