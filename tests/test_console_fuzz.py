"""The console's REST API under schemathesis (docs/reliability.md, scenario 20).

schemathesis (from PyPI) reads the console's own OpenAPI document and generates requests for
every operation, valid ones and hostile ones (wrong types, missing fields, odd unicode, huge
numbers), sent over HTTP on loopback to a running App as an admin. No answer may be a 500, and
every error must come in the documented envelope ``{"error": {"code", "message"}}``.
Left out: ``POST /api/v1/runs`` (each accepted call would start a training run) and the
session routes (they would log the fuzzer out of nothing: it uses a bearer token).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.console_support import bearer, running_app, seed

SKIP = {("POST", "/api/v1/runs"), ("POST", "/api/v1/session"), ("DELETE", "/api/v1/session")}
EXAMPLES = 30  # per operation and mode (hypothesis stops early where fewer inputs exist)


def fuzz(schema: dict[str, Any], base_url: str, headers: dict[str, str]) -> dict[str, int]:
    """Run every operation in both modes; returns how many requests got each status."""
    statuses: dict[str, int] = {}
    loaded = schemathesis.openapi.from_dict(schema)
    for result in loaded.get_all_operations():
        operation = result.ok()
        if (operation.method.upper(), operation.path) in SKIP:
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                run_operation(operation, mode, base_url, headers, statuses)
            except Unsatisfiable:  # nothing to make invalid (an operation without parameters or body)
                assert mode is GenerationMode.NEGATIVE
    return statuses


def run_operation(
    operation: Any, mode: GenerationMode, base_url: str, headers: dict[str, str], statuses: dict[str, int]
) -> None:
    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(operation.as_strategy(generation_mode=mode))
    def check(case: Any) -> None:
        response = case.call(base_url=base_url, headers=headers, timeout=30)
        key = str(response.status_code)
        statuses[key] = statuses.get(key, 0) + 1
        where = f"{case.method} {case.formatted_path} ({mode.value}) -> {response.status_code}"
        assert response.status_code < 500, f"{where}: {response.text[:300]}"
        if response.status_code >= 400:
            body = response.json()
            assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), where

    check()


async def test_console_api_holds_under_generated_hostile_requests(tiny_model: Path, tmp_path: Path) -> None:
    async with running_app(tiny_model, tmp_path) as app:
        assert app.store is not None and app.console is not None
        await seed(app.store)
        token = await app.store.accounts.create_token("alice", label="fuzz", actor="test")
        base_url = f"http://127.0.0.1:{app.console_port}"
        statuses = await asyncio.to_thread(fuzz, app.console.openapi(), base_url, bearer(token))
    print("statuses:", dict(sorted(statuses.items())))
    assert sum(statuses.values()) > 200 and any(s.startswith("4") for s in statuses)
