"""Honest and bad contributors side by side on the real app and PostgreSQL: the quarantine test spares honest
batches and every bad contributor loses its standing, so none of its labels counts at the end.

Three honest contributors answer with 5 % noise. In the first crowd a random one flips coins, an inverted one
answers the opposite of the truth (honeypots included), an always-relevant one says yes to everything. In the
second, over a small honeypot pool that runs out, a sleeper behaves until no honeypot is left for it and then
inverts everything, and two colluders claim side by side, compare what they were served, answer truthfully what
they suspect is a honeypot (served to both of them, now or before) and invert the rest.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from kombinat_api.main import create_app
from kombinat_api.settings import Settings
from tests.kombinat.conftest import Contributor, Kombinat, make_settings
from tests.support.fake_github import FakeGitHub

PAIRS, HONEYPOTS, BATCH = 1500, 400, 40

Answer = Callable[[bool, random.Random], bool]
BEHAVIOURS: dict[str, Answer] = {
    "honest": lambda truth, rng: truth if rng.random() >= 0.05 else not truth,
    "random": lambda truth, rng: rng.random() < 0.5,
    "inverted": lambda truth, rng: not truth,
    "always_relevant": lambda truth, rng: True,
}


@pytest.fixture
def kmb_live(database_url: str, github: FakeGitHub, engine: Engine) -> Iterator[Kombinat]:
    """Reputation refreshed after every batch (the 120 s throttle would outlast the whole simulation)."""
    with TestClient(create_app(make_settings(database_url, github, reputation_refresh_s=0.0))) as client:
        yield Kombinat(client, engine)


@pytest.mark.timeout(600)
def test_honest_batches_are_spared_and_bad_contributors_stop_counting(kmb_live: Kombinat) -> None:
    kmb = kmb_live
    rng = random.Random(7)
    kmb.admit()
    ids = kmb.enqueue(PAIRS)
    truth = {pid: rng.random() < 0.3 for pid in ids}
    gold = kmb.honeypots(HONEYPOTS)
    truth.update(gold)
    crowd: list[tuple[str, Contributor]] = [("honest", kmb.contributor(f"honest{i}")) for i in range(3)]
    crowd += [(kind, kmb.contributor(kind)) for kind in ("random", "inverted", "always_relevant")]
    batches: dict[str, list[bool]] = {}  # contributor login → quarantined flag of each batch
    for _round in range(200):
        claimed_any = False
        for kind, who in crowd:
            resp = kmb.client.post(
                "/api/v1/batches/claim",
                json={"size": BATCH, "model": {"backend": "llama_cpp", "model_id": "test/Tiny-LLM",
                                               "quantization": "Q4_K_M", "prompt_version": "p1"}},
                headers=who.headers,
            )  # fmt: skip
            if resp.status_code != 200 or not resp.json()["pairs"]:
                continue
            claimed_any = True
            batch = resp.json()
            verdicts = {p["pair_id"]: BEHAVIOURS[kind](truth[p["pair_id"]], rng) for p in batch["pairs"]}
            assert kmb.submit(who, batch["batch_id"], verdicts).status_code == 200
            flag = kmb.sql("SELECT quarantined FROM batch WHERE batch_id = %(b)s", {"b": batch["batch_id"]})[0][0]
            batches.setdefault(who.login, []).append(flag)
        if not claimed_any:
            break

    honest_flags = [f for kind, who in crowd if kind == "honest" for f in batches.get(who.login, [])]
    honest_rate = sum(honest_flags) / len(honest_flags)
    standing = dict(kmb.sql("SELECT login, good_standing FROM contributor"))
    counted_bad = kmb.sql(
        """SELECT count(*) FROM label l JOIN pair p ON p.pair_id = l.pair_id
           JOIN contributor c ON c.id = l.contributor_id
           WHERE p.status = 'verified' AND NOT l.quarantined AND c.good_standing AND l.tier >= p.tier
             AND c.login = ANY(%(bad)s)""",
        {"bad": ["random", "inverted", "always_relevant"]},
    )[0][0]  # fmt: skip
    verified = kmb.sql(
        "SELECT pair_id, n_relevant * 2 >= n_labels FROM pair WHERE status = 'verified' AND NOT is_honeypot"
    )
    accuracy = sum(truth[str(pid)] == label for pid, label in verified) / max(1, len(verified))
    # the rule before: a batch whose own honeypot accuracy fell below 90 % was quarantined
    old_rule = kmb.sql(
        """SELECT count(*) FROM (
               SELECT b.batch_id FROM batch b JOIN contributor c ON c.id = b.contributor_id
               JOIN label l ON l.batch_id = b.batch_id AND l.is_honeypot JOIN honeypot h ON h.pair_id = l.pair_id
               WHERE c.login LIKE 'honest%%' GROUP BY b.batch_id
               HAVING avg((l.relevant = h.relevant)::int) < 0.9) x"""
    )[0][0]
    report = {
        "honest batches": len(honest_flags),
        "honest quarantined": sum(honest_flags),
        "honest quarantined by the old per-batch 90 % bar": old_rule,
        "bad batches quarantined": {k: f"{sum(batches[k])}/{len(batches[k])}" for k in BEHAVIOURS if k in batches},
        "standing": standing,
        "verified pairs": len(verified),
        "verified accuracy": round(accuracy, 4),
    }
    print(report)
    assert len(honest_flags) >= 60, report
    assert honest_rate < 0.01, report
    for kind in ("random", "inverted", "always_relevant"):
        assert standing[kind] is False, report
    assert all(standing[f"honest{i}"] for i in range(3)), report
    assert counted_bad == 0, report
    assert accuracy >= 0.9, report
    assert uuid.UUID(str(verified[0][0]))  # ids came back as stored


def test_quarantine_can_be_switched_off_for_a_demo(database_url: str, github: FakeGitHub, engine: Engine) -> None:
    """KOMBINAT_HONEYPOT_QUARANTINE=false (the demo's near-chance tiny model): no batch is quarantined."""
    with TestClient(create_app(make_settings(database_url, github, honeypot_quarantine=False))) as client:
        kmb = Kombinat(client, engine)
        kmb.admit()
        kmb.enqueue(7)
        gold = kmb.honeypots(10)
        cheat = kmb.contributor()
        batch = kmb.claim(cheat, 10)
        verdicts = {p["pair_id"]: not gold[p["pair_id"]] if p["pair_id"] in gold else True for p in batch["pairs"]}
        assert sum(p["pair_id"] in gold for p in batch["pairs"]) == 3
        assert kmb.submit(cheat, batch["batch_id"], verdicts).status_code == 200
        assert kmb.sql("SELECT quarantined FROM batch WHERE batch_id = %(b)s", {"b": batch["batch_id"]})[0][0] is False


MODEL = {"backend": "llama_cpp", "model_id": "test/Tiny-LLM", "quantization": "Q4_K_M", "prompt_version": "p1"}
SMALL_POOL = 60
CAP = Settings().honeypot_max_exposure


def _claim(kmb: Kombinat, who: Contributor) -> dict[str, object] | None:
    resp = kmb.client.post("/api/v1/batches/claim", json={"size": BATCH, "model": MODEL}, headers=who.headers)
    if resp.status_code != 200 or not resp.json()["pairs"]:
        return None
    batch: dict[str, object] = resp.json()
    return batch


def _servable_left(kmb: Kombinat, who: Contributor) -> int:
    """What an insider would know: how many honeypots the server may still show this contributor."""
    return int(
        kmb.sql(
            """SELECT count(*) FROM honeypot h WHERE NOT h.retired
               AND NOT EXISTS (SELECT 1 FROM batch_honeypot bh WHERE bh.pair_id = h.pair_id
                               AND bh.contributor_id = %(c)s)""",
            {"c": who.id},
        )[0][0]
    )


@pytest.mark.timeout(600)
def test_a_spent_pool_still_catches_sleepers_and_colluders_cannot_spot_honeypots(kmb_live: Kombinat) -> None:
    kmb = kmb_live
    rng = random.Random(11)
    kmb.admit()
    ids = kmb.enqueue(PAIRS)
    truth = {pid: rng.random() < 0.3 for pid in ids}
    gold = kmb.honeypots(SMALL_POOL)
    truth.update(gold)
    honest = [kmb.contributor(f"honest{i}") for i in range(3)]
    sleeper = kmb.contributor("sleeper")
    colluders = (kmb.contributor("colluder_a"), kmb.contributor("colluder_b"))
    served: dict[str, set[str]] = {c.login: set() for c in colluders}
    served_at_once: set[str] = set()  # pairs in both colluders' batches while both were out
    sleeper_inverted_from: int | None = None
    honest_flags: list[bool] = []

    def quarantined(batch_id: object) -> bool:
        return bool(kmb.sql("SELECT quarantined FROM batch WHERE batch_id = %(b)s", {"b": batch_id})[0][0])

    for round_no in range(300):
        claimed_any = False
        for who in honest:
            batch = _claim(kmb, who)
            if batch is None:
                continue
            claimed_any = True
            verdicts = {p["pair_id"]: BEHAVIOURS["honest"](truth[p["pair_id"]], rng) for p in batch["pairs"]}  # type: ignore[attr-defined]
            assert kmb.submit(who, str(batch["batch_id"]), verdicts).status_code == 200
            honest_flags.append(quarantined(batch["batch_id"]))

        batch = _claim(kmb, sleeper)
        if batch is not None:
            claimed_any = True
            if sleeper_inverted_from is None and _servable_left(kmb, sleeper) == 0:
                sleeper_inverted_from = round_no
            kind = "honest" if sleeper_inverted_from is None else "inverted"
            verdicts = {p["pair_id"]: BEHAVIOURS[kind](truth[p["pair_id"]], rng) for p in batch["pairs"]}  # type: ignore[attr-defined]
            assert kmb.submit(sleeper, str(batch["batch_id"]), verdicts).status_code == 200

        # the colluders claim side by side, then compare before answering
        pair_batches = [(who, _claim(kmb, who)) for who in colluders]
        ids_now = [{p["pair_id"] for p in b["pairs"]} if b else set() for _, b in pair_batches]  # type: ignore[attr-defined]
        served_at_once |= ids_now[0] & ids_now[1]
        for i, (who, b) in enumerate(pair_batches):
            if b is None:
                continue
            claimed_any = True
            partner = colluders[1 - i].login
            served[who.login] |= ids_now[i]
            suspected = ids_now[i] & (ids_now[1 - i] | served[partner])
            verdicts = {pid: truth[pid] if pid in suspected else not truth[pid] for pid in ids_now[i]}
            assert kmb.submit(who, str(b["batch_id"]), verdicts).status_code == 200
        if not claimed_any:
            break

    both = served["colluder_a"] & served["colluder_b"]
    either = served["colluder_a"] | served["colluder_b"]
    hp_share_both = sum(pid in gold for pid in both) / max(1, len(both))
    hp_share_served = sum(pid in gold for pid in either) / max(1, len(either))
    standing = dict(kmb.sql("SELECT login, good_standing FROM contributor"))
    bad = ["sleeper", "colluder_a", "colluder_b"]
    counted_bad = kmb.sql(
        """SELECT count(*) FROM label l JOIN pair p ON p.pair_id = l.pair_id
           JOIN contributor c ON c.id = l.contributor_id
           WHERE p.status = 'verified' AND NOT l.quarantined AND c.good_standing AND l.tier >= p.tier
             AND c.login = ANY(%(bad)s)""",
        {"bad": bad},
    )[0][0]  # fmt: skip
    verified = kmb.sql(
        "SELECT pair_id, n_relevant * 2 >= n_labels FROM pair WHERE status = 'verified' AND NOT is_honeypot"
    )
    accuracy = sum(truth[str(pid)] == label for pid, label in verified) / max(1, len(verified))
    exposure = kmb.client.get("/api/v1/admin/honeypots", headers=kmb.admin).json()
    max_served = kmb.sql("SELECT max(served), max(n) FROM honeypot, "
                         "(SELECT count(*) AS n FROM batch_honeypot GROUP BY pair_id) x")[0]  # fmt: skip
    report = {
        "honest batches": len(honest_flags),
        "honest quarantined": sum(honest_flags),
        "sleeper inverted from round": sleeper_inverted_from,
        "pairs served to both colluders at once": len(served_at_once),
        "honeypots among them": sum(pid in gold for pid in served_at_once),
        "served to both colluders ever": len(both),
        "honeypot share among pairs served to both": round(hp_share_both, 3),
        "honeypot share among pairs served to either": round(hp_share_served, 3),
        "standing": standing,
        "pool exposure": exposure,
        "verified pairs": len(verified),
        "verified accuracy": round(accuracy, 4),
    }
    print(report)
    assert sleeper_inverted_from is not None, report  # the pool did run out for it
    assert exposure["servings_left"] == 0 and exposure["retired"] == SMALL_POOL, report
    assert max_served[0] <= CAP and max_served[1] <= CAP, report
    assert len(honest_flags) >= 40 and sum(honest_flags) / len(honest_flags) < 0.01, report
    assert not any(pid in gold for pid in served_at_once), report
    # co-occurrence says little: a pair served to both is a honeypot hardly more often than any served pair
    assert hp_share_both <= 1.5 * hp_share_served + 0.01, report
    for login in bad:
        assert standing[login] is False, report
    assert all(standing[f"honest{i}"] for i in range(3)), report
    assert counted_bad == 0, report
    assert accuracy >= 0.9, report
