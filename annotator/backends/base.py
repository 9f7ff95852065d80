"""The one small interface every backend implements, and the logic they share.

A backend turns pairs into P(relevant) with one forward pass per pair: it builds the token prompt
(prefix = template + query, rest = document + question + assistant header), reads the next-token
distribution after the prompt, and compares the probability of "yes" against "no". No text is generated.

This module is the one home of what the backends share: the prompt and answer tokens
(:class:`PromptBackend`, :class:`PromptTokenizer`), the KV-cache reuse and per-pair scoring loop of
llama.cpp and MLX (:class:`KVCacheBackend`), and the Hugging Face tokenizer handling of vLLM and MLX.
Everything here is plain Python + numpy, so it is unit-tested without any model library.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from annotator.prompt import YES_NO, Answer, PromptTemplate, PromptVersion, get_prompt

if TYPE_CHECKING:  # numpy comes with every backend library, never with the base install
    import numpy as np
    from numpy.typing import NDArray

    # A next-token logit vector over the whole vocabulary, as a backend's model returns it.
    Logits = NDArray[np.floating[Any]] | Sequence[float]

# tokenize(text, special) -> token ids, never adding BOS: the backend decides about BOS once, for the prefix.
Tokenize = Callable[[str, bool], list[int]]


@dataclass(frozen=True)
class Pair:
    pair_id: str
    query: str
    document: str


@dataclass(frozen=True)
class Score:
    pair_id: str
    p_relevant: float
    truncated: bool
    seconds: float
    prompt_tokens: int  # length of the full prompt
    evaluated_tokens: int  # tokens actually run through the model (the rest came from the prefix cache)
    yes_no_mass: float  # P(all answer tokens): low means the model wanted to say something else


@dataclass(frozen=True)
class ModelMeta:
    """What every label says about the model that made it (and nothing about the machine)."""

    backend: str
    model_id: str
    quantization: str
    annotator_version: str
    prompt_version: str = "p1"  # the wording the labels were made with: kombinat refuses a mismatch

    def as_dict(self) -> dict[str, str]:
        return {
            "backend": self.backend,
            "model_id": self.model_id,
            "quantization": self.quantization,
            "annotator_version": self.annotator_version,
            "prompt_version": self.prompt_version,
        }


@dataclass
class BackendStats:
    pairs: int = 0
    prompt_tokens: int = 0
    evaluated_tokens: int = 0
    seconds: float = 0.0
    truncated: int = 0
    extra: dict[str, float] = field(default_factory=dict)


class Backend(ABC):
    """Scores pairs in the order given. Callers pass pairs through :func:`order_pairs` first."""

    name: ClassVar[str] = "?"

    def __init__(self) -> None:
        self.stats = BackendStats()

    @abstractmethod
    def score_pairs(self, pairs: Iterable[Pair]) -> Iterator[Score]:
        """Yield one Score per pair, lazily, so that a caller can stop between pairs (Ctrl-C)."""

    def close(self) -> None:  # noqa: B027 - optional hook, most backends free memory on garbage collection
        """Release model memory."""

    def _account(self, score: Score) -> None:
        self.stats.pairs += 1
        self.stats.prompt_tokens += score.prompt_tokens
        self.stats.evaluated_tokens += score.evaluated_tokens
        self.stats.seconds += score.seconds
        self.stats.truncated += int(score.truncated)


def order_pairs(pairs: Iterable[Pair]) -> list[Pair]:
    """Group pairs that share a query so they run back to back (the backend reuses their prefix).

    Groups keep the order of each query's first appearance, and pairs keep their order inside a group:
    kombinat hands out hardest-first, and a stable order keeps resumed runs deterministic.
    """
    groups: dict[str, list[Pair]] = {}
    for pair in pairs:
        groups.setdefault(pair.query, []).append(pair)
    return [pair for group in groups.values() for pair in group]


@dataclass(frozen=True)
class TokenPrompt:
    prefix: list[int]  # template + query: shared by every pair with this query
    rest: list[int]  # document + question + assistant header
    truncated: bool

    @property
    def ids(self) -> list[int]:
        return self.prefix + self.rest


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PromptBuilder:
    """Tokenizes the versioned prompt for one model, truncating what does not fit the context.

    The context budget is spent in this order: the fixed template, then the query (capped at
    ``max_query_tokens``), then as much of the document as fits (capped at ``max_document_tokens``).
    Cutting at a token boundary keeps the cut exact; the label is marked truncated either way.
    """

    def __init__(
        self,
        template: PromptTemplate,
        tokenize: Tokenize,
        *,
        n_ctx: int,
        bos: Sequence[int] = (),
        max_query_tokens: int = 256,
        max_document_tokens: int = 1536,
    ) -> None:
        self.tokenize = tokenize
        self.bos = list(bos)
        self.before_query = self.bos + tokenize(template.before_query, True)
        self.between = tokenize(template.between, True)
        self.after_document = tokenize(template.after_document, True)
        self.n_ctx = n_ctx
        self.max_query_tokens = max_query_tokens
        self.max_document_tokens = max_document_tokens
        fixed = len(self.before_query) + len(self.between) + len(self.after_document)
        if fixed + 16 >= n_ctx:
            raise ValueError(f"context of {n_ctx} tokens is too small for the {fixed}-token prompt template")
        self._prefix_cache: tuple[str, list[int], bool] | None = None

    def prefix(self, query: str) -> tuple[list[int], bool]:
        # Pairs arrive grouped by query: remember the last prefix instead of re-tokenizing it per pair.
        if self._prefix_cache is not None and self._prefix_cache[0] == query:
            return self._prefix_cache[1], self._prefix_cache[2]
        q = self.tokenize(query, False)
        truncated = len(q) > self.max_query_tokens
        ids = self.before_query + q[: self.max_query_tokens] + self.between
        self._prefix_cache = (query, ids, truncated)
        return ids, truncated

    def build(self, query: str, document: str) -> TokenPrompt:
        prefix, q_truncated = self.prefix(query)
        budget = min(self.max_document_tokens, self.n_ctx - len(prefix) - len(self.after_document) - 1)
        d = self.tokenize(document, False)
        d_truncated = len(d) > budget
        return TokenPrompt(prefix, d[:budget] + self.after_document, q_truncated or d_truncated)


@dataclass(frozen=True)
class AnswerTokens:
    """The single-token spellings of each answer of a prompt version, with the answer's value.

    ``groups[i] = (value, token ids)``. For yes/no that is ``((1.0, yes ids), (0.0, no ids))``; for a graded
    0–3 prompt, four groups worth 0, 1/3, 2/3, 1.
    """

    groups: tuple[tuple[float, tuple[int, ...]], ...]

    @classmethod
    def yes_no(cls, yes: tuple[int, ...], no: tuple[int, ...]) -> AnswerTokens:
        return cls(((1.0, yes), (0.0, no)))

    @property
    def yes(self) -> tuple[int, ...]:
        """The tokens of the most relevant answer (yes, or the top grade)."""
        return max(self.groups)[1]

    @property
    def no(self) -> tuple[int, ...]:
        """The tokens of the least relevant answer (no, or grade 0)."""
        return min(self.groups)[1]

    @classmethod
    def from_tokenizer(cls, tokenize: Tokenize, answers: Sequence[Answer] = YES_NO) -> AnswerTokens:
        """The single-token spellings of the prompt's answers in this vocabulary.

        A variant that splits into several tokens (e.g. " YES" → " Y", "ES") cannot be read from one
        next-token distribution, so it is skipped; its first piece would be ambiguous ("Y" also starts "You").
        """
        groups: list[tuple[float, tuple[int, ...]]] = []
        for answer in answers:
            ids: list[int] = []
            for text in answer.variants:
                toks = tokenize(text, False)
                if len(toks) == 1 and toks[0] not in ids:
                    ids.append(toks[0])
            if not ids:
                spelled = "/".join(repr(v) for v in answer.variants[:2])
                raise ValueError(f"this tokenizer has no single-token {spelled}: the model cannot be used")
            groups.append((answer.value, tuple(ids)))
        seen: set[int] = set()
        for _, group_ids in groups:
            if seen & set(group_ids):
                raise ValueError("a token counts toward two different answers")
            seen |= set(group_ids)
        return cls(tuple(groups))


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(v - top) for v in values))


def p_relevant_from_logits(logits: Logits, answers: AnswerTokens) -> tuple[float, float]:
    """The expected answer value renormalized over the answers' tokens, and the answers' share of all mass.

    For yes/no that is P(yes) / (P(yes) + P(no)). Renormalizing over the answers is what makes the score
    comparable across models whose chat habits put different mass on other tokens (a leading space, "The", …);
    the mass is kept to spot such habits.
    """
    import numpy as np  # numpy comes with every backend library; the base install never reaches this

    arr = np.asarray(logits, dtype=np.float64)
    top = float(arr.max())
    log_total = top + math.log(float(np.exp(arr - top).sum()))
    logs = [_logsumexp([float(arr[i]) for i in ids]) for _, ids in answers.groups]
    return _expected_value(answers, logs), math.exp(_logsumexp(logs) - log_total)


def p_relevant_from_logprobs(logprobs: Mapping[int, float], answers: AnswerTokens) -> tuple[float, float]:
    """The same from a top-k map {token id: log-probability} (vLLM returns only the top k).

    A variant missing from the top k has a probability below the smallest one returned; we count it at that
    bound, which can only pull the score toward the middle — never invent confidence the model did not show.
    """
    if not logprobs:
        return _expected_value(answers, [0.0] * len(answers.groups)), 0.0
    floor = min(logprobs.values())
    logs = [_logsumexp([logprobs.get(i, floor) for i in ids]) for _, ids in answers.groups]
    mass = sum(math.exp(logprobs[i]) for _, ids in answers.groups for i in ids if i in logprobs)
    return _expected_value(answers, logs), mass


def _expected_value(answers: AnswerTokens, logs: Sequence[float]) -> float:
    """Σ value·P / Σ P over the answers, from their log-probabilities (exact for two answers: a logistic)."""
    values = [value for value, _ in answers.groups]
    if len(values) == 2:
        (v_hi, l_hi), (v_lo, l_lo) = sorted(zip(values, logs, strict=True), reverse=True)
        return v_lo + (v_hi - v_lo) * _two_way(l_hi, l_lo)
    top = max(logs)
    if top == -math.inf:
        return sum(values) / len(values)
    weights = [math.exp(v - top) for v in logs]
    return sum(v * w for v, w in zip(values, weights, strict=True)) / sum(weights)


def _two_way(log_yes: float, log_no: float) -> float:
    if log_yes == -math.inf and log_no == -math.inf:
        return 0.5
    # Logistic of the log-odds: exact and overflow-free.
    diff = log_no - log_yes
    if diff > 700:
        return 0.0
    return 1.0 / (1.0 + math.exp(diff))


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


# --- Hugging Face tokenizers (vLLM and MLX both load one with the model) ------------------------------


class HFTokenizer(Protocol):
    """The part of a Hugging Face tokenizer the prompt needs (``all_special_tokens`` is read when present)."""

    def encode(self, text: str, /, *, add_special_tokens: bool) -> list[int]: ...

    def apply_chat_template(
        self, conversation: list[dict[str, str]], /, *, tokenize: bool, add_generation_prompt: bool
    ) -> str: ...


def encode_plain(tokenizer: HFTokenizer, text: str) -> list[int]:
    """Encode untrusted text so that no special token comes out of it.

    Hugging Face tokenizers always parse special-token strings, so we split them out and encode each piece on
    its own: "<|im_end|>" in a document stays plain characters and cannot close the turn.
    """
    specials: list[str] = sorted(getattr(tokenizer, "all_special_tokens", None) or [], key=len, reverse=True)
    pieces = [text]
    for special in specials:
        if not special:
            continue
        split: list[str] = []
        for piece in pieces:
            parts = piece.split(special)
            for i, part in enumerate(parts):
                if i:
                    # Keep the characters, spelled so that they no longer match the special token.
                    split.append(special[0])
                    split.append(special[1:])
                split.append(part)
        pieces = split
    ids: list[int] = []
    for piece in pieces:
        if piece:
            ids.extend(tokenizer.encode(piece, add_special_tokens=False))
    return ids


# --- the backends' shared construction and scoring loop -----------------------------------------------


@dataclass(frozen=True)
class PromptTokenizer:
    """A model's tokenizer as the prompt needs it: the chat template, how to tokenize, and the BOS to add."""

    template: PromptTemplate
    tokenize: Tokenize
    bos: tuple[int, ...] = ()
    prompt: PromptVersion = field(default_factory=get_prompt)

    @classmethod
    def from_hugging_face(cls, tokenizer: HFTokenizer, prompt_version: str | None = None) -> PromptTokenizer:
        """The tokenizer vLLM and mlx-lm load with the model, for one prompt version (default p1).

        The rendered template already spells out any BOS (template text is encoded with special tokens on),
        so no BOS is added on top.
        """
        prompt = get_prompt(prompt_version)
        rendered = tokenizer.apply_chat_template(prompt.sentinel_messages(), tokenize=False, add_generation_prompt=True)

        def tokenize(text: str, special: bool) -> list[int]:
            if not text:
                return []
            if special:
                return list(tokenizer.encode(text, add_special_tokens=False))
            return encode_plain(tokenizer, text)

        return cls(PromptTemplate.from_rendered(rendered), tokenize, prompt=prompt)


class PromptBackend(Backend):
    """A backend that scores the versioned prompt, tokenized by its model's own tokenizer.

    A subclass loads its model first and then calls this constructor with the model's tokenizer: the
    prompt builder and the yes/no answer tokens both depend on that vocabulary.
    """

    def __init__(self, tokenizer: PromptTokenizer, *, n_ctx: int, max_document_tokens: int) -> None:
        super().__init__()
        self.builder = PromptBuilder(
            tokenizer.template,
            tokenizer.tokenize,
            n_ctx=n_ctx,
            bos=tokenizer.bos,
            max_document_tokens=max_document_tokens,
        )
        self.prompt = tokenizer.prompt
        self.answers = AnswerTokens.from_tokenizer(tokenizer.tokenize, tokenizer.prompt.answers)


class KVCacheBackend(PromptBackend):
    """One forward pass per pair over only the tokens not already in the model's KV cache (llama.cpp, MLX).

    The cache holds the tokens of the previous pair. Before a pair we keep the prefix it shares with them
    and run the rest, so with pairs grouped by query the template + query run once per query. A subclass
    implements :meth:`_forward`, the one step that touches its model library.
    """

    def __init__(
        self, tokenizer: PromptTokenizer, *, n_ctx: int, max_document_tokens: int, reuse_prefix: bool = True
    ) -> None:
        super().__init__(tokenizer, n_ctx=n_ctx, max_document_tokens=max_document_tokens)
        self.reuse_prefix = reuse_prefix
        self._in_context: list[int] = []  # the tokens whose keys/values sit in the cache now

    def forget_cache(self) -> None:
        """Score the next pair cold, reusing nothing (as after a new claim; what a benchmark starts from)."""
        self._in_context = []

    @abstractmethod
    def _forward(self, ids: list[int], *, keep: int, cached: int) -> Logits:
        """Drop the cached tokens after the first ``keep`` of ``cached``, run ``ids[keep:]``, return the logits
        after the last token. On failure the next call must still be right: it comes with ``keep = 0``."""

    def next_token_logits(self, ids: list[int]) -> tuple[Logits, int]:
        """Logits after ``ids`` and how many tokens ran: only those not already in the KV cache."""
        keep = common_prefix_len(self._in_context, ids) if self.reuse_prefix else 0
        # At least one token must run to produce fresh logits, even when the whole prompt is cached.
        keep = min(keep, len(ids) - 1)
        cached = len(self._in_context)
        self._in_context = []  # if the model raises, the cache is in an unknown state: trust nothing of it
        logits = self._forward(ids, keep=keep, cached=cached)
        self._in_context = list(ids)
        return logits, len(ids) - keep

    def score_pairs(self, pairs: Iterable[Pair]) -> Iterator[Score]:
        for pair in pairs:
            watch = Stopwatch()
            prompt = self.builder.build(pair.query, pair.document)
            ids = prompt.ids
            logits, evaluated = self.next_token_logits(ids)
            p, mass = p_relevant_from_logits(logits, self.answers)
            score = Score(
                pair_id=pair.pair_id,
                p_relevant=p,
                truncated=prompt.truncated,
                seconds=watch.elapsed(),
                prompt_tokens=len(ids),
                evaluated_tokens=evaluated,
                yes_no_mass=mass,
            )
            self._account(score)
            yield score
