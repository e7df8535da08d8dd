"""The retail domain's tools: look up users, orders and products; cancel, modify, exchange or return; transfer.

Each changes the database the way a store's back office would (statuses, payment history, gift-card balances)
and refuses what the policy forbids with a `ToolError`. Money is rounded to cents at every change, so a gold
replay and an agent that took the same actions in another order reach byte-identical databases.
"""

from __future__ import annotations

import json
from typing import Any

from .domain import Tool, ToolError

STRING = {"type": "string"}
IDS = {"type": "array", "items": {"type": "string"}}
CANCEL_REASONS = ("no longer needed", "ordered by mistake")

TOOLS: list[Tool] = []


def tool(description: str, required: tuple[str, ...] = (), writes: bool = False, terminates: bool = False,
         **parameters: dict[str, Any]):
    def register(fn):
        TOOLS.append(Tool(fn.__name__, description, parameters, required or tuple(parameters), fn, writes, terminates))
        return fn
    return register


def _user(db: dict, user_id: str) -> dict:
    if user_id not in db["users"]:
        raise ToolError(f"user '{user_id}' not found")
    return db["users"][user_id]


def _order(db: dict, order_id: str) -> dict:
    if order_id not in db["orders"]:
        raise ToolError(f"order '{order_id}' not found")
    return db["orders"][order_id]


def _payment_method(db: dict, order: dict, payment_method_id: str) -> dict:
    methods = db["users"][order["user_id"]]["payment_methods"]
    if payment_method_id not in methods:
        raise ToolError(f"payment method '{payment_method_id}' is not one of the user's")
    return methods[payment_method_id]


def _cents(x: float) -> float:
    return round(x + 0.0, 2)


def _show(record: Any) -> str:
    return json.dumps(record)


@tool("Find a user id by email.", email=STRING)
def find_user_id_by_email(db: dict, email: str) -> str:
    for user in db["users"].values():
        if user["email"].lower() == email.strip().lower():
            return user["user_id"]
    raise ToolError("user not found")


@tool("Find a user id by first name, last name and zip code.", first_name=STRING, last_name=STRING, zip=STRING)
def find_user_id_by_name_zip(db: dict, first_name: str, last_name: str, zip: str) -> str:
    for user in db["users"].values():
        name = user["name"]
        if (name["first_name"].lower(), name["last_name"].lower(), user["address"]["zip"]) == (
                first_name.strip().lower(), last_name.strip().lower(), zip.strip()):
            return user["user_id"]
    raise ToolError("user not found")


@tool("Get a user's profile: name, email, address, payment methods and orders.", user_id=STRING)
def get_user_details(db: dict, user_id: str) -> str:
    return _show(_user(db, user_id))


@tool("Get an order's status, items and payment history.", order_id=STRING)
def get_order_details(db: dict, order_id: str) -> str:
    return _show(_order(db, order_id))


@tool("Get a product's variants (item ids, options, price, availability).", product_id=STRING)
def get_product_details(db: dict, product_id: str) -> str:
    if product_id not in db["products"]:
        raise ToolError(f"product '{product_id}' not found")
    return _show(db["products"][product_id])


@tool("List every product name with its product id.")
def list_all_product_types(db: dict) -> str:
    return _show({p["name"]: p["product_id"] for p in db["products"].values()})


@tool("Cancel a pending order; the payment is refunded to where it came from.", writes=True,
      order_id=STRING, reason={"type": "string", "enum": list(CANCEL_REASONS)})
def cancel_pending_order(db: dict, order_id: str, reason: str) -> str:
    order = _order(db, order_id)
    if order["status"] != "pending":
        raise ToolError(f"order '{order_id}' is {order['status']}, not pending")
    refunds = []
    for entry in order["payment_history"]:
        if entry["type"] != "payment":
            continue
        refunds.append({"type": "refund", "amount": entry["amount"], "payment_method_id": entry["payment_method_id"]})
        method = _payment_method(db, order, entry["payment_method_id"])
        if method["source"] == "gift_card":
            method["balance"] = _cents(method["balance"] + entry["amount"])
    order["payment_history"] += refunds
    order["status"] = "cancelled"
    order["cancel_reason"] = reason
    return _show(order)


def _swap(db: dict, order: dict, item_ids: list[str], new_item_ids: list[str]) -> float:
    """Check a swap of items for variants of the same products; returns the price difference (new - old)."""
    if not item_ids:
        raise ToolError("give at least one item id")
    if len(item_ids) != len(new_item_ids):
        raise ToolError("item_ids and new_item_ids must have the same length")
    in_order = [item["item_id"] for item in order["items"]]
    diff = 0.0
    for old, new in zip(item_ids, new_item_ids):
        if old not in in_order:
            raise ToolError(f"item '{old}' is not in order '{order['order_id']}'")
        if item_ids.count(old) > in_order.count(old):
            raise ToolError(f"item '{old}' is in order '{order['order_id']}' fewer times than given")
        item = next(i for i in order["items"] if i["item_id"] == old)
        variant = db["products"][item["product_id"]]["variants"].get(new)
        if variant is None:
            raise ToolError(f"item '{new}' is not a variant of product '{item['product_id']}'")
        if new == old:
            raise ToolError(f"item '{new}' is the item itself")
        if not variant["available"]:
            raise ToolError(f"item '{new}' is not available")
        diff += variant["price"] - item["price"]
    return _cents(diff)


def _charge(db: dict, order: dict, payment_method_id: str, amount: float) -> None:
    """Charge (amount > 0) or refund (< 0) the difference to a payment method of the order's user."""
    method = _payment_method(db, order, payment_method_id)
    if method["source"] == "gift_card":
        if method["balance"] < amount:
            raise ToolError(f"gift card '{payment_method_id}' has {method['balance']:.2f}, not enough")
        method["balance"] = _cents(method["balance"] - amount)
    if amount:
        order["payment_history"].append({"type": "payment" if amount > 0 else "refund", "amount": abs(amount),
                                         "payment_method_id": payment_method_id})


@tool("Swap items of a pending order for other variants of the same products; the price difference is "
      "charged or refunded to a payment method.", writes=True,
      order_id=STRING, item_ids=IDS, new_item_ids=IDS, payment_method_id=STRING)
def modify_pending_order_items(db: dict, order_id: str, item_ids: list[str], new_item_ids: list[str],
                               payment_method_id: str) -> str:
    order = _order(db, order_id)
    if order["status"] != "pending":
        raise ToolError(f"order '{order_id}' is {order['status']}, not pending")
    diff = _swap(db, order, item_ids, new_item_ids)
    _charge(db, order, payment_method_id, diff)
    for old, new in zip(item_ids, new_item_ids):
        item = next(i for i in order["items"] if i["item_id"] == old)
        variant = db["products"][item["product_id"]]["variants"][new]
        item.update(item_id=new, options=dict(variant["options"]), price=variant["price"])
    order["status"] = "pending (items modified)"
    return _show(order)


@tool("Ask to exchange items of a delivered order for other variants of the same products; the price "
      "difference is charged or refunded to a payment method.", writes=True,
      order_id=STRING, item_ids=IDS, new_item_ids=IDS, payment_method_id=STRING)
def exchange_delivered_order_items(db: dict, order_id: str, item_ids: list[str], new_item_ids: list[str],
                                   payment_method_id: str) -> str:
    order = _order(db, order_id)
    if order["status"] != "delivered":
        raise ToolError(f"order '{order_id}' is {order['status']}, not delivered")
    diff = _swap(db, order, item_ids, new_item_ids)
    method = _payment_method(db, order, payment_method_id)
    if method["source"] == "gift_card" and method["balance"] < diff:
        raise ToolError(f"gift card '{payment_method_id}' has {method['balance']:.2f}, not enough for the difference")
    order.update(status="exchange requested", exchange_items=sorted(item_ids), exchange_new_items=sorted(new_item_ids),
                 exchange_payment_method_id=payment_method_id, exchange_price_difference=diff)
    return _show(order)


@tool("Ask to return items of a delivered order; the refund goes to the original payment method or a gift card.",
      writes=True, order_id=STRING, item_ids=IDS, payment_method_id=STRING)
def return_delivered_order_items(db: dict, order_id: str, item_ids: list[str], payment_method_id: str) -> str:
    order = _order(db, order_id)
    if order["status"] != "delivered":
        raise ToolError(f"order '{order_id}' is {order['status']}, not delivered")
    in_order = [item["item_id"] for item in order["items"]]
    if not item_ids or any(item_ids.count(i) > in_order.count(i) for i in item_ids):
        raise ToolError(f"the items to return must be items of order '{order_id}'")
    method = _payment_method(db, order, payment_method_id)
    original = order["payment_history"][0]["payment_method_id"]
    if payment_method_id != original and method["source"] != "gift_card":
        raise ToolError("a refund goes to the original payment method or a gift card")
    order.update(status="return requested", return_items=sorted(item_ids), return_payment_method_id=payment_method_id)
    return _show(order)


@tool("Change a user's default address.", writes=True, user_id=STRING, city=STRING, zip=STRING)
def modify_user_address(db: dict, user_id: str, city: str, zip: str) -> str:
    user = _user(db, user_id)
    user["address"] = {"city": city, "zip": zip}
    return _show(user)


@tool("Hand the conversation to a human agent when the request is outside the policy; ends the conversation.",
      terminates=True, summary=STRING)
def transfer_to_human_agents(db: dict, summary: str) -> str:
    return "Transfer successful"
