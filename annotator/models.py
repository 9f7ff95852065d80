"""Which model to run: kombinat's registry (only admitted models) × the mission's hardware table.

The mission table is the preference order; kombinat's registry says what is allowed. A model that kombinat
has not admitted is never chosen automatically (its labels would be refused with 403 anyway), and the
reasons for the choice are kept so that ``annotator doctor`` can say *why*.

Model files come from the Hugging Face Hub through ``huggingface_hub`` (progress bars included) and are
verified against the registry's sha256 before use. ``--model-path`` uses a local file instead — it is still
hashed, because the labels will claim that registry model produced them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from annotator.hardware import HardwareFacts
from annotator.prompt import DEFAULT_PROMPT_VERSION

# Below this much RAM the CPU tier drops from the 3B to the 1.5B model (3B Q4_K_M needs ~3 GB resident,
# and a volunteer's machine is doing other things too).
CPU_LOW_RAM_GB = 8.0

# kombinat's ModelEntry.tier (kombinat_api/schemas.py is the source of truth): an int from 0 to 10, default 0.
TIER_MIN, TIER_MAX, TIER_DEFAULT = 0, 10, 0


class ModelError(RuntimeError):
    """No usable model: explained in words a volunteer can act on."""


def parse_tier(value: object) -> int:
    """A registry entry's tier as kombinat defines it; the default tier for a missing or malformed value.

    The annotator only shows the tier (kombinat decides which pairs a model's tier may claim), so a registry
    from another server version must not stop a volunteer over it: anything that is not a whole number in
    kombinat's range reads as the default rather than raising.
    """
    # bool is an int subclass: JSON true must not read as tier 1
    if isinstance(value, int) and not isinstance(value, bool) and TIER_MIN <= value <= TIER_MAX:
        return value
    return TIER_DEFAULT


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    backend: str
    model_id: str
    quantization: str
    tier: int = TIER_DEFAULT
    hub_repo: str = ""
    hub_file: str | None = None
    sha256: str = ""
    size_bytes: int = 0
    min_memory_gb: float = 0.0
    admitted: bool = False
    qualification: Mapping[str, Any] = field(default_factory=dict)
    prompt_version: str = DEFAULT_PROMPT_VERSION  # the wording kombinat expects this model's labels in

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> RegistryEntry:
        """An entry of kombinat's registry; ModelError (a sentence, not a traceback) when a field is unreadable."""
        try:
            return cls._from_api(data)
        except (KeyError, TypeError, ValueError) as exc:
            name = data.get("name", "?") if isinstance(data, Mapping) else "?"
            raise ModelError(f"kombinat's registry entry {name!r} is malformed ({type(exc).__name__}: {exc})") from exc

    @classmethod
    def _from_api(cls, data: Mapping[str, Any]) -> RegistryEntry:
        return cls(
            name=str(data["name"]),
            backend=str(data["backend"]),
            model_id=str(data["model_id"]),
            quantization=str(data.get("quantization") or ""),
            tier=parse_tier(data.get("tier")),
            hub_repo=str(data.get("hub_repo") or ""),
            hub_file=data.get("hub_file") or None,
            sha256=str(data.get("sha256") or "").lower(),
            size_bytes=int(data.get("size_bytes") or 0),
            min_memory_gb=float(data.get("min_memory_gb") or 0.0),
            admitted=bool(data.get("admitted")),
            qualification=dict(data.get("qualification") or {}),
            prompt_version=str(data.get("prompt_version") or DEFAULT_PROMPT_VERSION),
        )

    @property
    def threshold(self) -> float:
        """Decision threshold on the raw score: the one calibrated on gold data at qualification, if any.

        Only a hint for the volunteer's own display: when the entry carries a calibration, kombinat decides
        each label's verdict from the raw score itself (the annotator cannot move it).
        """
        value = self.qualification.get("threshold") if isinstance(self.qualification, Mapping) else None
        if isinstance(value, int | float) and 0.0 < float(value) < 1.0:
            return float(value)
        return 0.5


@dataclass(frozen=True)
class TableRule:
    device: str  # nvidia | apple | cpu
    backend: str
    min_memory_gb: float
    model_id: str  # the Hub repo the mission names
    quantization: str
    hub_file: str | None = None


# The mission's table, in order of preference within each device class.
MISSION_TABLE: tuple[TableRule, ...] = (
    TableRule("nvidia", "vllm", 18, "Qwen/Qwen2.5-7B-Instruct", "bf16"),
    TableRule("nvidia", "vllm", 8, "Qwen/Qwen2.5-7B-Instruct-AWQ", "awq"),
    TableRule("nvidia", "vllm", 4, "Qwen/Qwen2.5-3B-Instruct-AWQ", "awq"),
    TableRule("apple", "mlx", 6, "mlx-community/Qwen2.5-7B-Instruct-4bit", "4bit"),
    TableRule("apple", "mlx", 4, "mlx-community/Qwen2.5-3B-Instruct-4bit", "4bit"),
    TableRule("cpu", "llama_cpp", CPU_LOW_RAM_GB, "Qwen/Qwen2.5-3B-Instruct-GGUF", "Q4_K_M",
              "qwen2.5-3b-instruct-q4_k_m.gguf"),
    TableRule("cpu", "llama_cpp", 0, "Qwen/Qwen2.5-1.5B-Instruct-GGUF", "Q4_K_M",
              "qwen2.5-1.5b-instruct-q4_k_m.gguf"),
)  # fmt: skip
DEVICE_OF_BACKEND = {"vllm": "nvidia", "mlx": "apple", "llama_cpp": "cpu"}
INSTALL_HINT = {"vllm": "embedkomb[gpu]", "mlx": "embedkomb[mlx]", "llama_cpp": "embedkomb[cpu]"}
BACKEND_LIBRARY = {"vllm": "vLLM", "mlx": "mlx-lm", "llama_cpp": "llama.cpp"}


@dataclass
class Choice:
    entry: RegistryEntry
    backend: str
    reasons: list[str]
    rule: TableRule | None = None


def _norm(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum())


def _matches(rule: TableRule, entry: RegistryEntry) -> bool:
    if entry.backend != rule.backend or _norm(entry.quantization) != _norm(rule.quantization):
        return False
    return _norm(rule.model_id) in {_norm(entry.model_id), _norm(entry.hub_repo)}


def memory_for(device: str, hw: HardwareFacts) -> float:
    if device == "nvidia":
        return hw.gpu_memory_gb
    # Apple Silicon memory is unified; on the CPU path the model lives in RAM.
    return hw.ram_total_gb


def candidate_devices(hw: HardwareFacts, backend: str | None, reasons: list[str]) -> list[str]:
    """Device classes to try, best first: the detected accelerator, then the CPU."""
    if backend:
        reasons.append(f"--backend {backend} given: using the {DEVICE_OF_BACKEND[backend]} rows of the table")
        return [DEVICE_OF_BACKEND[backend]]
    devices: list[str] = []
    if hw.gpus:
        found = f"NVIDIA GPU found ({hw.gpus[0].name}, {hw.gpu_memory_gb:g} GB)"
        _offer_accelerator(hw, "vllm", found, devices, reasons)
    if hw.apple_silicon:
        found = f"Apple Silicon with {hw.ram_total_gb:g} GB unified memory"
        _offer_accelerator(hw, "mlx", found, devices, reasons)
    devices.append("cpu")
    reasons.append(f"CPU: {hw.cpu_count} cores, {hw.ram_total_gb:g} GB RAM: {BACKEND_LIBRARY['llama_cpp']}")
    return devices


def _offer_accelerator(hw: HardwareFacts, backend: str, found: str, devices: list[str], reasons: list[str]) -> None:
    """Try an accelerator that was found only if its backend library is installed; say which it was."""
    library = BACKEND_LIBRARY[backend]
    if hw.backends_installed.get(backend):
        devices.append(DEVICE_OF_BACKEND[backend])
        reasons.append(f"{found}: {library}")
    else:
        reasons.append(f"{found}, but {library} is not installed (pip install '{INSTALL_HINT[backend]}')")


def choose_model(
    hw: HardwareFacts,
    registry: Iterable[RegistryEntry],
    *,
    backend: str | None = None,
    model: str | None = None,
) -> Choice:
    """Pick the registry entry to run, following the mission table, restricted to admitted models."""
    entries = list(registry)
    admitted = [e for e in entries if e.admitted]
    reasons: list[str] = []
    if model:
        named = [e for e in entries if model in (e.name, e.model_id)]
        if not named:
            raise ModelError(f"kombinat's registry has no model named {model!r}")
        chosen = [e for e in named if e.admitted and (backend is None or e.backend == backend)]
        if not chosen:
            raise ModelError(f"model {model!r} is not admitted by kombinat (for backend {backend or 'any'})")
        return Choice(chosen[0], chosen[0].backend, [f"--model {model} given"])
    if not admitted:
        raise ModelError("kombinat's registry admits no model yet: nothing can be labeled")
    for device in candidate_devices(hw, backend, reasons):
        memory = memory_for(device, hw)
        for rule in (r for r in MISSION_TABLE if r.device == device):
            if memory < rule.min_memory_gb:
                continue
            match = next((e for e in admitted if _matches(rule, e)), None)
            if match is None:
                reasons.append(f"table: {rule.model_id} {rule.quantization} fits, but kombinat does not admit it")
                continue
            reasons.append(
                f"table: {rule.model_id} {rule.quantization} (needs ≥ {rule.min_memory_gb:g} GB, have "
                f"{memory:g} GB) is admitted as {match.name!r}"
            )
            return Choice(match, rule.backend, reasons, rule)
        # None of the table's models is admitted: take the largest admitted model this device can hold.
        fitting = [e for e in admitted if DEVICE_OF_BACKEND.get(e.backend) == device and e.min_memory_gb <= memory]
        if fitting:
            best = max(fitting, key=lambda e: (e.min_memory_gb, e.size_bytes))
            reasons.append(
                f"no table model is admitted for {device}; the largest admitted {best.backend} model fitting "
                f"{memory:g} GB is {best.name!r}"
            )
            return Choice(best, best.backend, reasons)
        reasons.append(f"no admitted {device} model fits {memory:g} GB")
    raise ModelError("no admitted model fits this machine:\n  " + "\n  ".join(reasons))


# --- files ----------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_tree(root: Path) -> str:
    """A directory checkpoint's hash: sha256 over sorted ``relative/path\\tsha256`` lines of its files."""
    lines = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and ".cache" not in p.relative_to(root).parts):
        lines.append(f"{path.relative_to(root).as_posix()}\t{sha256_file(path)}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def sha256_path(path: Path) -> str:
    return sha256_tree(path) if path.is_dir() else sha256_file(path)


class VerifiedHashes:
    """Remembers hashes already checked (by path, size and mtime) so a restart does not re-hash gigabytes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.data: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.data = {}

    @staticmethod
    def _key(target: Path) -> tuple[str, list[int]]:
        st = target.stat()
        return str(target.resolve()), [st.st_size, st.st_mtime_ns]

    def get(self, target: Path) -> str:
        key, stamp = self._key(target)
        hit = self.data.get(key)
        if hit and hit.get("stamp") == stamp:
            return str(hit["sha256"])
        digest = sha256_path(target)
        self.data[key] = {"stamp": stamp, "sha256": digest}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)
        return digest


def verify(path: Path, entry: RegistryEntry, hashes: VerifiedHashes) -> None:
    if not entry.sha256:
        raise ModelError(f"registry entry {entry.name!r} has no sha256: refusing an unverifiable model")
    actual = hashes.get(path)
    if actual != entry.sha256:
        raise ModelError(
            f"{path} has sha256 {actual}, but kombinat's {entry.name!r} is {entry.sha256}: "
            "not the admitted model (corrupt or different file); refusing to label with it"
        )


def entry_for_local_path(path: Path, registry: Iterable[RegistryEntry], hashes: VerifiedHashes) -> RegistryEntry:
    """The admitted registry entry a local model file is (identified by its sha256, not by its name)."""
    digest = hashes.get(path)
    for entry in registry:
        if entry.admitted and entry.sha256 == digest:
            return entry
    raise ModelError(f"{path} (sha256 {digest}) is not a model kombinat admits")


Downloader = Callable[..., str]


def download(
    entry: RegistryEntry,
    cache_dir: Path,
    hashes: VerifiedHashes,
    *,
    progress: bool = True,
    hf_hub_download: Downloader | None = None,
    snapshot_download: Downloader | None = None,
) -> Path:
    """Fetch the entry's files from the Hub (cached; progress bars on a terminal), then verify the hash."""
    if not entry.hub_repo:
        raise ModelError(f"registry entry {entry.name!r} names no Hub repo: use --model-path")
    if hf_hub_download is None or snapshot_download is None:
        try:
            import huggingface_hub
        except ImportError as exc:  # pragma: no cover - the backend extras all bring it
            raise ModelError("huggingface_hub is not installed: pip install 'embedkomb[cpu]' (or gpu/mlx)") from exc
        if not progress:
            huggingface_hub.disable_progress_bars()
        hf_hub_download = hf_hub_download or huggingface_hub.hf_hub_download
        snapshot_download = snapshot_download or huggingface_hub.snapshot_download
    if entry.hub_file:
        path = Path(hf_hub_download(repo_id=entry.hub_repo, filename=entry.hub_file, cache_dir=str(cache_dir)))
    else:
        path = Path(snapshot_download(repo_id=entry.hub_repo, cache_dir=str(cache_dir)))
    verify(path, entry, hashes)
    return path
