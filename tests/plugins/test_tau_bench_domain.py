"""The tau_bench plugin's retail domain, its shipped data, τ-bench's reward and the task-file loader.

Covered here: what each write tool does to a fresh database (expected values are computed in the test from the
database rows, never by the plugin's helpers); refusals by the domain's rules (an `Error: ...` with status
"refused" and the database untouched); how `Domain.call` classifies a call that cannot run (unknown tool, bad
arguments, a tool that raises) and that an episode survives such a call; `db_hash` / `db_diff`; the reward
(`agent.score`: gold replays of every shipped task score 1, a changed argument or a missing output scores 0,
outputs match case-insensitively without commas); `load_tasks`' one-line errors naming file:item N / file:line;
and the shipped files being exactly what `retail_data.files()` generates, with disjoint test/train openings.
Each test name states the behaviour it pins down.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
from agentbench_npu_tau_bench import retail_data
from agentbench_npu_tau_bench.agent import GoldScript, gold_state, run_episode, score
from agentbench_npu_tau_bench.domain import (
    BAD_ARGUMENTS,
    OK,
    RAISED,
    REFUSED,
    UNKNOWN_TOOL,
    Domain,
    Tool,
    ToolError,
    db_diff,
    db_hash,
)
from agentbench_npu_tau_bench.retail import CANCEL_REASONS, TOOLS
from agentbench_npu_tau_bench.scenario import TauBenchScenario
from agentbench_npu_tau_bench.tasks import load_tasks, retail_domain, shipped_tasks

from agentbench_npu.errors import UserError
from agentbench_npu.types import SamplingParams, Task

DOMAIN = retail_domain()
TOOL_NAMES = [t.name for t in TOOLS]
DATA_DIR = shipped_tasks("test").parent
SPLITS = ("test", "train")
WRITE_TOOLS = {t.name for t in TOOLS if t.writes}


# -- helpers: pick rows of the shipped database by what they are, not by hard-coded ids ----------------
def fresh() -> dict[str, Any]:
    return DOMAIN.fresh_db()


def call(db: dict, name: str, **arguments: Any):
    return DOMAIN.call(db, name, arguments)


def methods_of(db: dict, order: dict) -> dict[str, dict]:
    return db["users"][order["user_id"]]["payment_methods"]


def paid_with(db: dict, order: dict) -> str:
    return order["payment_history"][0]["payment_method_id"]


def orders(db: dict, status: str, source: str | None = None) -> list[dict]:
    """Orders with `status`, optionally only those first paid from a `source` ("gift_card", "credit_card")."""
    return [o for o in db["orders"].values() if o["status"] == status
            and (source is None or methods_of(db, o)[paid_with(db, o)]["source"] == source)]


def card_of(db: dict, order: dict, source: str) -> str | None:
    return next((k for k, m in methods_of(db, order).items() if m["source"] == source), None)


def swaps(db: dict, status: str, sign: int | None = None) -> list[tuple[dict, dict, dict]]:
    """(order, item, other available variant of the item's product) for orders with `status` (the item and
    variant are copies, so they keep their values after a call changes the db); `sign` keeps
    only swaps whose price difference (new - old) is positive (1) or negative (-1)."""
    out = []
    for order in db["orders"].values():
        if order["status"] != status:
            continue
        for item in order["items"]:
            for variant in db["products"][item["product_id"]]["variants"].values():
                if variant["item_id"] == item["item_id"] or not variant["available"]:
                    continue
                diff = variant["price"] - item["price"]
                if sign is None or diff * sign > 0:
                    out.append((order, copy.deepcopy(item), copy.deepcopy(variant)))  # as they were
    assert out, f"the shipped database has no {status} order with such a swap"
    return out


def cents(x: float) -> float:
    return round(x, 2)


# -- cancel_pending_order ----------------------------------------------------------------------------
def test_cancel_marks_the_order_cancelled_with_its_reason_and_refunds_each_payment():
    db = fresh()
    order = orders(db, "pending", "credit_card")[0]
    before = copy.deepcopy(order)
    result = call(db, "cancel_pending_order", order_id=order["order_id"], reason="ordered by mistake")
    after = db["orders"][order["order_id"]]
    assert result.status == OK
    assert after["status"] == "cancelled"
    assert after["cancel_reason"] == "ordered by mistake"
    refunds = [{"type": "refund", "amount": p["amount"], "payment_method_id": p["payment_method_id"]}
               for p in before["payment_history"] if p["type"] == "payment"]
    assert after["payment_history"] == before["payment_history"] + refunds
    assert after["items"] == before["items"]
    assert json.loads(result.output) == after  # the tool shows the changed order


def test_cancelling_an_order_paid_by_gift_card_puts_the_amount_back_on_the_card():
    db = fresh()
    order = orders(db, "pending", "gift_card")[0]
    card = paid_with(db, order)
    balance = methods_of(db, order)[card]["balance"]
    amount = order["payment_history"][0]["amount"]
    assert call(db, "cancel_pending_order", order_id=order["order_id"], reason="no longer needed").status == OK
    assert methods_of(db, order)[card]["balance"] == cents(balance + amount)


def test_cancelling_an_order_paid_by_credit_card_changes_no_payment_method():
    db = fresh()
    order = orders(db, "pending", "credit_card")[0]
    methods = copy.deepcopy(methods_of(db, order))
    call(db, "cancel_pending_order", order_id=order["order_id"], reason="no longer needed")
    assert methods_of(db, order) == methods


def test_cancel_changes_only_that_order():
    db = fresh()
    order = orders(db, "pending", "credit_card")[0]
    call(db, "cancel_pending_order", order_id=order["order_id"], reason="no longer needed")
    untouched, changed = fresh(), db
    del untouched["orders"][order["order_id"]], changed["orders"][order["order_id"]]
    assert changed == untouched


# -- modify_pending_order_items ----------------------------------------------------------------------
@pytest.mark.parametrize("sign, entry_type", [(1, "payment"), (-1, "refund")])
def test_modifying_items_swaps_the_variant_and_charges_or_refunds_the_difference(sign, entry_type):
    db = fresh()
    order, item, variant = swaps(db, "pending", sign)[0]
    card = card_of(db, order, "credit_card")
    history = copy.deepcopy(order["payment_history"])
    position = order["items"].index(item)
    expected_item = {**item, "item_id": variant["item_id"], "options": variant["options"], "price": variant["price"]}
    result = call(db, "modify_pending_order_items", order_id=order["order_id"], item_ids=[item["item_id"]],
                  new_item_ids=[variant["item_id"]], payment_method_id=card)
    after = db["orders"][order["order_id"]]
    assert result.status == OK, result.output
    assert after["items"][position] == expected_item
    assert after["status"] == "pending (items modified)"
    amount = cents(abs(variant["price"] - item["price"]))
    assert after["payment_history"] == history + [{"type": entry_type, "amount": amount, "payment_method_id": card}]


@pytest.mark.parametrize("sign", [1, -1])
def test_modifying_items_paid_by_gift_card_moves_the_difference_on_its_balance(sign):
    db = fresh()
    order, item, variant = next((o, i, v) for o, i, v in swaps(db, "pending", sign)
                                if card_of(db, o, "gift_card"))
    card = card_of(db, order, "gift_card")
    balance = methods_of(db, order)[card]["balance"]
    result = call(db, "modify_pending_order_items", order_id=order["order_id"], item_ids=[item["item_id"]],
                  new_item_ids=[variant["item_id"]], payment_method_id=card)
    assert result.status == OK, result.output
    assert methods_of(db, order)[card]["balance"] == cents(balance - (variant["price"] - item["price"]))


def test_modifying_several_items_at_once_charges_the_sum_of_their_differences():
    db = fresh()
    candidates = swaps(db, "pending")
    order = next(o for o, _, _ in candidates
                 if len({i["item_id"] for oo, i, _ in candidates if oo is o}) >= 2)
    picks = {}
    for o, item, variant in candidates:
        if o is order:
            picks.setdefault(item["item_id"], (item, variant))
    olds = list(picks)
    news = [picks[i][1]["item_id"] for i in olds]
    diff = cents(sum(picks[i][1]["price"] - picks[i][0]["price"] for i in olds))
    card = card_of(db, order, "credit_card")
    history = copy.deepcopy(order["payment_history"])
    assert call(db, "modify_pending_order_items", order_id=order["order_id"], item_ids=olds, new_item_ids=news,
                payment_method_id=card).status == OK
    after = db["orders"][order["order_id"]]
    assert sorted(i["item_id"] for i in after["items"]) == sorted(news)
    assert after["payment_history"] == history + [
        {"type": "payment" if diff > 0 else "refund", "amount": abs(diff), "payment_method_id": card}]


# -- exchange / return / address -------------------------------------------------------------------
def test_exchange_records_the_request_and_leaves_items_and_payments_as_they_were():
    db = fresh()
    order, item, variant = swaps(db, "delivered")[0]
    before = copy.deepcopy(order)
    methods = copy.deepcopy(methods_of(db, order))
    card = paid_with(db, order)
    result = call(db, "exchange_delivered_order_items", order_id=order["order_id"], item_ids=[item["item_id"]],
                  new_item_ids=[variant["item_id"]], payment_method_id=card)
    assert result.status == OK, result.output
    assert db["orders"][order["order_id"]] == {
        **before, "status": "exchange requested", "exchange_items": [item["item_id"]],
        "exchange_new_items": [variant["item_id"]], "exchange_payment_method_id": card,
        "exchange_price_difference": cents(variant["price"] - item["price"])}
    assert methods_of(db, order) == methods  # nothing is charged until the exchange happens


def test_an_exchange_of_several_items_records_them_sorted_and_the_summed_difference():
    db = fresh()
    candidates = swaps(db, "delivered")
    order = next(o for o, _, _ in candidates
                 if len({i["item_id"] for oo, i, _ in candidates if oo is o}) >= 2)
    picks: dict = {}
    for o, item, variant in candidates:
        if o is order:
            picks.setdefault(item["item_id"], (item, variant))
    olds = sorted(picks, reverse=True)
    news = [picks[i][1]["item_id"] for i in olds]
    result = call(db, "exchange_delivered_order_items", order_id=order["order_id"], item_ids=olds,
                  new_item_ids=news, payment_method_id=paid_with(db, order))
    assert result.status == OK, result.output
    after = db["orders"][order["order_id"]]
    assert (after["exchange_items"], after["exchange_new_items"]) == (sorted(olds), sorted(news))
    assert after["exchange_price_difference"] == cents(sum(picks[i][1]["price"] - picks[i][0]["price"] for i in olds))


def test_return_records_the_items_and_the_refund_method_sorted():
    db = fresh()
    order = next(o for o in orders(db, "delivered") if len(o["items"]) >= 2)
    before = copy.deepcopy(order)
    ids = [i["item_id"] for i in order["items"]][::-1]
    result = call(db, "return_delivered_order_items", order_id=order["order_id"], item_ids=ids,
                  payment_method_id=paid_with(db, order))
    assert result.status == OK, result.output
    assert db["orders"][order["order_id"]] == {**before, "status": "return requested", "return_items": sorted(ids),
                                               "return_payment_method_id": paid_with(db, order)}


def test_a_return_may_be_refunded_to_a_gift_card_of_the_user_other_than_the_original_method():
    db = fresh()
    order = next(o for o in orders(db, "delivered", "credit_card") if card_of(db, o, "gift_card"))
    card = card_of(db, order, "gift_card")
    result = call(db, "return_delivered_order_items", order_id=order["order_id"],
                  item_ids=[order["items"][0]["item_id"]], payment_method_id=card)
    assert result.status == OK, result.output
    assert db["orders"][order["order_id"]]["return_payment_method_id"] == card


def test_modify_user_address_replaces_the_address_and_nothing_else_of_the_user():
    db = fresh()
    user_id = min(db["users"])
    before = copy.deepcopy(db["users"][user_id])
    result = call(db, "modify_user_address", user_id=user_id, city="Nowhere", zip="00001")
    assert result.status == OK
    assert db["users"][user_id] == {**before, "address": {"city": "Nowhere", "zip": "00001"}}


def test_transfer_to_a_human_succeeds_ends_the_episode_and_changes_nothing():
    db = fresh()
    result = call(db, "transfer_to_human_agents", summary="wants a refund for a delivered order")
    assert (result.status, result.terminates) == (OK, True)
    assert db == DOMAIN.data
    assert not call(db, "get_user_details", user_id=min(db["users"])).terminates


# -- refusals by the domain's rules ------------------------------------------------------------------
def _cancel_delivered(db):
    order = orders(db, "delivered")[0]
    return "cancel_pending_order", {"order_id": order["order_id"], "reason": "no longer needed"}, "not pending"


def _cancel_cancelled(db):
    order = orders(db, "cancelled")[0]
    return "cancel_pending_order", {"order_id": order["order_id"], "reason": "no longer needed"}, "not pending"


def _cancel_unknown_order(db):
    return "cancel_pending_order", {"order_id": "#W9999", "reason": "no longer needed"}, "not found"


def swap_args(order: dict, olds: list[str], news: list[str], card: str) -> dict:
    return {"order_id": order["order_id"], "item_ids": olds, "new_item_ids": news, "payment_method_id": card}


def return_args(order: dict, ids: list[str], card: str) -> dict:
    return {"order_id": order["order_id"], "item_ids": ids, "payment_method_id": card}


def _modify_to_unavailable_variant(db):
    for order in orders(db, "pending"):
        for item in order["items"]:
            for v in db["products"][item["product_id"]]["variants"].values():
                if not v["available"] and v["item_id"] != item["item_id"]:
                    args = swap_args(order, [item["item_id"]], [v["item_id"]], paid_with(db, order))
                    return "modify_pending_order_items", args, "not available"
    raise AssertionError("no unavailable variant to try")


def _modify_to_another_products_variant(db):
    order, item, _ = swaps(db, "pending")[0]
    other = next(p for p in db["products"].values() if p["product_id"] != item["product_id"])
    args = swap_args(order, [item["item_id"]], [next(iter(other["variants"]))], paid_with(db, order))
    return "modify_pending_order_items", args, "not a variant"


def _modify_an_item_not_in_the_order(db):
    order, item, variant = swaps(db, "pending")[0]
    absent = next(v for v in db["products"][item["product_id"]]["variants"]
                  if v not in [i["item_id"] for i in order["items"]] and v != variant["item_id"])
    args = swap_args(order, [absent], [variant["item_id"]], paid_with(db, order))
    return "modify_pending_order_items", args, "not in order"


def _modify_to_the_item_itself(db):
    order, item, _ = swaps(db, "pending")[0]
    args = swap_args(order, [item["item_id"]], [item["item_id"]], paid_with(db, order))
    return "modify_pending_order_items", args, "the item itself"


def _modify_with_another_users_card(db):
    order, item, variant = swaps(db, "pending")[0]
    stranger = next(u for u in db["users"].values() if u["user_id"] != order["user_id"])
    args = swap_args(order, [item["item_id"]], [variant["item_id"]], next(iter(stranger["payment_methods"])))
    return "modify_pending_order_items", args, "not one of the user's"


def _modify_with_a_gift_card_short_of_the_difference(db):
    order, item, variant = next((o, i, v) for o, i, v in swaps(db, "pending", 1) if card_of(db, o, "gift_card"))
    card = card_of(db, order, "gift_card")
    methods_of(db, order)[card]["balance"] = cents((variant["price"] - item["price"]) / 2)
    return "modify_pending_order_items", swap_args(order, [item["item_id"]], [variant["item_id"]], card), "not enough"


def _modify_an_order_already_modified(db):
    order, item, variant = swaps(db, "pending")[0]
    card = paid_with(db, order)
    there = swap_args(order, [item["item_id"]], [variant["item_id"]], card)
    assert DOMAIN.call(db, "modify_pending_order_items", there).status == OK
    back = swap_args(order, [variant["item_id"]], [item["item_id"]], card)
    return "modify_pending_order_items", back, "not pending"


def _exchange_a_pending_order(db):
    order, item, variant = swaps(db, "pending")[0]
    args = swap_args(order, [item["item_id"]], [variant["item_id"]], paid_with(db, order))
    return "exchange_delivered_order_items", args, "not delivered"


def _return_to_a_credit_card_that_did_not_pay(db):
    order = next(o for o in orders(db, "delivered", "gift_card") if card_of(db, o, "credit_card"))
    args = return_args(order, [order["items"][0]["item_id"]], card_of(db, order, "credit_card"))
    return "return_delivered_order_items", args, "original payment method"


def _return_an_item_not_in_the_order(db):
    order = orders(db, "delivered")[0]
    ids = {i["item_id"] for i in order["items"]}
    absent = next(v for p in db["products"].values() for v in p["variants"] if v not in ids)
    return "return_delivered_order_items", return_args(order, [absent], paid_with(db, order)), "must be items of order"


def _return_more_copies_than_ordered(db):
    order = orders(db, "delivered")[0]
    first = order["items"][0]["item_id"]
    args = return_args(order, [first, first], paid_with(db, order))
    return "return_delivered_order_items", args, "must be items of order"


def _address_of_an_unknown_user(db):
    return "modify_user_address", {"user_id": "nobody_here", "city": "X", "zip": "1"}, "not found"


REFUSALS = [_cancel_delivered, _cancel_cancelled, _cancel_unknown_order, _modify_to_unavailable_variant,
            _modify_to_another_products_variant, _modify_an_item_not_in_the_order, _modify_to_the_item_itself,
            _modify_with_another_users_card, _modify_with_a_gift_card_short_of_the_difference,
            _modify_an_order_already_modified, _exchange_a_pending_order, _return_to_a_credit_card_that_did_not_pay,
            _return_an_item_not_in_the_order, _return_more_copies_than_ordered, _address_of_an_unknown_user]


@pytest.mark.parametrize("case", REFUSALS, ids=lambda f: f.__name__.strip("_"))
def test_a_call_the_domain_rules_forbid_is_refused_with_an_error_and_leaves_the_db_unchanged(case):
    db = fresh()
    name, arguments, why = case(db)  # a case may prepare the db (an earlier change, a smaller balance)
    before = copy.deepcopy(db)
    result = DOMAIN.call(db, name, arguments)
    assert result.status == REFUSED, result
    assert result.output.startswith("Error: ") and why in result.output, result.output
    assert "\n" not in result.output
    assert db == before


def test_an_exchange_paid_by_a_gift_card_short_of_the_difference_is_refused():
    db = fresh()
    order, item, variant = next((o, i, v) for o, i, v in swaps(db, "delivered", 1) if card_of(db, o, "gift_card"))
    card = card_of(db, order, "gift_card")
    methods_of(db, order)[card]["balance"] = 0.0
    before = copy.deepcopy(db)
    result = call(db, "exchange_delivered_order_items", order_id=order["order_id"], item_ids=[item["item_id"]],
                  new_item_ids=[variant["item_id"]], payment_method_id=card)
    assert result.status == REFUSED, result.output
    assert db == before


# -- Domain.call: what cannot run is classified, never raised ----------------------------------------
@pytest.mark.parametrize("name", ["refund_everything", "", None, 7, ["cancel_pending_order"]])
def test_an_unknown_tool_is_an_unknown_tool_error_listing_the_tools(name):
    db = fresh()
    result = DOMAIN.call(db, name, {})
    assert result.status == UNKNOWN_TOOL
    assert result.output.startswith("Error: unknown tool")
    assert all(tool in result.output for tool in TOOL_NAMES)
    assert db == DOMAIN.data


@pytest.mark.parametrize("tool, arguments, says", [
    ("cancel_pending_order", {"order_id": "#W1001"}, "missing argument 'reason'"),
    ("get_order_details", {}, "missing argument 'order_id'"),
    ("cancel_pending_order", {"order_id": "#W1001", "reason": "no longer needed", "note": "x"},
     "unknown argument 'note'"),
    ("list_all_product_types", {"verbose": True}, "unknown argument 'verbose'"),
    ("get_order_details", {"order_id": 1001}, "argument 'order_id' must be a string"),
    ("get_order_details", {"order_id": None}, "argument 'order_id' must be a string"),
    ("return_delivered_order_items", {"order_id": "#W1002", "item_ids": "i117", "payment_method_id": "x"},
     "argument 'item_ids' must be an array"),
    ("return_delivered_order_items", {"order_id": "#W1002", "item_ids": [117], "payment_method_id": "x"},
     "argument 'item_ids' item 0 must be a string"),
    ("cancel_pending_order", {"order_id": "#W1001", "reason": "too expensive"}, "argument 'reason' must be one of"),
    ("cancel_pending_order", ["#W1001", "no longer needed"], "must be a JSON object"),
    ("cancel_pending_order", '{"order_id": "#W1001"}', "must be a JSON object"),
])
def test_arguments_the_schema_refuses_are_bad_arguments_naming_the_tool_and_argument(tool, arguments, says):
    db = fresh()
    result = DOMAIN.call(db, tool, arguments)
    assert result.status == BAD_ARGUMENTS
    assert result.output.startswith(f"Error: {tool}: "), result.output
    assert says in result.output, result.output
    assert db == DOMAIN.data


def test_the_enum_error_lists_the_allowed_values():
    result = call(fresh(), "cancel_pending_order", order_id="#W1001", reason="too expensive")
    assert all(json.dumps(reason) in result.output for reason in CANCEL_REASONS)


def _typed_domain(*extra: Tool) -> Domain:
    seen: list = []
    measure = Tool("measure", "count and weigh", {"count": {"type": "integer"}, "weight": {"type": "number"},
                                                   "fragile": {"type": "boolean"}}, ("count",),
                   lambda db, **kw: seen.append(kw) or "measured")
    return Domain("test", {"things": {}}, "", {t.name: t for t in (measure, *extra)})


@pytest.mark.parametrize("arguments, says", [
    ({"count": True}, "argument 'count' must be an integer"),
    ({"count": 1.5}, "argument 'count' must be an integer"),
    ({"count": "3"}, "argument 'count' must be an integer"),
    ({"count": 1, "weight": False}, "argument 'weight' must be a number"),
    ({"count": 1, "weight": "2.5"}, "argument 'weight' must be a number"),
    ({"count": 1, "fragile": 1}, "argument 'fragile' must be a boolean"),
])
def test_json_types_are_strict_a_bool_is_not_a_number_and_a_number_is_not_a_bool(arguments, says):
    result = _typed_domain().call({}, "measure", arguments)
    assert result.status == BAD_ARGUMENTS
    assert result.output == f"Error: measure: {says}, got {json.dumps(list(arguments.values())[-1])}"


@pytest.mark.parametrize("arguments", [{"count": 3}, {"count": 3, "weight": 2}, {"count": 3, "weight": 2.5,
                                                                                 "fragile": False}])
def test_arguments_of_the_right_types_run_the_tool(arguments):
    result = _typed_domain().call({}, "measure", arguments)
    assert (result.status, result.output) == (OK, "measured")


def _explode(db, **kwargs):
    db["touched"] = True
    return {}["missing"]


def _refuse(db, **kwargs):
    raise ToolError("not today")


EXPLODE = Tool("explode", "a tool with a bug", {}, (), _explode, writes=True)
REFUSE = Tool("refuse", "a tool that refuses", {}, (), _refuse)


def test_a_tool_that_raises_is_a_raised_error_naming_the_tool_and_exception_not_a_crash():
    domain = _typed_domain(EXPLODE, REFUSE)
    db: dict = {}
    result = domain.call(db, "explode", {})
    assert result.status == RAISED
    assert result.output == "Error: explode failed: KeyError: 'missing'"
    assert not result.terminates
    assert domain.call(db, "measure", {"count": 1}).status == OK  # the domain goes on working


def test_a_tool_error_from_any_tool_is_a_refusal_with_its_message():
    result = _typed_domain(EXPLODE, REFUSE).call({}, "refuse", {})
    assert (result.status, result.output) == (REFUSED, "Error: not today")


@pytest.fixture(scope="module")
def tokenizer():
    from agentbench_npu.models.loading import load_tokenizer, resolve_model_dir
    return load_tokenizer(resolve_model_dir("tiny", 0))


def test_an_episode_whose_tool_raises_goes_on_to_the_next_call_and_is_scored(tokenizer):
    from agentbench_npu.scenario import RolloutContext

    domain = Domain("retail", DOMAIN.data, DOMAIN.policy, {**DOMAIN.tools, "explode": EXPLODE})
    order = orders(domain.fresh_db(), "pending")[0]
    task = Task(id="raises-then-cancels", prompt="Cancel my order, please.",
                label={"actions": [{"name": "explode", "kwargs": {}},
                                   {"name": "cancel_pending_order",
                                    "kwargs": {"order_id": order["order_id"], "reason": "no longer needed"}}],
                       "outputs": []},
                metadata={"user_id": order["user_id"], "instruction": "cancel", "kind": "cancel"})
    options = dict(TauBenchScenario().recipe().values["task"])
    ctx = RolloutContext(engine=None, tokenizer=tokenizer, sampling=SamplingParams(), options=options,
                         rng=random.Random(0), policy="gold")
    traj = asyncio.run(run_episode(ctx, task, domain, options, "gold", {}))
    assert traj.metadata["tool_statuses"] == [RAISED, OK]
    assert traj.metadata["reward"] == 1.0  # the cancel after the failed call still happened


# -- db_hash / db_diff -------------------------------------------------------------------------------
def test_db_hash_ignores_key_order_at_every_depth():
    a = {"users": {"u1": {"name": "A", "zip": "1"}, "u2": {"name": "B"}}, "orders": {}}
    b = {"orders": {}, "users": {"u2": {"name": "B"}, "u1": {"zip": "1", "name": "A"}}}
    assert db_hash(a) == db_hash(b)
    shuffled = json.loads(json.dumps(DOMAIN.data, sort_keys=True))
    assert list(shuffled) != list(DOMAIN.data) or list(shuffled["users"]) != list(DOMAIN.data["users"])
    assert db_hash(shuffled) == db_hash(DOMAIN.data)


@pytest.mark.parametrize("change", [
    lambda d: d["users"]["u1"].update(zip="2"),
    lambda d: d["users"]["u1"].pop("zip"),
    lambda d: d["users"]["u1"].update(zip=1),  # "1" and 1 differ
    lambda d: d["orders"].update(o1=[1, 2]),
    lambda d: d.update(extra=None),
])
def test_db_hash_changes_with_any_content_change(change):
    base = {"users": {"u1": {"name": "A", "zip": "1"}}, "orders": {"o1": [2, 1]}}
    changed = copy.deepcopy(base)
    change(changed)
    assert db_hash(changed) != db_hash(base)


def test_two_orders_of_the_same_edits_reach_the_same_hash():
    order_a, order_b = orders(fresh(), "pending")[:2]
    one, two = fresh(), fresh()
    for db, sequence in ((one, (order_a, order_b)), (two, (order_b, order_a))):
        for order in sequence:
            assert call(db, "cancel_pending_order", order_id=order["order_id"], reason="no longer needed").status == OK
    assert db_hash(one) == db_hash(two)


def test_db_diff_names_each_differing_path_in_sorted_order():
    db = fresh()
    order = orders(db, "pending")[0]
    oid = order["order_id"]
    call(db, "cancel_pending_order", order_id=oid, reason="no longer needed")
    assert db_diff(db, DOMAIN.data) == [f"orders.{oid}.cancel_reason", f"orders.{oid}.payment_history",
                                        f"orders.{oid}.status"]
    assert db_diff(db, db) == [] and db_diff(DOMAIN.data, fresh()) == []


def test_db_diff_indexes_into_lists_of_equal_length():
    a = {"orders": {"#W1": {"items": [{"item_id": "i1"}, {"item_id": "i2"}]}}}
    b = copy.deepcopy(a)
    b["orders"]["#W1"]["items"][1]["item_id"] = "i3"
    assert db_diff(a, b) == ["orders.#W1.items[1].item_id"]


def test_db_diff_reports_at_most_limit_paths():
    a = {f"k{n}": n for n in range(10)}
    b = {f"k{n}": -n - 1 for n in range(10)}
    assert db_diff(a, b) == [f"k{n}" for n in range(5)]
    assert len(db_diff(a, b, limit=2)) == 2


# -- the reward ---------------------------------------------------------------------------------------
def all_shipped() -> list[Task]:
    return [t for split in SPLITS for t in load_tasks(shipped_tasks(split), DOMAIN)]


SHIPPED = all_shipped()


def replay_by_hand(task: Task) -> dict:
    db = fresh()
    for action in task.label["actions"]:
        assert DOMAIN.call(db, action["name"], action["kwargs"]).status == OK
    return db


def test_every_shipped_task_replayed_and_closed_by_the_gold_message_scores_one():
    assert len(SHIPPED) == sum(len(json.loads(shipped_tasks(s).read_text())) for s in SPLITS)
    failing = {}
    for task in SHIPPED:
        closing = GoldScript(task).turns[-1]["content"]
        result = score(DOMAIN, task, replay_by_hand(task), [closing], {})
        if result != {"reward": 1.0, "db_match": True, "outputs_missing": [], "db_diff": []}:
            failing[task.id] = result
    assert not failing


def test_every_shipped_write_task_changes_the_db_and_a_do_nothing_agent_scores_zero():
    for task in SHIPPED:
        writes = [a for a in task.label["actions"] if a["name"] in WRITE_TOOLS]
        result = score(DOMAIN, task, fresh(), [" ".join(task.label["outputs"])], {})
        assert result["reward"] == (0.0 if writes else 1.0), task.id
        assert bool(result["db_diff"]) == bool(writes), task.id


def test_a_forbidden_request_s_gold_state_is_the_untouched_database():
    transfers = [t for t in SHIPPED if t.metadata["kind"] == "transfer"]
    assert transfers
    for task in transfers:
        assert gold_state(DOMAIN, task, {})[0] == db_hash(DOMAIN.data)


def _another_argument(db: dict, action: dict) -> dict:
    kwargs = dict(action["kwargs"])
    if action["name"] == "cancel_pending_order":
        kwargs["reason"] = next(r for r in CANCEL_REASONS if r != kwargs["reason"])
    elif action["name"] == "modify_user_address":
        kwargs["zip"] = str(int(kwargs["zip"]) + 1)
    elif action["name"] in ("modify_pending_order_items", "exchange_delivered_order_items"):
        order = db["orders"][kwargs["order_id"]]
        old = kwargs["item_ids"][0]
        product = next(i["product_id"] for i in order["items"] if i["item_id"] == old)
        others = [v["item_id"] for v in db["products"][product]["variants"].values()
                  if v["available"] and v["item_id"] not in (old, kwargs["new_item_ids"][0])]
        if not others:
            return {}
        kwargs["new_item_ids"] = [others[0]]
    elif action["name"] == "return_delivered_order_items":
        order = db["orders"][kwargs["order_id"]]
        others = [i["item_id"] for i in order["items"] if i["item_id"] not in kwargs["item_ids"]]
        if not others:
            return {}
        kwargs["item_ids"] = [others[0]]
    return {"name": action["name"], "kwargs": kwargs}


def test_one_changed_argument_of_a_gold_write_action_scores_zero_and_shows_the_diff():
    tried = set()
    for task in SHIPPED:
        db = fresh()
        changed_here = False
        for action in task.label["actions"]:
            changed = _another_argument(db, action) if action["name"] in WRITE_TOOLS else {}
            if changed:
                # the changed call itself succeeds: only the database comparison can catch it
                assert DOMAIN.call(db, changed["name"], changed["kwargs"]).status == OK, (task.id, changed)
                tried.add(action["name"])
                changed_here = True
            else:
                DOMAIN.call(db, action["name"], action["kwargs"])
        if not changed_here:
            continue
        result = score(DOMAIN, task, db, [" ".join(task.label["outputs"])], {})
        assert result["reward"] == 0.0 and not result["db_match"], task.id
        assert result["db_diff"], task.id
    assert tried >= {"cancel_pending_order", "modify_user_address", "modify_pending_order_items",
                     "exchange_delivered_order_items", "return_delivered_order_items"}


def test_the_changed_cancel_reason_is_named_in_the_diff():
    task = next(t for t in SHIPPED if t.metadata["kind"] == "cancel")
    cancel = next(a for a in task.label["actions"] if a["name"] == "cancel_pending_order")
    db = fresh()
    wrong = next(r for r in CANCEL_REASONS if r != cancel["kwargs"]["reason"])
    call(db, "cancel_pending_order", order_id=cancel["kwargs"]["order_id"], reason=wrong)
    result = score(DOMAIN, task, db, [], {})
    assert result["db_diff"] == [f"orders.{cancel['kwargs']['order_id']}.cancel_reason"]


def test_extra_lookups_do_not_matter_only_the_final_database_does():
    task = next(t for t in SHIPPED if t.metadata["kind"] == "modify")
    db = replay_by_hand(task)
    call(db, "list_all_product_types")
    call(db, "get_user_details", user_id=task.metadata["user_id"])
    call(db, "cancel_pending_order", order_id="#W0000", reason="no longer needed")  # refused: changes nothing
    assert score(DOMAIN, task, db, [], {})["reward"] == 1.0


def test_an_extra_write_beyond_the_gold_actions_scores_zero():
    task = next(t for t in SHIPPED if t.metadata["kind"] == "address")
    db = replay_by_hand(task)
    user = db["users"][task.metadata["user_id"]]
    call(db, "modify_user_address", user_id=next(u for u in db["users"] if u != user["user_id"]), city="X", zip="1")
    assert score(DOMAIN, task, db, [], {})["reward"] == 0.0


def test_a_required_output_left_unsaid_scores_zero_and_is_named():
    task = next(t for t in SHIPPED if t.label["outputs"])
    result = score(DOMAIN, task, replay_by_hand(task), ["Your request is done."], {})
    assert result == {"reward": 0.0, "db_match": True, "outputs_missing": task.label["outputs"], "db_diff": []}


def _talking_task(*outputs: str) -> Task:
    return Task(id=f"talk-{'-'.join(outputs)}", prompt="?", label={"actions": [], "outputs": list(outputs)},
                metadata={"user_id": next(iter(DOMAIN.data["users"]))})


@pytest.mark.parametrize("outputs, said, missing", [
    (["Delivered"], ["your order is DELIVERED."], []),
    (["1000"], ["It costs 1,000 dollars."], []),
    (["10", "blue"], ["I found 1,0 items", "in Blue"], []),
    (["pending"], ["Hello.", "It is pen", "ding"], ["pending"]),
    (["order delivered"], ["your order", "delivered"], ["order delivered"]),  # each message on its own
    (["cancelled", "delivered"], ["one is cancelled"], ["delivered"]),
    (["anything"], [], ["anything"]),
])
def test_outputs_match_case_insensitively_ignoring_commas_each_within_one_agent_message(outputs, said, missing):
    result = score(DOMAIN, _talking_task(*outputs), fresh(), said, {})
    assert result["outputs_missing"] == missing
    assert result["reward"] == (0.0 if missing else 1.0)


def test_the_gold_state_is_computed_once_per_task_and_gold_actions():
    task = next(t for t in SHIPPED if t.metadata["kind"] == "cancel")
    cache: dict = {}
    first = gold_state(DOMAIN, task, cache)
    assert gold_state(DOMAIN, task, cache) is first
    assert first[0] == db_hash(replay_by_hand(task))
    assert len(cache) == 1
    # another task file reusing the id with other gold actions gets its own gold state
    other = Task(id=task.id, prompt=task.prompt, label={**task.label, "actions": task.label["actions"][:1]},
                 metadata=task.metadata)
    assert gold_state(DOMAIN, other, cache)[0] == db_hash(fresh()) != first[0]
    assert len(cache) == 2


# -- load_tasks -------------------------------------------------------------------------------------
def a_row(**changes: Any) -> dict:
    db = fresh()
    order = orders(db, "pending")[0]
    user = db["users"][order["user_id"]]
    row = {"id": "mine-1", "user_id": user["user_id"], "instruction": f"Cancel {order['order_id']}.",
           "actions": [{"name": "find_user_id_by_email", "kwargs": {"email": user["email"]}},
                       {"name": "cancel_pending_order",
                        "kwargs": {"order_id": order["order_id"], "reason": "no longer needed"}}],
           "outputs": []}
    row.update(changes)
    return {k: v for k, v in row.items() if v is not _DROP}


_DROP = object()


def write_json(tmp_path: Path, rows: list, name: str = "tasks.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return path


def write_jsonl(tmp_path: Path, rows: list, name: str = "tasks.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def load_error(path: Path) -> str:
    with pytest.raises(UserError) as info:
        load_tasks(path, DOMAIN)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def with_action(n: int, **change: Any) -> list:
    actions = copy.deepcopy(a_row()["actions"])
    actions[n] = {**actions[n], **change}
    return actions


BAD_ROWS = [
    ("missing instruction", {"instruction": _DROP}, "missing field 'instruction'"),
    ("missing actions", {"actions": _DROP}, "missing field 'actions'"),
    ("blank instruction", {"instruction": "  "}, "'instruction' must be a non-empty string"),
    ("unknown user", {"user_id": "nobody_here"}, "user_id 'nobody_here' is not a user of the retail database"),
    ("outputs not strings", {"outputs": [3]}, "'outputs' must be a list of strings"),
    ("actions not a list", {"actions": {"name": "x"}}, "'actions' must be a list"),
    ("action without a name", {"actions": [{"kwargs": {}}]}, "actions[0]: expected an object with a 'name'"),
    ("unknown tool", {"actions": with_action(1, name="refund_everything")},
     "actions[1]: unknown tool 'refund_everything'; the retail tools are " + ", ".join(TOOL_NAMES)),
    ("enum refused", {"actions": with_action(1, kwargs={"order_id": "#W1001", "reason": "too expensive"})},
     "actions[1]: cancel_pending_order: argument 'reason' must be one of"),
    ("wrong type", {"actions": with_action(0, kwargs={"email": ["a@b.c"]})},
     "actions[0]: find_user_id_by_email: argument 'email' must be a string"),
    ("missing argument", {"actions": with_action(1, kwargs={"order_id": "#W1001"})},
     "actions[1]: cancel_pending_order: missing argument 'reason'"),
    ("kwargs not JSON", {"actions": with_action(1, kwargs="{order_id: 1}")}, "actions[1]: 'kwargs' is a string"),
    ("opening not a string", {"opening": ["hi"]}, "'opening' must be a string"),
    ("output with a comma", {"outputs": ["1,000"]}, "an output holds a comma, which never matches"),
    ("action after a transfer", {"actions": [{"name": "transfer_to_human_agents", "kwargs": {"summary": "s"}},
                                             with_action(1)[1]]},
     "actions[1]: follows transfer_to_human_agents, which ends the conversation"),
]


def test_a_parquet_task_file_loads_though_its_kwargs_column_carries_every_key(tmp_path):
    import pyarrow as pa  # the test extra brings it
    import pyarrow.parquet as pq
    rows = [a_row(), a_row(id="mine-2")]
    path = tmp_path / "tasks.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)  # one struct type: email, order_id, reason in every action
    tasks = load_tasks(path, DOMAIN)
    assert [t.label["actions"] for t in tasks] == [rows[0]["actions"], rows[1]["actions"]]


@pytest.mark.parametrize("change, says", [c[1:] for c in BAD_ROWS], ids=[c[0] for c in BAD_ROWS])
def test_a_bad_row_of_a_json_array_is_a_one_line_error_naming_file_item_and_field(tmp_path, change, says):
    path = write_json(tmp_path, [a_row(), a_row(id="mine-2", **change)])
    message = load_error(path)
    assert message.startswith(f"{path}:item 2: "), message
    assert says in message, message


@pytest.mark.parametrize("change, says", [c[1:] for c in BAD_ROWS], ids=[c[0] for c in BAD_ROWS])
def test_a_bad_line_of_a_jsonl_file_is_a_one_line_error_naming_file_line_and_field(tmp_path, change, says):
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps(a_row()) + "\n\n" + json.dumps(a_row(id="mine-2", **change)) + "\n", encoding="utf-8")
    message = load_error(path)
    assert message.startswith(f"{path}:3: "), message
    assert says in message, message


def test_a_gold_action_that_fails_on_the_initial_database_is_an_error_with_the_tool_s_reason(tmp_path):
    delivered = orders(fresh(), "delivered")[0]
    row = a_row(user_id=delivered["user_id"], actions=[
        {"name": "cancel_pending_order", "kwargs": {"order_id": delivered["order_id"], "reason": "no longer needed"}}])
    message = load_error(write_json(tmp_path, [row]))
    assert message.startswith(f"{tmp_path / 'tasks.json'}:item 1: actions[0]: the gold action fails on the initial "
                              "database (Error: "), message
    assert "not pending" in message


def test_gold_actions_run_in_sequence_so_a_second_cancel_of_the_same_order_fails(tmp_path):
    row = a_row()
    row["actions"].append(copy.deepcopy(row["actions"][1]))
    message = load_error(write_jsonl(tmp_path, [row]))
    assert message.startswith(f"{tmp_path / 'tasks.jsonl'}:1: actions[2]: the gold action fails"), message


def test_a_duplicate_task_id_names_the_second_row_and_the_id(tmp_path):
    message = load_error(write_json(tmp_path, [a_row(), a_row(instruction="again")]))
    assert message.startswith(f"{tmp_path / 'tasks.json'}:item 2: task id 'mine-1' appears twice"), message


def test_a_user_id_that_is_not_a_string_is_a_user_error(tmp_path):
    message = load_error(write_jsonl(tmp_path, [a_row(user_id=["mo_rossi"])]))
    assert "user_id" in message


def test_a_missing_or_empty_file_is_a_user_error(tmp_path):
    assert "does not exist" in load_error(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    load_error(tmp_path / "empty.jsonl")


def test_arguments_is_read_as_kwargs_and_a_json_string_of_kwargs_is_parsed(tmp_path):
    expected = a_row()
    row = copy.deepcopy(expected)
    row["actions"] = [{"name": a["name"], "arguments": a["kwargs"]} for a in expected["actions"]]
    row["actions"][1] = {"name": "cancel_pending_order", "arguments": json.dumps(expected["actions"][1]["kwargs"])}
    (task,) = load_tasks(write_jsonl(tmp_path, [row]), DOMAIN)
    assert task.label["actions"] == expected["actions"]


def test_a_third_party_jsonl_file_loads_its_own_tasks_with_defaults(tmp_path):
    db = fresh()
    pending = orders(db, "pending")
    user = db["users"][pending[1]["user_id"]]
    rows = [
        a_row(id=_DROP, opening="Hi, cancel my order please.", team_field={"any": "thing"}),
        {"user_id": user["user_id"], "instruction": "You want to know the status of your order.",
         "actions": [{"name": "get_order_details", "arguments": {"order_id": pending[1]["order_id"]}}],
         "outputs": ["pending"], "kind": "status"},
    ]
    first, second = load_tasks(write_jsonl(tmp_path, rows, "team.jsonl"), DOMAIN)
    assert (first.id, second.id) == ("task-0", "task-1")
    assert first.prompt == "Hi, cancel my order please."  # the opening, when given
    assert second.prompt == "You want to know the status of your order."  # else the instruction
    assert second.label == {"actions": [{"name": "get_order_details",
                                         "kwargs": {"order_id": pending[1]["order_id"]}}], "outputs": ["pending"]}
    assert second.metadata == {"user_id": user["user_id"], "instruction": rows[1]["instruction"], "kind": "status"}
    assert first.metadata["kind"] == ""
    # and its tasks are scored like the shipped ones
    said = GoldScript(second).turns[-1]["content"]
    assert score(DOMAIN, second, replay_by_hand(second), [said], {})["reward"] == 1.0


def test_a_task_without_actions_or_outputs_loads_and_its_gold_is_the_initial_database(tmp_path):
    (task,) = load_tasks(write_json(tmp_path, [a_row(actions=[], outputs=None)]), DOMAIN)
    assert task.label == {"actions": [], "outputs": []}
    assert gold_state(DOMAIN, task, {})[1] == DOMAIN.data


def test_loading_tasks_leaves_the_domain_database_as_shipped(tmp_path):
    before = db_hash(DOMAIN.data)
    load_tasks(write_json(tmp_path, [a_row()]), DOMAIN)
    for split in SPLITS:
        load_tasks(shipped_tasks(split), DOMAIN)
    assert db_hash(DOMAIN.data) == before
    assert DOMAIN.data == json.loads((DATA_DIR / "db.json").read_text(encoding="utf-8"))


# -- the shipped data ---------------------------------------------------------------------------------
def test_the_shipped_files_are_exactly_what_the_generator_writes():
    generated = retail_data.files()
    assert sorted(generated) == sorted(p.name for p in DATA_DIR.iterdir() if p.is_file())
    for name, text in generated.items():
        assert (DATA_DIR / name).read_bytes() == text.encode("utf-8"), f"{name} drifted from retail_data.py"


def test_the_generator_is_deterministic_and_its_seed_matters():
    assert retail_data.files() == retail_data.files()
    assert retail_data.files(retail_data.SEED + 1)["db.json"] != retail_data.files()["db.json"]


def test_the_test_and_train_splits_share_no_opening_and_no_id():
    rows = {s: json.loads(shipped_tasks(s).read_text(encoding="utf-8")) for s in SPLITS}
    openings = {s: [r["opening"] for r in rows[s]] for s in SPLITS}
    for s in SPLITS:
        assert len(set(openings[s])) == len(openings[s]), f"{s} repeats an opening"
    assert not set(openings["test"]) & set(openings["train"])
    ids = [r["id"] for s in SPLITS for r in rows[s]]
    assert len(set(ids)) == len(ids)


def test_each_split_holds_every_kind_of_task_the_generator_makes():
    for split, per_kind in (("test", retail_data.TEST_PER_KIND), ("train", retail_data.TRAIN_PER_KIND)):
        kinds = [t["kind"] for t in json.loads(shipped_tasks(split).read_text(encoding="utf-8"))]
        assert {k: kinds.count(k) for k in retail_data.KINDS} == {k: per_kind for k in retail_data.KINDS}


def test_money_in_the_shipped_database_is_in_cents_and_orders_are_paid_in_full():
    db = DOMAIN.data
    for order in db["orders"].values():
        for item in order["items"]:
            assert math.isclose(item["price"], round(item["price"], 2))
        total = round(sum(i["price"] for i in order["items"]), 2)
        assert [p["amount"] for p in order["payment_history"]] == [total], order["order_id"]
        assert order["order_id"] in db["users"][order["user_id"]]["orders"]
        assert paid_with(db, order) in methods_of(db, order)
