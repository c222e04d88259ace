"""Schemathesis against the server's own OpenAPI schema: generated requests never get a 5xx, and every
refusal is a complete OpenAI error body."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import schemathesis
import schemathesis.specs.openapi.schemas  # noqa: F401  (see below)
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from pallava.inference import PaLlava
from pallava.serve.app import BackgroundServer, ServerSettings, create_app

KEY = "schema-key"
# `schemathesis.openapi.from_url` imports its OpenAPI module lazily, and pytest rewrites that module's
# assertions as it does. Parsed in the test while the live server's threads run, it met CPython 3.11's race in
# the AST validator ("AST constructor recursion depth mismatch") about one run in four; imported above, it is
# parsed at collection, before any thread starts.


def error_bodies_are_complete(ctx, response, case) -> None:
    """Every refusal names a code and leaks no heap address (`<object at 0x...>`)."""
    if response.status_code >= 400:
        error = json.loads(response.content)["error"]
        assert isinstance(error["code"], str) and error["code"], f"error without a code: {error}"
        assert not re.search(r" at 0x[0-9a-fA-F]+", error["message"]), f"heap address in {error}"


@pytest.fixture(scope="module")
def live_server(tiny):
    server_settings = ServerSettings(api_key=KEY, max_tokens_limit=2, default_max_tokens=2, batch_window_s=0)
    with BackgroundServer(create_app(PaLlava(*tiny), server_settings)) as running:
        yield running


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_generated_requests_never_cause_a_server_error(live_server, mode):
    schema = schemathesis.openapi.from_url(f"{live_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/chat/completions", "GET /v1/models", "GET /health"}
    statuses: Counter[tuple[str, int]] = Counter()
    for operation in operations:

        @settings(
            max_examples=20,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        @given(case=operation.as_strategy(mode))
        def call(case):
            for headers in ({"Authorization": f"Bearer {KEY}"}, {}):  # with and without the key
                response = case.call_and_validate(
                    base_url=live_server.url,
                    headers=headers,
                    checks=[not_a_server_error, error_bodies_are_complete],
                )
                statuses[case.operation.label, response.status_code] += 1

        try:
            call()
        except Unsatisfiable:  # no request can break the schema of these GETs (any string is a valid id)
            assert mode == GenerationMode.NEGATIVE and operation.method.upper() == "GET"
    print(
        f"schemathesis {mode}: {sum(statuses.values())} requests, status counts "
        f"{dict(sorted(statuses.items()))}"
    )
    assert statuses and all(status < 500 for _, status in statuses)
    assert any(op == "POST /v1/chat/completions" for op, _ in statuses)
