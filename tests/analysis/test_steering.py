"""SteeringSpec on the tiny Gemma-2: each method against its definition, one SAE pass, positions, BOS, code."""

import pytest
import torch

from toolkit.analysis.steering import LatentSteer, SteeringSpec, VectorSteer
from toolkit.config import SAEConfig
from toolkit.sae import SAE
from toolkit.sae.splice import sae_splice
from toolkit.tracing import Add, generate, run_with_edits

SITE = "blocks.0.resid_post"
SITE1 = "blocks.1.resid_pre"
PROMPT = "The cat sat on the mat"


@pytest.fixture(scope="module")
def sae():
    return SAE.from_config(SAEConfig(d_in=64, d_sae=128, architecture="topk", k=8, site=SITE), seed=0)


@pytest.fixture(scope="module")
def sae1():
    return SAE.from_config(SAEConfig(d_in=64, d_sae=96, architecture="topk", k=8, site=SITE1), seed=1)


def _cap(model, edits, site=SITE, prompt=PROMPT):
    logits, c = run_with_edits(model, prompt, edits, capture=[site])
    return logits, c[site][0]


def _codes_edit(sae, fn):
    def edit(codes):
        codes = codes.clone()
        fn(codes)
        return codes
    return edit


def test_clamp_equals_encode_set_decode_with_error_kept(tiny, sae):
    spec = SteeringSpec([LatentSteer(sae, 7, "clamp", 2.5, unit=2.0)])
    ref = sae_splice(sae, tiny, keep_error=True, edit_codes=_codes_edit(sae, lambda c: c[..., 7].fill_(5.0)))
    got, x = _cap(tiny, spec.edits(tiny))
    want, y = _cap(tiny, [ref])
    torch.testing.assert_close(x, y)
    torch.testing.assert_close(got, want)
    base, x0 = _cap(tiny, [])
    assert torch.equal(x[0], x0[0]), "BOS is never steered"
    assert (got - base).abs().max() > 1e-4


def test_scale_and_ablate_and_add(tiny, sae):
    for method, strength, fn in [("scale", -1.5, lambda c: c[..., 3].mul_(-1.5)), ("ablate", 9.0, lambda c: c[..., 3].zero_())]:
        _, x = _cap(tiny, SteeringSpec([LatentSteer(sae, 3, method, strength)]).edits(tiny))
        _, y = _cap(tiny, [sae_splice(sae, tiny, keep_error=True, edit_codes=_codes_edit(sae, fn))])
        torch.testing.assert_close(x, y)
    _, x = _cap(tiny, SteeringSpec([LatentSteer(sae, 3, "add", 0.5, unit=4.0)]).edits(tiny))
    _, y = _cap(tiny, [Add(SITE, 2.0 * sae.W_dec[3].detach(), skip_bos=True)])
    torch.testing.assert_close(x, y)


def test_one_sae_pass_per_site_for_several_latents(tiny, sae, monkeypatch):
    calls = []
    orig = SAE.encode
    monkeypatch.setattr(SAE, "encode", lambda self, x: calls.append(1) or orig(self, x))
    spec = SteeringSpec([LatentSteer(sae, 1, "clamp", 3.0), LatentSteer(sae, 2, "scale", 2.0),
                         LatentSteer(sae, 5, "ablate"), LatentSteer(sae, 9, "add", 1.0)])
    _, x = _cap(tiny, spec.edits(tiny))
    assert len(calls) == 1

    def fn(c):
        c[..., 1] = 3.0
        c[..., 2] *= 2.0
        c[..., 5] = 0.0
        c[..., 9] += 1.0  # add = the latent's decoder row at that activation, i.e. the code raised by 1
    calls.clear()
    _, y = _cap(tiny, [sae_splice(sae, tiny, keep_error=True, edit_codes=_codes_edit(sae, fn))])
    torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_vector_methods(tiny):
    v = torch.randn(64)
    d = v / v.norm()
    _, x0 = _cap(tiny, [])
    _, x = _cap(tiny, SteeringSpec([VectorSteer(v, SITE, "add", 0.5, unit=10.0)]).edits(tiny))
    torch.testing.assert_close(x[1:], x0[1:] + 5.0 * d)
    _, x = _cap(tiny, SteeringSpec([VectorSteer(v, SITE, "add", 2.0)]).edits(tiny))
    torch.testing.assert_close(x[1:], x0[1:] + 2.0 * v)  # default unit |v|: strength 1 adds v itself
    _, x = _cap(tiny, SteeringSpec([VectorSteer(v, SITE, "project_out", 1.0)]).edits(tiny))
    assert (x[1:] @ d).abs().max() < 1e-4 and torch.equal(x[0], x0[0])
    _, x = _cap(tiny, SteeringSpec([VectorSteer(v, SITE, "cap", 0.1, unit=1.0)]).edits(tiny))
    p0, p = x0[1:] @ d, x[1:] @ d
    torch.testing.assert_close(p, p0.clamp(max=0.1))
    torch.testing.assert_close(x[1:] - p[:, None] * d, x0[1:] - p0[:, None] * d, atol=1e-5, rtol=1e-5)


def test_mixed_items_at_two_sites_in_order(tiny, sae, sae1):
    v = torch.randn(64)
    spec = SteeringSpec([VectorSteer(v, SITE1, "add", 1.0, name="v1"), LatentSteer(sae, 4, "clamp", 6.0),
                         LatentSteer(sae1, 2, "scale", 0.0), VectorSteer(v, SITE, "cap", 0.0, unit=1.0, name="cap")])
    edits = spec.edits(tiny)
    assert [e.site.name for e in edits] == [SITE, SITE1]
    logits, _ = spec.run(tiny, PROMPT)
    base, _ = run_with_edits(tiny, PROMPT)
    assert (logits - base).abs().max() > 1e-3
    assert len(spec.generate(tiny, [PROMPT, "Paris is"], max_new_tokens=4)) == 2


def test_positions(tiny):
    v = 30 * torch.randn(64)
    prompts = ["The cat sat", "Water boils at one"]
    plain = generate(tiny, prompts, max_new_tokens=6)
    gen_only = SteeringSpec([VectorSteer(v, SITE, "add", 1.0, positions="generated")])
    logits, _ = gen_only.run(tiny, PROMPT)
    torch.testing.assert_close(logits, run_with_edits(tiny, PROMPT)[0])  # one forward = the prompt pass
    out = gen_only.generate(tiny, prompts, max_new_tokens=6)
    ids = [tiny.tokenizer(o)["input_ids"] for o in out]
    ref = [tiny.tokenizer(o)["input_ids"] for o in plain]
    assert all(a[:1] == b[:1] for a, b in zip(ids, ref, strict=True))  # the first new token comes from the prompt pass
    assert out != plain
    prompt_only = SteeringSpec([VectorSteer(v, SITE, "add", 1.0, positions="prompt")])
    everywhere = SteeringSpec([VectorSteer(v, SITE, "add", 1.0)])
    assert prompt_only.generate(tiny, prompts, max_new_tokens=6) != everywhere.generate(tiny, prompts, max_new_tokens=6)


def test_with_strength_and_scaled(sae):
    spec = SteeringSpec([LatentSteer(sae, 1, "add", 1.0), VectorSteer(torch.ones(64), SITE, "add", 2.0, name="v")])
    assert [i.strength for i in spec.with_strength(0.5)] == [0.5, 0.5]
    assert [i.strength for i in spec.with_strength(3.0, "v")] == [1.0, 3.0]
    assert [i.strength for i in spec.scaled(-2.0)] == [-2.0, -4.0]
    assert spec["v"].strength == 2.0 and spec[0].latent == 1
    assert len(spec + LatentSteer(sae, 2)) == 3
    with pytest.raises(KeyError, match="no items named"):
        spec.with_strength(1.0, "nope")


def test_to_code_round_trip_gives_identical_generations(tiny, sae, sae1):
    v = torch.randn(64) * 3
    spec = SteeringSpec([LatentSteer(sae, 11, "clamp", 1.25, unit=3.3), VectorSteer(v, SITE1, "add", 0.7, name="dm"),
                         LatentSteer(sae1, 5, "scale", -1.0, positions="generated", sae_name="mlp", name="flip"),
                         VectorSteer(v, SITE, "cap", 0.3, unit=2.0, positions="prompt", name="cap")])
    prompts = ["The cat sat", "Paris is the"]
    want = spec.generate(tiny, prompts, max_new_tokens=6)
    ns = {"saes": spec.saes(), "vectors": spec.vectors()}
    exec(spec.to_code(), ns)
    assert repr(ns["spec"]) == repr(spec)
    assert ns["spec"].generate(tiny, prompts, max_new_tokens=6) == want
    ns = {"saes": spec.saes()}
    exec(spec.to_code(inline_vectors=True, prompt="The cat sat"), {**ns, "model": tiny})
    exec(spec.to_code(inline_vectors=True), ns)
    assert torch.equal(ns["spec"]["dm"].vector, spec["dm"].vector)
    assert ns["spec"].generate(tiny, prompts, max_new_tokens=6) == want
    assert eval(repr(spec), {"LatentSteer": LatentSteer, "VectorSteer": VectorSteer, "SteeringSpec": SteeringSpec,
                             "saes": spec.saes(), "vectors": spec.vectors()}).to_items() == spec.to_items()


def test_items_and_files_round_trip(tiny, sae, sae1, tmp_path):
    spec = SteeringSpec([LatentSteer(sae, 11, "clamp", 1.25, unit=3.3), VectorSteer(torch.randn(64), SITE1, "project_out", 0.5, name="po"),
                         LatentSteer(sae1, 5, "add", -1.0, positions="prompt")])
    items = spec.to_items()
    assert set(items[0]) >= {"kind", "name", "site", "strength", "min", "max", "method", "positions"}
    assert items[0]["kind"] == "latent" and items[1]["kind"] == "vector" and items[0]["min"] <= 1.25 <= items[0]["max"]
    back = SteeringSpec.from_items(items, vectors=spec.vectors(), saes=[sae, sae1])
    assert back.to_items() == items
    contract_only = [{k: d[k] for k in ("kind", "name", "site", "strength", "min", "max", "method", "positions")}
                     for d in items]
    assert SteeringSpec.from_items(contract_only, vectors=spec.vectors(), saes=[sae, sae1])[0].latent == 11
    spec.save(tmp_path / "s")
    loaded = SteeringSpec.load(tmp_path / "s", saes=spec.saes())
    assert loaded.to_items() == items and torch.equal(loaded["po"].vector, spec["po"].vector)
    torch.testing.assert_close(loaded.run(tiny, PROMPT)[0], spec.run(tiny, PROMPT)[0])
    with pytest.raises(KeyError, match="needs SAE"):
        SteeringSpec.from_items(items, vectors=spec.vectors(), saes={})
    with pytest.raises(KeyError, match="needs vector 'po'"):
        SteeringSpec.from_items(items, saes=[sae, sae1])
