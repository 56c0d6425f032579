"""The default benchmark's skills and their compositions (docs/design.md §7, issue: the embedded default).

Two kinds of task, all registered in the task registry:

* skills, each learnt by one adapter of the example pool (``smartfed zoo build``):
  ``math`` (``"What is 23 + 45?"`` → ``"68"``), ``json_format`` (questions
  about words and numbers answered as ``{"answer": ...}``, no arithmetic),
  ``spanish`` (the same questions asked and answered in Spanish) and ``code``
  (the same questions answered as a Python function in one fixed form,
  ``"def solve():\n    return 5"``, no arithmetic);
* compositions, which need two skills at once and are never trained by any
  adapter: ``json_math`` (``"What is 23 + 45? Answer in JSON."`` →
  ``{"answer": 68}``, the default), ``spanish_math``
  (``"¿Cuánto es 23 más 45?"`` → ``"68"``) and ``code_math``
  (``"Write solve() for: What is 23 + 45?"`` → ``"def solve():\n    return 68"``).

``code`` and ``code_math`` are scored by running the answer: the metric
``program_value`` (``smartfed.eval.solve``) calls the predicted ``solve()`` in
the sandbox and compares what it returns with the reference's value, so
``return 23 + 45`` is right too.

Every arithmetic problem (a, op, b) belongs to exactly one shard by a hash of
the problem: the math skill trains on the ``skill`` shard, composite training
data come from the ``composite`` shard, and the held-out composite items come
from the ``heldout`` shard, chosen with a fixed seed. So no held-out item, nor
its arithmetic problem in any phrasing, is in any training set, and every run
seed is scored on the same items (paired comparisons).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator
from typing import Any, Literal

from datasets import Dataset

from .tasks import register_task

Shard = Literal["skill", "composite", "heldout"]

HELDOUT_SEED = 20_240_601
"""Fixes which held-out items every run is scored on, whatever its seed."""

OPS: dict[str, str] = {"+": "más", "-": "menos", "*": "por"}
"""Arithmetic operations and their Spanish words; the label is the index in this order."""

JSON_SUFFIX = " Answer in JSON."
CODE_PREFIX = "Write solve() for: "

WORDS_EN: tuple[str, ...] = (
    "apple", "river", "house", "garden", "window", "pencil", "orange", "yellow", "mountain", "table",
    "chair", "bottle", "candle", "flower", "forest", "island", "jacket", "kitchen", "letter", "market",
    "monkey", "needle", "ocean", "planet", "rabbit", "silver", "summer", "ticket", "turtle", "violin",
    "wallet", "winter", "basket", "bridge", "castle", "dragon", "engine", "finger", "guitar", "hammer",
    "button", "carpet", "doctor", "family", "golden", "helmet", "insect", "jungle", "kettle", "ladder",
    "mirror", "number", "pepper", "pillow", "rocket", "saddle", "shadow", "spider", "thread", "tunnel",
    "cat", "dog", "sun", "moon", "tree", "bird", "fish", "book", "door", "road", "cloud", "stone",
    "bread", "water", "music", "paper", "glass", "horse", "plant", "train", "sugar", "light", "heart",
)  # fmt: skip
WORDS_ES: tuple[str, ...] = (
    "casa", "perro", "gato", "libro", "mesa", "silla", "ventana", "puerta", "camino", "ciudad",
    "ciencia", "manzana", "naranja", "montaña", "bosque", "isla", "cocina", "carta", "mercado", "mono",
    "aguja", "planeta", "conejo", "verano", "invierno", "tortuga", "cartera", "puente", "castillo", "dragon",
    "motor", "dedo", "guitarra", "martillo", "boton", "alfombra", "doctor", "familia", "insecto", "selva",
    "espejo", "numero", "almohada", "cohete", "sombra", "araña", "hilo", "tunel", "sol", "luna",
    "arbol", "pajaro", "pez", "nube", "piedra", "pan", "agua", "musica", "papel", "vaso",
    "caballo", "planta", "tren", "azucar", "luz", "corazon", "flor", "rio", "jardin", "lapiz",
)  # fmt: skip


# --------------------------------------------------------------------------- arithmetic problems


def _problems() -> list[tuple[int, str, int]]:
    """Every arithmetic problem of the benchmark: 2-digit + and − (no negatives), small ×."""
    problems = [(a, "+", b) for a in range(10, 100) for b in range(10, 100)]
    problems += [(a, "-", b) for a in range(10, 100) for b in range(10, a + 1)]
    problems += [(a, "*", b) for a in range(2, 20) for b in range(2, 10)]
    return problems


def shard_of(problem: tuple[int, str, int]) -> Shard:
    """60% skill, 20% composite training, 20% held-out, by a hash of the problem (not of its phrasing)."""
    bucket = int(hashlib.sha256(f"{problem[0]}{problem[1]}{problem[2]}".encode()).hexdigest(), 16) % 10
    return "skill" if bucket < 6 else "composite" if bucket < 8 else "heldout"


def _solve(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _shard_problems(shard: Shard) -> list[tuple[int, str, int]]:
    return [p for p in _problems() if shard_of(p) == shard]


def _sample(items: list[Any], count: int, seed: int, what: str) -> list[Any]:
    if count > len(items):
        raise ValueError(f"{what}: asked for {count} items, the shard has {len(items)}")
    return random.Random(seed).sample(items, count)


ArithStyle = Literal["math", "json_math", "spanish_math", "code_math"]


def solve_program(value: object) -> str:
    """The code skill's answer form: ``def solve():`` returning ``value`` as a Python literal (``repr``)."""
    return f"def solve():\n    return {value!r}"


def _arith_record(problem: tuple[int, str, int], style: ArithStyle) -> dict:
    a, op, b = problem
    result = _solve(a, op, b)
    if style == "spanish_math":
        question, answer = f"¿Cuánto es {a} {OPS[op]} {b}?", str(result)
    else:
        question = f"What is {a} {op} {b}?"
        answer = str(result)
        if style == "json_math":
            question, answer = question + JSON_SUFFIX, json.dumps({"answer": result})
        elif style == "code_math":
            question, answer = CODE_PREFIX + question, solve_program(result)
    return {"question": question, "answer": answer, "label": list(OPS).index(op)}


def _arith_split(style: ArithStyle) -> Callable[[int, int, int], tuple]:
    """Train items from the skill (math) or composite shard by ``seed``; test items fixed."""

    def split(seed: int, num_train: int, num_test: int) -> tuple[Dataset, Dataset]:
        train_shard: Shard = "skill" if style == "math" else "composite"
        train_pool = _shard_problems(train_shard)
        if style == "math":  # the skill's own held-out items come from its own shard, disjoint from train
            pool = _sample(train_pool, len(train_pool), HELDOUT_SEED, f"task {style!r}")
            test, train_pool = pool[:num_test], pool[num_test:]
        else:
            test = _sample(_shard_problems("heldout"), num_test, HELDOUT_SEED, f"task {style!r} (held-out shard)")
        train = _sample(train_pool, num_train, seed, f"task {style!r} ({train_shard} shard)")
        return (
            Dataset.from_list([_arith_record(p, style) for p in train]),
            Dataset.from_list([_arith_record(p, style) for p in test]),
        )

    return split


# --------------------------------------------------------------------------- word questions (form skills)

Question = tuple[str, str, object, int]  # (English, Spanish, answer value, label: question kind)


def _word_questions(rng: random.Random) -> Iterator[Question]:
    """Questions about words and numbers that need no arithmetic (the form skills' content)."""
    while True:
        kind = rng.randrange(4)
        en, es = rng.choice(WORDS_EN), rng.choice(WORDS_ES)
        if kind == 0:
            yield (
                f"How many letters are in the word '{en}'?",
                f"¿Cuántas letras tiene la palabra '{es}'?",
                (len(en), len(es)),
                kind,
            )
        elif kind == 1:
            yield (
                f"What is the first letter of the word '{en}'?",
                f"¿Cuál es la primera letra de la palabra '{es}'?",
                (en[0], es[0]),
                kind,
            )
        elif kind == 2:
            yield (
                f"Write the word '{en}' in capital letters.",
                f"Escribe la palabra '{es}' en mayúsculas.",
                (en.upper(), es.upper()),
                kind,
            )
        else:
            x, y = rng.sample(range(10, 100), 2)
            yield f"Which number is larger, {x} or {y}?", f"¿Qué número es mayor, {x} o {y}?", (max(x, y),) * 2, kind


def _word_split(style: Literal["json_format", "spanish", "code"]) -> Callable[[int, int, int], tuple]:
    def records(count: int, rng: random.Random, exclude: set[str]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for en, es, (value_en, value_es), kind in _word_questions(rng):
            if style == "json_format":
                record = {"question": en + JSON_SUFFIX, "answer": json.dumps({"answer": value_en}), "label": kind}
            elif style == "code":
                record = {"question": CODE_PREFIX + en, "answer": solve_program(value_en), "label": kind}
            else:
                record = {"question": es, "answer": str(value_es), "label": kind}
            if record["question"] not in exclude:
                exclude.add(record["question"])
                out.append(record)
            if len(out) == count:
                return out
        raise AssertionError("unreachable")  # the generator is infinite

    def split(seed: int, num_train: int, num_test: int) -> tuple[Dataset, Dataset]:
        seen: set[str] = set()
        test = records(num_test, random.Random(HELDOUT_SEED), seen) if num_test else []
        train = records(num_train, random.Random(seed), seen)
        columns = ("question", "answer", "label")
        empty = {c: [] for c in columns}
        return Dataset.from_list(train), Dataset.from_list(test) if test else Dataset.from_dict(empty)

    return split


# --------------------------------------------------------------------------- registration


def _register(name: str, metric: str, splitter: Callable, description: str) -> None:
    def builder(num_examples: int, seed: int) -> Dataset:
        return splitter(seed, num_examples, 0)[0]

    builder.__doc__ = description
    register_task(
        name,
        metric=metric,  # type: ignore[arg-type]
        prompt_template="{question}",
        answer_field="answer",
        label_field="label",
        description=description,
        splitter=splitter,
    )(builder)


_register("math", "numeric", _arith_split("math"), "Skill: 'What is 23 + 45?' -> '68' (2-digit +, -, small *).")
_register(
    "json_format",
    "json_answer",
    _word_split("json_format"),
    'Skill: questions about words and numbers, answered as {"answer": ...}; no arithmetic.',
)
_register("spanish", "exact_match", _word_split("spanish"), "Skill: the same word questions asked in Spanish.")
_register(
    "code",
    "program_value",
    _word_split("code"),
    "Skill: the same word questions answered as 'def solve(): return <literal>', run in the sandbox; no arithmetic.",
)
_register(
    "json_math",
    "json_answer",
    _arith_split("json_math"),
    "Composite (default): 'What is 23 + 45? Answer in JSON.' -> {\"answer\": 68}; held-out items fixed.",
)
_register(
    "spanish_math",
    "numeric",
    _arith_split("spanish_math"),
    "Composite: '¿Cuánto es 23 más 45?' -> '68'; held-out items fixed.",
)
_register(
    "code_math",
    "program_value",
    _arith_split("code_math"),
    "Composite: 'Write solve() for: What is 23 + 45?' -> a solve() returning 68, run in the sandbox; "
    "held-out items fixed.",
)

SKILLS: dict[str, str] = {"math": "math", "json": "json_format", "spanish": "spanish", "code": "code"}
"""Adapter name in the example pool → the skill task it is trained on."""

COMPOSITES: dict[str, tuple[str, str]] = {
    "json_math": ("json", "math"),
    "spanish_math": ("spanish", "math"),
    "code_math": ("code", "math"),
}
"""Composite task → the two pool adapters whose skills it needs."""
