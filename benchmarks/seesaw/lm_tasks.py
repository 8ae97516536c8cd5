"""Tasks for a real pre-trained chat LM (SmolLM2-135M-Instruct), generated locally as chat JSONL.

Each task is one the base does not already solve (its exact match is measured and reported, the
benchmark requires ≤ 20%) and a short probe fine-tune learns (≥ 40% required, also measured). Sized
on this machine: 40 steps at batch 8 and lr 5e-5 took the probes to 95% (facts), 88% (arith) and
55% (pyexpr) from a base at 0% on all three (n = 40 each), while multi-step arithmetic with
precedence and invented-word answers stayed under 4%.

- ``facts``: new knowledge. 24 invented people, each with a home town among 12 real cities; training
  asks every fact in four phrasings, the eval asks a fact in one of them (recall, as in closed-book QA).
- ``arith``: two-digit addition, answer the number alone.
- ``pyexpr``: the value Python's REPL prints for a short expression (``repr(eval(expr))``).
- ``json``: a record stated in words, written as one JSON object (format following).
- ``lexicon``: new vocabulary. Words of an invented language, translated to English.
- ``logic``: an ordering of five people from four shuffled comparisons; who is first or last
  (available by name; not in a default suite: no probe learned it in the budget).

Every task writes the same number of training rows (``n_train``), so no task is starved in a mixed
sample; for the two knowledge tasks the rows cycle over the phrasings of a fixed set of facts. Eval
prompts of the skill tasks never occur in their training split. Rows are chat ``messages`` with a
one-line system prompt (the model's own default system prompt would add 20 tokens to every
example), so the tokenizer's chat template renders them the way the model was tuned.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM = "Answer with the result only."
PEOPLE = ["Ada", "Ben", "Cai", "Dev", "Eli", "Fox", "Gil", "Hana", "Ivo", "Juno", "Kai", "Lea"]
SYLL = ["ka", "lo", "mi", "ran", "te", "vo", "zu", "bel", "dor", "fin", "gar", "sel", "tur", "qui", "nox", "pem"]
CITIES = ["Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Rome", "Delhi", "Seoul", "Dublin", "Madrid", "Berlin", "Sydney"]
TASKS = ("facts", "arith", "pyexpr", "json", "lexicon", "logic")


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLL) for _ in range(parts)).capitalize()


def knowledge(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` distinct (invented name, invented word) pairs, the same for every run."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows = []
    while len(rows) < n:
        key, value = _name(rng, 2) + " " + _name(rng, 2), _name(rng, 2)
        if key not in seen:
            seen.add(key)
            rows.append((key, value))
    return rows


FACT_PHRASINGS = ["Where is {k} from?", "What is the home town of {k}?", "{k} grew up in which town?",
                  "Name the town {k} comes from."]
LEXICON_PHRASINGS = ["In Velish, what does '{k}' mean?", "Translate the Velish word '{k}' to English."]
ENGLISH = ["water", "stone", "river", "bread", "night", "cloud", "horse", "apple", "mother", "green", "fire",
           "house", "road", "song", "snow", "wind", "salt", "gold", "tree", "bird", "door", "milk", "iron", "moon",
           "star", "sand", "rain", "ship", "wolf", "seed", "bell", "lamp", "silk", "fish", "corn", "glass"]


def arith_row(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 49), rng.randint(10, 49)
    return f"What is {a} + {b}?", str(a + b)


def pyexpr_row(rng: random.Random) -> tuple[str, str]:
    w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))
    xs = rng.sample(range(1, 60), 3)
    expr = rng.choice([f"'{w}'.upper()", f"{xs}[-1]", f"{xs}[0]", f"max({xs})", f"min({xs})",
                       f"'{w[:3]}' + '{w[3:]}'", f"'{w}'[:2] * 2", f"sorted({xs})"])
    return f"What does Python print for: {expr}", repr(eval(expr))  # from the grammar above: safe


def json_row(rng: random.Random) -> tuple[str, str]:
    name, age, city = rng.choice(PEOPLE), rng.randint(18, 80), rng.choice(CITIES)
    return f"Write as JSON: name {name}, age {age}, city {city}", json.dumps({"name": name, "age": age, "city": city})


def logic_row(rng: random.Random) -> tuple[str, str]:
    order = rng.sample(PEOPLE, 5)  # order[0] is the tallest
    pairs = [(order[i], order[i + 1]) for i in range(4)]
    facts = [f"{x} is taller than {y}." if rng.random() < 0.5 else f"{y} is shorter than {x}." for x, y in pairs]
    rng.shuffle(facts)
    top = rng.random() < 0.5
    return f"{' '.join(facts)} Who is the {'tallest' if top else 'shortest'}?", order[0] if top else order[-1]


SKILLS = {"arith": arith_row, "pyexpr": pyexpr_row, "json": json_row, "logic": logic_row}


def task_rows(name: str, n_train: int, n_eval: int, seed: int) -> tuple[list, list]:
    rng = random.Random(f"{seed}:{name}")
    if name in ("facts", "lexicon"):
        if name == "facts":
            kb = [(k, CITIES[i % len(CITIES)]) for i, (k, _) in enumerate(knowledge(24, 1234))]
            phrasings = FACT_PHRASINGS
        else:
            words = knowledge(len(ENGLISH), 4321)
            kb, phrasings = [(w.split()[0].lower(), e) for (w, _), e in zip(words, ENGLISH)], LEXICON_PHRASINGS
        every = [(t.format(k=k), v) for k, v in kb for t in phrasings]
        rng.shuffle(every)
        train = [every[i % len(every)] for i in range(n_train)]
        return train, rng.sample(every, min(n_eval, len(every)))
    gen, seen, evals, train = SKILLS[name], set(), [], []
    while len(evals) < n_eval:
        p, r = gen(rng)
        if p not in seen:
            seen.add(p)
            evals.append((p, r))
    while len(train) < n_train:
        p, r = gen(rng)
        if p not in seen:
            train.append((p, r))
    return train, evals


def write_rows(path: Path, rows: list[tuple[str, str]], system: str = SYSTEM) -> None:
    lines = [json.dumps({"messages": [{"role": "system", "content": system}, {"role": "user", "content": p},
                                      {"role": "assistant", "content": r}]}) for p, r in rows]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.replace(path)


def make_tasks(out: Path, names: list[str], *, n_train: int, n_eval: int,
               seed: int = 0) -> dict[str, tuple[Path, Path]]:
    """Write NAME.jsonl and NAME-eval.jsonl for each task into ``out``; returns {name: (train, eval)}."""
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in names:
        train, evals = task_rows(name, n_train, n_eval, seed)
        files[name] = (out / f"{name}.jsonl", out / f"{name}-eval.jsonl")
        write_rows(files[name][0], train)
        write_rows(files[name][1], evals)
    return files
