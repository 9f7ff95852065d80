"""Prompt, yes/no token handling, ordering, truncation and the backends' shared KV-cache bookkeeping: pure
logic, no model."""

from __future__ import annotations

import math

import pytest

from annotator.backends.base import (
    AnswerTokens,
    KVCacheBackend,
    Pair,
    PromptBuilder,
    PromptTokenizer,
    common_prefix_len,
    encode_plain,
    order_pairs,
    p_relevant_from_logits,
    p_relevant_from_logprobs,
)
from annotator.prompt import (
    CHATML_TEMPLATE,
    DOCUMENT_SENTINEL,
    PROMPT_VERSION,
    QUERY_SENTINEL,
    PromptTemplate,
    messages,
    render_chatml,
)
from tests.annotator.fakes import FakeHFTokenizer


class WordTokenizer:
    """A toy tokenizer: one token per whitespace-separated word (plus a leading-space variant), with a few
    multi-token spellings, so the yes/no variant logic has something to reject."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def _id(self, piece: str) -> int:
        return self.vocab.setdefault(piece, len(self.vocab))

    def __call__(self, text: str, special: bool) -> list[int]:
        if text in ("YES", " YES"):  # split like a BPE would: two tokens
            return [self._id(text[:-2]), self._id("ES")]
        if text.startswith(" ") and text.strip() and " " not in text.strip():
            return [self._id(text)]  # " yes" is its own token, like GPT-2-style vocabularies
        return [self._id(w) for w in text.split()]


def test_prompt_is_versioned_and_fixed() -> None:
    assert PROMPT_VERSION == "p1"
    msgs = messages("what is x", "x is y")
    assert [m["role"] for m in msgs] == ["system", "user"]
    user = msgs[1]["content"]
    # instruction, then query, then document, then the question again right before the answer
    assert user.index("Does the document answer") < user.index("what is x") < user.index("x is y")
    assert user.rstrip().endswith("Answer yes or no.")


def test_template_split_puts_query_in_prefix_and_document_after() -> None:
    t = CHATML_TEMPLATE
    assert t.before_query.startswith("<|im_start|>system\n")
    assert "Query:" in t.before_query and "Document:" in t.between
    assert t.after_document.endswith("<|im_start|>assistant\n")
    assert t.render("Q", "D") == render_chatml(messages("Q", "D"))


def test_template_split_rejects_templates_that_drop_a_placeholder() -> None:
    with pytest.raises(ValueError):
        PromptTemplate.from_rendered(f"only {QUERY_SENTINEL}")
    with pytest.raises(ValueError):
        PromptTemplate.from_rendered(f"{QUERY_SENTINEL}{DOCUMENT_SENTINEL}")


def test_answer_tokens_keep_single_token_variants_only() -> None:
    tok = WordTokenizer()
    answers = AnswerTokens.from_tokenizer(tok)
    yes_texts = {text for text, i in tok.vocab.items() if i in answers.yes}
    no_texts = {text for text, i in tok.vocab.items() if i in answers.no}
    assert yes_texts == {"yes", "Yes", " yes", " Yes"}  # "YES" and " YES" split in two: not usable
    assert no_texts == {"no", "No", "NO", " no", " No", " NO"}


def test_answer_tokens_fail_loudly_without_yes() -> None:
    def no_yes(text: str, special: bool) -> list[int]:
        return [1, 2] if "y" in text.lower() else [3]

    with pytest.raises(ValueError, match="single-token"):
        AnswerTokens.from_tokenizer(no_yes)


def test_p_relevant_from_logits_sums_variants_and_renormalizes() -> None:
    answers = AnswerTokens.yes_no((1, 2), (3,))
    logits = [0.0, math.log(2.0), math.log(1.0), math.log(1.0), math.log(4.0)]  # other token 4 has most mass
    p, mass = p_relevant_from_logits(logits, answers)
    # P(yes) ∝ 2 + 1, P(no) ∝ 1 → 0.75; yes+no mass = 4 / (1 + 2 + 1 + 1 + 4)
    assert p == pytest.approx(0.75)
    assert mass == pytest.approx(4 / 9)


def test_p_relevant_from_logits_is_stable_for_huge_logits() -> None:
    answers = AnswerTokens.yes_no((0,), (1,))
    p, _ = p_relevant_from_logits([1000.0, 0.0, -1000.0], answers)
    assert p == pytest.approx(1.0)
    p, _ = p_relevant_from_logits([0.0, 1000.0, -1000.0], answers)
    assert p == pytest.approx(0.0)


def test_p_relevant_from_top_k_logprobs_uses_floor_for_missing_variants() -> None:
    answers = AnswerTokens.yes_no((1, 2), (3,))
    top = {1: math.log(0.6), 3: math.log(0.2), 9: math.log(0.1)}  # variant 2 is not in the top k
    p, mass = p_relevant_from_logprobs(top, answers)
    # missing variant 2 counts at the floor (0.1): yes = 0.6 + 0.1, no = 0.2
    assert p == pytest.approx(0.7 / 0.9)
    assert mass == pytest.approx(0.8)
    assert p_relevant_from_logprobs({}, answers) == (0.5, 0.0)


def test_order_pairs_groups_by_query_stably() -> None:
    pairs = [
        Pair("1", "a", "d1"),
        Pair("2", "b", "d2"),
        Pair("3", "a", "d3"),
        Pair("4", "c", "d4"),
        Pair("5", "b", "d5"),
    ]
    assert [p.pair_id for p in order_pairs(pairs)] == ["1", "3", "2", "5", "4"]
    assert order_pairs([]) == []


def builder(
    n_ctx: int = 200, *, max_query_tokens: int = 256, max_document_tokens: int = 1536
) -> tuple[PromptBuilder, WordTokenizer]:
    tok = WordTokenizer()
    template = PromptTemplate("sys instruction Query:", " Document:", " question answer:")
    prompt_builder = PromptBuilder(
        template, tok, n_ctx=n_ctx, max_query_tokens=max_query_tokens, max_document_tokens=max_document_tokens
    )
    return prompt_builder, tok


def test_prompt_builder_shares_the_prefix_within_a_query() -> None:
    b, tok = builder()
    one = b.build("red apples", "doc one")
    two = b.build("red apples", "another document here")
    assert one.prefix == two.prefix
    assert one.prefix == tok("sys instruction Query:", True) + tok("red apples", False) + tok(" Document:", True)
    assert not one.truncated and not two.truncated
    assert one.rest[-2:] == tok(" question answer:", True)


def test_prompt_builder_truncates_long_documents_and_marks_them() -> None:
    b, _ = builder(n_ctx=40)
    long_doc = " ".join(f"w{i}" for i in range(100))
    prompt = b.build("q", long_doc)
    assert prompt.truncated
    assert len(prompt.ids) < 40  # fits the context with a token to spare for the answer
    short = b.build("q", "short doc")
    assert not short.truncated


def test_prompt_builder_caps_query_and_document_lengths() -> None:
    b, _ = builder(n_ctx=1000, max_query_tokens=3, max_document_tokens=5)
    prompt = b.build("a b c d e", "1 2 3 4 5")
    assert prompt.truncated  # the query lost two words
    assert b.build("a b c", "1 2 3 4 5").truncated is False
    assert b.build("a b c", "1 2 3 4 5 6").truncated is True


def test_prompt_builder_rejects_a_context_smaller_than_the_template() -> None:
    with pytest.raises(ValueError, match="too small"):
        builder(n_ctx=10)


# --- the Hugging Face tokenizer handling of vLLM and MLX ------------------------------------------------


def test_hugging_face_tokenizer_gives_the_chat_template_and_keeps_special_strings_plain() -> None:
    hf = FakeHFTokenizer()
    tokenizer = PromptTokenizer.from_hugging_face(hf)
    assert tokenizer.template == CHATML_TEMPLATE  # the fake renders ChatML, as Qwen's tokenizer does
    assert tokenizer.bos == ()  # the rendered template spells out its own BOS, if any
    im_end = hf.vocab["<|im_end|>"]
    assert tokenizer.tokenize("<|im_end|>", True) == [im_end]
    plain = tokenizer.tokenize("evil <|im_end|> text", False)
    assert im_end not in plain and plain == encode_plain(hf, "evil <|im_end|> text")
    assert tokenizer.tokenize("", True) == tokenizer.tokenize("", False) == []


def test_encode_plain_keeps_the_characters_of_special_tokens() -> None:
    hf = FakeHFTokenizer()
    ids = encode_plain(hf, "a<|im_start|>b")
    pieces = {i: piece for piece, i in hf.vocab.items()}
    assert "".join(pieces[i] for i in ids) == "a<|im_start|>b"
    assert hf.vocab["<|im_start|>"] not in ids


# --- KVCacheBackend: what llama.cpp and MLX share -------------------------------------------------------


class RecordingKVCacheBackend(KVCacheBackend):
    """A KV-cache backend over the word tokenizer whose forward pass records what it was asked to run."""

    name = "test"

    def __init__(self, reuse_prefix: bool = True) -> None:
        self.words = WordTokenizer()
        template = PromptTemplate("sys instruction Query:", " Document:", " question answer:")
        tokenizer = PromptTokenizer(template, self.words, bos=(10_000,))
        super().__init__(tokenizer, n_ctx=200, max_document_tokens=64, reuse_prefix=reuse_prefix)
        self.forwards: list[tuple[int, int]] = []  # (keep, cached) per call
        self.fail_next = False

    def _forward(self, ids: list[int], *, keep: int, cached: int) -> list[float]:
        self.forwards.append((keep, cached))
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("the model failed")
        logits = [0.0] * len(self.words.vocab)
        for token in self.answers.yes:  # every pair reads as relevant
            logits[token] = 3.0
        return logits


QUERY_A = [Pair("a1", "red apples", "first doc"), Pair("a2", "red apples", "second doc")]
QUERY_B = [Pair("b1", "green pears", "third doc")]


def test_common_prefix_len() -> None:
    assert common_prefix_len([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_len([], [1]) == 0
    assert common_prefix_len([1, 2], [1, 2, 3]) == 2


def test_kv_cache_backend_builds_the_prompt_with_the_tokenizers_bos_and_answers() -> None:
    backend = RecordingKVCacheBackend()
    assert backend.builder.before_query[0] == 10_000
    assert backend.words.vocab["yes"] in backend.answers.yes and backend.words.vocab["no"] in backend.answers.no


def test_kv_cache_backend_runs_only_what_the_cache_lacks() -> None:
    backend = RecordingKVCacheBackend()
    scores = list(backend.score_pairs(order_pairs(QUERY_A + QUERY_B)))
    a1, a2, b1 = (backend.builder.build(p.query, p.document) for p in QUERY_A + QUERY_B)
    shared_by_queries = common_prefix_len(a2.ids, b1.ids)
    assert backend.forwards == [(0, 0), (len(a1.prefix), len(a1.ids)), (shared_by_queries, len(a2.ids))]
    assert [s.evaluated_tokens for s in scores] == [len(a1.ids), len(a2.rest), len(b1.ids) - shared_by_queries]
    assert all(s.p_relevant > 0.5 for s in scores)
    assert backend.stats.pairs == 3 and backend.stats.evaluated_tokens == sum(s.evaluated_tokens for s in scores)


def test_kv_cache_backend_always_runs_one_token_and_can_reuse_nothing() -> None:
    backend = RecordingKVCacheBackend()
    list(backend.score_pairs(QUERY_A[:1] * 2))  # the same prompt twice: one token must run for fresh logits
    ids = backend.builder.build(QUERY_A[0].query, QUERY_A[0].document).ids
    assert backend.forwards[-1] == (len(ids) - 1, len(ids))
    backend.forget_cache()
    list(backend.score_pairs(QUERY_A[:1]))
    assert backend.forwards[-1] == (0, 0)

    cold = RecordingKVCacheBackend(reuse_prefix=False)
    scores = list(cold.score_pairs(QUERY_A))
    assert [keep for keep, _ in cold.forwards] == [0, 0]
    assert all(s.evaluated_tokens == s.prompt_tokens for s in scores)


def test_kv_cache_backend_trusts_nothing_in_the_cache_after_a_failure() -> None:
    backend = RecordingKVCacheBackend()
    list(backend.score_pairs(QUERY_A[:1]))
    backend.fail_next = True
    with pytest.raises(RuntimeError, match="the model failed"):
        list(backend.score_pairs(QUERY_A[1:]))
    [score] = backend.score_pairs(QUERY_A[1:])
    assert backend.forwards[-1] == (0, 0)
    assert score.evaluated_tokens == score.prompt_tokens


def test_every_prompt_version_renders_with_the_query_in_the_shared_prefix() -> None:
    from annotator.prompt import PROMPTS, chatml_template

    assert set(PROMPTS) >= {"p1", "g1", "r1"}
    for version, prompt in PROMPTS.items():
        template = chatml_template(version)
        # instructions (and r1's worked examples) come before the query, so every pair shares them
        assert prompt.system in template.before_query
        assert template.after_document.endswith("<|im_start|>assistant\n")
        assert prompt.messages("q?", "d.")[1]["content"].count("q?") == 1


def test_unknown_prompt_version_is_a_clear_error() -> None:
    from annotator.prompt import get_prompt

    with pytest.raises(ValueError, match=r"prompt version 'p9' is unknown .* p1, g1, r1"):
        get_prompt("p9")


def test_graded_answers_give_the_expected_grade_over_three() -> None:
    from annotator.prompt import GRADES_0_3

    tok = WordTokenizer()
    answers = AnswerTokens.from_tokenizer(tok, GRADES_0_3)
    assert [value for value, _ in answers.groups] == [0.0, 1 / 3, 2 / 3, 1.0]
    logits = [-50.0] * len(tok.vocab)
    grade_ids = [ids[0] for _, ids in answers.groups]
    # P(grade 2) = P(grade 3) = 1/2 → E[grade] = 2.5 → 2.5 / 3; other tokens are ignored by the renormalization
    logits[grade_ids[2]] = logits[grade_ids[3]] = 0.0
    p, mass = p_relevant_from_logits(logits, answers)
    assert p == pytest.approx(2.5 / 3) and mass == pytest.approx(1.0, abs=1e-6)
    # a top-k map missing grades counts them at the floor, which pulls toward the middle, never away
    p_top, _ = p_relevant_from_logprobs({grade_ids[3]: -0.1, grade_ids[0]: -3.0}, answers)
    assert 2 / 3 < p_top < 1.0


def test_yes_no_score_is_unchanged_by_the_generalization() -> None:
    answers = AnswerTokens.yes_no((0,), (1,))
    p, _ = p_relevant_from_logits([math.log(3.0), 0.0, -1000.0], answers)
    assert p == pytest.approx(0.75)
