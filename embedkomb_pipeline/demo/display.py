"""What the demo shows while it runs (a live board of stages and labeling progress) and the summary after.

Rendering only: the demo (demo.py) owns the work and fills in Board and DemoSummary.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from embedkomb_pipeline.formatting import number

_ICONS = {"pending": "[dim]·[/]", "done": "[green]✓[/]", "skipped": "[cyan]↷[/]", "failed": "[red]✗[/]"}


@dataclass
class Stage:
    key: str
    title: str
    state: str = "pending"  # pending | running | done | skipped | failed
    detail: str = ""
    started: float = 0.0
    seconds: float = 0.0


@dataclass
class LabelingView:
    """kombinat's counts for the demo's split × cycle, refreshed while volunteers label."""

    target: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    per_volunteer: dict[str, int] = field(default_factory=dict)
    round: int = 0

    def render(self) -> RenderableType:
        table = Table.grid(padding=(0, 1))
        total = max(1, self.target)
        for name in ("labeled", "verified"):
            value = int(self.counts.get(name, 0))
            table.add_row(f"  {name:>8}", ProgressBar(total=total, completed=min(value, total), width=40),
                          f"{value:,} / {self.target:,}")  # fmt: skip
        volunteers = ", ".join(f"{k} {v:,}" for k, v in sorted(self.per_volunteer.items()))
        extra = (
            f"  round {self.round} · queued {self.counts.get('queued', 0):,} · leased {self.counts.get('leased', 0):,}"
        )
        return Group(table, Text(extra + (f" · labels: {volunteers}" if volunteers else ""), style="dim"))


class Board:
    """The stages of one cycle; a live display on a terminal, one line per finished stage otherwise."""

    def __init__(self, stages: list[tuple[str, str]], console: Console) -> None:
        self.stages = {key: Stage(key, title) for key, title in stages}
        self.console = console
        self.labeling: LabelingView | None = None
        self._live: Live | None = None
        self._spinner = Spinner("dots", style="yellow")  # one instance: it animates by its own start time

    def __rich__(self) -> RenderableType:
        table = Table.grid(padding=(0, 1))
        table.add_column(width=2)
        table.add_column(min_width=16)
        table.add_column(justify="right", min_width=7)
        table.add_column()
        for stage in self.stages.values():
            if stage.state == "running":
                icon: RenderableType = self._spinner
                seconds = time.perf_counter() - stage.started
            else:
                icon = Text.from_markup(_ICONS[stage.state])
                seconds = stage.seconds
            shown = f"{seconds:.0f} s" if stage.state in ("running", "done", "failed") else ""
            table.add_row(icon, stage.title, shown, Text.from_markup(stage.detail, overflow="fold"))
            if stage.key == "labeling" and stage.state == "running" and self.labeling is not None:
                table.add_row("", "", "", self.labeling.render())
        return Panel(table, title="Embed Kombinat — one cycle", border_style="blue")

    @contextmanager
    def live(self) -> Iterator[Board]:
        if not self.console.is_terminal:
            yield self
            return
        with Live(self, console=self.console, refresh_per_second=4, transient=False) as live:
            self._live = live
            try:
                yield self
            finally:
                self._live = None

    @contextmanager
    def stage(self, key: str, detail: str = "") -> Iterator[Stage]:
        """Run one stage: running while inside, done on exit (or failed on an exception, which propagates)."""
        stage = self.stages[key]
        stage.state, stage.detail, stage.started = "running", detail, time.perf_counter()
        try:
            yield stage
        except BaseException:
            stage.state, stage.seconds = "failed", time.perf_counter() - stage.started
            self._line(stage)
            raise
        if stage.state == "running":
            stage.state = "done"
        stage.seconds = time.perf_counter() - stage.started
        self._line(stage)

    def skip(self, key: str, why: str) -> None:
        stage = self.stages[key]
        stage.state, stage.detail = "skipped", why
        self._line(stage)

    def _line(self, stage: Stage) -> None:
        if self._live is None:  # not a terminal: a plain log line per stage
            shown = f" ({stage.seconds:.0f} s)" if stage.state != "skipped" else ""
            self.console.print(f"{_ICONS[stage.state]} {stage.title}{shown}: {stage.detail}")


@dataclass
class DemoSummary:
    """Everything the summary prints; the test asserts on these numbers."""

    split: str
    cycle: str
    seconds: float = 0.0
    database: str = ""
    kombinat_url: str = ""
    source_pairs: int = 0
    mined: int = 0
    top_k: int = 0
    queued_total: int = 0  # pairs of this split × cycle in kombinat
    queued_added: int = 0
    honeypots: int = 0
    honeypots_added: int = 0
    labels_total: int = 0  # label rows in kombinat for this split × cycle (honeypot answers excluded)
    labels_added: int = 0
    honeypot_answers: int = 0
    snapshot_rows: int = 0
    snapshot_distinct: int = 0
    verified: int = 0
    verified_relevant: int = 0
    export_rows: int = 0
    export_distinct: int = 0
    disputed: int = 0
    kappa: float | None = None
    kappa_same_config: float | None = None
    pairs_same_config: int = 0
    kappa_different_configs: float | None = None
    pairs_different_configs: int = 0
    mean_agreement: float | None = None
    checks: dict[str, bool] = field(default_factory=dict)
    volunteers: list[dict[str, Any]] = field(default_factory=list)
    scores: dict[str, Any] = field(default_factory=dict)  # base / checkpoint nDCG@10 when evaluated
    scores_note: str = ""
    checkpoint_path: str = ""
    checkpoint_steps: int | None = None
    dataset_path: str = ""
    lake: str = ""
    logs: str = ""
    dagster_home: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def duplicates(self) -> dict[str, int]:
        return {
            "snapshot": self.snapshot_rows - self.snapshot_distinct,
            "export": self.export_rows - self.export_distinct,
        }


def render_summary(s: DemoSummary, console: Console) -> None:
    counts = Table(title=f"cycle {s.cycle} of {s.split}", show_header=True, header_style="bold")
    counts.add_column("")
    counts.add_column("total", justify="right")
    counts.add_column("this run", justify="right")
    counts.add_row("source pairs (title → abstract)", f"{s.source_pairs:,}", "")
    counts.add_row(f"candidates mined (top {s.top_k} per query)", f"{s.mined:,}", "")
    counts.add_row("pairs queued in kombinat (hardest first)", f"{s.queued_total:,}", f"+{s.queued_added:,}")
    counts.add_row("honeypots loaded", f"{s.honeypots:,}", f"+{s.honeypots_added:,}")
    counts.add_row("labels on queued pairs", f"{s.labels_total:,}", f"+{s.labels_added:,}")
    counts.add_row("honeypot answers", f"{s.honeypot_answers:,}", "")
    counts.add_row("verified pairs (exported)", f"{s.verified:,}", f"{s.verified_relevant:,} relevant")
    counts.add_row("disputed (wait for a third volunteer)", f"{s.disputed:,}", "")
    console.print(counts)

    quality = Table(title="labels", show_header=True, header_style="bold")
    for col in ("volunteer", "labels", "honeypot accuracy", "reputation", "pairs/s"):
        quality.add_column(col, justify="left" if col == "volunteer" else "right")
    for v in s.volunteers:
        quality.add_row(v["login"], f"{v['labels']:,}", number(v["honeypot_accuracy"], 2), number(v["reputation"], 2),
                        number(v.get("rate"), 1))  # fmt: skip
    console.print(quality)
    console.print(
        f"agreement: Cohen's κ (first two labels of a pair) {number(s.kappa)}; mean agreement of verified pairs "
        f"{number(s.mean_agreement)}"
    )
    if s.pairs_same_config:
        # Honest about what the demo's agreement means: both volunteers run one deterministic model.
        console.print(
            f"  of which {s.pairs_same_config:,} pairs were labeled twice by the same model configuration "
            f"(κ {number(s.kappa_same_config)}): one model's opinion twice, which catches broken or dishonest "
            "volunteers but is no independent evidence about relevance"
            + (
                f"; {s.pairs_different_configs:,} pairs by two different models (κ {number(s.kappa_different_configs)})"
                if s.pairs_different_configs
                else "; no pair was labeled by two different models"
            )
            + ". How good the labels are is measured against humans and GPT-4o: `python -m bench.labeling`."
        )
    if s.checks:
        console.print("checks: " + ", ".join(f"{k} {'[green]passed[/]' if v else '[red]failed[/]'}"
                                              for k, v in sorted(s.checks.items())))  # fmt: skip
    if s.scores:
        base, after = s.scores.get("base"), s.scores.get("checkpoint")
        delta = f" ({after - base:+.4f})" if base is not None and after is not None else ""
        task = s.scores.get("task", "SciFact")
        console.print(f"nDCG@10 on {task}: base {number(base, 4)} → checkpoint {number(after, 4)}{delta}")
    if s.scores_note:
        console.print(f"scores: {s.scores_note}")
    dup = s.duplicates
    console.print(
        f"no duplicates: label snapshot {s.snapshot_rows:,} rows = {s.snapshot_distinct:,} distinct label ids "
        f"({dup['snapshot']} extra); export {s.export_rows:,} rows = {s.export_distinct:,} distinct pair ids "
        f"({dup['export']} extra); kombinat keys pairs by pair_id and labels by (pair, contributor)"
    )
    where = Table.grid(padding=(0, 1))
    where.add_row("dataset (Hugging Face layout)", s.dataset_path)
    where.add_row("checkpoint", s.checkpoint_path + (f" ({s.checkpoint_steps} steps)" if s.checkpoint_steps else ""))
    where.add_row("lake", s.lake)
    where.add_row("database", s.database)
    where.add_row("Dagster instance", s.dagster_home)
    where.add_row("logs", s.logs)
    console.print(where)
    for note in s.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"[bold]done in {s.seconds:.0f} s[/]")
