"""The offline-model pins and registry entries (embedkomb_pipeline.offline_models) and the one number formatter."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from annotator.models import RegistryEntry, sha256_file
from embedkomb_pipeline.formatting import number
from embedkomb_pipeline.offline_models import (
    MODELS,
    TINY,
    fetch,
    main,
    min_memory_gb,
    offline_registry_entry,
    tiny_model_path,
)
from kombinat_api.schemas import ModelEntry
from tests.annotator.conftest import TINY_ENTRY


@pytest.mark.parametrize("name", list(MODELS))
def test_every_pinned_model_has_an_entry_kombinat_accepts_and_the_annotator_reads_back(name: str) -> None:
    model = MODELS[name]
    entry = offline_registry_entry(model, admitted=False, note="test")
    # kombinat's schema is the source of truth (strict: an unknown or mistyped field is refused)
    accepted = ModelEntry.model_validate(entry)
    read = RegistryEntry.from_api(accepted.model_dump())
    assert (read.name, read.sha256, read.size_bytes, read.tier) == (model.registry_name, model.sha256, model.size, 0)
    assert isinstance(accepted.tier, int) and isinstance(read.tier, int)
    assert read.min_memory_gb == min_memory_gb(model.size) > model.size / 1e9  # weights fit with room to run


def test_the_tests_admit_exactly_what_the_demo_and_qualification_would_name() -> None:
    assert TINY_ENTRY["name"] == TINY.registry_name == "smollm2-135m-q4_1"
    assert TINY_ENTRY["sha256"] == TINY.sha256 and TINY_ENTRY["hub_file"] == TINY.filename
    assert min_memory_gb(TINY.size) == 0.5  # ~98 MB of weights: the smallest step


def test_fetching_a_present_file_verifies_its_hash_without_the_network(capsys: pytest.CaptureFixture[str]) -> None:
    path = tiny_model_path()  # make test fetched it (make models-tiny)
    assert fetch(TINY, path.parent) == path
    assert "present, sha256 verified" in capsys.readouterr().out
    assert sha256_file(path) == TINY.sha256


def test_a_missing_tiny_model_names_the_make_target(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="make models-tiny"):
        tiny_model_path(tmp_path)


def test_an_unknown_model_name_is_refused_with_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["no-such-model"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown model 'no-such-model'" in err and "smollm2-135m" in err


@pytest.mark.parametrize(
    ("value", "kwargs", "shown"),
    [
        (None, {}, "—"),
        (math.nan, {}, "—"),
        (0.12345, {}, "0.123"),
        (0.5, {"digits": 1}, "0.5"),
        (0.6493, {"digits": 2, "scale": 100}, "64.93"),
        (-0.0123, {"digits": 2, "scale": 100, "signed": True}, "-1.23"),
        (0.0077, {"digits": 2, "scale": 100, "signed": True}, "+0.77"),
    ],
)
def test_one_formatter_shows_missing_values_the_same_everywhere(value: float | None, kwargs: dict, shown: str) -> None:
    assert number(value, **kwargs) == shown
