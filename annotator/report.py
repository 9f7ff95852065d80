"""How the worker talks to the person (or program) that started it: rich progress, JSON lines, or quiet.

The worker calls these hooks; it never prints. Human mode draws a live progress display on stderr (pairs/s,
the batch's progress, totals); ``--json`` writes one JSON object per event on stdout for scripts;
``--quiet`` prints only warnings and errors.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import IO, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


@dataclass
class Totals:
    labeled: int = 0
    accepted: int = 0
    duplicates: int = 0
    batches: int = 0
    lost_batches: int = 0
    released: int = 0
    truncated: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    @property
    def pairs_per_second(self) -> float:
        return self.labeled / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("started")
        data["seconds"] = round(self.seconds, 3)
        data["pairs_per_second"] = round(self.pairs_per_second, 3)
        return data


class Reporter:
    """Base reporter: every hook is a no-op (this *is* quiet mode, apart from warnings)."""

    def __init__(self, err: IO[str] | None = None) -> None:
        self.err = err or sys.stderr

    def start(self, info: dict[str, Any]) -> None: ...
    def batch(self, batch_id: str, size: int, resumed: bool = False) -> None: ...
    def pair(self, totals: Totals, p_relevant: float) -> None: ...
    def submitted(self, batch_id: str, sent: int, accepted: int, duplicates: int) -> None: ...
    def idle(self, seconds: float) -> None: ...
    def finish(self, totals: Totals, reason: str) -> None: ...
    def info(self, text: str) -> None: ...

    def warn(self, text: str) -> None:
        print(f"warning: {text}", file=self.err, flush=True)

    def retry(self, attempt: int, delay: float, problem: str) -> None:
        self.warn(f"kombinat unreachable ({problem}); retry {attempt} in {delay:.1f}s")

    def close(self) -> None: ...


class JsonReporter(Reporter):
    def __init__(self, out: IO[str] | None = None, err: IO[str] | None = None) -> None:
        super().__init__(err)
        self.out = out or sys.stdout

    def _emit(self, event: str, **fields: Any) -> None:
        print(json.dumps({"event": event, "time": round(time.time(), 3), **fields}), file=self.out, flush=True)

    def start(self, info: dict[str, Any]) -> None:
        self._emit("start", **info)

    def batch(self, batch_id: str, size: int, resumed: bool = False) -> None:
        self._emit("batch", batch_id=batch_id, size=size, resumed=resumed)

    def submitted(self, batch_id: str, sent: int, accepted: int, duplicates: int) -> None:
        self._emit("submitted", batch_id=batch_id, sent=sent, accepted=accepted, duplicates=duplicates)

    def idle(self, seconds: float) -> None:
        self._emit("idle", seconds=round(seconds, 1))

    def finish(self, totals: Totals, reason: str) -> None:
        self._emit("finish", reason=reason, **totals.as_dict())

    def info(self, text: str) -> None:
        self._emit("info", message=text)

    def warn(self, text: str) -> None:
        self._emit("warning", message=text)

    def retry(self, attempt: int, delay: float, problem: str) -> None:
        self._emit("retry", attempt=attempt, delay=round(delay, 2), problem=problem)


class RichReporter(Reporter):
    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        super().__init__(self.console.file)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[totals]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self.task: Any = None
        self._totals: Totals | None = None
        self._started = False

    def _ensure(self) -> None:
        if not self._started:
            self.progress.start()
            self._started = True

    def start(self, info: dict[str, Any]) -> None:
        self.console.print(
            f"[bold]annotator[/] → {info.get('server')} as [cyan]{info.get('login')}[/] · "
            f"{info.get('backend')} · {info.get('model_id')} ({info.get('quantization')})"
        )

    def batch(self, batch_id: str, size: int, resumed: bool = False) -> None:
        self._ensure()
        if self.task is not None:
            self.progress.remove_task(self.task)
        label = "resumed batch" if resumed else "batch"
        self.task = self.progress.add_task(f"{label} {batch_id[:8]}", total=size, rate="", totals="")

    @staticmethod
    def _totals_text(totals: Totals) -> str:
        return f"labeled {totals.labeled} · accepted {totals.accepted}"

    def pair(self, totals: Totals, p_relevant: float) -> None:
        self._totals = totals
        if self.task is None:
            return
        self.progress.update(
            self.task, advance=1, rate=f"{totals.pairs_per_second:.2f} pairs/s", totals=self._totals_text(totals)
        )

    def submitted(self, batch_id: str, sent: int, accepted: int, duplicates: int) -> None:
        note = f" ({duplicates} already there)" if duplicates else ""
        if self.task is not None and self._totals is not None:  # the worker updated its totals first
            self.progress.update(self.task, totals=self._totals_text(self._totals))
        self.progress.console.print(f"  sent {sent} labels of batch {batch_id[:8]}: {accepted} accepted{note}")

    def idle(self, seconds: float) -> None:
        self.progress.console.print(f"  no work available; asking again in {seconds:.0f}s")

    def info(self, text: str) -> None:
        self.progress.console.print(f"  {escape(text)}")

    def warn(self, text: str) -> None:
        self.progress.console.print(f"[yellow]warning:[/] {escape(text)}")

    def finish(self, totals: Totals, reason: str) -> None:
        self.close()
        t = totals
        self.console.print(
            f"[bold green]done[/] ({reason}): {t.labeled} labeled, {t.accepted} accepted, "
            f"{t.duplicates} duplicates, {t.batches} batches, {t.released} released, "
            f"{t.lost_batches} lost leases · {t.pairs_per_second:.2f} pairs/s over {t.seconds:.0f}s"
        )

    def close(self) -> None:
        if self._started:
            self.progress.stop()
            self._started = False


def make_reporter(json_mode: bool, quiet: bool) -> Reporter:
    if json_mode:
        return JsonReporter()
    if quiet:
        return Reporter()
    return RichReporter()
