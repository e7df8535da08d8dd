"""A generated knowledge base for the tiny profile: facts no model can know, so reward needs retrieval.

Entities are `item N`, `order N` and `user N` (N three digits) with two facts each, one document per fact.
Numbers are shared across kinds (item 417 and order 417 both exist) and every entity has two documents,
so a query must carry both the kind and the attribute word to find its fact. Values never equal an entity
number, except a user's order, which names a real order (so two-hop questions can be built on it).
Words are short and common, so a tiny tokenizer keeps a document around 20 tokens.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from importlib.resources import files
from pathlib import Path

KINDS = ("item", "order", "user")
ORDER_STATUSES = ("shipped", "cancelled", "returned", "pending")
USER_STATUSES = ("active", "closed", "pending", "blocked")


def generate_kb(seed: int = 0, per_kind: int = 80) -> tuple[list[dict], list[dict]]:
    """(corpus records `{"id", "contents"}`, QA rows `{"id", "question", "golden_answers"}`), sorted by id."""
    if not 1 <= per_kind <= 900:
        raise ValueError(f"per_kind must be in 1..900 (three-digit numbers), got {per_kind}")
    rng = random.Random(f"search_r1-kb:{seed}")
    # Each kind draws from one shared pool half again as large, so any two kinds share >= per_kind / 2 numbers.
    pool = rng.sample(range(100, 1000), min(900, per_kind * 3 // 2))
    numbers = {kind: sorted(rng.sample(pool, per_kind)) for kind in KINDS}
    taken = set(pool)

    def value() -> str:  # a number no entity has, so it never pulls another entity's documents up
        while (n := rng.randint(10, 9999)) in taken:
            pass
        return str(n)

    facts = []  # (kind, number, attribute, answer)
    for n in numbers["item"]:
        facts += [("item", n, "price", value()), ("item", n, "code", value())]
    for n in numbers["order"]:
        facts += [("order", n, "total", value()), ("order", n, "status", rng.choice(ORDER_STATUSES))]
    for n in numbers["user"]:
        facts += [("user", n, "status", rng.choice(USER_STATUSES)), ("user", n, "order", str(rng.choice(numbers["order"])))]
    corpus, qa = [], []
    for kind, n, attribute, answer in sorted(facts, key=lambda f: f"{f[0]}-{f[1]}-{f[2]}"):
        doc_id = f"{kind}-{n}-{attribute}"
        corpus.append({"id": doc_id, "contents": f'"{kind} {n}"\nThe {attribute} of {kind} {n} is {answer}.'})
        qa.append({"id": doc_id, "question": f"What is the {attribute} of {kind} {n}?", "golden_answers": [answer]})
    return corpus, qa


def write_kb(directory: Path, seed: int = 0, per_kind: int = 80) -> tuple[Path, Path]:
    """Write `corpus.jsonl` and `qa.jsonl` into `directory`, each atomically (no half-written file is ever read)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    corpus, qa = generate_kb(seed, per_kind)
    paths = []
    for name, rows in (("corpus.jsonl", corpus), ("qa.jsonl", qa)):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; shipped and shared files must be readable
            os.replace(tmp, directory / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        paths.append(directory / name)
    return paths[0], paths[1]


def shipped_paths() -> tuple[Path, Path]:
    """The knowledge base shipped in the package (`write_kb` with the defaults): corpus and QA files."""
    data = files(__package__) / "data"
    return Path(str(data / "corpus.jsonl")), Path(str(data / "qa.jsonl"))


def two_hop_questions(corpus: list[dict]) -> list[dict]:
    """Questions that take two searches: a user's order first, then that order's total.

    "What is the total of the order of user 886?" — the order (355) is in `user-886-order`, its total in
    `order-355-total`; the id names both facts, `hops` the two queries a demonstration makes.
    """
    facts = {r["id"]: r["contents"].rstrip(".").split()[-1] for r in corpus}
    rows = []
    for doc_id, order in facts.items():
        kind, user, attribute = doc_id.split("-")
        total = facts.get(f"order-{order}-total")
        if (kind, attribute) == ("user", "order") and total is not None:
            rows.append({"id": f"user-{user}-order-total", "question": f"What is the total of the order of user {user}?",
                         "golden_answers": [total], "hops": [f"order of user {user}", f"total of order {order}"]})
    return rows
