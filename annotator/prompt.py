"""The fixed, versioned relevance prompt, split so that backends can reuse the shared prefix.

A label is only comparable with another label made with the same wording, so the wording is frozen under a
version string that travels with every label (in ``annotator_version``). Change the text → bump the version.

The prompt is rendered through the model's own chat template (the model was tuned on it) with sentinel
strings in place of the query and the document, then cut at the sentinels. That gives five segments::

    [template: system, instruction, "Query:"] [query] [template: "Document:"] [document]
    [template: question, assistant header]

Template segments are tokenized with special tokens enabled; the query and the document — untrusted text
from a public corpus — are tokenized with special tokens *disabled*, so a document that contains
``<|im_end|>`` cannot close the turn and inject an answer. The shared prefix of all pairs with the same
query is ``segments[0:3]``, which is what the backends cache.
"""

from __future__ import annotations

from dataclasses import dataclass

PROMPT_VERSION = "p1"

SYSTEM = "You are a careful search relevance judge."
QUESTION = "Does the document answer the query? Answer yes or no."
USER_TEMPLATE = "{question}\n\nQuery:\n{query}\n\nDocument:\n{document}\n\n{question}"

# Private-use code points: they never occur in real text, and no tokenizer merges them with neighbours.
QUERY_SENTINEL = "\ue000QUERY\ue000"
DOCUMENT_SENTINEL = "\ue000DOCUMENT\ue000"

# The answers we read the next-token probabilities of. Tokenizers spell a leading word differently
# (" yes" with a space-prefix byte, "Yes" capitalized), and a chat model may start its turn with any of them,
# so every single-token variant counts toward its side.
YES_VARIANTS = ("yes", "Yes", "YES", " yes", " Yes", " YES")
NO_VARIANTS = ("no", "No", "NO", " no", " No", " NO")


def messages(query: str, document: str) -> list[dict[str, str]]:
    """The chat messages for one pair (used as they are by the naive baseline, with sentinels by backends)."""
    user = USER_TEMPLATE.format(question=QUESTION, query=query, document=document)
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def sentinel_messages() -> list[dict[str, str]]:
    return messages(QUERY_SENTINEL, DOCUMENT_SENTINEL)


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


CHATML_TEMPLATE = PromptTemplate.from_rendered(render_chatml(sentinel_messages()))
