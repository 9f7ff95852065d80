"""Hardware detection helpers and the mission-table model choice on fake hardware facts; model download
verification with the Hub call faked at its boundary (no network here)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest

from annotator.hardware import GPU, HardwareFacts, detect, parse_nvidia_smi
from annotator.models import (
    MISSION_TABLE,
    TIER_DEFAULT,
    TIER_MAX,
    TIER_MIN,
    ModelError,
    RegistryEntry,
    VerifiedHashes,
    choose_model,
    download,
    entry_for_local_path,
    parse_tier,
    sha256_tree,
)


def registry_of_the_mission(**admitted: bool) -> list[RegistryEntry]:
    """One registry entry per mission-table row, admitted unless told otherwise (by model id)."""
    entries = []
    for rule in MISSION_TABLE:
        entries.append(
            RegistryEntry(
                name=rule.model_id.split("/")[1].lower(),
                backend=rule.backend,
                model_id=rule.model_id,
                quantization=rule.quantization,
                hub_repo=rule.model_id,
                hub_file=rule.hub_file,
                sha256="ab" * 32,
                min_memory_gb=rule.min_memory_gb,
                admitted=admitted.get(rule.model_id, True),
            )
        )
    return entries


def hw(
    gpu_gb: float = 0, ram: float = 16, apple: bool = False, installed: tuple[str, ...] = ("llama_cpp",)
) -> HardwareFacts:
    gpus = (GPU("NVIDIA Test", gpu_gb),) if gpu_gb else ()
    return HardwareFacts(
        system="Darwin" if apple else "Linux",
        machine="arm64" if apple else "x86_64",
        cpu_count=8,
        ram_total_gb=ram,
        ram_available_gb=ram / 2,
        gpus=gpus,
        apple_silicon=apple,
        backends_installed={b: b in installed for b in ("llama_cpp", "vllm", "mlx")},
    )


@pytest.mark.parametrize(
    ("facts", "backend", "model_id"),
    [
        (hw(gpu_gb=24, installed=("vllm",)), "vllm", "Qwen/Qwen2.5-7B-Instruct"),
        (hw(gpu_gb=18, installed=("vllm",)), "vllm", "Qwen/Qwen2.5-7B-Instruct"),
        (hw(gpu_gb=12, installed=("vllm",)), "vllm", "Qwen/Qwen2.5-7B-Instruct-AWQ"),
        (hw(gpu_gb=8, installed=("vllm",)), "vllm", "Qwen/Qwen2.5-7B-Instruct-AWQ"),
        (hw(gpu_gb=6, installed=("vllm",)), "vllm", "Qwen/Qwen2.5-3B-Instruct-AWQ"),
        (hw(gpu_gb=2, ram=16, installed=("vllm", "llama_cpp")), "llama_cpp", "Qwen/Qwen2.5-3B-Instruct-GGUF"),
        (hw(gpu_gb=24, ram=16), "llama_cpp", "Qwen/Qwen2.5-3B-Instruct-GGUF"),  # vLLM not installed
        (hw(ram=16, apple=True, installed=("mlx",)), "mlx", "mlx-community/Qwen2.5-7B-Instruct-4bit"),
        (hw(ram=5, apple=True, installed=("mlx",)), "mlx", "mlx-community/Qwen2.5-3B-Instruct-4bit"),
        (hw(ram=3, apple=True, installed=("mlx",)), "llama_cpp", "Qwen/Qwen2.5-1.5B-Instruct-GGUF"),
        (hw(ram=16), "llama_cpp", "Qwen/Qwen2.5-3B-Instruct-GGUF"),
        (hw(ram=8), "llama_cpp", "Qwen/Qwen2.5-3B-Instruct-GGUF"),
        (hw(ram=4), "llama_cpp", "Qwen/Qwen2.5-1.5B-Instruct-GGUF"),
    ],
)
def test_mission_table(facts: HardwareFacts, backend: str, model_id: str) -> None:
    choice = choose_model(facts, registry_of_the_mission())
    assert (choice.backend, choice.entry.model_id) == (backend, model_id)
    assert choice.reasons


def test_only_admitted_models_are_chosen() -> None:
    registry = registry_of_the_mission(**{"Qwen/Qwen2.5-7B-Instruct": False})
    choice = choose_model(hw(gpu_gb=24, installed=("vllm",)), registry)
    assert choice.entry.model_id == "Qwen/Qwen2.5-7B-Instruct-AWQ"
    assert any("does not admit" in r for r in choice.reasons)


def test_falls_back_to_the_largest_admitted_model_outside_the_table() -> None:
    offline = [
        RegistryEntry("coder-0.5b", "llama_cpp", "Qwen/Qwen2.5-Coder-0.5B-Instruct", "Q4_K_M",
                      sha256="1" * 64, min_memory_gb=1, size_bytes=5, admitted=True),
        RegistryEntry("coder-1.5b", "llama_cpp", "Qwen/Qwen2.5-Coder-1.5B-Instruct", "Q4_K_M",
                      sha256="2" * 64, min_memory_gb=2, size_bytes=9, admitted=True),
        RegistryEntry("huge", "llama_cpp", "x/huge", "Q4_K_M", min_memory_gb=64, admitted=True),
        RegistryEntry("gpu-only", "vllm", "x/gpu", "bf16", min_memory_gb=1, admitted=True),
    ]  # fmt: skip
    choice = choose_model(hw(ram=16), offline)
    assert choice.entry.name == "coder-1.5b"
    assert "largest admitted" in choice.reasons[-1]


def test_nothing_fits_or_nothing_admitted_is_explained() -> None:
    with pytest.raises(ModelError, match="admits no model"):
        choose_model(hw(), registry_of_the_mission(**{r.model_id: False for r in MISSION_TABLE}))
    only_gpu = [RegistryEntry("g", "vllm", "x/g", "bf16", min_memory_gb=1, admitted=True)]
    with pytest.raises(ModelError, match="no admitted model fits"):
        choose_model(hw(ram=16), only_gpu)


def test_explicit_model_and_backend() -> None:
    registry = registry_of_the_mission()
    choice = choose_model(hw(ram=16), registry, model="qwen2.5-1.5b-instruct-gguf")
    assert choice.entry.model_id == "Qwen/Qwen2.5-1.5B-Instruct-GGUF"
    with pytest.raises(ModelError, match="no model named"):
        choose_model(hw(), registry, model="nope")
    not_admitted = registry_of_the_mission(**{"Qwen/Qwen2.5-1.5B-Instruct-GGUF": False})
    with pytest.raises(ModelError, match="not admitted"):
        choose_model(hw(), not_admitted, model="qwen2.5-1.5b-instruct-gguf")
    forced = choose_model(hw(gpu_gb=24, ram=16, installed=("vllm",)), registry, backend="llama_cpp")
    assert forced.backend == "llama_cpp"


def test_an_accelerator_without_its_backend_library_says_what_to_install() -> None:
    without = choose_model(hw(gpu_gb=24, ram=16), registry_of_the_mission())
    assert any("NVIDIA GPU found (NVIDIA Test, 24 GB), but vLLM is not installed" in r for r in without.reasons)
    assert any("embedkomb[gpu]" in r for r in without.reasons)
    apple = choose_model(hw(ram=16, apple=True, installed=("mlx",)), registry_of_the_mission())
    assert apple.reasons[0] == "Apple Silicon with 16 GB unified memory: mlx-lm"


API_ENTRY: dict[str, Any] = {"name": "m", "backend": "llama_cpp", "model_id": "org/m", "quantization": "Q4_K_M"}


@pytest.mark.parametrize(
    ("tier", "expected"),
    [
        (3, 3),
        (0, 0),
        (TIER_MAX, TIER_MAX),
        (None, TIER_DEFAULT),  # absent or null: kombinat's default
        (TIER_MAX + 1, TIER_DEFAULT),  # outside kombinat's range
        (-1, TIER_DEFAULT),
        ("gpu", TIER_DEFAULT),  # the old free-text tier
        ("3", TIER_DEFAULT),  # kombinat sends a number; text is not guessed at
        (2.5, TIER_DEFAULT),
        (True, TIER_DEFAULT),  # a JSON boolean is an int to Python, but no tier
    ],
)
def test_tier_is_kombinats_int_and_a_bad_value_never_breaks_the_registry(tier: object, expected: int) -> None:
    assert parse_tier(tier) == expected
    entry = RegistryEntry.from_api({**API_ENTRY, "tier": tier})
    assert entry.tier == expected and isinstance(entry.tier, int)
    assert RegistryEntry.from_api(API_ENTRY).tier == TIER_DEFAULT


def test_tier_range_agrees_with_kombinats_schema() -> None:
    from kombinat_api.schemas import ModelEntry  # the source of truth (the test environment has the server)

    tier = ModelEntry.model_fields["tier"]
    bounds = {type(rule).__name__: rule for rule in tier.metadata}
    assert tier.annotation is int and tier.default == TIER_DEFAULT
    assert (bounds["Ge"].ge, bounds["Le"].le) == (TIER_MIN, TIER_MAX)


@pytest.mark.parametrize(
    "broken",
    [{"size_bytes": "1 GB"}, {"min_memory_gb": "lots"}, {"qualification": "yes"}, {"model_id": None, "name": None}],
)
def test_a_malformed_registry_entry_is_a_model_error_naming_it(broken: dict[str, object]) -> None:
    data = {**API_ENTRY, **broken}
    if data.get("name") is None:
        del data["name"]  # a missing required field, not only a mistyped one
    with pytest.raises(ModelError, match=r"registry entry .* is malformed"):
        RegistryEntry.from_api(data)


def test_threshold_comes_from_qualification_when_present() -> None:
    assert RegistryEntry("a", "llama_cpp", "m", "q").threshold == 0.5
    assert RegistryEntry("a", "llama_cpp", "m", "q", qualification={"threshold": 0.3}).threshold == 0.3
    assert RegistryEntry("a", "llama_cpp", "m", "q", qualification={"threshold": 7}).threshold == 0.5


def test_parse_nvidia_smi() -> None:
    out = "NVIDIA GeForce RTX 4090, 24564, 550.54\nNVIDIA A10, 23028, 550.54\n"
    gpus = parse_nvidia_smi(out)
    assert gpus == (GPU("NVIDIA GeForce RTX 4090", 24.0, "550.54"), GPU("NVIDIA A10", 22.5, "550.54"))
    assert parse_nvidia_smi("garbage\n") == ()


def test_detect_on_this_machine_matches_the_os() -> None:
    facts = detect()
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    total_gb = int(meminfo["MemTotal"].split()[0]) * 1024 / 1024**3
    assert facts.ram_total_gb == pytest.approx(total_gb, abs=0.1)
    import os

    assert facts.cpu_count == len(os.sched_getaffinity(0))
    assert facts.backends_installed["llama_cpp"] is True
    if shutil.which("nvidia-smi") is None:
        assert facts.gpus == ()


# --- download and verification --------------------------------------------------------------------------


def test_download_verifies_the_sha256(tmp_path: Path) -> None:
    blob = tmp_path / "src.gguf"
    blob.write_bytes(b"model bytes")
    good = hashlib.sha256(b"model bytes").hexdigest()
    calls: list[dict[str, Any]] = []

    def fake_hf_hub_download(**kw: Any) -> str:
        calls.append(kw)
        target = Path(kw["cache_dir"]) / kw["filename"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(blob, target)
        return str(target)

    entry = RegistryEntry("m", "llama_cpp", "org/m", "Q4_K_M", hub_repo="org/m-GGUF", hub_file="m.gguf",
                          sha256=good, admitted=True)  # fmt: skip
    hashes = VerifiedHashes(tmp_path / "hashes.json")
    path = download(entry, tmp_path / "cache", hashes, hf_hub_download=fake_hf_hub_download,
                    snapshot_download=lambda **kw: "")  # fmt: skip
    assert path.read_bytes() == b"model bytes"
    assert calls == [{"repo_id": "org/m-GGUF", "filename": "m.gguf", "cache_dir": str(tmp_path / "cache")}]

    bad = RegistryEntry("m", "llama_cpp", "org/m", "Q4_K_M", hub_repo="org/m-GGUF", hub_file="m.gguf",
                        sha256="0" * 64, admitted=True)  # fmt: skip
    with pytest.raises(ModelError, match="refusing"):
        download(bad, tmp_path / "cache", hashes, hf_hub_download=fake_hf_hub_download,
                 snapshot_download=lambda **kw: "")  # fmt: skip
    unpinned = RegistryEntry("m", "llama_cpp", "org/m", "Q4_K_M", hub_repo="r", hub_file="m.gguf", admitted=True)
    with pytest.raises(ModelError, match="no sha256"):
        download(unpinned, tmp_path / "cache", hashes, hf_hub_download=fake_hf_hub_download,
                 snapshot_download=lambda **kw: "")  # fmt: skip


def test_directory_checkpoints_hash_as_a_manifest(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    (ckpt / "sub" / "weights.safetensors").write_bytes(b"w")
    first = sha256_tree(ckpt)
    (ckpt / "sub" / "weights.safetensors").write_bytes(b"W")
    assert sha256_tree(ckpt) != first


def test_local_file_is_identified_by_hash_and_hashes_are_remembered(tmp_path: Path) -> None:
    model = tmp_path / "any-name.gguf"
    model.write_bytes(b"abc")
    digest = hashlib.sha256(b"abc").hexdigest()
    registry = [
        RegistryEntry("other", "llama_cpp", "o", "q", sha256="f" * 64, admitted=True),
        RegistryEntry("mine", "llama_cpp", "m", "q", sha256=digest, admitted=True),
    ]
    hashes = VerifiedHashes(tmp_path / "h.json")
    assert entry_for_local_path(model, registry, hashes).name == "mine"
    # a second instance reads the remembered hash instead of hashing again
    again = VerifiedHashes(tmp_path / "h.json")
    assert next(iter(again.data.values()))["sha256"] == digest
    not_admitted = [RegistryEntry("mine", "llama_cpp", "m", "q", sha256=digest, admitted=False)]
    with pytest.raises(ModelError, match="not a model kombinat admits"):
        entry_for_local_path(model, not_admitted, hashes)


def test_registry_entry_names_the_prompt_version_and_an_unknown_one_is_a_model_error() -> None:
    from annotator.cli import _model_meta
    from annotator.models import ModelError

    base = {"name": "a", "backend": "llama_cpp", "model_id": "m", "quantization": "q"}
    assert RegistryEntry.from_api(base).prompt_version == "p1"
    entry = RegistryEntry.from_api({**base, "prompt_version": "g1"})
    meta = _model_meta(entry)
    assert meta.prompt_version == "g1" and meta.annotator_version.endswith("+g1")
    assert meta.as_dict()["prompt_version"] == "g1"
    with pytest.raises(ModelError, match="prompt version 'z9' is unknown"):
        _model_meta(RegistryEntry.from_api({**base, "prompt_version": "z9"}))
