"""The live progress page: its JSON (throughput series, agreement), escaping, and the page itself in a real
headless Chromium (Debian's package, driven by Playwright) against a real kombinat on the real PostgreSQL.

The browser test saves screenshots under ``build/screenshots/`` (printed, and copied into pytest's tmp dir).
``make test`` installs Chromium first (scripts/ensure-chromium.sh); without it the browser test fails and
says how to install it: it is never skipped.
"""

from __future__ import annotations

import html
import itertools
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.kombinat.conftest import Kombinat
from tests.support.fake_github import FakeGitHub
from tests.support.kombinat_server import (
    REPO_ROOT,
    KombinatServer,
    admit_model,
    bearer,
    model_info,
    running_kombinat,
    sign_in,
)

CHROMIUM = Path(os.environ.get("EMBEDKOMB_CHROMIUM", "/usr/bin/chromium"))
SCREENSHOTS = REPO_ROOT / "build" / "screenshots"
# The flags that work on these machines (no network but loopback, root, no GPU); Playwright adds its own
# fresh --user-data-dir, --headless and --no-sandbox.
CHROMIUM_ARGS = [
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
XSS_LOGIN = "<script>window.__xss='login'</script>"
XSS_SPLIT = "<img src=x onerror=\"window.__xss='split'\">"


def label_all(kmb: Kombinat, who: Any, size: int, verdict: bool = True) -> int:
    batch = kmb.claim(who, size)
    verdicts = {p["pair_id"]: verdict for p in batch["pairs"]}
    resp = kmb.submit(who, batch["batch_id"], verdicts)
    assert resp.status_code == 200, resp.text
    return len(verdicts)


# --------------------------------------------------------------------------------------------------------
# JSON and HTML, in process


def test_throughput_series_counts_labels_per_bucket_without_honeypots(kmb: Kombinat) -> None:
    kmb.admit()
    kmb.enqueue(6)
    kmb.honeypots(10)
    newcomer = kmb.contributor()  # untrusted: honeypot-heavy batches
    label_all(kmb, newcomer, 10)
    total, honeypot_labels = kmb.sql("SELECT count(*), count(*) FILTER (WHERE is_honeypot) FROM label")[0]
    assert honeypot_labels > 0 and total > honeypot_labels
    # Two labels moved back in time: one into an older bucket of the window, one out of the window.
    ordinary = [r.label_id for r in kmb.sql("SELECT label_id FROM label WHERE NOT is_honeypot ORDER BY label_id")]
    kmb.sql("UPDATE label SET created_at = now() - interval '30 minutes' WHERE label_id = %(i)s", {"i": ordinary[0]})
    kmb.sql("UPDATE label SET created_at = now() - interval '3 hours' WHERE label_id = %(i)s", {"i": ordinary[1]})

    resp = kmb.client.get("/api/v1/stats/throughput?hours=1&buckets=60")
    assert resp.status_code == 200 and "max-age" in resp.headers["cache-control"]
    series = resp.json()
    assert series["hours"] == 1 and series["bucket_seconds"] == 60 and len(series["buckets"]) == 60
    starts = [datetime.fromisoformat(b["start"]) for b in series["buckets"]]
    assert all(int(t.timestamp()) % 60 == 0 for t in starts)
    assert all((b - a).total_seconds() == 60 for a, b in itertools.pairwise(starts))
    counts = [b["labels"] for b in series["buckets"]]
    in_window = total - honeypot_labels - 1
    assert series["labels"] == sum(counts) == in_window
    # the 30-minute-old label sits 29-31 buckets before the current one (the current bucket is filling)
    assert sum(counts[-32:-28]) == 1 and counts[-1] + counts[-2] == in_window - 1
    # the wider window reaches the 3-hour-old label too
    day = kmb.client.get("/api/v1/stats/throughput?hours=24&buckets=72").json()
    assert day["bucket_seconds"] == 1200 and len(day["buckets"]) == 72 and day["labels"] == total - honeypot_labels
    # and the stats' labels-per-hour agrees with the series (honeypots out of both)
    stats = kmb.client.get("/api/v1/stats").json()
    assert stats["labels_per_hour"] == in_window and stats["labels_total"] == total - honeypot_labels


@pytest.mark.parametrize(
    ("query", "field"),
    [("hours=0", "hours"), ("hours=169", "hours"), ("buckets=0", "buckets"), ("buckets=361", "buckets")],
)
def test_throughput_series_is_bounded(kmb: Kombinat, query: str, field: str) -> None:
    resp = kmb.client.get(f"/api/v1/stats/throughput?{query}")
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["loc"] == ["query", field]


def test_agreement_and_empty_state(kmb: Kombinat) -> None:
    empty = kmb.client.get("/api/v1/stats").json()
    assert empty["splits"] == [] and empty["leaderboard"] == []
    assert empty["agreement"]["verified_share"] is None and empty["agreement"]["mean_agreement"] is None
    assert "nothing yet" in kmb.client.get("/progress").text  # the no-JavaScript tables have an empty state too

    kmb.admit()
    kmb.enqueue(3, split="s1")
    a, b, c = (kmb.contributor(trusted=True) for _ in range(3))
    for who, verdict in ((a, True), (b, True)):
        label_all(kmb, who, 3, verdict)  # all three pairs: 2-0 → verified
    kmb.enqueue(2, split="s2", start_priority=-100)
    for who, verdict in ((a, True), (c, False)):
        label_all(kmb, who, 2, verdict)  # 1-1 → disputed
    s = kmb.client.get("/api/v1/stats").json()
    rows = {r["split"]: r for r in s["splits"]}
    assert (rows["s1"]["verified"], rows["s1"]["compared"], rows["s1"]["mean_agreement"]) == (3, 3, 1.0)
    assert (rows["s2"]["disputed"], rows["s2"]["compared"], rows["s2"]["mean_agreement"]) == (2, 2, 0.5)
    agreement = s["agreement"]
    assert (agreement["verified"], agreement["disputed"], agreement["compared"]) == (3, 2, 5)
    assert agreement["verified_share"] == pytest.approx(3 / 5)
    assert agreement["mean_agreement"] == pytest.approx((3 * 1.0 + 2 * 0.5) / 5)


def test_page_escapes_logins_and_split_names(kmb: Kombinat) -> None:
    kmb.admit()
    kmb.enqueue(2, split=XSS_SPLIT)
    label_all(kmb, kmb.contributor(login=XSS_LOGIN, trusted=True), 2)
    for path in ("/", "/progress"):
        page = kmb.client.get(path)
        assert page.status_code == 200
        text = page.text
        assert XSS_LOGIN not in text and XSS_SPLIT not in text
        assert "<script>window.__xss" not in text and "<img src=x" not in text
        assert html.escape(XSS_LOGIN) in text and html.escape(XSS_SPLIT) in text  # the <noscript> tables
        # The data the script renders from is the stats JSON, with <, > and & unicode-escaped.
        embedded = re.search(r'<script id="initial-stats" type="application/json">(.*?)</script>', text, re.S)
        assert embedded is not None and "<" not in embedded.group(1)
        data = json.loads(embedded.group(1))
        assert data["leaderboard"] == [{"login": XSS_LOGIN, "labels": 2}]
        assert [r["split"] for r in data["splits"]] == [XSS_SPLIT]
        # Only the page's own script may run.
        csp = page.headers["content-security-policy"]
        nonce = re.search(r"script-src 'nonce-([^']+)'", csp)
        assert nonce is not None and f'<script nonce="{nonce.group(1)}">' in text
        assert text.count("<script") == 2  # the JSON data block and the nonce'd script


# --------------------------------------------------------------------------------------------------------
# In a real browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"the progress page's browser test needs Debian's Chromium at {CHROMIUM}: run "
            "`bash scripts/ensure-chromium.sh` (apt-get install -y chromium), or set EMBEDKOMB_CHROMIUM",
            pytrace=False,
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser test needs Playwright: install the dev extra (pip install -e '.[dev]')", pytrace=False)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def enqueue(server: KombinatServer, split: str, n: int, priority: float, cycle: str = "c000") -> None:
    pairs = [
        {
            "pair_id": str(uuid.uuid4()),
            "query": f"{split} query {i}",
            "document": f"{split} document {i}",
            "split": split,
            "cycle": cycle,
            "priority": priority - i,
        }
        for i in range(n)
    ]
    resp = httpx.post(f"{server.url}/api/v1/admin/pairs", json={"pairs": pairs}, headers=bearer(server.admin_token))
    assert resp.status_code == 200 and resp.json()["inserted"] == n, resp.text


def label(server: KombinatServer, token: str, size: int, verdict: Any = True) -> list[str]:
    """Claim ``size`` pairs and label them; ``verdict`` is a bool or a function of the pair's query."""
    claim = httpx.post(
        f"{server.url}/api/v1/batches/claim", json={"size": size, "model": model_info()}, headers=bearer(token)
    )
    assert claim.status_code == 200, claim.text
    pairs = claim.json()["pairs"]
    assert len(pairs) == size, pairs
    labels = [
        {"pair_id": p["pair_id"], "relevant": bool(verdict(p["query"]) if callable(verdict) else verdict),
         "p_relevant": 0.8, "grade": None, "truncated": False, "seconds": 0.4}
        for p in pairs
    ]  # fmt: skip
    resp = httpx.post(
        f"{server.url}/api/v1/batches/{claim.json()['batch_id']}/labels",
        json={"model": model_info(), "labels": labels},
        headers=bearer(token),
    )
    assert resp.status_code == 200 and resp.json()["accepted"] == size, resp.text
    return [p["query"] for p in pairs]


def shoot(page: Any, tmp_path: Path, name: str, record: Any) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    target = SCREENSHOTS / name
    page.screenshot(path=str(target), full_page=True)
    shutil.copy(target, tmp_path / name)
    print(f"screenshot: {target}")  # shown with -s or on failure
    record(name, str(target))  # in the JUnit XML, when pytest writes one
    return target


def split_row(page: Any, split: str) -> Any:
    return page.locator("#splits li.split").filter(has=page.locator(".split-name", has_text=split)).first


@pytest.mark.subprocess
@pytest.mark.browser
def test_progress_page_in_chromium_updates_without_reload(browser: Any, tmp_path: Path, record_property: Any) -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=20_000)  # a poll every 5 s; generous for a loaded 2-core machine
    errors: list[str] = []
    with FakeGitHub() as gh, running_kombinat(github=gh) as server:
        context = browser.new_context(viewport={"width": 1100, "height": 900}, color_scheme="light")
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("dialog", lambda d: errors.append(f"dialog: {d.message}"))
        # Nothing may be fetched from anywhere but kombinat itself.
        foreign: list[str] = []
        page.on("request", lambda r: foreign.append(r.url) if not r.url.startswith(server.url) else None)

        # 1. Zero data: every section says so.
        page.goto(server.url + "/progress")
        expect(page.locator("#splits-empty")).to_be_visible()
        expect(page.locator("#board-empty")).to_be_visible()
        expect(page.locator("#chart")).to_contain_text("no labels in this window")
        expect(page.locator("#chart-caption")).to_contain_text("0 labels in the last hour")
        expect(page.locator("[data-agree=verified_share]")).to_have_text("—")
        shoot(page, tmp_path, "progress-empty.png", record_property)
        page.evaluate("window.__sameDocument = true")

        # 2. Work arrives while the page is open: it shows without a reload.
        admit_model(server)
        enqueue(server, "scifact_title_abstract", 6, priority=100)
        enqueue(server, "nfcorpus_title_abstract", 4, priority=50)
        enqueue(server, XSS_SPLIT, 2, priority=10)
        alice = sign_in(server, gh, "alice", 5001)
        mallory = sign_in(server, gh, XSS_LOGIN, 5002)
        assert len(label(server, alice, 4)) == 4
        assert len(label(server, mallory, 4)) == 4  # the same four pairs: two agreeing labels each → verified
        row = split_row(page, "scifact_title_abstract")
        expect(row.locator("[data-count=verified]")).to_have_text("4")
        expect(row.locator("[data-count=labeled]")).to_have_text("4")
        expect(row.locator("[data-count=queued]")).to_have_text("2")
        expect(row.locator("[data-count=pairs]")).to_have_text("6")
        expect(page.locator("#chart-caption")).to_contain_text("8 labels in the last hour")
        assert page.evaluate("window.__sameDocument") is True

        # 3. A fresh load renders from the numbers embedded in the page; names show as text, never as markup.
        page.reload()
        # (the order of names is the database collation's, so the test compares sets)
        expect(page.locator("#splits .split-name")).to_have_count(3)
        names = set(page.locator("#splits .split-name").all_text_contents())
        assert names == {"nfcorpus_title_abstract", "scifact_title_abstract", XSS_SPLIT}
        expect(page.locator("#board td.login")).to_have_count(2)
        board = {tuple(r.locator("td").all_text_contents()[1:]) for r in page.locator("#board tr").all()}
        assert board == {(XSS_LOGIN, "4"), ("alice", "4")}
        expect(split_row(page, XSS_SPLIT).locator("[data-count=pairs]")).to_have_text("2")
        assert page.locator("#splits img, #board script").count() == 0
        assert page.evaluate("window.__xss === undefined")
        expect(page.locator("[data-total=verified]")).to_have_text("4")
        expect(page.locator("[data-agree=verified_share]")).to_have_text("100%")

        # 4. More labels and a dispute, still without a reload.
        page.evaluate("window.__sameDocument = true")
        carol = sign_in(server, gh, "carol", 5003)
        dave = sign_in(server, gh, "dave", 5004)
        picked = label(server, carol, 3)  # the last 2 scifact pairs and the first nfcorpus pair
        assert sum(q.startswith("scifact") for q in picked) == 2
        label(server, dave, 3, verdict=lambda q: q.startswith("scifact"))  # disagrees on the nfcorpus pair
        expect(row.locator("[data-count=verified]")).to_have_text("6")
        expect(row.locator("[data-count=queued]")).to_have_text("0")
        nf = split_row(page, "nfcorpus_title_abstract")
        expect(nf.locator("[data-count=labeled]")).to_have_text("1")
        expect(nf.locator("[data-count=disputed]")).to_have_text("1")
        expect(page.locator("#board td.login")).to_have_count(4)
        assert set(page.locator("#board td.login").all_text_contents()) == {XSS_LOGIN, "alice", "carol", "dave"}
        expect(page.locator("[data-agree=disputed]")).to_have_text("1")
        expect(page.locator("[data-agree=verified_share]")).to_have_text("85.7%")  # 6 of 7
        expect(page.locator("#chart-caption")).to_contain_text("14 labels in the last hour")
        expect(page.locator("#chart rect.bar-rect")).to_have_count(60)
        assert page.evaluate("window.__sameDocument") is True
        # The bar's width is the verified share of the split's pairs.
        widths = row.locator(".bar span").evaluate_all("els => els.map(e => e.style.width)")
        assert widths == ["100%", "0%"]
        shoot(page, tmp_path, "progress.png", record_property)

        # 5. Many splits: all listed, and the filter narrows them.
        for i in range(40):
            enqueue(server, f"domain_{i:02d}_title_body", 3, priority=1)
        expect(page.locator("#splits li.split")).to_have_count(43)
        expect(page.locator("#split-count")).to_have_text("43 splits and cycles")
        # they scroll inside their own box instead of pushing the other sections down
        assert page.locator(".split-scroll").evaluate("e => e.scrollHeight > e.clientHeight")
        assert page.locator("#h-throughput").evaluate("e => e.getBoundingClientRect().top < 1600")
        page.locator("#filter").fill("nfcorpus")
        expect(page.locator("#splits li.split")).to_have_count(1)
        expect(page.locator("#split-count")).to_have_text("1 of 43 shown")
        page.locator("#filter").fill("")
        shoot(page, tmp_path, "progress-many-splits.png", record_property)
        context.close()

    assert errors == []
    assert foreign == []
