"""Schema-driven fuzzing of kombinat over real HTTP: no request answers a 5xx.

Every operation of kombinat's own OpenAPI description gets data that fits the schema and data that does not
(schemathesis' positive and negative generation: wrong types, out-of-range numbers, malformed ids and bodies), sent
by uvicorn's HTTP stack to a real server on the real PostgreSQL, once with an admin token and once with a
contributor's. The server holds an admitted model, queued pairs, honeypots and a claimed batch, so the queries run
against real rows. Derandomized and bounded (examples per mode), so CI sees the same requests every run; the
input classes that fuzzing found before (U+0000, surrogates, NaN, subnormals, bigint overflow, invalid UTF-8) have
their own regression tests in test_input_validation.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from tests.support.fake_github import FakeGitHub
from tests.support.kombinat_server import KombinatServer, admit_model, bearer, model_info, running_kombinat
from tests.support.postgres import fresh_database

pytestmark = [pytest.mark.subprocess, pytest.mark.timeout(600)]

EXAMPLES_PER_MODE = 400


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[KombinatServer, dict[str, str]]]:
    with FakeGitHub() as github, fresh_database() as url, running_kombinat(url, github=github) as kmb:
        admin = bearer(kmb.admin_token)
        admit_model(kmb)
        pairs = [
            {"pair_id": str(uuid.uuid4()), "query": f"q{i}", "document": f"d{i}", "split": "s1", "cycle": "c000"}
            for i in range(20)
        ]
        httpx.post(f"{kmb.url}/api/v1/admin/pairs", json={"pairs": pairs}, headers=admin).raise_for_status()
        gold = [{"pair_id": str(uuid.uuid4()), "query": "g", "document": f"g{i}", "relevant": True} for i in range(5)]
        httpx.post(f"{kmb.url}/api/v1/admin/honeypots", json={"honeypots": gold}, headers=admin).raise_for_status()
        from tests.support.kombinat_server import sign_in

        contributor = bearer(sign_in(kmb, github, "fuzzer", 4242))
        claim = {"size": 5, "model": model_info()}
        httpx.post(f"{kmb.url}/api/v1/batches/claim", json=claim, headers=contributor).raise_for_status()
        yield kmb, contributor


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_no_request_answers_a_server_error(server: tuple[KombinatServer, dict[str, str]], mode: Any) -> None:
    kmb, contributor = server
    schema = schemathesis.openapi.from_url(f"{kmb.url}/openapi.json")
    session = requests.Session()
    seen: dict[int, int] = {}

    @settings(
        max_examples=EXAMPLES_PER_MODE,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=schema.as_strategy(mode))
    def fuzz(case: Any) -> None:
        for headers in (bearer(kmb.admin_token), contributor):
            response = case.call(base_url=kmb.url, session=session, headers=headers, timeout=30)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500, (
                f"{case.method} {case.formatted_path} answered {response.status_code}: {response.text[:500]}\n"
                f"{case.as_curl_command(headers=headers)}"
            )

    fuzz()
    assert sum(seen.values()) >= EXAMPLES_PER_MODE, seen  # it really sent them
    if mode == GenerationMode.NEGATIVE:
        assert seen.get(422, 0) > 0, seen  # invalid data was generated and refused as such
