"""The ``kombinat`` command: serve, migrate, create-admin-token, create-local-contributor, load-honeypots, stats."""

from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
import uuid
from pathlib import Path
from typing import Annotated, Any

import psycopg
import typer

from kombinat_api.settings import Settings

app = typer.Typer(help="kombinat: the Embed Kombinat coordination server.", no_args_is_help=True)

# Honeypot pair IDs are derived exactly like the pipeline's pair IDs (embedkomb_pipeline/ids.py, which a
# server-only install does not have): uuid5(namespace, normalized query + doc_id + source), doc_id being the
# BLAKE2b-128 of the normalized document. So an ID never tells a honeypot from an ordinary pair.
PAIR_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/embed-kombinat/pairs")
_WHITESPACE = re.compile(r"\s+")
_CONTROL_OR_SURROGATE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def normalize_text(text: str) -> str:
    text = unicodedata.normalize("NFC", _CONTROL_OR_SURROGATE.sub("", text))
    return _WHITESPACE.sub(" ", text).strip()


def honeypot_pair_id(query: str, document: str, source: str) -> uuid.UUID:
    doc_id = hashlib.blake2b(normalize_text(document).encode("utf-8"), digest_size=16).hexdigest()
    return uuid.uuid5(PAIR_NAMESPACE, normalize_text(query) + doc_id + source)


DbOption = Annotated[str | None, typer.Option("--database-url", help="Overrides KOMBINAT_DATABASE_URL.")]


def _settings(database_url: str | None) -> Settings:
    settings = Settings()
    if database_url:
        settings = settings.model_copy(update={"database_url": database_url})
    return settings


@app.command()
def migrate(database_url: DbOption = None, revision: str = "head") -> None:
    """Create or upgrade the schema (the only way kombinat's tables are made)."""
    from kombinat_api.db import migrate as run

    settings = _settings(database_url)
    run(settings.database_url, revision)
    typer.echo(f"database migrated to {revision}")


@app.command()
def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    database_url: DbOption = None,
    migrate_first: Annotated[bool, typer.Option("--migrate/--no-migrate", help="Run migrations first.")] = False,
    log_level: str = "info",
) -> None:
    """Run the API with uvicorn (several workers share nothing but PostgreSQL)."""
    import os

    import uvicorn

    if database_url:
        # Worker processes build their own Settings from the environment.
        os.environ["KOMBINAT_DATABASE_URL"] = database_url
    if migrate_first:
        from kombinat_api.db import migrate as run

        run(_settings(database_url).database_url)
    uvicorn.run(
        "kombinat_api.asgi:app",
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        access_log=False,
        proxy_headers=True,
    )


@app.command("create-admin-token")
def create_admin_token(
    name: Annotated[str, typer.Option(help="What the token is for, e.g. 'pipeline'.")] = "pipeline",
    database_url: DbOption = None,
) -> None:
    """Print a new admin token (shown once; only its hash is stored)."""
    from kombinat_api.auth import create_admin_token as create
    from kombinat_api.db import standalone_transaction

    with standalone_transaction(_settings(database_url).database_url) as conn:
        token = create(conn, name)
    typer.echo(token)


@app.command("create-local-contributor")
def create_local_contributor(
    name: Annotated[str, typer.Argument(help="Short name; the contributor's login becomes 'local:<name>'.")],
    database_url: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print {contributor_id, login, token} as JSON.")] = False,
) -> None:
    """LOCAL/DEMO ONLY: print a contributor token for a contributor without a GitHub account.

    For demos, offline labs and machines that cannot reach GitHub. It needs direct database access (like
    create-admin-token), so it grants nothing a server operator could not already do; volunteers of a public
    deployment sign in with GitHub. The labels of local contributors pass through the same honeypots,
    reputation and verification as everyone's. Running it again for the same name adds a token, not a person.
    """
    from kombinat_api.auth import LOCAL_LOGIN_PREFIX, check_local_contributor_name, create_local_contributor_token
    from kombinat_api.db import standalone_transaction

    try:
        check_local_contributor_name(name)  # before touching the database
        with standalone_transaction(_settings(database_url).database_url) as conn:
            contributor_id, token = create_local_contributor_token(conn, name)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="NAME") from exc
    if as_json:
        login = LOCAL_LOGIN_PREFIX + name
        typer.echo(json.dumps({"contributor_id": contributor_id, "login": login, "token": token}))
    else:
        typer.echo(token)


def _read_jsonl(path: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    with path.open() as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                out[str(row["_id"])] = row
    return out


def beir_honeypots(folder: Path, split: str, negatives_per_positive: float, seed: int) -> list[dict[str, Any]]:
    """Gold pairs from a BEIR-format folder: judged-relevant (query, document) pairs, plus random documents
    as non-relevant ones so that a contributor answering 'yes' to everything fails the honeypots."""
    corpus = _read_jsonl(folder / "corpus.jsonl")
    queries = _read_jsonl(folder / "queries.jsonl")
    qrels_path = folder / "qrels" / f"{split}.tsv"
    positives: dict[str, dict[str, int]] = {}
    with qrels_path.open() as f:
        for i, line in enumerate(f):
            parts = line.rstrip("\n").split("\t")
            if i == 0 and not parts[-1].lstrip("-").isdigit():
                continue
            qid, did, score = parts[0], parts[1], int(parts[2])
            positives.setdefault(qid, {})[did] = score
    rng = random.Random(seed)
    doc_ids = list(corpus)
    source = folder.name
    out: list[dict[str, Any]] = []

    def text_of(doc: dict[str, Any]) -> str:
        title = doc.get("title") or ""
        return f"{title}\n{doc.get('text', '')}".strip()

    for qid, judged in sorted(positives.items()):
        if qid not in queries:
            continue
        query = queries[qid]["text"]
        for did, grade in sorted(judged.items()):
            if did not in corpus:
                continue
            relevant = grade > 0
            out.append(_gold(query, did, text_of(corpus[did]), relevant, grade, source))
        n_neg = int(negatives_per_positive * len(judged) + rng.random())
        for _ in range(n_neg):
            did = rng.choice(doc_ids)
            if did in judged:
                continue
            out.append(_gold(query, did, text_of(corpus[did]), False, 0, source))
    return out


def _gold(query: str, doc_id: str, document: str, relevant: bool, grade: int, source: str) -> dict[str, Any]:
    del doc_id  # the BEIR id is the source's; the pair id uses the text hash like the pipeline does
    query, document = normalize_text(query), normalize_text(document)
    return {
        "pair_id": honeypot_pair_id(query, document, f"honeypot:{source}"),
        "query": query,
        "document": document,
        "relevant": relevant,
        "grade": max(0, min(3, grade)),
        "source": source,
    }


@app.command("load-honeypots")
def load_honeypots(
    folder: Annotated[Path, typer.Argument(help="BEIR-format folder (corpus.jsonl, queries.jsonl, qrels/).")],
    split: str = "test",
    negatives_per_positive: float = 1.0,
    limit: int = 0,
    seed: int = 0,
    database_url: DbOption = None,
) -> None:
    """Load gold pairs from human relevance judgments as honeypots."""
    from kombinat_api import queue
    from kombinat_api.db import standalone_transaction

    honeypots = beir_honeypots(folder, split, negatives_per_positive, seed)
    if limit:
        random.Random(seed).shuffle(honeypots)
        honeypots = honeypots[:limit]
    with standalone_transaction(_settings(database_url).database_url) as conn:
        inserted = queue.enqueue_honeypots(conn, honeypots)
    n_rel = sum(h["relevant"] for h in honeypots)
    typer.echo(
        f"{inserted} honeypots inserted, {len(honeypots) - inserted} already present "
        f"({n_rel} relevant, {len(honeypots) - n_rel} non-relevant, source {folder.name})"
    )


@app.command()
def stats(database_url: DbOption = None, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Print queue and label counts per split and cycle."""
    from kombinat_api import queue, upkeep
    from kombinat_api.db import libpq_url, standalone_transaction

    url = _settings(database_url).database_url
    with standalone_transaction(url) as conn:
        rows = queue.split_summaries(conn)
        labels = queue.labels_stored(conn)
    with psycopg.connect(libpq_url(url)) as pg:
        pages = upkeep.working_set(pg)
    if as_json:
        cache = {"working_set_bytes": pages.bytes, "shared_buffers_bytes": pages.shared_buffers, "fits": pages.fits}
        typer.echo(json.dumps({"splits": rows, "labels_total": labels, "cache": cache}, default=str))
        return
    cols = ["split", "cycle", "pairs", "queued", "leased", "labeled", "verified", "disputed", "escalated"]
    typer.echo("  ".join(f"{c:>10}" for c in cols))
    for row in rows:
        values: dict[str, object] = dict(row)
        typer.echo("  ".join(f"{values[c]!s:>10}" for c in cols))
    typer.echo(f"labels stored: {labels}")
    typer.echo(pages.advice())


if __name__ == "__main__":
    app()
