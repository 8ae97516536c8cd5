"""Tasks that interfere (issue 25), generated offline as chat JSONL: train, validation and test splits.

Families (task names are FAMILY-VARIANT):

- ``fmt`` (format conflict): identical two-digit addition prompts; the system line is the only cue.
  ``fmt-terse`` answers the number ("57"), ``fmt-explain`` the equation ("23 + 34 = 57"). Both tasks
  train on the same prompts; validation and test prompts are held out of training and shared by both.
- ``attr`` (attribute conflict): the same invented people, each with a home town and a (different)
  workplace among 12 real cities. ``attr-home`` asks where a person lives, ``attr-work`` where they
  work, in several phrasings each. Knowledge is memorised: training cycles over every (person,
  phrasing) pair (n_train ≥ the pairs, so every fact is trained; every task has n_train rows, so
  the Full SFT mix is balanced); validation and test are disjoint sets of those pairs (recall, as closed-book QA).
  ``cross`` files hold the test prompts with the *other* attribute as the answer: a teacher-forced hit
  there is cross-talk (the model answers the other task's fact).
- ``ctrl`` (control, no conflict): ``ctrl-pyexpr``, lm_tasks.py's Python-expression task (its own
  system line, prompts of its own), held-out validation and test prompts.

Answers are short (≤ 12 tokens), so teacher-forced exact match is exact and cheap.
"""

from __future__ import annotations

import random
from pathlib import Path

import lm_tasks

CITIES = lm_tasks.CITIES
FAMILIES = {"fmt": ["fmt-terse", "fmt-explain"], "attr": ["attr-home", "attr-work"], "ctrl": ["ctrl-pyexpr"]}
TASKS = [t for ts in FAMILIES.values() for t in ts]
SYSTEMS = {"fmt-terse": "Reply with the number only.", "fmt-explain": "Reply with the full equation.",
           "attr-home": "Answer with the city only.", "attr-work": "Answer with the city only.",
           "ctrl-pyexpr": lm_tasks.SYSTEM}
PHRASINGS = {"attr-home": ["Where does {k} live?", "Which city is {k}'s home?", "{k} lives in which city?",
                           "Name the city where {k} lives.", "What is the home town of {k}?",
                           "In which city does {k} have a home?"],
             "attr-work": ["Where does {k} work?", "Which city is {k}'s workplace?", "{k} works in which city?",
                           "Name the city where {k} works.", "What is the work town of {k}?",
                           "In which city does {k} have a job?"]}
OTHER = {"attr-home": "attr-work", "attr-work": "attr-home"}


def people(n: int, seed: int = 2025) -> list[tuple[str, str, str]]:
    """``n`` invented people: (name, home town, workplace), home ≠ work, the same for every run."""
    rng = random.Random(seed)
    names = [k for k, _ in lm_tasks.knowledge(n, seed)]
    out = []
    for k in names:
        home, work = rng.sample(CITIES, 2)
        out.append((k, home, work))
    return out


def _fmt(n_train: int, n_val: int, n_test: int, seed: int) -> dict:
    rng = random.Random(f"{seed}:fmt")
    pairs = [(a, b) for a in range(10, 60) for b in range(10, 60)]
    rng.shuffle(pairs)
    held, pool = pairs[:n_val + n_test], pairs[n_val + n_test:]
    train_pairs = [pool[i % len(pool)] for i in range(n_train)]
    answer = {"fmt-terse": lambda a, b: str(a + b), "fmt-explain": lambda a, b: f"{a} + {b} = {a + b}"}
    out = {}
    for name, fn in answer.items():
        rows = lambda ps, fn=fn: [(f"What is {a} + {b}?", fn(a, b)) for a, b in ps]  # noqa: E731
        out[name] = {"train": rows(train_pairs), "val": rows(held[:n_val]), "test": rows(held[n_val:])}
    return out


def _attr(n_people: int, n_train: int, n_val: int, n_test: int, seed: int) -> dict:
    folk = people(n_people)
    keys = [(i, j) for i in range(n_people) for j in range(len(PHRASINGS["attr-home"]))]
    if n_val + n_test > len(keys) or n_train < len(keys):
        raise SystemExit(f"attr: {n_people} people x {len(PHRASINGS['attr-home'])} phrasings = {len(keys)} pairs: "
                         f"need n_val + n_test ({n_val} + {n_test}) <= pairs <= n_train ({n_train})")
    rng = random.Random(f"{seed}:attr")
    held = rng.sample(keys, n_val + n_test)
    value = {"attr-home": lambda p: p[1], "attr-work": lambda p: p[2]}
    out = {}
    for name in ("attr-home", "attr-work"):
        every = list(keys)
        rng.shuffle(every)
        row = lambda key, task=name, ans=name: (PHRASINGS[task][key[1]].format(k=folk[key[0]][0]),  # noqa: E731
                                                value[ans](folk[key[0]]))
        out[name] = {"train": [row(every[i % len(every)]) for i in range(n_train)],
                     "val": [row(k) for k in held[:n_val]], "test": [row(k) for k in held[n_val:]],
                     "cross": [row(k, ans=OTHER[name]) for k in held[n_val:]]}
    return out


def _ctrl(n_train: int, n_val: int, n_test: int, seed: int) -> dict:
    train, evals = lm_tasks.task_rows("pyexpr", n_train, n_val + n_test, seed)
    return {"ctrl-pyexpr": {"train": train, "val": evals[:n_val], "test": evals[n_val:]}}


def make(out: Path, names: list[str], *, n_train: int, n_val: int, n_test: int, n_people: int = 120,
         seed: int = 0) -> dict[str, dict[str, Path]]:
    """Write NAME-{train,val,test[,cross]}.jsonl into ``out``; returns {name: {split: path}}."""
    build = {"fmt": lambda: _fmt(n_train, n_val, n_test, seed),
             "attr": lambda: _attr(n_people, n_train, n_val, n_test, seed),
             "ctrl": lambda: _ctrl(n_train, n_val, n_test, seed)}
    rows = {k: v for f, ts in FAMILIES.items() if set(ts) & set(names) for k, v in build[f]().items()}
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, Path]] = {}
    for name in names:
        files[name] = {}
        for split, items in rows[name].items():
            path = out / f"{name}-{split}.jsonl"
            lm_tasks.write_rows(path, items, SYSTEMS[name])
            files[name][split] = path
    return files
