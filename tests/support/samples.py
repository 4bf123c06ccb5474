"""Shopify's published webhook samples, and variations of them for tests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).with_name("fixtures") / "shopify"


def sample(name: str) -> dict[str, Any]:
    """A sample by file stem, copied from ../shared/samples/shopify into tests/support/fixtures."""
    return json.loads((FIXTURES / f"{name}.json").read_text())


def customer_gid(email: str) -> int:
    """One Shopify customer id per test email: the same id would rightly mean the same person."""
    return int(hashlib.sha256(email.encode()).hexdigest()[:15], 16)


def customer(email: str, *, first_name: str = "Bob", updated_at: str = "2024-01-01T10:00:00-05:00", **extra: Any) -> dict[str, Any]:
    body = sample("CustomersCreate")
    body.update(email=email, first_name=first_name, updated_at=updated_at,
                admin_graphql_api_id=f"gid://shopify/Customer/{customer_gid(email)}", **extra)
    return body


def order(email: str, *, order_gid: int = 820982911946154508, total: str = "388.00", processed_at: str = "2024-01-02T10:00:00-05:00") -> dict[str, Any]:
    body = sample("Order")
    body["customer"]["email"] = email
    body["customer"]["admin_graphql_api_id"] = f"gid://shopify/Customer/{customer_gid(email)}"
    body.update(total_price=total, processed_at=processed_at, updated_at=processed_at, cancelled_at=None, test=False,
                financial_status="paid", admin_graphql_api_id=f"gid://shopify/Order/{order_gid}")
    return body
