"""``annotator``: label Embed Kombinat's candidate pairs on your own GPU or CPU.

Commands: login, logout, whoami, doctor, run, bench. Run ``annotator COMMAND --help`` for each.
Human output by default; ``--json`` for one JSON object per line (scripts); ``--quiet`` for errors only.
"""

from __future__ import annotations

import json
import signal
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from annotator import __version__, auth
from annotator.backends import BACKEND_EXTRAS, BACKENDS, ModelMeta, load_backend, order_pairs
from annotator.client import ApiError, KombinatClient, Unavailable, UnexpectedResponse
from annotator.hardware import HardwareFacts, detect
from annotator.journal import Journal, JournalBusy, journal_path, peek
from annotator.models import (
    ModelError,
    RegistryEntry,
    VerifiedHashes,
    choose_model,
    download,
    entry_for_local_path,
    verify,
)
from annotator.prompt import DEFAULT_PROMPT_VERSION, PROMPTS, get_prompt
from annotator.report import make_reporter

APP_HELP = """Label Embed Kombinat's candidate (query, document) pairs with a small local LLM.

Sign in once with `annotator login` (GitHub), check your machine with `annotator doctor`, then
`annotator run`. The annotator picks the backend and model for your hardware (vLLM on NVIDIA, MLX on
Apple Silicon, llama.cpp on CPU) from the models kombinat admits, claims batches of pairs, scores each
pair with one forward pass (P("yes") vs P("no")) and streams the labels back. A local journal keeps
finished labels safe across crashes, network outages and Ctrl-C.

Privacy: only pair IDs, your labels and the model's name/quantization leave your machine.
"""

app = typer.Typer(help=APP_HELP, no_args_is_help=True, add_completion=False, rich_markup_mode=None)

EXIT_ERROR, EXIT_NOT_LOGGED_IN, EXIT_REFUSED, EXIT_UNAVAILABLE = 1, 3, 4, 5

ServerOpt = Annotated[
    str | None,
    typer.Option("--server", envvar="ANNOTATOR_SERVER", help="kombinat URL (default: the one you logged in to)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output: one JSON object per line.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print only warnings and errors.")]
BackendOpt = Annotated[
    str | None,
    typer.Option("--backend", help=f"Force a backend ({', '.join(BACKENDS)}) instead of auto-detection."),
]
ModelOpt = Annotated[
    str | None, typer.Option("--model", help="Registry model name to use instead of the automatic choice.")
]
ModelPathOpt = Annotated[
    Path | None,
    typer.Option(
        "--model-path",
        help="Use this local model file/directory instead of downloading; it must hash to an admitted model.",
    ),
]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="CPU threads for llama.cpp (default: all).")]
MaxDocumentTokensOpt = Annotated[
    int | None,
    typer.Option(
        "--max-document-tokens",
        min=16,
        help="Cut each document to this many tokens (default: the backend's, 1536 on llama.cpp). Shorter is "
        "faster on a CPU; a cut document's label is marked truncated.",
    ),
]

err_console = Console(stderr=True)


def _fail(message: str, code: int = EXIT_ERROR, json_mode: bool = False) -> typer.Exit:
    if json_mode:
        print(json.dumps({"event": "error", "message": message}), flush=True)
    else:
        err_console.print(f"[bold red]error:[/] {escape(message)}")
    return typer.Exit(code)


def _server(server: str | None) -> str:
    return (server or auth.default_server()).rstrip("/")


def _client(server: str, token: str | None = None, **kwargs: Any) -> KombinatClient:
    return KombinatClient(server, token, **kwargs)


def _annotator_version(prompt_version: str = DEFAULT_PROMPT_VERSION) -> str:
    # The prompt version travels with the code version: labels from another wording are not comparable.
    return f"{__version__}+{prompt_version}"


def _credentials(server: str, json_mode: bool) -> auth.Credentials:
    creds = auth.load(server)
    if creds is None:
        raise _fail(
            f"not logged in to {server}: run `annotator login --server {server}`",
            EXIT_NOT_LOGGED_IN,
            json_mode,
        )
    return creds


def _print_version(value: bool) -> None:
    if value:
        print(f"{__version__} (prompt versions: {', '.join(PROMPTS)})")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Label Embed Kombinat's candidate pairs with a local LLM."""


# --- sign-in ------------------------------------------------------------------------------------------


@app.command()
def login(server: ServerOpt = None, json_mode: JsonOpt = False) -> None:
    """Sign in with GitHub (device flow): open the URL shown, enter the code; the token is kept (0600)."""
    url = _server(server)

    def show(uri: str, code: str, expires: int) -> None:
        if json_mode:
            print(json.dumps({"event": "device_code", "verification_uri": uri, "user_code": code}), flush=True)
        else:
            err_console.print(
                f"Open [bold]{uri}[/] and enter the code [bold cyan]{code}[/] (valid {expires // 60} min)."
            )

    with _client(url, max_elapsed=60) as client:
        try:
            creds = auth.device_login(client, show)
        except (auth.LoginFailed, ApiError, Unavailable) as exc:
            raise _fail(str(exc), EXIT_REFUSED, json_mode) from exc
    path = auth.save(creds)
    if json_mode:
        print(json.dumps({"event": "logged_in", "login": creds.login, "server": url, "token_file": str(path)}))
    else:
        err_console.print(f"Logged in to {url} as [bold]{creds.login}[/]; token saved in {path}")


@app.command()
def logout(server: ServerOpt = None, json_mode: JsonOpt = False) -> None:
    """Revoke this machine's token on kombinat and delete it locally."""
    url = _server(server)
    creds = auth.load(url)
    if creds is None:
        raise _fail(f"not logged in to {url}", EXIT_NOT_LOGGED_IN, json_mode)
    revoked = True
    with _client(url, creds.token, max_elapsed=20) as client:
        try:
            client.revoke_token()
        except ApiError as exc:
            revoked = exc.status == 401  # already invalid: nothing left to revoke
        except Unavailable:
            revoked = False
    auth.forget(url)
    if json_mode:
        print(json.dumps({"event": "logged_out", "server": url, "revoked_on_server": revoked}))
    elif revoked:
        err_console.print(f"Logged out of {url}.")
    else:
        err_console.print(f"Deleted the local token; kombinat at {url} could not be told to revoke it.")


@app.command()
def whoami(server: ServerOpt = None, json_mode: JsonOpt = False) -> None:
    """Show who you are signed in as, your reputation and how many labels you have given."""
    url = _server(server)
    creds = _credentials(url, json_mode)
    with _client(url, creds.token, max_elapsed=30) as client:
        try:
            me = client.me()
        except (ApiError, Unavailable) as exc:
            raise _fail(str(exc), EXIT_REFUSED if isinstance(exc, ApiError) else EXIT_UNAVAILABLE, json_mode) from exc
    if json_mode:
        print(json.dumps({"server": url, **me}))
        return
    trusted = "trusted" if me.get("trusted") else "not yet trusted"
    print(
        f"{me.get('login')} on {url} · reputation {me.get('reputation')} ({trusted}) · "
        f"{me.get('labels_submitted')} labels submitted"
    )


# --- doctor -------------------------------------------------------------------------------------------


def _fetch_registry(url: str) -> tuple[list[RegistryEntry] | None, str | None]:
    try:
        with _client(url, max_elapsed=10, timeout=10) as client:
            return [RegistryEntry.from_api(m) for m in client.models()], None
    except (ApiError, Unavailable, UnexpectedResponse, ModelError) as exc:
        return None, str(exc)


def _model_meta(entry: RegistryEntry) -> ModelMeta:
    """What every label says about its model; a prompt version this annotator does not know is a ModelError."""
    try:
        prompt = get_prompt(entry.prompt_version)
    except ValueError as exc:
        raise ModelError(f"model {entry.name}: {exc}") from exc
    return ModelMeta(
        entry.backend, entry.model_id, entry.quantization, _annotator_version(prompt.version), prompt.version
    )


@app.command()
def doctor(
    server: ServerOpt = None, backend: BackendOpt = None, json_mode: JsonOpt = False, quiet: QuietOpt = False
) -> None:
    """Show the hardware found, the backend and model the annotator would use, and why."""
    url = _server(server)
    hw = detect()
    registry, registry_error = _fetch_registry(url)
    creds = auth.load(url)
    report: dict[str, Any] = {
        "annotator_version": _annotator_version(),
        "hardware": hw.as_dict(),
        "server": url,
        "logged_in_as": creds.login if creds else None,
        "token_file": str(auth.token_path()),
        "registry_error": registry_error,
        "registry": [asdict(e) for e in registry] if registry is not None else None,
        "choice": None,
    }
    if registry is not None:
        try:
            choice = choose_model(hw, registry, backend=backend)
            report["choice"] = {
                "name": choice.entry.name,
                "backend": choice.backend,
                "model_id": choice.entry.model_id,
                "quantization": choice.entry.quantization,
                "hub_repo": choice.entry.hub_repo,
                "hub_file": choice.entry.hub_file,
                "size_bytes": choice.entry.size_bytes,
                "backend_installed": hw.backends_installed.get(choice.backend, False),
                "reasons": choice.reasons,
            }
        except ModelError as exc:
            report["choice_error"] = str(exc)
    if creds:
        report["journal"] = peek(journal_path(auth.data_dir(), url, creds.contributor_id))
    if json_mode:
        print(json.dumps(report, indent=1))
        return
    if quiet:
        return
    _print_doctor(report, hw)


def _print_doctor(report: dict[str, Any], hw: HardwareFacts) -> None:
    console = Console()
    table = Table(title=f"annotator {report['annotator_version']} — doctor", show_header=False)
    table.add_row("system", f"{hw.system} {hw.machine}, {hw.cpu_count} CPU cores")
    table.add_row("memory", f"{hw.ram_total_gb:g} GB RAM ({hw.ram_available_gb:g} GB available)")
    gpus = ", ".join(f"{g.name} ({g.memory_gb:g} GB)" for g in hw.gpus) or f"none ({hw.gpu_source})"
    table.add_row("NVIDIA GPUs", gpus)
    table.add_row("Apple Silicon", "yes" if hw.apple_silicon else "no")
    table.add_row(
        "backends installed",
        escape(
            ", ".join(
                f"{name} {'yes' if ok else f'no (pip install embedkomb[{BACKEND_EXTRAS[name]}])'}"
                for name, ok in hw.backends_installed.items()
            )
        ),
    )
    table.add_row("server", report["server"])
    table.add_row("signed in", report["logged_in_as"] or "no (run `annotator login`)")
    if report["registry_error"]:
        table.add_row("registry", escape(f"unreachable: {report['registry_error']}"))
    else:
        admitted = [e["name"] for e in report["registry"] if e["admitted"]]
        table.add_row("admitted models", ", ".join(admitted) or "none")
    choice = report.get("choice")
    if choice:
        table.add_row(
            "would use",
            f"{choice['backend']} · {choice['name']} ({choice['model_id']}, {choice['quantization']})",
        )
        table.add_row("why", escape("\n".join(choice["reasons"])))
        if not choice["backend_installed"]:
            table.add_row("missing", escape(f"pip install 'embedkomb[{BACKEND_EXTRAS[choice['backend']]}]'"))
    elif report.get("choice_error"):
        table.add_row("would use", escape(report["choice_error"]))
    journal = report.get("journal")
    if journal and journal["exists"]:
        table.add_row("journal", f"{journal['open_batches']} open batches, {journal['pending_labels']} labels to send")
    console.print(table)


# --- model resolution (run, bench) --------------------------------------------------------------------


def _resolve(
    hw: HardwareFacts,
    registry: list[RegistryEntry],
    *,
    backend: str | None,
    model: str | None,
    model_path: Path | None,
    progress: bool,
) -> tuple[RegistryEntry, Path, list[str]]:
    """The registry entry to label with and its verified local path."""
    hashes = VerifiedHashes(auth.cache_dir() / "verified-hashes.json")
    if model_path is not None:
        if not model_path.exists():
            raise ModelError(f"--model-path {model_path} does not exist")
        if model:
            choice = choose_model(hw, registry, backend=backend, model=model)
            verify(model_path, choice.entry, hashes)
            entry = choice.entry
        else:
            entry = entry_for_local_path(model_path, registry, hashes)
        if backend and entry.backend != backend:
            raise ModelError(f"{model_path} is registered for {entry.backend}, not --backend {backend}")
        return entry, model_path, [f"--model-path {model_path}: sha256 matches admitted model {entry.name!r}"]
    choice = choose_model(hw, registry, backend=backend, model=model)
    path = download(choice.entry, auth.cache_dir() / "models", hashes, progress=progress)
    return choice.entry, path, choice.reasons


# --- run ----------------------------------------------------------------------------------------------


@app.command()
def run(
    server: ServerOpt = None,
    backend: BackendOpt = None,
    model: ModelOpt = None,
    model_path: ModelPathOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, max=2000, help="Pairs to claim at a time.")] = 200,
    max_pairs: Annotated[
        int | None, typer.Option("--max-pairs", min=1, help="Stop after labeling this many pairs.")
    ] = None,
    once: Annotated[
        bool, typer.Option("--once", help="Label one batch (or finish an interrupted one), then exit.")
    ] = False,
    chunk_size: Annotated[int, typer.Option("--chunk-size", min=1, max=500, help="Labels per submission.")] = 50,
    threads: ThreadsOpt = None,
    max_document_tokens: MaxDocumentTokensOpt = None,
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Claim batches from kombinat, label them locally, stream the labels back. Ctrl-C stops cleanly.

    The first Ctrl-C finishes the pair being scored, sends every finished label and gives the unlabeled
    pairs back to the queue; a second Ctrl-C exits at once (finished labels are still kept in the local
    journal and sent on the next start).
    """
    from annotator.worker import Worker, WorkerConfig

    url = _server(server)
    creds = _credentials(url, json_mode)
    reporter = make_reporter(json_mode, quiet)
    client = _client(url, creds.token, on_retry=reporter.retry)
    try:
        registry = [RegistryEntry.from_api(m) for m in client.models()]
        entry, path, reasons = _resolve(
            detect(),
            registry,
            backend=backend,
            model=model,
            model_path=model_path,
            progress=not (json_mode or quiet),
        )
        meta = _model_meta(entry)
        reporter.start({"server": url, "login": creds.login, **meta.as_dict(), "model": entry.name,
                        "model_path": str(path), "reasons": reasons})  # fmt: skip
        journal = Journal(journal_path(auth.data_dir(), url, creds.contributor_id))
    except (ModelError, JournalBusy, UnexpectedResponse) as exc:
        reporter.close()
        client.close()
        raise _fail(str(exc), EXIT_ERROR, json_mode) from exc
    except ApiError as exc:
        reporter.close()
        client.close()
        raise _fail(str(exc), EXIT_REFUSED, json_mode) from exc
    except Unavailable as exc:
        reporter.close()
        client.close()
        raise _fail(str(exc), EXIT_UNAVAILABLE, json_mode) from exc

    config = WorkerConfig(
        batch_size=batch_size,
        chunk_size=chunk_size,
        max_pairs=max_pairs,
        once=once,
        threshold=entry.threshold,
    )
    code = 0
    loaded = None
    try:
        loaded = load_backend(
            entry.backend,
            path,
            quantization=entry.quantization,
            n_threads=threads,
            prompt_version=meta.prompt_version,
            max_document_tokens=max_document_tokens,
        )
        worker = Worker(client, loaded, journal, meta, config, reporter)
        presses = 0

        def on_signal(signum: int, frame: object) -> None:
            nonlocal presses
            presses += 1
            if presses > 1 or signum == getattr(signal, "SIGQUIT", None):
                raise KeyboardInterrupt
            worker.request_stop()
            reporter.warn("stopping: finishing the current pair, sending labels, releasing the rest "
                          "(press Ctrl-C again to quit at once)")  # fmt: skip

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        worker.run()
    except KeyboardInterrupt:
        reporter.close()
        pending = journal.total_pending()
        err_console.print(f"interrupted; {pending} finished labels kept in the journal, sent on the next start")
        code = 130
    except ApiError as exc:
        reporter.close()
        code = EXIT_REFUSED
        _fail(f"{exc} — stopping; finished labels stay in the journal", code, json_mode)
    except Unavailable as exc:
        reporter.close()
        code = EXIT_UNAVAILABLE
        pending = journal.total_pending()
        _fail(f"{exc}; {pending} finished labels kept in the journal, sent on the next start", code, json_mode)
    except ModelError as exc:
        reporter.close()
        code = EXIT_ERROR
        _fail(str(exc), code, json_mode)
    except UnexpectedResponse as exc:  # another kombinat version? nothing to retry until the annotator is updated
        reporter.close()
        code = EXIT_ERROR
        _fail(f"{exc} — stopping; finished labels stay in the journal (is this annotator up to date?)", code, json_mode)
    except ImportError as exc:  # e.g. --backend vllm without the [gpu] extra
        reporter.close()
        code = EXIT_ERROR
        extra = BACKEND_EXTRAS.get(entry.backend, "cpu")
        _fail(
            f"the {entry.backend} backend is not installed ({exc}): pip install 'embedkomb[{extra}]'", code, json_mode
        )
    finally:
        reporter.close()
        journal.close()
        client.close()
        if loaded is not None:
            loaded.close()
    if code:
        raise typer.Exit(code)


# --- bench --------------------------------------------------------------------------------------------


@app.command()
def bench(
    server: ServerOpt = None,
    backend: BackendOpt = None,
    model: ModelOpt = None,
    model_path: ModelPathOpt = None,
    pairs: Annotated[int, typer.Option("--pairs", min=1, help="How many sample pairs to score.")] = 32,
    threads: ThreadsOpt = None,
    max_document_tokens: MaxDocumentTokensOpt = None,
    prompt_version: Annotated[
        str | None,
        typer.Option(
            "--prompt-version", help=f"Prompt wording ({', '.join(PROMPTS)}; default: the registry's, or p1)."
        ),
    ] = None,
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Measure local throughput (pairs/s, prompt tokens/s) on built-in sample pairs; sends nothing.

    With --model-path and --backend it needs no server at all (the model is not checked against the
    registry, since nothing is submitted); otherwise it resolves the model as `run` does.
    """
    from annotator.samples import sample_pairs

    hw = detect()
    if model_path is not None and backend is not None and model is None:
        name, backend_name, quantization, registry_prompt = model_path.name, backend, "", DEFAULT_PROMPT_VERSION
    else:
        url = _server(server)
        registry, error = _fetch_registry(url)
        if registry is None:
            raise _fail(f"cannot read kombinat's registry ({error}); pass --model-path and --backend", 1, json_mode)
        try:
            entry, model_path, _ = _resolve(
                hw,
                registry,
                backend=backend,
                model=model,
                model_path=model_path,
                progress=not (json_mode or quiet),
            )
        except ModelError as exc:
            raise _fail(str(exc), EXIT_ERROR, json_mode) from exc
        name, backend_name, quantization = entry.name, entry.backend, entry.quantization
        registry_prompt = entry.prompt_version
    try:
        prompt = get_prompt(prompt_version or registry_prompt)
    except ValueError as exc:
        raise _fail(str(exc), EXIT_ERROR, json_mode) from exc
    samples = sample_pairs()
    chosen = [samples[i % len(samples)] for i in range(pairs)]
    # Unique IDs even when the sample list wraps around.
    items = [(p.__class__(f"{p.pair_id}#{i}", p.query, p.document), rel) for i, (p, rel) in enumerate(chosen)]
    relevant = {p.pair_id: rel for p, rel in items}
    loaded = load_backend(
        backend_name,
        model_path,
        quantization=quantization,
        n_threads=threads,
        prompt_version=prompt.version,
        max_document_tokens=max_document_tokens,
    )
    try:
        scores = list(loaded.score_pairs(order_pairs([p for p, _ in items])))
    finally:
        loaded.close()
    stats = loaded.stats
    seconds = max(stats.seconds, 1e-9)
    correct = sum((s.p_relevant >= 0.5) == relevant[s.pair_id] for s in scores)
    result = {
        "backend": backend_name,
        "model": name,
        "prompt_version": prompt.version,
        "pairs": stats.pairs,
        "seconds": round(stats.seconds, 3),
        "pairs_per_second": round(stats.pairs / seconds, 3),
        "prompt_tokens": stats.prompt_tokens,
        "evaluated_tokens": stats.evaluated_tokens,
        "prompt_tokens_per_second": round(stats.prompt_tokens / seconds, 1),
        "evaluated_tokens_per_second": round(stats.evaluated_tokens / seconds, 1),
        "prefix_reuse": round(1 - stats.evaluated_tokens / max(1, stats.prompt_tokens), 3),
        "sample_accuracy_at_0.5": round(correct / max(1, len(scores)), 3),
    }
    if json_mode:
        print(json.dumps(result))
    elif not quiet:
        print(
            f"{result['backend']} · {result['model']}: {result['pairs']} pairs in {result['seconds']}s = "
            f"{result['pairs_per_second']} pairs/s; {result['prompt_tokens_per_second']} prompt tokens/s "
            f"({result['prefix_reuse']:.0%} served from the prefix cache); "
            f"sample accuracy {result['sample_accuracy_at_0.5']:.0%}"
        )


def main() -> None:  # pragma: no cover - `python -m annotator`
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
