"""Malformed input of every class found by fuzzing answers a 4xx naming the problem, never a 500, and stores nothing.

Regression tests, one per input class: U+0000 and lone surrogates in text, invalid UTF-8, NaN / Infinity / 1e400,
subnormal floats (rounded to 0 and stored), integers beyond bigint, wrong JSON types, and error bodies that must
stay JSON whatever they echo. All against the real app and PostgreSQL.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from tests.kombinat.conftest import Kombinat
from tests.support.kombinat_server import TEST_MODEL, model_info


def post_raw(kmb: Kombinat, path: str, body: bytes, headers: dict[str, str]) -> Any:
    return kmb.client.post(path, content=body, headers={**headers, "content-type": "application/json"})


def assert_422(resp: Any, *field: str) -> list[dict[str, Any]]:
    assert resp.status_code == 422, (resp.status_code, resp.text)
    detail = json.loads(resp.text)["detail"]  # the body is JSON, whatever was echoed
    if field:
        assert any(tuple(e["loc"][-len(field) :]) == field for e in detail), detail
    return detail


def pair(**overrides: Any) -> dict[str, Any]:
    return {"pair_id": str(uuid.uuid4()), "query": "q", "document": "d", "split": "s1", "cycle": "c000", **overrides}


def labels_body(pair_id: str, **label: Any) -> dict[str, Any]:
    entry = {"pair_id": pair_id, "relevant": True, "p_relevant": 0.9, "grade": None, "truncated": False,
             "seconds": 0.5, **label}  # fmt: skip
    return {"model": model_info(), "labels": [entry]}


@pytest.fixture
def claimed(kmb: Kombinat) -> tuple[Any, dict[str, Any]]:
    kmb.admit()
    kmb.enqueue(4)
    who = kmb.contributor()
    return who, kmb.claim(who, 4)


def test_nul_and_lone_surrogates_in_text_are_refused_naming_the_field(kmb: Kombinat) -> None:
    resp = kmb.client.post("/api/v1/admin/pairs", json={"pairs": [pair(query="a\x00b")]}, headers=kmb.admin)
    detail = assert_422(resp, "pairs", 0, "query")
    assert "U+0000" in detail[0]["msg"]
    # a lone surrogate escape is not JSON text (RFC 8259): the parser refuses it
    raw = json.dumps({"pairs": [pair()]}).replace('"q"', '"\\ud800"').encode()
    assert assert_422(post_raw(kmb, "/api/v1/admin/pairs", raw, kmb.admin))[0]["type"] == "json_invalid"
    entry = {**TEST_MODEL, "qualification": {"note": "x\x00"}}
    detail = assert_422(kmb.client.put("/api/v1/admin/models", json={"models": [entry]}, headers=kmb.admin))
    assert "note" in detail[0]["msg"] and "U+0000" in detail[0]["msg"]
    assert kmb.sql("SELECT count(*) FROM pair")[0][0] == 0 and kmb.sql("SELECT count(*) FROM model")[0][0] == 0


def test_text_errors_on_the_contributors_paths(kmb: Kombinat, claimed: tuple[Any, dict[str, Any]]) -> None:
    who, batch = claimed
    bad_model = {**model_info(), "model_id": "m\x00"}
    resp = kmb.client.post("/api/v1/batches/claim", json={"size": 2, "model": bad_model}, headers=who.headers)
    assert_422(resp, "model", "model_id")
    body = labels_body(batch["pairs"][0]["pair_id"])
    body["model"] = bad_model
    resp = kmb.client.post(f"/api/v1/batches/{batch['batch_id']}/labels", json=body, headers=who.headers)
    assert_422(resp, "model", "model_id")
    raw = json.dumps(labels_body(batch["pairs"][0]["pair_id"])).replace('"test-0.1"', '"\\udfff"').encode()
    resp = post_raw(kmb, f"/api/v1/batches/{batch['batch_id']}/labels", raw, who.headers)
    assert assert_422(resp)[0]["type"] == "json_invalid"


def test_invalid_utf8_bodies_are_422_on_both_parsers(kmb: Kombinat, claimed: tuple[Any, dict[str, Any]]) -> None:
    who, batch = claimed
    raw = json.dumps({"pairs": [pair()]}).encode().replace(b'"q"', b'"\xff\xfe"')
    assert assert_422(post_raw(kmb, "/api/v1/admin/pairs", raw, kmb.admin))[0]["type"] == "json_invalid"
    raw = json.dumps(labels_body(batch["pairs"][0]["pair_id"])).encode().replace(b'"test-0.1"', b'"\xc3"')
    resp = post_raw(kmb, f"/api/v1/batches/{batch['batch_id']}/labels", raw, who.headers)
    assert assert_422(resp)[0]["type"] == "json_invalid"
    raw = json.dumps({"size": 2, "model": model_info()}).encode().replace(b'"test-0.1"', b'"\x80"')
    assert assert_422(post_raw(kmb, "/api/v1/batches/claim", raw, who.headers))[0]["type"] == "json_invalid"


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
def test_non_finite_numbers_are_refused_and_the_error_stays_json(
    kmb: Kombinat, claimed: tuple[Any, dict[str, Any]], literal: str
) -> None:
    who, batch = claimed
    pid = batch["pairs"][0]["pair_id"]
    raw = json.dumps(labels_body(pid)).replace('"p_relevant": 0.9', f'"p_relevant": {literal}').encode()
    resp = post_raw(kmb, f"/api/v1/batches/{batch['batch_id']}/labels", raw, who.headers)
    assert_422(resp)
    raw = json.dumps({"pairs": [pair(priority=1.5)]}).replace("1.5", literal).encode()
    assert_422(post_raw(kmb, "/api/v1/admin/pairs", raw, kmb.admin))
    entry = json.dumps({"models": [{**TEST_MODEL, "min_memory_gb": 2.5}]}).replace("2.5", literal).encode()
    resp = kmb.client.put(
        "/api/v1/admin/models", content=entry, headers={**kmb.admin, "content-type": "application/json"}
    )
    assert_422(resp)
    assert kmb.sql("SELECT count(*) FROM label")[0][0] == 0 and kmb.sql("SELECT count(*) FROM model")[0][0] == 1


def test_subnormal_floats_are_stored_as_zero(kmb: Kombinat, claimed: tuple[Any, dict[str, Any]]) -> None:
    who, batch = claimed
    pid = batch["pairs"][0]["pair_id"]
    body = labels_body(pid, relevant=False, p_relevant=5e-324, seconds=1e-300)
    resp = kmb.client.post(f"/api/v1/batches/{batch['batch_id']}/labels", json=body, headers=who.headers)
    assert resp.status_code == 200, resp.text
    assert kmb.sql("SELECT p_relevant, seconds FROM label WHERE pair_id = %(p)s", {"p": pid}) == [(0.0, 0.0)]
    resp = kmb.client.post("/api/v1/admin/pairs", json={"pairs": [pair(priority=5e-324)]}, headers=kmb.admin)
    assert resp.status_code == 200, resp.text


def test_wrong_json_types_are_refused(kmb: Kombinat, claimed: tuple[Any, dict[str, Any]]) -> None:
    who, batch = claimed
    pid = batch["pairs"][0]["pair_id"]
    url = f"/api/v1/batches/{batch['batch_id']}/labels"
    for label, field in (
        ({"grade": False}, "grade"),
        ({"relevant": "yes"}, "relevant"),
        ({"truncated": 1}, "truncated"),
    ):
        assert_422(kmb.client.post(url, json=labels_body(pid, **label), headers=who.headers), "labels", 0, field)
    resp = kmb.client.post("/api/v1/batches/claim", json={"size": True, "model": model_info()}, headers=who.headers)
    assert_422(resp, "size")
    gold = {"pair_id": str(uuid.uuid4()), "query": "q", "document": "d", "relevant": "no"}
    assert_422(kmb.client.post("/api/v1/admin/honeypots", json={"honeypots": [gold]}, headers=kmb.admin))


def test_query_values_beyond_bigint_or_unknown_are_422(kmb: Kombinat) -> None:
    for url, field in (
        ("/api/v1/admin/contributors?offset=9223372036854775808", "offset"),
        ("/api/v1/admin/contributors?limit=99999999999999999999", "limit"),
        ("/api/v1/admin/labels?after=1:99999999999999999999", "after"),
        ("/api/v1/admin/labels?after=nonsense", "after"),
        ("/api/v1/admin/verified?status=bogus", "status"),
        ("/api/v1/admin/labels?split=a%00b", "split"),
    ):
        assert_422(kmb.client.get(url, headers=kmb.admin), field)
    assert kmb.client.get("/api/v1/admin/contributors?offset=9223372036854775807", headers=kmb.admin).status_code == 200


def test_the_openapi_description_lists_the_error_responses(kmb: Kombinat) -> None:
    spec = kmb.client.get("/openapi.json").json()
    labels = spec["paths"]["/api/v1/batches/{batch_id}/labels"]["post"]["responses"]
    assert {"401", "403", "404", "409", "413", "422", "429"} <= set(labels)
    assert labels["409"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorMessage"}
    export = spec["paths"]["/api/v1/admin/verified"]["get"]["responses"]
    assert {"401", "403", "422", "429"} <= set(export) and "404" not in export
    assert spec["components"]["schemas"]["ErrorMessage"]["required"] == ["detail"]
