"""One token per character, whitespace included, no trailing whitespace on any token.

This is the tokenization of the Chinese gold Docs the readers build. ``spacy.blank("zh")``
also splits into characters, but it turns a single space into the previous token's trailing
whitespace and merges runs of newlines, so a gold entity that starts or ends at whitespace
(87 of them in CCKS 2019) cannot be represented on its tokens. A pipeline whose
``[nlp.tokenizer]`` is ``spacy_medllm.CharTokenizer.v1`` predicts on exactly the gold tokens.
"""

from typing import Callable, Iterable, Iterator

from spacy.language import Language
from spacy.tokens import Doc
from spacy.util import registry
from spacy.vocab import Vocab


def char_doc(vocab: Vocab, text: str) -> Doc:
    """A Doc with one token per character of ``text``."""
    return Doc(vocab, words=list(text), spaces=[False] * len(text))


class CharTokenizer:
    """Tokenizer making :func:`char_doc`; it has no state to save."""

    def __init__(self, vocab: Vocab) -> None:
        self.vocab = vocab

    def __call__(self, text: str) -> Doc:
        return char_doc(self.vocab, text)

    def pipe(self, texts: Iterable[str], batch_size: int = 1000) -> Iterator[Doc]:
        for text in texts:
            yield self(text)

    def to_bytes(self, *, exclude: Iterable[str] = tuple()) -> bytes:
        return b""

    def from_bytes(self, data: bytes, *, exclude: Iterable[str] = tuple()) -> "CharTokenizer":
        return self

    def to_disk(self, path, *, exclude: Iterable[str] = tuple()) -> None:
        return None

    def from_disk(self, path, *, exclude: Iterable[str] = tuple()) -> "CharTokenizer":
        return self


@registry.tokenizers("spacy_medllm.CharTokenizer.v1")
def create_char_tokenizer() -> Callable[[Language], CharTokenizer]:
    """``[nlp.tokenizer] @tokenizers = "spacy_medllm.CharTokenizer.v1"``."""

    def make_tokenizer(nlp: Language) -> CharTokenizer:
        return CharTokenizer(nlp.vocab)

    return make_tokenizer
