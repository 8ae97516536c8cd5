"""Five heterogeneous tasks, generated locally and deterministically as prompt/response JSONL.

Each mirrors one of the paper's task families at a size a char-level model learns in minutes:

- ``math``: one-step word problems (add, subtract, multiply) with a numeric answer (GSM8K-like).
- ``code``: the REPL output of a short Python expression (len, slicing, str methods, arithmetic,
  max/min/sorted); the reference is Python's own ``repr(eval(expr))`` (CodeAlpaca-like).
- ``logic``: deduction over a three-element ordering given by two shuffled comparisons (LogiQA-like).
- ``instruct``: an instruction naming a string operation: count letters, first/last letter, contains e,
  first two letters (Alpaca-like).
- ``facts``: closed-book QA over a synthetic knowledge base of invented countries (capital, colour);
  the eval questions ask about facts present in the training split (recall, as in knowledge QA),
  each in one of the two phrasings that training uses.

Eval prompts never occur in the training split (except ``facts``, by design). Any other JSONL task
can be added by path (``seesaw.py --task NAME=TRAIN.jsonl,EVAL.jsonl``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

NAMES = ["Al", "Bo", "Cy", "Di", "Ed", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kim", "Lu"]
ITEMS = ["pens", "eggs", "cards", "coins", "books", "cups", "rocks", "bees"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _word(rng: random.Random, lo: int = 3, hi: int = 6) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def math_row(rng: random.Random) -> tuple[str, str]:
    who, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return f"Q: {who} has {a} {item} and gets {b} more. How many? A: ", str(a + b)
    if kind == 1:
        a = rng.randint(2, 18)
        b = rng.randint(1, min(a, 9))
        return f"Q: {who} had {a} {item} and lost {b}. How many left? A: ", str(a - b)
    a, b = rng.randint(2, 5), rng.randint(2, 5)
    return f"Q: {who} has {a} bags of {b} {item}. How many? A: ", str(a * b)


def code_row(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    a, b, c = rng.randint(0, 20), rng.randint(1, 9), rng.randint(0, 9)
    expr = rng.choice([f"len('{w}')", f"'{w}'.upper()", f"'{w}'[{rng.randrange(len(w))}]", f"'{w}'[::-1]",
                       f"{a}*{b}+{c}", f"{a}-{b}*{c}", f"max({a},{b},{c})", f"min({a},{b},{c})", f"{a}%{b}",
                       f"{a}//{b}", f"sorted('{w}')[0]", f"'{w}'.count('{w[0]}')", f"'{w[:3]}'*2"])
    return f">>> {expr}\n", repr(eval(expr))  # generated from the grammar above: safe to evaluate


def logic_row(rng: random.Random) -> tuple[str, str]:
    x, y, z = rng.sample(NAMES, 3)  # x > y > z
    rel, top, bottom = rng.choice([("taller", "tallest", "shortest"), ("older", "oldest", "youngest"),
                                   ("faster", "fastest", "slowest")])
    facts = [f"{x} is {rel} than {y}.", f"{y} is {rel} than {z}."]
    rng.shuffle(facts)
    ask_top = rng.random() < 0.5
    return f"{facts[0]} {facts[1]} Who is {top if ask_top else bottom}? ", x if ask_top else z


def instruct_row(rng: random.Random) -> tuple[str, str]:
    # short answers: whole-word rewrites (reverse, upper) stay at 0% for a 2-layer model at this budget
    w = _word(rng, 3, 7)
    op, fn = rng.choice([("count letters", lambda s: str(len(s))), ("first letter", lambda s: s[0]),
                         ("last letter", lambda s: s[-1]), ("has an e", lambda s: "yes" if "e" in s else "no"),
                         ("first two", lambda s: s[:2])])
    return f"{op}: {w} -> ", fn(w)


def knowledge_base(n: int = 60, seed: int = 1234) -> list[tuple[str, str, str]]:
    """Invented countries with a capital and a colour, the same for every run and scale."""
    rng = random.Random(seed)
    syll = ["ka", "lo", "mi", "ran", "te", "vo", "zu", "bel", "dor", "fin", "gar", "sel", "tur", "qui", "nox"]
    colours = ["red", "blue", "green", "gold", "grey", "pink", "teal", "black"]
    seen: set[str] = set()
    rows = []
    while len(rows) < n:
        country = (rng.choice(syll) + rng.choice(syll) + rng.choice(syll)).capitalize()
        city = (rng.choice(syll) + rng.choice(syll)).capitalize()
        if country not in seen:
            seen.add(country)
            rows.append((country, city, rng.choice(colours)))
    return rows


FACT_TEMPLATES = {"capital": ["The capital of {c} is ", "Q: capital of {c}? A: "],
                  "colour": ["The flag of {c} is ", "Q: flag colour of {c}? A: "]}


def fact_rows(rng: random.Random, kb) -> list[tuple[str, str]]:
    """Every fact in every training phrasing."""
    return [(t.format(c=c), city if attr == "capital" else colour) for c, city, colour in kb
            for attr, ts in FACT_TEMPLATES.items() for t in ts]


GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "math": math_row, "code": code_row, "logic": logic_row, "instruct": instruct_row}
TASKS = ("math", "code", "logic", "instruct", "facts")


def _write(path: Path, rows: list[tuple[str, str]]) -> None:
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in rows))


def make_tasks(out: Path, *, n_train: int, n_eval: int, seed: int = 0) -> dict[str, tuple[Path, Path]]:
    """Write NAME.jsonl and NAME-eval.jsonl for every task into ``out``; returns {name: (train, eval)}."""
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for i, name in enumerate(TASKS):
        rng = random.Random(f"{seed}:{name}")
        if name == "facts":
            train = fact_rows(rng, knowledge_base())
            evals = rng.sample(train, min(n_eval, len(train)))
        else:
            gen = GENERATORS[name]
            evals, seen = [], set()
            while len(evals) < n_eval:  # distinct eval prompts first, then training rows that avoid them
                p, r = gen(rng)
                if p not in seen:
                    seen.add(p)
                    evals.append((p, r))
            train = []
            while len(train) < n_train:
                p, r = gen(rng)
                if p not in seen:
                    train.append((p, r))
        files[name] = (out / f"{name}.jsonl", out / f"{name}-eval.jsonl")
        _write(files[name][0], train)
        _write(files[name][1], evals)
    return files
