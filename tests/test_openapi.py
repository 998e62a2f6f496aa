"""The admin API's OpenAPI document and its route table say the same thing: every admin route is
documented, every documented operation is routed and answers, every documented parameter is
taken, and the document is valid OpenAPI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate

from bridge.admin import OPENAPI

TOKEN = "an-admin-token-for-the-openapi-tests"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
# a value a path parameter could have, for an object that does not exist
PATH_EXAMPLES = {"event_id": "evt_01JD7QNOTTHERE0000000000", "delivery_id": "999999"}


def sample(schema: dict[str, Any]) -> str:
    """A valid value of a query parameter's schema."""
    if "example" in schema:
        return str(schema["example"])
    if "enum" in schema:
        return str(schema["enum"][0])
    if "anyOf" in schema:
        return "1h" if any("pattern" in s for s in schema["anyOf"]) else sample(schema["anyOf"][0])
    return {"integer": "1", "boolean": "true"}.get(schema.get("type", "string"), "x")


@pytest.fixture
async def client(app_client, tmp_path: Path):
    raw = {
        "server": {"admin_token": TOKEN},
        "store": f"sqlite:///{tmp_path / 'bridge.db'}",
        "destinations": {"audit": {"type": "log", "path": str(tmp_path / "events.jsonl")}},
        "default": ["audit"],
    }
    return await app_client(raw)


def documented() -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in OPENAPI["paths"].items() for method in item}


def test_the_document_is_valid_openapi():
    validate(OPENAPI)


async def test_every_admin_route_is_documented_and_every_documented_operation_routed(client):
    routed = set()
    for route in client.app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        # (`*`: the 405 naming the methods a path has, on every path; HEAD: aiohttp's, with GET)
        if path.startswith("/admin/") and route.method not in ("HEAD", "*") and path != "/admin/openapi.json":
            routed.add((route.method, path))
    assert routed == documented()


@pytest.mark.parametrize(("method", "path"), sorted(documented()))
async def test_every_documented_operation_answers_with_every_documented_parameter(client, method, path):
    operation = OPENAPI["paths"][path][method.lower()]
    url = path.format(**PATH_EXAMPLES)
    query = {p["name"]: sample(p["schema"]) for p in operation.get("parameters", []) if p["in"] == "query"}
    if path == "/admin/replay":
        query.pop("limit", None)  # a replay is of everything its filter selects
    async with client.request(method, url, params=query, headers=BEARER) as response:
        body = await response.json(content_type=None)
        status = response.status
    # the handler answered (JSON, a documented status), not the router (404/405 in plain text)
    assert str(status) in operation["responses"], (status, body)
    assert isinstance(body, dict) and status < 500, body
    if status == 400:
        pytest.fail(f"a documented parameter was refused: {body}")
    unauthorized = await client.request(method, url)
    assert unauthorized.status == 401 and "401" in operation["responses"]
