"""Calibration that annotators cannot move: the registry's calibration decides each label's verdict at submit,
with the calibration and prompt version the batch was claimed with; claims made with another prompt wording are
refused."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import Engine

from kombinat_api.calibration import CALIBRATION, IsotonicCalibration, PlattCalibration, verdict
from kombinat_api.main import create_app
from kombinat_api.queue import BatchModel, BatchModelCache
from tests.kombinat.conftest import Contributor, Kombinat, make_settings
from tests.support.fake_github import FakeGitHub
from tests.support.kombinat_server import TEST_MODEL, model_info

# sigmoid(logit(p) + 2) >= 0.5  <=>  p >= sigmoid(-2) = 0.119: p = 0.3 is relevant, p = 0.05 is not
PLATT = {"method": "platt", "a": 1.0, "b": 2.0, "threshold": 0.5}
CALIBRATED = {**TEST_MODEL, "calibration": PLATT}


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def send(
    kmb: Kombinat, who: Contributor, batch_id: str, labels: dict[str, tuple[bool, float]], model: Any = None
) -> Any:
    """Labels as {pair_id: (the annotator's relevant, p_relevant)}."""
    body = {
        "model": model_info(model),
        "labels": [{"pair_id": pid, "relevant": rel, "p_relevant": p} for pid, (rel, p) in labels.items()],
    }
    return kmb.client.post(f"/api/v1/batches/{batch_id}/labels", json=body, headers=who.headers)


def stored(kmb: Kombinat, pair_id: str) -> list[Any]:
    return kmb.sql(
        "SELECT relevant, p_relevant, p_calibrated, prompt_version FROM label WHERE pair_id = %(p)s ORDER BY label_id",
        {"p": pair_id},
    )


# ---- the formula ------------------------------------------------------------------------------------------


def test_platt_is_a_logistic_map_of_the_logit() -> None:
    cal = PlattCalibration(method="platt", a=1.5, b=-0.5, threshold=0.6)
    for p in (0.01, 0.2, 0.5, 0.73, 0.99):
        assert cal.apply(p) == pytest.approx(sigmoid(1.5 * math.log(p / (1 - p)) - 0.5), rel=1e-12)
    # the raw score is clipped to [1e-6, 1 - 1e-6] before the logit, so 0 and 1 stay finite
    assert cal.apply(0.0) == pytest.approx(sigmoid(1.5 * math.log(1e-6 / (1 - 1e-6)) - 0.5))
    assert 0.0 < cal.apply(0.0) < cal.apply(1.0) < 1.0
    # any finite a and b: exp() never overflows
    assert PlattCalibration(method="platt", a=1e300, b=0.0, threshold=0.5).apply(0.9) == 1.0
    assert PlattCalibration(method="platt", a=1e300, b=0.0, threshold=0.5).apply(0.1) < 1e-300
    assert verdict(cal, 0.9) == (cal.apply(0.9), True)
    p_edge = sigmoid((math.log(0.6 / 0.4) + 0.5) / 1.5)  # where p_cal == threshold
    assert verdict(cal, p_edge + 1e-9)[1] and not verdict(cal, p_edge - 1e-9)[1]


def test_isotonic_interpolates_linearly_and_clamps_at_the_ends() -> None:
    cal = IsotonicCalibration(method="isotonic", x=[0.2, 0.5, 0.8], y=[0.1, 0.1, 0.9], threshold=0.5)
    assert cal.apply(0.0) == 0.1 and cal.apply(0.2) == 0.1 and cal.apply(0.35) == 0.1
    assert cal.apply(0.65) == pytest.approx(0.5) and cal.apply(0.8) == 0.9 and cal.apply(1.0) == 0.9
    assert cal.apply(0.6) == pytest.approx(0.1 + 0.8 / 3)
    assert verdict(cal, 0.66) == (pytest.approx(0.1 + 0.8 * 0.16 / 0.3), True)
    assert verdict(cal, 0.64)[1] is False
    parsed = CALIBRATION.validate_python({"method": "isotonic", "x": [0, 1], "y": [0.2, 0.7], "threshold": 0.4})
    assert isinstance(parsed, IsotonicCalibration) and parsed.apply(0.5) == pytest.approx(0.45)


BAD_CALIBRATIONS = [
    ({"method": "platt", "a": 1.0, "b": 0.0}, "threshold"),
    ({"method": "platt", "a": 1.0, "b": 0.0, "threshold": 1.0}, "threshold"),
    ({"method": "platt", "a": 1.0, "b": 0.0, "threshold": 0.0}, "threshold"),
    ({"method": "platt", "a": "NaN", "b": 0.0, "threshold": 0.5}, "a"),
    ({"method": "platt", "a": 1.0, "b": "Infinity", "threshold": 0.5}, "b"),
    ({"method": "platt", "a": 1.0, "b": 0.0, "threshold": 0.5, "c": 1}, "c"),
    ({"method": "beta", "a": 1.0, "b": 0.0, "threshold": 0.5}, "calibration"),
    ({"a": 1.0, "b": 0.0, "threshold": 0.5}, "calibration"),
    ({"method": "isotonic", "x": [0.1, 0.1], "y": [0.2, 0.3], "threshold": 0.5}, "strictly increasing"),
    ({"method": "isotonic", "x": [0.1, 0.2], "y": [0.3, 0.2], "threshold": 0.5}, "non-decreasing"),
    ({"method": "isotonic", "x": [0.1, 0.2, 0.3], "y": [0.2, 0.3], "threshold": 0.5}, "same length"),
    ({"method": "isotonic", "x": [0.1], "y": [0.2], "threshold": 0.5}, "x"),
    ({"method": "isotonic", "x": [0.1, 1.2], "y": [0.2, 0.3], "threshold": 0.5}, "x"),
    ({"method": "isotonic", "x": [0.1, 0.2], "y": [-0.1, 0.3], "threshold": 0.5}, "y"),
    (
        {"method": "isotonic", "x": [i / 600 for i in range(513)], "y": [0.5] * 513, "threshold": 0.5},
        "x",
    ),
]


@pytest.mark.parametrize(("calibration", "named"), BAD_CALIBRATIONS)
def test_invalid_calibrations_are_refused_naming_the_field(
    kmb: Kombinat, calibration: dict[str, Any], named: str
) -> None:
    with pytest.raises(ValidationError):
        CALIBRATION.validate_python(calibration)
    resp = kmb.client.put(
        "/api/v1/admin/models", json={"models": [{**TEST_MODEL, "calibration": calibration}]}, headers=kmb.admin
    )
    assert resp.status_code == 422, resp.text
    errors = resp.json()["detail"]
    assert all(e["loc"][:4] == ["body", "models", 0, "calibration"] for e in errors), errors
    assert any(named in e["loc"] or named in e["msg"] for e in errors), errors
    assert kmb.sql("SELECT count(*) FROM model")[0][0] == 0


def test_the_registry_keeps_prompt_version_and_calibration(kmb: Kombinat) -> None:
    iso = {"method": "isotonic", "x": [0.0, 0.5, 1.0], "y": [0.0, 0.25, 1.0], "threshold": 0.3}
    kmb.admit({**TEST_MODEL, "prompt_version": "g1", "calibration": iso})
    [entry] = kmb.client.get("/api/v1/models").json()["models"]
    assert entry["prompt_version"] == "g1" and entry["calibration"] == iso
    # defaults: p1 and no calibration
    kmb.admit({k: v for k, v in TEST_MODEL.items() if k not in ("prompt_version", "calibration")})
    [entry] = kmb.client.get("/api/v1/models").json()["models"]
    assert entry["prompt_version"] == "p1" and entry["calibration"] is None
    for bad in ("P1", "1p", "", "p" * 33, "p 1"):
        resp = kmb.client.put(
            "/api/v1/admin/models", json={"models": [{**TEST_MODEL, "prompt_version": bad}]}, headers=kmb.admin
        )
        assert resp.status_code == 422 and resp.json()["detail"][0]["loc"][-1] == "prompt_version", bad


# ---- the verdict at submit ----------------------------------------------------------------------------------


def test_the_calibration_decides_the_verdict_not_the_annotator(kmb: Kombinat) -> None:
    kmb.admit(CALIBRATED)
    yes_pair, no_pair = kmb.enqueue(2)
    a, b = kmb.contributor(trusted=True), kmb.contributor(trusted=True)
    batch = kmb.claim(a, 2)
    # the annotator says "not relevant" at p = 0.3 (maps to 0.76) and "relevant" at p = 0.05 (maps to 0.28)
    resp = send(kmb, a, batch["batch_id"], {yes_pair: (False, 0.3), no_pair: (True, 0.05)})
    assert resp.status_code == 200 and resp.json()["accepted"] == 2, resp.text
    [(rel, p, p_cal, version)] = stored(kmb, yes_pair)
    assert rel is True and p == pytest.approx(0.3) and version == "p1"
    assert p_cal == pytest.approx(sigmoid(math.log(0.3 / 0.7) + 2.0), rel=1e-6)
    [(rel, p, p_cal, _)] = stored(kmb, no_pair)
    assert rel is False and p_cal == pytest.approx(sigmoid(math.log(0.05 / 0.95) + 2.0), rel=1e-6)
    assert (kmb.pair(yes_pair).n_relevant, kmb.pair(no_pair).n_relevant) == (1, 0)
    # a second contributor's labels, judged the same way, verify both pairs with kombinat's verdicts
    batch = kmb.claim(b, 2)
    assert send(kmb, b, batch["batch_id"], {yes_pair: (False, 0.6), no_pair: (True, 0.01)}).status_code == 200
    pairs = kmb.client.get("/api/v1/admin/verified", headers=kmb.admin).json()["pairs"]
    exported = {p["pair_id"]: p for p in pairs}
    assert exported[yes_pair]["label"] is True and exported[no_pair]["label"] is False
    # the mean probability is the calibrated one
    p_cal_06 = sigmoid(math.log(0.6 / 0.4) + 2.0)
    assert exported[yes_pair]["p_relevant"] == pytest.approx((sigmoid(math.log(0.3 / 0.7) + 2) + p_cal_06) / 2)
    labels = kmb.client.get("/api/v1/admin/labels", headers=kmb.admin).json()["labels"]
    assert {lab["pair_id"]: lab["relevant"] for lab in labels if lab["contributor_id"] == b.id} == {
        yes_pair: True,
        no_pair: False,
    }
    assert all(lab["p_calibrated"] is not None and lab["prompt_version"] == "p1" for lab in labels)
    # the statistics count kombinat's verdicts
    [split] = kmb.client.get("/api/v1/stats").json()["splits"]
    assert split["verified"] == 2 and split["mean_agreement"] == 1.0


def test_without_a_calibration_the_annotators_verdict_counts(kmb: Kombinat) -> None:
    kmb.admit()
    [pid] = kmb.enqueue(1)
    a = kmb.contributor(trusted=True)
    batch = kmb.claim(a, 1)
    assert send(kmb, a, batch["batch_id"], {pid: (True, 0.05)}).status_code == 200
    assert stored(kmb, pid) == [(True, pytest.approx(0.05), None, "p1")]
    assert kmb.pair(pid).n_relevant == 1


def test_honeypots_are_judged_by_the_calibrated_verdict(kmb: Kombinat) -> None:
    kmb.admit(CALIBRATED)
    kmb.enqueue(14)
    gold = kmb.honeypots(40)
    sincere, lucky = kmb.contributor(), kmb.contributor()
    # Untrusted: 3 honeypots in 10. The sincere annotator's own verdicts are wrong, its scores right; the lucky
    # one's verdicts are right and its scores wrong: only the scores are judged.
    for who, scores_right in ((sincere, True), (lucky, False)):
        batch = kmb.claim(who, 10)
        labels = {}
        for p in batch["pairs"]:
            if p["pair_id"] in gold:
                truth = gold[p["pair_id"]]
                score_says = truth if scores_right else not truth
                labels[p["pair_id"]] = (not score_says, 0.9 if score_says else 0.02)
            else:
                labels[p["pair_id"]] = (True, 0.9)
        assert sum(pid in gold for pid in labels) == 3
        assert send(kmb, who, batch["batch_id"], labels).status_code == 200
        hp_wrong, quarantined = kmb.sql(
            "SELECT hp_wrong, quarantined FROM batch WHERE batch_id = %(b)s", {"b": batch["batch_id"]}
        )[0]
        assert (hp_wrong, quarantined) == ((0, False) if scores_right else (3, True))
    quality = kmb.client.get("/api/v1/admin/model-quality", headers=kmb.admin).json()["models"]
    assert quality[0]["honeypots_answered"] == 6 and quality[0]["honeypot_accuracy"] == 0.5


def test_a_batch_keeps_the_calibration_it_was_claimed_with(kmb: Kombinat) -> None:
    kmb.admit(CALIBRATED)
    first, second = kmb.enqueue(2)
    a, b = kmb.contributor(trusted=True), kmb.contributor(trusted=True)
    old = kmb.claim(a, 1)
    assert [p["pair_id"] for p in old["pairs"]] == [first]
    # The registry moves on (a refit and a new wording) while the batch is out.
    strict = {"method": "platt", "a": 1.0, "b": 0.0, "threshold": 0.9}
    kmb.admit({**CALIBRATED, "calibration": strict, "prompt_version": "g1"})
    new = kmb.claim(b, 1, {**CALIBRATED, "prompt_version": "g1"})  # the new wording
    assert [p["pair_id"] for p in new["pairs"]] == [second]
    assert send(kmb, a, old["batch_id"], {first: (False, 0.3)}).status_code == 200
    reworded = {**CALIBRATED, "prompt_version": "g1"}
    assert send(kmb, b, new["batch_id"], {second: (True, 0.3)}, reworded).status_code == 200
    # p = 0.3 is relevant under the claim-time calibration of the first batch, not under the refit
    [(rel, _, p_cal, version)] = stored(kmb, first)
    assert (rel, version) == (True, "p1") and p_cal == pytest.approx(sigmoid(math.log(0.3 / 0.7) + 2.0), rel=1e-6)
    [(rel, _, p_cal, version)] = stored(kmb, second)
    assert (rel, version) == (False, "g1") and p_cal == pytest.approx(0.3, rel=1e-6)
    rows = kmb.sql("SELECT prompt_version, calibration FROM batch ORDER BY created_at")
    assert rows == [("p1", PLATT), ("g1", strict)]


@pytest.fixture
def other_replica(database_url: str, github: FakeGitHub, engine: Engine) -> Iterator[Kombinat]:
    """A second app (replica) on the same database: its cache of batch models starts empty."""
    with TestClient(create_app(make_settings(database_url, github))) as client:
        yield Kombinat(client, engine)


def test_every_replica_judges_a_batch_alike(kmb: Kombinat, other_replica: Kombinat) -> None:
    kmb.admit(CALIBRATED)
    pids = kmb.enqueue(2)
    a = kmb.contributor(trusted=True)
    batch = kmb.claim(a, 2)
    # the first chunk goes to the replica that served the claim, the second to another one
    assert send(kmb, a, batch["batch_id"], {pids[0]: (False, 0.3)}).status_code == 200
    other_replica.admit({**CALIBRATED, "calibration": None})  # registry changes in between: no matter
    assert send(other_replica, a, batch["batch_id"], {pids[1]: (False, 0.3)}).status_code == 200
    assert [stored(kmb, pid)[0][0] for pid in pids] == [True, True]


def test_batch_model_cache_drops_its_oldest_entries() -> None:
    import uuid

    cache = BatchModelCache(capacity=10)
    model = BatchModel(1, "llama_cpp", "m", "q", "p1", None)
    ids = [uuid.uuid4() for _ in range(11)]
    for bid in ids:
        cache.put(bid, model)
    assert cache.get(ids[0]) is None and cache.get(ids[1]) is model and cache.get(ids[10]) is model


# ---- prompt versions ------------------------------------------------------------------------------------------


def test_a_claim_with_another_prompt_version_is_refused(kmb: Kombinat) -> None:
    kmb.admit({**TEST_MODEL, "prompt_version": "g1"})
    kmb.enqueue(3)
    a = kmb.contributor(trusted=True)

    def claim(model: dict[str, Any]) -> Any:
        return kmb.client.post("/api/v1/batches/claim", json={"size": 3, "model": model}, headers=a.headers)

    old = {**model_info(), "prompt_version": "p1"}
    resp = claim(old)
    assert resp.status_code == 409, resp.text
    detail = resp.json()["detail"]
    assert "g1" in detail and "p1" in detail and "Update the annotator" in detail
    # nothing leased, no batch
    assert kmb.sql("SELECT count(*) FROM batch")[0][0] == 0
    assert kmb.sql("SELECT count(*) FROM pair WHERE state = 'leased'")[0][0] == 0
    # a claim without a prompt version means p1
    del old["prompt_version"]
    assert claim(old).status_code == 409
    bad = claim({**old, "prompt_version": "G1"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "model", "prompt_version"]
    # an unknown model is still a 403, whatever its prompt version
    unknown = {**old, "model_id": "nobody/Unknown", "prompt_version": "g1"}
    assert claim(unknown).status_code == 403
    batch = kmb.claim(a, 3, {**TEST_MODEL, "prompt_version": "g1"})
    assert len(batch["pairs"]) == 3
    assert kmb.sql("SELECT prompt_version FROM batch") == [("g1",)]


def test_labels_must_be_made_with_the_claimed_model_and_prompt(kmb: Kombinat) -> None:
    kmb.admit(CALIBRATED)
    [pid] = kmb.enqueue(1)
    a = kmb.contributor(trusted=True)
    batch = kmb.claim(a, 1)
    for other in ({**CALIBRATED, "prompt_version": "g1"}, {**CALIBRATED, "quantization": "Q8_0"}):
        resp = send(kmb, a, batch["batch_id"], {pid: (True, 0.9)}, other)
        assert resp.status_code == 409 and "claimed with" in resp.json()["detail"], resp.text
    assert kmb.sql("SELECT count(*) FROM label")[0][0] == 0
    assert send(kmb, a, batch["batch_id"], {pid: (True, 0.9)}).status_code == 200
