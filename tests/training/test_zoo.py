"""The zoo's activation caches are keyed by the exact tokens: another corpus never reuses a stale cache."""

from __future__ import annotations

import torch

from toolkit.tracing.cache import contexts_fingerprint
from toolkit.training.zoo import CorpusSpec, corpus_activations, default_train_config, sae_folder


def test_corpus_activations_are_filled_once_per_exact_token_set(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path))
    spec = CorpusSpec(ctx_len=16, n_contexts=8)
    first = corpus_activations(tiny, "blocks.0.resid_post", spec, progress=False)
    assert first.complete and first.n_tokens == 8 * 15  # BOS dropped
    assert first.folder.name.startswith(f"{spec.key}-{contexts_fingerprint(spec.contexts(tiny))[:12]}-")
    assert first.cfg.fingerprint == contexts_fingerprint(spec.contexts(tiny))
    again = corpus_activations(tiny, "blocks.0.resid_post", spec, progress=False)
    assert again.folder == first.folder and again.cfg == first.cfg

    (tmp_path / "texts.txt").write_text("A different corpus of plain words, repeated. " * 200)
    other = CorpusSpec(source=str(tmp_path / "texts.txt"), ctx_len=16, n_contexts=8)
    third = corpus_activations(tiny, "blocks.0.resid_post", other, progress=False)
    assert third.folder != first.folder and third.cfg.fingerprint != first.cfg.fingerprint


def test_paired_activations_and_trained_crosscoder_are_cached(tiny, tiny4, tmp_path, monkeypatch):
    from toolkit.config import CrosscoderConfig
    from toolkit.data import token_contexts
    from toolkit.training.zoo import paired_activations, trained_crosscoder

    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path))
    contexts = token_contexts(tiny.tokenizer, ["Plain words in a row, again and again. " * 40], 16, n_contexts=8)
    site = "blocks.1.resid_post"
    pairs = paired_activations(tiny, tiny4, site, contexts, progress=False)
    assert pairs.models == (tiny.name, tiny4.name) and pairs.site == site and len(pairs) == 8 * 15
    assert not torch.equal(pairs.acts[:, 0], pairs.acts[:, 1]), "each model got its own cache"
    again = paired_activations(tiny, tiny4, site, contexts, progress=False)
    assert torch.equal(again.acts, pairs.acts)

    cfg = CrosscoderConfig(d_in=pairs.d, d_sae=32, architecture="batchtopk", k=4, models=pairs.models, site=site)
    cc = trained_crosscoder(cfg, pairs, total_steps=5, batch_size=32, progress=False)
    folders = [p for p in (tmp_path / "crosscoders").glob("*/*/*") if p.is_dir()]
    assert len(folders) == 1 and (folders[0] / "crosscoder" / "manifest.json").is_file()
    loaded = trained_crosscoder(cfg, pairs, total_steps=5, batch_size=32, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(cc.state_dict().values(), loaded.state_dict().values(), strict=True))
    trained_crosscoder(cfg, pairs, total_steps=6, batch_size=32, progress=False)  # other settings: another folder
    assert len([p for p in (tmp_path / "crosscoders").glob("*/*/*") if p.is_dir()]) == 2


def test_zoo_saes_are_keyed_by_the_exact_tokens(tiny, tmp_path, monkeypatch):
    """A changed corpus behind the same source name (the default corpus after an update) trains a new SAE."""
    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    texts = tmp_path / "texts.txt"
    texts.write_text("The first corpus, about rivers and mountains. " * 200)
    spec = CorpusSpec(source=str(texts), ctx_len=16, n_contexts=8)
    cfg = default_train_config("blocks.0.resid_post", d_in=tiny.d_model, d_sae=32, k=4, steps=4)
    first = sae_folder(tiny, cfg, spec)
    assert sae_folder(tiny, cfg, spec) == first and first.parent.name == spec.folder_key(tiny)
    texts.write_text("A second corpus, about bread and cheese. " * 200)
    assert sae_folder(tiny, cfg, spec) != first and spec.key in sae_folder(tiny, cfg, spec).parent.name
