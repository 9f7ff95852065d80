"""Model presets: their knobs, how a form's knobs combine with them, and loading a model from a folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedkomb_pipeline.mining.embedding import default_base_model_path
from embedkomb_pipeline.training.presets import PRESETS, get_preset, is_local_reference, load_sentence_transformer


def test_three_sizes_each_with_their_knobs() -> None:
    assert list(PRESETS) == ["mini", "base", "large"]
    mini, base, large = PRESETS.values()
    assert mini.model == "sentence-transformers/all-MiniLM-L6-v2" and mini.embedding_dim == 384
    assert base.model == "BAAI/bge-base-en-v1.5" and 110 <= round(base.parameters_millions) <= 140
    assert large.model == "BAAI/bge-large-en-v1.5" and 320 <= large.parameters_millions <= 340
    for preset in PRESETS.values():
        assert preset.max_seq_length > 0 and preset.batch_size > 0 and 0 < preset.lr < 1e-3
        assert 0 < preset.temperature <= 0.1 and preset.cache_precision in ("fp32", "bf16")
        assert all(d <= preset.embedding_dim for d in preset.matryoshka_dims or ())
    assert base.lr > large.lr  # the bigger model takes the smaller step


def test_mini_is_the_pipeline_default_recipe_and_loads_offline() -> None:
    mini = get_preset("mini")
    config = mini.train_config()
    assert (config.lr, config.batch_size, config.temperature, config.max_seq_length) == (1e-4, 64, 0.05, 256)
    assert config.matryoshka_dims is None and config.cache_precision == "fp32"
    reference = mini.resolve_model()
    assert reference == str(default_base_model_path())  # the offline folder, not the Hub id
    assert is_local_reference(reference) and not is_local_reference("BAAI/bge-base-en-v1.5")
    model = load_sentence_transformer(reference, "cpu")
    assert model.get_embedding_dimension() == 384
    # an explicit model and the pipeline's configured folder win over the preset's
    assert mini.resolve_model("BAAI/bge-small-en-v1.5") == "BAAI/bge-small-en-v1.5"
    assert mini.resolve_model(mini_folder="/models/minilm") == "/models/minilm"
    assert get_preset("base").resolve_model(mini_folder="/models/minilm") == "BAAI/bge-base-en-v1.5"


def test_form_knobs_override_the_preset_and_none_keeps_it() -> None:
    base = get_preset("base")
    config = base.configure(batch_size=None, lr=3e-5, matryoshka_dims=None, max_steps_per_phase=None, phases=1)
    assert config.batch_size == 128 and config.lr == 3e-5 and config.phases == 1
    assert config.matryoshka_dims == (768, 512, 256, 128) and config.cache_precision == "bf16"
    assert base.configure(matryoshka_dims=[]).matryoshka_dims is None  # [] : the full size alone
    assert base.configure(matryoshka_dims=[256, 768]).matryoshka_dims == (256, 768)
    record = base.record()
    assert record["name"] == "base" and record["model"] == "BAAI/bge-base-en-v1.5"


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model preset 'huge'; presets: mini, base, large"):
        get_preset("huge")
    with pytest.raises(ValueError, match="not TrainConfig fields: learning_rate"):
        get_preset("mini").train_config(learning_rate=1e-3)
    with pytest.raises(FileNotFoundError, match=f"model folder {tmp_path} holds no sentence-transformers"):
        load_sentence_transformer(tmp_path, "cpu")
