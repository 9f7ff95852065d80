"""Prompt, yes/no token handling, ordering and truncation: pure logic, no model."""

from __future__ import annotations

import math

import pytest

from annotator.backends.base import (
    AnswerTokens,
    Pair,
    PromptBuilder,
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
    answers = AnswerTokens(yes=(1, 2), no=(3,))
    logits = [0.0, math.log(2.0), math.log(1.0), math.log(1.0), math.log(4.0)]  # other token 4 has most mass
    p, mass = p_relevant_from_logits(logits, answers)
    # P(yes) ∝ 2 + 1, P(no) ∝ 1 → 0.75; yes+no mass = 4 / (1 + 2 + 1 + 1 + 4)
    assert p == pytest.approx(0.75)
    assert mass == pytest.approx(4 / 9)


def test_p_relevant_from_logits_is_stable_for_huge_logits() -> None:
    answers = AnswerTokens(yes=(0,), no=(1,))
    p, _ = p_relevant_from_logits([1000.0, 0.0, -1000.0], answers)
    assert p == pytest.approx(1.0)
    p, _ = p_relevant_from_logits([0.0, 1000.0, -1000.0], answers)
    assert p == pytest.approx(0.0)


def test_p_relevant_from_top_k_logprobs_uses_floor_for_missing_variants() -> None:
    answers = AnswerTokens(yes=(1, 2), no=(3,))
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


def builder(n_ctx: int = 200, **kw: int) -> tuple[PromptBuilder, WordTokenizer]:
    tok = WordTokenizer()
    template = PromptTemplate("sys instruction Query:", " Document:", " question answer:")
    return PromptBuilder(template, tok, n_ctx=n_ctx, **kw), tok


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
