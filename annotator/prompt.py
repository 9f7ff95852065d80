"""The versioned relevance prompts, split so that backends can reuse the shared prefix.

A label is only comparable with another label made with the same wording, so each wording is frozen under a
version string that travels with every label (``prompt_version``, and in ``annotator_version``). Change a
text → add a new version; never edit a published one. kombinat's model registry says which version each model
uses (the one the labeling benchmark, ``python -m bench.labeling``, measured best for it).

A prompt is rendered through the model's own chat template (the model was tuned on it) with sentinel
strings in place of the query and the document, then cut at the sentinels. That gives five segments::

    [template: system, instruction (+ examples), "Query:"] [query] [template: "Document:"] [document]
    [template: question, assistant header]

Template segments are tokenized with special tokens enabled; the query and the document — untrusted text
from a public corpus — are tokenized with special tokens *disabled*, so a document that contains
``<|im_end|>`` cannot close the turn and inject an answer. The shared prefix of all pairs with the same
query is ``segments[0:3]``, which is what the backends cache; everything before the query (instructions,
few-shot examples) is shared by *all* pairs, so a longer instruction costs once per run, not once per pair.

Every version is read the same way — one forward pass, the next-token distribution after the assistant
header — and scored as the expected value of its answers (:class:`Answer`), renormalized over the answer
tokens: for yes/no that is P(yes) / (P(yes) + P(no)); for a graded 0–3 scale it is E[grade] / 3 (UMBRELA's
grades read as expected relevance, Thomas et al. 2024 / Upadhyay et al. 2024).
"""

from __future__ import annotations

from dataclasses import dataclass

# Private-use code points: they never occur in real text, and no tokenizer merges them with neighbours.
QUERY_SENTINEL = "\ue000QUERY\ue000"
DOCUMENT_SENTINEL = "\ue000DOCUMENT\ue000"

# Tokenizers spell a leading word differently (" yes" with a space-prefix byte, "Yes" capitalized), and a chat
# model may start its turn with any of them, so every single-token variant counts toward its answer.
YES_VARIANTS = ("yes", "Yes", "YES", " yes", " Yes", " YES")
NO_VARIANTS = ("no", "No", "NO", " no", " No", " NO")


@dataclass(frozen=True)
class Answer:
    """One answer the model may give: its single-token spellings and what it is worth on the [0, 1] scale."""

    value: float
    variants: tuple[str, ...]


YES_NO = (Answer(1.0, YES_VARIANTS), Answer(0.0, NO_VARIANTS))
GRADES_0_3 = tuple(Answer(grade / 3, (str(grade), f" {grade}")) for grade in range(4))


@dataclass(frozen=True)
class PromptVersion:
    """One frozen wording: the chat messages (with ``{query}`` and ``{document}`` slots) and how to read it."""

    version: str
    summary: str
    system: str
    user_template: str
    answers: tuple[Answer, ...]

    def messages(self, query: str, document: str) -> list[dict[str, str]]:
        """The chat messages for one pair (used as they are by the naive baseline, with sentinels by backends)."""
        user = self.user_template.format(query=query, document=document)
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]

    def sentinel_messages(self) -> list[dict[str, str]]:
        return self.messages(QUERY_SENTINEL, DOCUMENT_SENTINEL)

    @property
    def graded(self) -> bool:
        return len(self.answers) > 2


_P1_QUESTION = "Does the document answer the query? Answer yes or no."

P1 = PromptVersion(
    version="p1",
    summary="binary: 'Does the document answer the query?', P(yes) renormalized over yes/no",
    system="You are a careful search relevance judge.",
    user_template=f"{_P1_QUESTION}\n\nQuery:\n{{query}}\n\nDocument:\n{{document}}\n\n{_P1_QUESTION}",
    answers=YES_NO,
)

# Graded in the spirit of UMBRELA (the TREC RAG relevance assessor): the four TREC DL grades, each defined,
# read as expected relevance from the distribution over the grade tokens. Our own wording.
G1 = PromptVersion(
    version="g1",
    summary="graded 0-3 (UMBRELA-style definitions), score = E[grade]/3 over the grade tokens",
    system="You are a search quality rater who judges how well a document answers a search query.",
    user_template=(
        "Rate how well the document answers the query on this scale:\n"
        "3 = the document is dedicated to the query and contains the exact answer.\n"
        "2 = the document answers the query, but the answer is partial, unclear, or buried in unrelated text.\n"
        "1 = the document is on the topic of the query but does not answer it.\n"
        "0 = the document has nothing to do with the query.\n\n"
        "Query:\n{query}\n\nDocument:\n{document}\n\n"
        "Reply with the grade only: 0, 1, 2 or 3."
    ),
    answers=GRADES_0_3,
)

# A reranker-style binary judgment with a short definition of relevance and two worked examples, all in the
# shared prefix (computed once per run). The examples are written for this prompt, from no evaluation set.
R1 = PromptVersion(
    version="r1",
    summary="binary with a definition of relevance and two worked examples in the shared prefix",
    system='You judge search results: decide whether the Document satisfies the Query. Answer only "yes" or "no".',
    user_template=(
        "A document is relevant when it contains information that answers the query, fully or in large part. "
        "A document that only mentions the same topic, names, or words without answering is not relevant.\n\n"
        "Example:\nQuery: how long do tomatoes take to ripen\n"
        "Document: Tomatoes usually ripen 20 to 30 days after the flowers are pollinated, depending on variety "
        "and warmth.\nRelevant: yes\n\n"
        "Example:\nQuery: how long do tomatoes take to ripen\n"
        "Document: The tomato was brought to Europe from the Americas in the 16th century and was long thought "
        "to be poisonous.\nRelevant: no\n\n"
        "Query:\n{query}\n\nDocument:\n{document}\n\n"
        "Is the document relevant to the query? Answer yes or no."
    ),
    answers=YES_NO,
)

PROMPTS: dict[str, PromptVersion] = {p.version: p for p in (P1, G1, R1)}
DEFAULT_PROMPT_VERSION = P1.version
# Kept for readers of older code: the version a model uses when its registry entry names none.
PROMPT_VERSION = DEFAULT_PROMPT_VERSION


def get_prompt(version: str | None = None) -> PromptVersion:
    """The frozen wording of ``version`` (default: p1); a clear error for one this annotator does not know."""
    key = version or DEFAULT_PROMPT_VERSION
    try:
        return PROMPTS[key]
    except KeyError:
        raise ValueError(
            f"prompt version {key!r} is unknown to this annotator (it knows {', '.join(PROMPTS)}): "
            "update the annotator (`pip install -U embedkomb`)"
        ) from None


def messages(query: str, document: str, version: str | None = None) -> list[dict[str, str]]:
    return get_prompt(version).messages(query, document)


def sentinel_messages(version: str | None = None) -> list[dict[str, str]]:
    return get_prompt(version).sentinel_messages()


def render_chatml(msgs: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """ChatML, the format of Qwen2.5 and SmolLM2: the fallback when a model file carries no template."""
    out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
    return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")


@dataclass(frozen=True)
class PromptTemplate:
    """A rendered chat prompt cut at the sentinels: ``before_query + Q + between + D + after_document``."""

    before_query: str
    between: str
    after_document: str

    @classmethod
    def from_rendered(cls, rendered: str) -> PromptTemplate:
        if rendered.count(QUERY_SENTINEL) != 1 or rendered.count(DOCUMENT_SENTINEL) != 1:
            raise ValueError("the chat template must place the query and the document exactly once each")
        before, rest = rendered.split(QUERY_SENTINEL)
        between, after = rest.split(DOCUMENT_SENTINEL)
        if not between:
            raise ValueError("the chat template put the document directly after the query")
        return cls(before, between, after)

    def render(self, query: str, document: str) -> str:
        return self.before_query + query + self.between + document + self.after_document


def chatml_template(version: str | None = None) -> PromptTemplate:
    return PromptTemplate.from_rendered(render_chatml(sentinel_messages(version)))


CHATML_TEMPLATE = chatml_template(DEFAULT_PROMPT_VERSION)
