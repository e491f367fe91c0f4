import json

import numpy as np
import pytest
import torch

from toolkit.analysis.feature_store import FeatureStore, StoreSettings, build_feature_store, token_latents
from toolkit.analysis.feature_store_build import STATE_FILE, decoder_neighbours
from toolkit.analysis.features import logit_lens, logit_lens_ids
from toolkit.config import SAEConfig
from toolkit.errors import (
    CacheError,
    EmptyInputError,
    FeatureIndexError,
    NonFiniteError,
    ShapeMismatchError,
    check_finite,
)
from toolkit.sae.sae import SAE
from toolkit.tracing import capture

SITE = "blocks.1.resid_post"
SETTINGS = StoreSettings(top_k=4, n_samples=5, n_quantiles=2, bins=8, window=(3, 2), lens_k=3, n_neighbours=4)


@pytest.fixture(scope="module")
def sae():
    return SAE.from_config(SAEConfig(d_in=64, d_sae=96, architecture="topk", k=6, site=SITE), seed=0)


@pytest.fixture(scope="module")
def ctx(tiny):
    ids = torch.randint(4, len(tiny.tokenizer), (10, 16), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = tiny.bos_token_id
    return ids


@pytest.fixture(scope="module")
def codes(tiny, sae, ctx):
    with torch.no_grad():
        c = sae.encode(capture(tiny, ctx, SITE)[SITE]).float()
    c[ctx == tiny.bos_token_id] = 0
    return c  # (10, 16, 96)


@pytest.fixture(scope="module")
def store(tiny, sae, ctx, tmp_path_factory):
    return build_feature_store(tiny, sae, ctx, tmp_path_factory.mktemp("fs"), settings=SETTINGS, batch_size=3,
                               progress=False)


def _arrays(store):
    return {p.stem: np.load(p) for p in sorted(store.folder.glob("*.npy"))}


def test_density_max_and_histogram_are_exact(store, codes):
    fired = (codes != 0).sum((0, 1)).double() / (codes.shape[0] * (codes.shape[1] - 1))
    np.testing.assert_allclose(store.density, fired.numpy(), rtol=1e-6)
    np.testing.assert_allclose(store.max_act, codes.amax((0, 1)).numpy(), rtol=1e-6)
    assert store.density.dtype == np.float32 and store.max_act.shape == (96,)
    for i in range(96):
        d = store.latent_details(i)
        vals = codes[..., i][codes[..., i] > 0].numpy()
        counts, _ = np.histogram(vals, bins=d["hist"]["edges"])
        assert d["hist"]["counts"].tolist() == counts.tolist() and d["hist"]["counts"].sum() == len(vals)
        if len(vals):  # the range fits the largest activation and at least half the bins are within it
            assert d["hist"]["edges"][-1] > vals.max() >= d["hist"]["edges"][len(counts) // 2] * 0.999


def test_top_contexts_are_per_context_maxima_with_true_windows(store, codes, tiny, ctx):
    a = _arrays(store)
    per_ctx = codes.amax(1)  # (10, 96)
    for i in range(96):
        want = per_ctx[:, i].sort(descending=True).values
        want = want[want > 0][:4]
        got = a["top_act"][i][a["top_ctx"][i] >= 0]
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)
        for c, p, s, acts in zip(a["top_ctx"][i], a["top_pos"][i], a["top_start"][i], a["top_acts"][i], strict=True):
            if c < 0:
                continue
            assert codes[c, p, i] == per_ctx[c, i] and s <= p < s + 6 and s >= 1
            np.testing.assert_allclose(acts, codes[c, s:s + 6, i].numpy(), rtol=1e-3, atol=1e-3)  # float16
    d = store.latent_details(int(np.argmax(store.density)))
    first = d["top"][0]
    assert len(first["tokens"]) == len(first["acts"]) == 6 and max(first["acts"]) == pytest.approx(d["max_act"], rel=1e-3)


def test_samples_are_a_reservoir_of_firing_contexts(store, codes):
    a = _arrays(store)
    per_ctx = codes.amax(1)
    for i in range(96):
        live = a["sample_ctx"][i] >= 0
        firing = set(torch.nonzero(per_ctx[:, i] > 0).flatten().tolist())
        assert live.sum() == min(5, len(firing))
        assert set(a["sample_ctx"][i][live].tolist()) <= firing and len(set(a["sample_ctx"][i][live])) == live.sum()
        np.testing.assert_allclose(a["sample_act"][i][live], per_ctx[a["sample_ctx"][i][live], i].numpy(), rtol=1e-6)
        assert np.all(np.diff(a["sample_act"][i][live]) >= 0)
    d = store.latent_details(int(np.argmax(store.density)))
    assert [len(q["examples"]) for q in d["quantiles"]] == [2, 3]  # 5 samples in 2 bands, strongest band first
    assert "quantile 2/2" in d["quantiles"][0]["label"]


def test_details_follow_the_contract(store, sae, tiny):
    d = store.latent_details(7)
    assert set(d) == {"latent", "density", "max_act", "hist", "top", "quantiles", "promoted", "suppressed",
                      "neighbours"}
    assert d["latent"] == 7 and isinstance(d["density"], float) and isinstance(d["max_act"], float)
    assert d["hist"]["edges"].shape == (9,) and d["hist"]["counts"].shape == (8,)
    for ctx in d["top"] + [e for q in d["quantiles"] for e in q["examples"]]:
        assert set(ctx) == {"tokens", "acts"} and all(isinstance(t, str) for t in ctx["tokens"])
        assert all(isinstance(v, float) for v in ctx["acts"])
    lens = logit_lens(sae, tiny, 7, k=3)
    assert [t for t, _ in lens["promoted"]] == [t for t, _ in d["promoted"]]
    assert [v for _, v in d["suppressed"]] == pytest.approx([v for _, v in lens["suppressed"]], rel=1e-5)
    assert d["suppressed"][0][1] < 0 < d["promoted"][0][1]
    json.dumps({k: v for k, v in d.items() if k != "hist"})  # plain Python besides the histogram arrays
    assert store.labels[7] == d["promoted"][0][0] and len(store.labels) == len(store) == 96


def test_neighbours_and_lens_match_brute_force(sae, tiny):
    ids, cos = decoder_neighbours(sae.W_dec, 4, chunk=7)
    W = torch.nn.functional.normalize(sae.W_dec.float(), dim=1)
    full = W @ W.T
    full.fill_diagonal_(-2)
    want = full.topk(4, dim=1)
    assert torch.equal(ids, want.indices) and torch.allclose(cos, want.values, atol=1e-6)
    up_ids, up, down_ids, down = logit_lens_ids(sae, tiny, [3, 50], k=5, latent_chunk=1, vocab_chunk=37)
    scores = (sae.W_dec[[3, 50]] / sae.input_scale) @ tiny.hf.get_output_embeddings().weight.float().T
    assert torch.equal(up_ids, scores.topk(5).indices) and torch.allclose(down, -(-scores).topk(5).values)


class _RowsOnly:
    """Wraps a stored array and fails on any read that is not one latent's row (an O(1) lookup)."""

    def __init__(self, arr, name):
        self.arr, self.name, self.shape = arr, name, arr.shape

    def __getitem__(self, key):
        first = key[0] if isinstance(key, tuple) else key
        assert isinstance(first, (int, np.integer)), f"{self.name}: read {key!r}, not a single row"
        return self.arr[key]


def test_open_is_lazy_and_lookups_read_one_row(store):
    again = FeatureStore.open(store.folder)
    assert again._arrays == {}  # nothing read at open
    again.latent_details(3)
    assert all(isinstance(a, np.memmap) for a in again._arrays.values())
    for name in list(again._arrays) + ["contexts"]:
        again._arrays[name] = _RowsOnly(again._a(name), name)
    d = again.latent_details(11)
    assert d == {**store.latent_details(11), "hist": d["hist"]} and d["hist"]["counts"].tolist() == \
        store.latent_details(11)["hist"]["counts"].tolist()


def test_resume_after_an_interrupted_build_equals_an_uninterrupted_one(tiny, sae, ctx, store, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = sae.encode

    def dying(x):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(x)

    monkeypatch.setattr(sae, "encode", dying)
    with pytest.raises(KeyboardInterrupt):
        build_feature_store(tiny, sae, ctx, tmp_path, settings=SETTINGS, batch_size=3, checkpoint_every=3,
                            progress=False)
    assert (tmp_path / STATE_FILE).exists() and not (tmp_path / "manifest.json").exists()
    monkeypatch.setattr(sae, "encode", real)
    calls["n"] = 0
    monkeypatch.setattr(sae, "encode", lambda x: (calls.__setitem__("n", calls["n"] + 1), real(x))[1])
    resumed = build_feature_store(tiny, sae, ctx, tmp_path, settings=SETTINGS, batch_size=3, progress=False)
    assert calls["n"] == 2  # contexts 6..9 only: the first two batches came from the checkpoint
    assert not (tmp_path / STATE_FILE).exists()
    want, got = _arrays(store), _arrays(resumed)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # a complete store is reopened, not rebuilt; other settings in the same folder are refused
    assert build_feature_store(tiny, sae, ctx, tmp_path, settings=SETTINGS, progress=False).folder == tmp_path
    with pytest.raises(CacheError, match="other settings"):
        build_feature_store(tiny, sae, ctx, tmp_path, settings=StoreSettings(top_k=2), progress=False)
    other = SAE.from_config(sae.cfg, seed=1)  # same name, other weights
    with pytest.raises(CacheError, match="SAE weights"):
        build_feature_store(tiny, other, ctx, tmp_path, settings=SETTINGS, progress=False)


def test_partial_build_with_other_settings_is_refused(tiny, sae, ctx, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = sae.encode

    def once(x):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        return real(x)

    monkeypatch.setattr(sae, "encode", once)
    with pytest.raises(KeyboardInterrupt):
        build_feature_store(tiny, sae, ctx[:4], tmp_path, settings=SETTINGS, batch_size=2, checkpoint_every=1,
                            progress=False)
    monkeypatch.undo()
    with pytest.raises(CacheError, match="settings"):
        build_feature_store(tiny, sae, ctx[:4], tmp_path, settings=StoreSettings(bins=4), batch_size=2,
                            progress=False)


def test_search_by_token_and_context(store):
    label = store.labels[5]
    hits = store.search(label, "token")
    assert 5 in hits.tolist() and hits.dtype == np.int64
    assert np.all(np.diff(store.max_act[hits]) <= 0)  # strongest first
    d = store.latent_details(5)
    word = max(d["top"][0]["tokens"], key=len)
    assert 5 in store.search(word, "context").tolist()
    assert len(store.search("   ", "token")) == 0 and len(store.search("zzzzqqq", "context")) == 0
    with pytest.raises(ValueError, match="'token' or 'context'"):
        store.search("a", by="index")


def test_token_latents(tiny, sae):
    out = token_latents(tiny, sae, "The cat sat", k=3)
    assert len(out["tokens"]) == len(out["latents"]) and len(out["tokens"]) >= 3
    with torch.no_grad():
        c = sae.encode(capture(tiny, "The cat sat", SITE)[SITE][0])[1:]
    assert [lat for lat, _ in out["latents"][0]] == c[0].topk(3).indices.tolist()
    assert out["latents"][0][0][1] == pytest.approx(float(c[0].max()), rel=1e-5)
    with pytest.raises(EmptyInputError):
        token_latents(tiny, sae, "  ")
    with pytest.raises(ValueError, match="positive integer"):
        token_latents(tiny, sae, "cat", k=0)


def test_bad_inputs(tiny, sae, ctx, store, tmp_path, monkeypatch):
    for bad in (-1, 96, 1.5, True, "3"):
        with pytest.raises(FeatureIndexError, match=r"0\.\.95"):
            store.latent_details(bad)
    with pytest.raises(TypeError, match="integer token tensor"):
        build_feature_store(tiny, sae, ctx.float(), tmp_path, progress=False)
    with pytest.raises(EmptyInputError):
        build_feature_store(tiny, sae, ctx[:0], tmp_path, progress=False)
    small = SAE.from_config(SAEConfig(d_in=32, d_sae=8, architecture="relu", site=SITE))
    with pytest.raises(ShapeMismatchError):
        build_feature_store(tiny, small, ctx, tmp_path, progress=False)
    with pytest.raises(ValueError, match="top_k"):
        StoreSettings(top_k=0)
    with pytest.raises(ValueError, match="window"):
        StoreSettings(window=(3,))
    with pytest.raises(NonFiniteError, match=r"2 of 3 values are non-finite \(1 NaN, 1 inf\) in activations at blocks.1"):
        check_finite(torch.tensor([1.0, float("nan"), float("inf")]), "activations at blocks.1.resid_post")
    real = sae.encode
    monkeypatch.setattr(sae, "encode", lambda x: real(x) * float("nan"))
    with pytest.raises(NonFiniteError, match=r"SAE codes of activations at blocks\.1\.resid_post \(contexts 0\.\.2\)"):
        build_feature_store(tiny, sae, ctx, tmp_path / "nan", batch_size=3, progress=False)
    with pytest.raises(CacheError, match="missing"):
        FeatureStore.open(tmp_path / "nowhere")


def test_describe_is_plain_text(store):
    i = int(np.argmax(store.density))
    text = store.describe(i, n_contexts=2)
    d = store.latent_details(i)
    assert text.startswith(f"latent {i}: density") and "«" in text and repr(d["promoted"][0][0]) in text
    assert text.count("\n    ") >= 2
    with pytest.raises(FeatureIndexError):
        store.describe(96)
