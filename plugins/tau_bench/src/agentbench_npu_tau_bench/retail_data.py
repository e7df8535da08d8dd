"""How the shipped retail data (data/retail/) was made: a small store and its tasks, from a seed.

`python -m agentbench_npu_tau_bench.retail_data` rewrites the files; a test checks the shipped files are exactly
what this produces, so the data and its generator cannot drift apart. Every task's gold actions are replayed at
generation time and must all succeed.

Tasks come in kinds that need different amounts of work: a cancellation or an address change names everything
the agent needs; a return, exchange or item change names the product, so the agent must read the order (and the
product) to find item ids; a status question must be answered in words (a required output); a request the
policy forbids (cancelling a delivered order) should be handed to a human and must leave the database alone.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from .domain import Domain
from .retail import CANCEL_REASONS, TOOLS

SEED = 7
FIRST = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo", "Kai", "Lena", "Mo", "Nia"]
LAST = ["Lee", "Kim", "Diaz", "Shah", "Ito", "Moss", "Park", "Rossi", "Berg", "Cruz"]
CITIES = ["Austin", "Boston", "Denver", "Fresno", "Miami", "Omaha", "Tulsa", "Reno"]
PRODUCTS = [  # name, options, prices per variant
    ("T-Shirt", [{"color": c, "size": s} for c in ("red", "blue", "black") for s in ("S", "M", "L")]),
    ("Water Bottle", [{"capacity": c} for c in ("500ml", "750ml", "1000ml")]),
    ("Desk Lamp", [{"color": c} for c in ("white", "black", "green")]),
    ("Backpack", [{"color": c, "size": s} for c in ("grey", "navy") for s in ("small", "large")]),
]
TEST_PER_KIND = 2
TRAIN_PER_KIND = 10

POLICY = """\
# Retail agent policy
You help customers of an online store with their orders, by tool calls and plain answers.
- First find the customer's user id, by email or by name and zip code. Act only on that user's orders.
- A pending order can be cancelled (reason "no longer needed" or "ordered by mistake") or have its items
  swapped for other available variants of the same products.
- A delivered order can have items returned (refund to the original payment method or a gift card) or
  exchanged for other variants of the same products.
- Delivered orders cannot be cancelled. Requests outside this policy go to transfer_to_human_agents.
- Answer questions from what the tools return. Make one change per request, then tell the customer it is done.
"""


def build_db(rng: random.Random) -> dict[str, Any]:
    products: dict[str, Any] = {}
    item = 101
    for n, (name, options) in enumerate(PRODUCTS, start=1):
        base = rng.choice([12, 18, 25, 40])
        variants = {}
        for opts in options:
            variants[f"i{item}"] = {"item_id": f"i{item}", "options": opts, "price": round(base + rng.randint(0, 900) / 100, 2),
                                    "available": rng.random() > 0.2}
            item += 1
        products[f"p{n}"] = {"product_id": f"p{n}", "name": name, "variants": variants}
    users: dict[str, Any] = {}
    orders: dict[str, Any] = {}
    order_no = 1001
    names = rng.sample([(f, last) for f in FIRST for last in LAST], 12)
    for first, last in names:
        uid = f"{first}_{last}".lower()
        methods = {f"credit_card_{rng.randint(1000, 9999)}": {"source": "credit_card"}}
        if rng.random() < 0.5:
            methods[f"gift_card_{rng.randint(1000, 9999)}"] = {"source": "gift_card", "balance": float(rng.randint(20, 150))}
        methods = {k: {"id": k, **v} for k, v in methods.items()}
        user = {"user_id": uid, "name": {"first_name": first, "last_name": last},
                "email": f"{first}.{last}@mail.com".lower(),
                "address": {"city": rng.choice(CITIES), "zip": str(rng.randint(10000, 99999))},
                "payment_methods": methods, "orders": []}
        for status in ("pending", "delivered", rng.choice(["pending", "delivered", "cancelled"])):
            oid = f"#W{order_no}"
            order_no += 1
            items = []
            for pid in rng.sample(sorted(products), rng.randint(1, 2)):
                variant = rng.choice(list(products[pid]["variants"].values()))
                items.append({"item_id": variant["item_id"], "product_id": pid, "name": products[pid]["name"],
                              "options": dict(variant["options"]), "price": variant["price"]})
            total = round(sum(i["price"] for i in items), 2)
            pm = rng.choice(sorted(methods))
            orders[oid] = {"order_id": oid, "user_id": uid, "status": status, "items": items,
                           "payment_history": [{"type": "payment", "amount": total, "payment_method_id": pm}]}
            user["orders"].append(oid)
        users[uid] = user
    return {"users": users, "products": products, "orders": orders}


def _act(name: str, **kwargs: Any) -> dict[str, Any]:
    return {"name": name, "kwargs": kwargs}


def _identify(rng: random.Random, user: dict) -> tuple[str, str, dict]:
    """(what the user says to identify themself, the instruction's words for it, the lookup action)."""
    if rng.random() < 0.6:
        return (f"My email is {user['email']}.", f"your email is {user['email']}",
                _act("find_user_id_by_email", email=user["email"]))
    n = user["name"]
    return (f"I am {n['first_name']} {n['last_name']}, zip {user['address']['zip']}.",
            f"you are {n['first_name']} {n['last_name']} and your zip code is {user['address']['zip']}",
            _act("find_user_id_by_name_zip", first_name=n["first_name"], last_name=n["last_name"],
                 zip=user["address"]["zip"]))


def _other_variant(rng: random.Random, db: dict, item: dict) -> dict | None:
    choices = [v for v in db["products"][item["product_id"]]["variants"].values()
               if v["item_id"] != item["item_id"] and v["available"]]
    return rng.choice(choices) if choices else None


def _describe(options: dict) -> str:
    return " ".join(str(v) for v in options.values())


def make_task(kind: str, rng: random.Random, db: dict) -> dict[str, Any] | None:
    """One task of `kind` for a random user, or None when that user has no order it fits."""
    user = rng.choice(list(db["users"].values()))
    orders = [db["orders"][o] for o in user["orders"]]
    pending = [o for o in orders if o["status"] == "pending"]
    delivered = [o for o in orders if o["status"] == "delivered"]
    said, told, lookup = _identify(rng, user)
    cards = sorted(user["payment_methods"])
    if kind == "cancel" and pending:
        order, reason = rng.choice(pending), rng.choice(CANCEL_REASONS)
        return dict(opening=f"Cancel my order {order['order_id']}, reason: {reason}. {said}",
                    instruction=f"You want to cancel order {order['order_id']} because it is {reason}; {told}.",
                    actions=[lookup, _act("cancel_pending_order", order_id=order["order_id"], reason=reason)],
                    outputs=[], user_id=user["user_id"])
    if kind == "address":
        city, zip_ = rng.choice(CITIES), str(rng.randint(10000, 99999))
        return dict(opening=f"Change my address to {city}, zip {zip_}. {said}",
                    instruction=f"You moved to {city}, zip code {zip_}, and want your address changed; {told}.",
                    actions=[lookup, _act("modify_user_address", user_id=user["user_id"], city=city, zip=zip_)],
                    outputs=[], user_id=user["user_id"])
    if kind == "status":
        order = rng.choice(orders)
        return dict(opening=f"What is the status of my order {order['order_id']}? {said}",
                    instruction=f"You want to know the status of order {order['order_id']}; {told}.",
                    actions=[lookup, _act("get_order_details", order_id=order["order_id"])],
                    outputs=[order["status"]], user_id=user["user_id"])
    if kind == "return" and delivered:
        order = rng.choice(delivered)
        item = rng.choice(order["items"])
        pm = order["payment_history"][0]["payment_method_id"]
        return dict(opening=f"Return the {item['name']} from order {order['order_id']}, refund to {pm}. {said}",
                    instruction=f"You want to return the {item['name']} of order {order['order_id']} with the "
                                f"refund going to {pm}; {told}.",
                    actions=[lookup, _act("get_order_details", order_id=order["order_id"]),
                             _act("return_delivered_order_items", order_id=order["order_id"],
                                  item_ids=[item["item_id"]], payment_method_id=pm)],
                    outputs=[], user_id=user["user_id"])
    if kind in ("exchange", "modify"):
        order = rng.choice(delivered if kind == "exchange" else pending or [None])
        if order is None:
            return None
        item = rng.choice(order["items"])
        new = _other_variant(rng, db, item)
        if new is None:
            return None
        pm = rng.choice(cards)
        tool = "exchange_delivered_order_items" if kind == "exchange" else "modify_pending_order_items"
        verb = "Exchange" if kind == "exchange" else "Change"
        return dict(opening=f"{verb} the {item['name']} in order {order['order_id']} for the {_describe(new['options'])} "
                            f"one, pay with {pm}. {said}",
                    instruction=f"You want the {item['name']} of order {order['order_id']} swapped for the "
                                f"{_describe(new['options'])} one, any difference paid with {pm}; {told}.",
                    actions=[lookup, _act("get_order_details", order_id=order["order_id"]),
                             _act("get_product_details", product_id=item["product_id"]),
                             _act(tool, order_id=order["order_id"], item_ids=[item["item_id"]],
                                  new_item_ids=[new["item_id"]], payment_method_id=pm)],
                    outputs=[], user_id=user["user_id"])
    if kind == "transfer" and delivered:
        order = rng.choice(delivered)
        return dict(opening=f"Cancel my order {order['order_id']}, reason: no longer needed. {said}",
                    instruction=f"You want to cancel order {order['order_id']} (already delivered); {told}. If the "
                                "agent cannot, accept a transfer to a human.",
                    actions=[lookup, _act("transfer_to_human_agents",
                                          summary=f"User wants to cancel delivered order {order['order_id']}.")],
                    outputs=[], user_id=user["user_id"])
    return None


KINDS = ("cancel", "address", "status", "return", "exchange", "modify", "transfer")


def build(seed: int = SEED) -> dict[str, Any]:
    rng = random.Random(seed)
    db = build_db(rng)
    domain = Domain("retail", db, POLICY, {t.name: t for t in TOOLS})
    splits: dict[str, list[dict]] = {"test": [], "train": []}
    seen: set[str] = set()
    for split, per_kind in (("test", TEST_PER_KIND), ("train", TRAIN_PER_KIND)):
        for kind in KINDS:
            made = 0
            while made < per_kind:
                task = make_task(kind, rng, db)
                if task is None or task["opening"] in seen:
                    continue
                check = domain.fresh_db()
                for action in task["actions"]:
                    result = domain.call(check, action["name"], action["kwargs"])
                    assert result.status == "ok", (task, result)
                seen.add(task["opening"])
                splits[split].append({"id": f"retail-{split}-{len(splits[split])}", "kind": kind, **task})
                made += 1
    return {"db": db, "policy": POLICY, **{f"tasks_{k}": v for k, v in splits.items()}}


def files(seed: int = SEED) -> dict[str, str]:
    """Shipped file name -> its exact text."""
    built = build(seed)
    return {"db.json": json.dumps(built["db"], indent=1) + "\n", "policy.md": built["policy"],
            "tasks_test.json": json.dumps(built["tasks_test"], indent=1) + "\n",
            "tasks_train.json": json.dumps(built["tasks_train"], indent=1) + "\n"}


if __name__ == "__main__":
    target = Path(__file__).parent / "data" / "retail"
    target.mkdir(parents=True, exist_ok=True)
    for name, text in files().items():
        (target / name).write_text(text, encoding="utf-8")
        print(f"wrote {target / name}")
