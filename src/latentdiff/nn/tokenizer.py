"""A word-level tokenizer built from the training captions, for the text encoder τ_θ trained from scratch.

LDM trains its BERT-style text encoder jointly with the U-Net (Rombach et al. 2022, sec. 4.3.1); a vocabulary
of the captions' own words is all a small captioned dataset needs.

Rules, the same for building and encoding:
- Lower-cased (``str.lower``).
- A word is a run of letters and digits (any script); an apostrophe between two such runs stays inside the word
  ("don't"). Everything else (whitespace, punctuation, hyphens, underscores, symbols) separates words and is
  dropped: "A red circle, top-left!" -> ["a", "red", "circle", "top", "left"].
- Special tokens at fixed ids: ``<pad>`` = 0, ``<unk>`` = 1, ``<end>`` = 2. A word not in the vocabulary maps to
  ``<unk>`` (no error). Every encoded prompt ends with ``<end>`` and is padded with ``<pad>`` to
  ``context_length``. The empty prompt "" encodes to [<end>, <pad>, ...]: the unconditional input of
  classifier-free guidance.
- A prompt whose token count (words + end) exceeds ``context_length`` is an error naming both lengths.

The vocabulary is ordered: the three specials, then the words by decreasing count in the captions, ties
alphabetically, so the same captions always give the same ids. Saved as JSON ({"type", "context_length",
"vocab"}), written atomically.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch

from ..fileio import atomic_write_text

PAD, UNK, END = "<pad>", "<unk>", "<end>"
SPECIALS = (PAD, UNK, END)  # ids 0, 1, 2
PAD_ID, UNK_ID, END_ID = 0, 1, 2
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")  # letters/digits, apostrophes inside a word
_TYPE = "word"


def split_words(text: str) -> list[str]:
    """The words of ``text`` as the tokenizer sees them: lower-cased, punctuation dropped."""
    return [w.replace("’", "'") for w in _WORD.findall(text.lower())]


class WordTokenizer:
    """Word-level tokenizer: ``encode(texts) -> (B, context_length)`` long ids; see the module docstring.

    Build it from captions with ``WordTokenizer.build``; ``save``/``load`` a JSON file beside the model weights.
    """

    def __init__(self, vocab: list[str], context_length: int):
        _check_vocab(vocab, context_length)
        self.vocab = list(vocab)
        self.context_length = context_length
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def build(cls, captions: Iterable[str], context_length: int | None = None, min_count: int = 1) -> "WordTokenizer":
        """The vocabulary of ``captions``: words seen at least ``min_count`` times (rarer words become <unk>).

        ``context_length`` None = the longest caption's token count (words + end). A caption longer than a
        given ``context_length`` is an error here already, before any training step.
        """
        if isinstance(captions, str):
            raise TypeError("WordTokenizer.build expects a list of captions, got one string")
        if not isinstance(min_count, int) or min_count < 1:
            raise ValueError(f"min_count must be a positive integer, got {min_count!r}")
        counts, longest, longest_caption, n = Counter(), 0, "", 0
        for caption in captions:
            if not isinstance(caption, str):
                raise TypeError(f"caption {n} is a {type(caption).__name__}, not a string: {caption!r}")
            words = split_words(caption)
            counts.update(words)
            if len(words) + 1 > longest:
                longest, longest_caption = len(words) + 1, caption
            n += 1
        if n == 0:
            raise ValueError("WordTokenizer.build: no captions to build a vocabulary from")
        if context_length is None:
            context_length = longest
        elif longest > context_length:
            raise ValueError(
                f"a training caption has {longest} tokens (words + end), more than context_length={context_length}: "
                f"{longest_caption!r}; raise context_length to at least {longest}"
            )
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(list(SPECIALS) + words, context_length)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, texts: list[str]) -> torch.Tensor:
        """(B, context_length) long ids: each text's words (unknown ones as <unk>), <end>, then <pad>s."""
        if isinstance(texts, str):
            raise TypeError(f"encode expects a list of prompts, got one string {texts!r}; pass [{texts!r}]")
        out = torch.full((len(texts), self.context_length), PAD_ID, dtype=torch.long)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"prompt {i} is a {type(text).__name__}, not a string: {text!r}")
            ids = [self.ids.get(w, UNK_ID) for w in split_words(text)] + [END_ID]
            if len(ids) > self.context_length:
                raise ValueError(
                    f"prompt has {len(ids)} tokens (words + end), longer than the context length "
                    f"{self.context_length}: {text!r}"
                )
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """The words of each row up to its <end>, joined by spaces (unknown words read "<unk>")."""
        if tokens.dim() != 2:
            raise ValueError(f"decode expects (B, L) token ids, got shape {tuple(tokens.shape)}")
        texts = []
        for row in tokens.tolist():
            words = []
            for i in row:
                if i == END_ID:
                    break
                if not 0 <= i < self.vocab_size:
                    raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
                if i != PAD_ID:
                    words.append(self.vocab[i])
            texts.append(" ".join(words))
        return texts

    # ---- files -------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"type": _TYPE, "context_length": self.context_length, "vocab": list(self.vocab)}

    @classmethod
    def from_dict(cls, d: dict, source: str = "tokenizer") -> "WordTokenizer":
        """Rebuild from ``to_dict()``'s output; a malformed dict is a ValueError that names ``source``."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        keys = {"type", "context_length", "vocab"}
        if set(d) != keys:
            raise ValueError(f"{source}: expected keys {sorted(keys)}, got {sorted(d)}")
        if d["type"] != _TYPE:
            raise ValueError(f"{source}: tokenizer type {d['type']!r} is not {_TYPE!r}")
        try:
            return cls(d["vocab"], d["context_length"])
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def save(self, path) -> Path:
        """Write the tokenizer as JSON to ``path`` atomically; returns the path."""
        return atomic_write_text(path, json.dumps(self.to_dict(), ensure_ascii=False, indent=0) + "\n")

    @classmethod
    def load(cls, path) -> "WordTokenizer":
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"tokenizer file {path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"tokenizer file {path} is not valid JSON: {e}") from None
        return cls.from_dict(d, source=f"tokenizer file {path}")

    def __eq__(self, other) -> bool:
        same = isinstance(other, WordTokenizer) and self.context_length == other.context_length
        return same and self.vocab == other.vocab

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"


def _check_vocab(vocab, context_length) -> None:
    """ValueError naming the first problem of a vocabulary list / context length."""
    if not isinstance(context_length, int) or isinstance(context_length, bool) or context_length < 1:
        raise ValueError(f"context_length must be a positive integer (room for the end token), got {context_length!r}")
    if not isinstance(vocab, list) or not all(isinstance(w, str) for w in vocab):
        raise ValueError("vocab must be a list of strings")
    if tuple(vocab[: len(SPECIALS)]) != SPECIALS:
        raise ValueError(f"vocab must start with the special tokens {list(SPECIALS)} (ids 0-2), got {vocab[:3]}")
    seen = {}
    for i, w in enumerate(vocab):
        if w in seen:
            raise ValueError(f"vocab has the duplicate entry {w!r} at ids {seen[w]} and {i}")
        seen[w] = i
        if i >= len(SPECIALS) and split_words(w) != [w]:
            raise ValueError(f"vocab entry {i} {w!r} is not a lower-case word this tokenizer can produce")
