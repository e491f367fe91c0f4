"""Activation cache: storage, manifest, resume after a killed writer (reliability case 11), streaming reader."""

from __future__ import annotations

import functools
import json
from types import SimpleNamespace

import pytest
import torch

from toolkit.config import CacheConfig
from toolkit.data import token_contexts
from toolkit.errors import CacheError, ShapeMismatchError
from toolkit.io import sha256_file
from toolkit.sites import Site
from toolkit.tracing.cache import (
    ActivationCache,
    contexts_fingerprint,
    fill_cache,
    shard_name,
)
from toolkit.tracing.capture import iter_capture
from toolkit.tracing.stream import paired_batches

BOS, PAD = 2, 0
CTX, D = 6, 5


class FakeModel:
    """Just what fill_cache asks of a Model: name, sites, widths, tokenizer.bos_token_id."""

    def __init__(self, name: str = "fake", seed: int = 0) -> None:
        self.name, self.seed = name, seed
        self.tokenizer = SimpleNamespace(bos_token_id=BOS)

    def site(self, s):
        return Site.parse(s)

    def site_width(self, s) -> int:
        return 3 * D if Site.parse(s).kind == "mlp_post" else D


def synthetic_acts(model: FakeModel, site: Site, row: int, ctx: int, d: int) -> torch.Tensor:
    """Deterministic per (model seed, site, context row); channel 0 holds the flat token index (for alignment)."""
    g = torch.Generator().manual_seed(model.seed * 100_003 + site.layer * 1009 + len(site.kind) * 31 + row)
    x = torch.randn(ctx, d, generator=g)
    x[:, 0] = row * ctx + torch.arange(ctx, dtype=torch.float32)
    return x


def synthetic_capture(model, contexts, sites, *, batch_size=8, attention_mask=None, progress=True, desc=None,
                      start=0, fail_after=None):
    n, ctx = contexts.shape
    for k, off in enumerate(range(start, n, batch_size)):
        if fail_after is not None and k == fail_after:
            raise RuntimeError("writer killed")
        rows = range(off, min(off + batch_size, n))
        yield off, {s.name: torch.stack([synthetic_acts(model, s, r, ctx, model.site_width(s)) for r in rows])
                    for s in map(Site.parse, sites)}


def make_contexts(n: int = 10, seed: int = 0) -> torch.Tensor:
    x = torch.randint(3, 50, (n, CTX), generator=torch.Generator().manual_seed(seed))
    x[:, 0] = BOS
    return x


def fill(folder, contexts=None, model=None, sites="blocks.1.resid_post", **kw) -> ActivationCache:
    kw = {"batch_size": 3, "shard_contexts": 4, "progress": False, "capture_fn": synthetic_capture, **kw}
    return fill_cache(model or FakeModel(), sites, make_contexts() if contexts is None else contexts, folder, **kw)


def expected_rows(model, site: str, contexts, keep) -> torch.Tensor:
    s = Site.parse(site)
    acts = torch.stack([synthetic_acts(model, s, r, contexts.shape[1], model.site_width(s))
                        for r in range(len(contexts))])
    return acts[keep]


def test_fill_then_open_stores_real_tokens_only(tmp_path):
    ctx = make_contexts()
    cache = fill(tmp_path / "c", ctx)
    assert len(cache) == 3 and cache.complete and cache.shard_rows == [20, 20, 10]
    reopened = ActivationCache.open(tmp_path / "c")
    assert reopened.n_tokens == 50 and reopened.d == D and reopened.sites == ("blocks.1.resid_post",)
    rows = torch.cat([reopened.shard(i)["blocks.1.resid_post"] for i in range(len(reopened))])
    assert torch.equal(rows, expected_rows(FakeModel(), "blocks.1.resid_post", ctx, ctx != BOS))
    pos = reopened.token_positions(1)
    assert pos[:, 1].min() >= 1 and pos[0].tolist() == [4, 1]
    meta = json.loads((tmp_path / "c" / "cache.json").read_text())
    assert meta["fingerprint"] == contexts_fingerprint(ctx) and meta["tokens_per_shard"] == 4 * CTX
    assert meta["keep_bos"] is False and meta["d"] == [D] and meta["n_contexts"] == 10


def test_keep_bos_and_attention_mask(tmp_path):
    ctx = make_contexts()
    mask = torch.ones_like(ctx)
    mask[3, 4:] = 0
    ctx[3, 4:] = PAD
    assert fill(tmp_path / "a", ctx, keep_bos=True).n_tokens == 10 * CTX
    cache = fill(tmp_path / "b", ctx, attention_mask=mask)
    assert cache.n_tokens == 50 - 2
    rows = torch.cat([cache.shard(i)["blocks.1.resid_post"] for i in range(len(cache))])
    assert torch.equal(rows, expected_rows(FakeModel(), "blocks.1.resid_post", ctx, (ctx != BOS) & mask.bool()))


def test_bfloat16_storage_reads_back_as_float32(tmp_path):
    ctx = make_contexts()
    cache = fill(tmp_path / "c", ctx, dtype=torch.bfloat16)
    assert cache.shard(0)["blocks.1.resid_post"].dtype == torch.bfloat16
    batch = next(cache.iter_batches(50, shuffle=False))
    want = expected_rows(FakeModel(), "blocks.1.resid_post", ctx, ctx != BOS).to(torch.bfloat16).float()
    assert batch.dtype == torch.float32 and torch.equal(batch, want)
    full = list(cache.iter_batches(7, dtype=None, seed=1, drop_last=False))
    tail = list(cache.iter_batches(7, dtype=None, seed=1, drop_last=False, start_batch=5))
    assert all(b.dtype == torch.bfloat16 for b in tail) and len(tail) == len(full) - 5
    assert all(torch.equal(a, b) for a, b in zip(tail, full[5:], strict=True))


def test_killed_writer_resumes_to_identical_cache(tmp_path):
    ctx = make_contexts()
    full = fill(tmp_path / "full", ctx, batch_size=2)
    killed = functools.partial(synthetic_capture, fail_after=3)  # 6 contexts captured: shard 0 done, 1 half
    with pytest.raises(RuntimeError, match="writer killed"):
        fill(tmp_path / "part", ctx, batch_size=2, capture_fn=killed)
    part = tmp_path / "part"
    # What a writer killed at other moments leaves: a half-written temp file, a shard it had not listed yet.
    (part / ".tmp-shard_00001.safetensors.abc123").write_bytes(b"half a shard")
    (part / shard_name(1)).write_bytes(b"renamed, but the manifest was never updated")
    reopened = ActivationCache.open(part)
    assert len(reopened) == 1 and reopened.n_tokens == 20 and not reopened.complete

    resumed = fill(part, ctx, batch_size=2, resume=True)
    assert resumed.complete and len(resumed) == len(full) == 3
    assert not list(part.glob(".tmp-*"))
    for i in range(3):
        assert sha256_file(part / shard_name(i)) == sha256_file(tmp_path / "full" / shard_name(i))
        assert torch.equal(resumed.shard(i)["blocks.1.resid_post"], full.shard(i)["blocks.1.resid_post"])
    assert fill(part, ctx, resume=True).n_tokens == full.n_tokens  # already complete: nothing to do


def test_non_empty_target_refused_without_resume(tmp_path):
    fill(tmp_path / "c")
    with pytest.raises(CacheError, match=r"c: folder is not empty.*resume=True.*empty folder"):
        fill(tmp_path / "c")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not an activation cache"):
        fill(tmp_path / "other", resume=True)


def test_resume_with_other_data_or_settings_refused(tmp_path):
    fill(tmp_path / "c")
    with pytest.raises(CacheError, match="cannot resume: fingerprint"):
        fill(tmp_path / "c", make_contexts(seed=1), resume=True)
    with pytest.raises(CacheError, match="cannot resume: dtype"):
        fill(tmp_path / "c", resume=True, dtype=torch.bfloat16)
    with pytest.raises(CacheError, match="cannot resume: shard_contexts"):
        fill(tmp_path / "c", resume=True, shard_contexts=5)


def test_corrupt_or_truncated_shard_is_named(tmp_path):
    fill(tmp_path / "c")
    path = tmp_path / "c" / shard_name(1)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"shard_00001\.safetensors: shard sha256"):
        ActivationCache.open(tmp_path / "c")
    with pytest.raises(CacheError, match="shard_00001"):
        fill(tmp_path / "c", resume=True)
    path.write_bytes(bytes(data[:100]))
    with pytest.raises(CacheError, match=r"shard_00001\.safetensors: shard is 100 bytes"):
        ActivationCache.open(tmp_path / "c", verify=False)


def test_iter_batches_unshuffled_is_the_rows_in_order(tmp_path):
    ctx = make_contexts()
    cache = fill(tmp_path / "c", ctx)
    want = expected_rows(FakeModel(), "blocks.1.resid_post", ctx, ctx != BOS)
    batches = list(cache.iter_batches(7, shuffle=False, drop_last=False))
    assert [len(b) for b in batches] == [7] * 7 + [1] and torch.equal(torch.cat(batches), want)
    assert len(list(cache.iter_batches(7, shuffle=False))) == cache.n_batches(7) == 7


@pytest.mark.parametrize("buffer_shards", [1, 2, 5])
def test_iter_batches_shuffles_deterministically_and_resumes_exactly(tmp_path, buffer_shards):
    cache = fill(tmp_path / "c", make_contexts(23), shard_contexts=3)
    kw = {"buffer_shards": buffer_shards, "seed": 5, "drop_last": False}
    full = list(cache.iter_batches(8, **kw))
    ids = torch.cat(full)[:, 0]
    assert sorted(ids.tolist()) == sorted(torch.cat([cache.shard(i)["blocks.1.resid_post"][:, 0]
                                                     for i in range(len(cache))]).tolist())
    assert not torch.equal(ids, ids.sort().values)
    assert all(torch.equal(a, b) for a, b in zip(full, cache.iter_batches(8, **kw), strict=True))
    assert not torch.equal(torch.cat(list(cache.iter_batches(8, **{**kw, "seed": 6})))[:, 0], ids)
    for k in (0, 1, 4, len(full) - 1, len(full), len(full) + 3):
        tail = list(cache.iter_batches(8, start_batch=k, **kw))
        assert len(tail) == max(len(full) - k, 0)
        assert all(torch.equal(a, b) for a, b in zip(tail, full[k:], strict=True))


def test_multi_site_cache_and_paired_batches(tmp_path):
    ctx = make_contexts(12)
    sites = ["blocks.0.resid_post", "blocks.1.resid_post"]
    a = fill(tmp_path / "a", ctx, FakeModel("base", seed=1), sites)
    b = fill(tmp_path / "b", ctx, FakeModel("chat", seed=2), sites)
    with pytest.raises(CacheError, match="several sites"):
        next(a.iter_batches(4))
    with pytest.raises(CacheError, match="not in this cache"):
        next(a.iter_batches(4, site="blocks.0.mlp_out"))
    pairs = list(paired_batches(a, b, 16, site_a=sites[1], site_b=sites[1], seed=3))
    assert len(pairs) == a.n_batches(16) and pairs[0].shape == (16, 2, D)
    for p, x, y in zip(pairs, a.iter_batches(16, site=sites[1], seed=3), b.iter_batches(16, site=sites[1], seed=3),
                       strict=True):
        assert torch.equal(p[:, 0, 0], p[:, 1, 0])  # same token in both halves of every row
        assert torch.equal(p[:, 0], x) and torch.equal(p[:, 1], y)
    layers = list(paired_batches(a, a, 8, site_a=sites[0], site_b=sites[1], buffer_shards=1))
    tail = list(paired_batches(a, a, 8, site_a=sites[0], site_b=sites[1], buffer_shards=1, start_batch=3))
    assert layers[0].shape == (8, 2, D) and all(torch.equal(x, y) for x, y in zip(tail, layers[3:], strict=True))


def test_reader_arguments_are_checked_before_iterating(tmp_path):
    cache = fill(tmp_path / "c")
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        cache.iter_batches(0)
    with pytest.raises(ValueError, match="start_batch"):
        cache.iter_batches(4, start_batch=-1)
    with pytest.raises(CacheError, match="not in this cache"):
        paired_batches(cache, cache, 4, site_b="blocks.0.resid_post")


def test_paired_batches_refuses_other_tokens_or_rows(tmp_path):
    a = fill(tmp_path / "a", make_contexts(12))
    other = fill(tmp_path / "o", make_contexts(12, seed=9))
    with pytest.raises(CacheError, match="differ in fingerprint"):
        next(paired_batches(a, other, 4))
    killed = functools.partial(synthetic_capture, fail_after=2)
    with pytest.raises(RuntimeError):
        fill(tmp_path / "p", make_contexts(12), capture_fn=killed)
    with pytest.raises(CacheError, match="different row counts"):
        next(paired_batches(a, ActivationCache.open(tmp_path / "p"), 4))
    wide = fill(tmp_path / "w", make_contexts(12), sites="blocks.1.mlp_post")
    with pytest.raises(ShapeMismatchError, match="width"):
        next(paired_batches(a, wide, 4))


def test_capture_with_wrong_width_is_refused(tmp_path):
    def bad(model, contexts, sites, **kw):
        yield 0, {Site.parse(sites[0]).name: torch.zeros(2, CTX, D + 1)}

    with pytest.raises(ShapeMismatchError, match=r"expected \(batch, 6, 5\)"):
        fill(tmp_path / "c", capture_fn=bad)


def test_cache_config_checks():
    ok = {"model": "m", "sites": ["blocks.0.resid_post"], "d": [4], "ctx_len": 8, "n_contexts": 10,
          "fingerprint": "a" * 64}
    cfg = CacheConfig.from_dict(ok)
    assert cfg.sites == ("blocks.0.resid_post",) and cfg.n_shards == 1 and CacheConfig.from_dict(cfg.to_dict()) == cfg
    for bad, msg in [({"d": [4, 4]}, "one width per site"), ({"dtype": "int8"}, "dtype must be"),
                     ({"fingerprint": "xyz"}, "sha256"), ({"shard_contexts": 0}, "shard_contexts")]:
        with pytest.raises(ValueError, match=msg):
            CacheConfig.from_dict({**ok, **bad})
    with pytest.raises(ValueError, match="unknown CacheConfig key"):
        CacheConfig.from_dict({**ok, "shardcontexts": 3})


def test_fill_from_tiny_gemma2_matches_direct_capture(tmp_path, tiny):
    texts = ["The quick brown fox jumps over the lazy dog. " * 4, "Water boils at a temperature of 100 degrees."]
    ctx = token_contexts(tiny.tokenizer, texts, 8, n_contexts=5)
    site = "blocks.1.resid_post"
    cache = fill_cache(tiny, site, ctx, tmp_path / "c", batch_size=2, shard_contexts=2, progress=False)
    direct = torch.cat([acts[site] for _, acts in iter_capture(tiny, ctx, [site], batch_size=5, progress=False)])
    got = torch.cat([cache.shard(i)[site] for i in range(len(cache))])
    assert cache.cfg.model == tiny.name and cache.d == tiny.d_model and len(cache) == 3
    torch.testing.assert_close(got, direct[ctx != tiny.tokenizer.bos_token_id], rtol=1e-5, atol=1e-6)
    positions = torch.cat([cache.token_positions(i) for i in range(len(cache))])
    assert torch.equal(positions, (ctx != tiny.tokenizer.bos_token_id).nonzero())
