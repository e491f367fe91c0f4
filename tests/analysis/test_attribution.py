"""Attribution patching matches the true effect of ablating latents to first order."""

import pytest

from toolkit.analysis.attribution import attribute, logit_diff, logprob
from toolkit.config import SAEConfig
from toolkit.errors import EmptyInputError
from toolkit.sae import SAE
from toolkit.sae.splice import run_with_sae
from toolkit.tracing import Splice, run_with_edits

SITE = "blocks.0.resid_post"
PROMPT = "The cat sat on the mat"


@pytest.fixture(scope="module")
def sae():
    return SAE.from_config(SAEConfig(d_in=64, d_sae=128, architecture="topk", k=8, site=SITE), seed=0)


def _metric_with(tiny, sae, metric, fn=None):
    def edit(c):
        c = c.clone()
        fn(c)
        return c
    logits = run_with_sae(tiny, PROMPT, sae, keep_error=True, edit_codes=edit if fn else None)
    return float(metric(logits[0]))


def test_forward_is_unchanged_and_matches_ablation_to_first_order(tiny, sae):
    metric = logprob(tiny, 5)
    a = attribute(tiny, PROMPT, metric, saes=sae)
    clean = float(metric(run_with_edits(tiny, PROMPT)[0][0]))
    assert a.metric == pytest.approx(clean, abs=1e-5)
    per_latent = a.latents[SITE].sum(0)
    top = per_latent.abs().topk(5).indices.tolist()
    base = _metric_with(tiny, sae, metric)
    eps = 1e-2  # shrink the latent by 1 %: the change is -eps * attribution to first order
    for lat in top:
        small = (_metric_with(tiny, sae, metric, lambda c, lat=lat: c[..., lat].mul_(1 - eps)) - base) / eps
        assert small == pytest.approx(-float(per_latent[lat]), rel=0.02, abs=1e-6)
        full = _metric_with(tiny, sae, metric, lambda c, lat=lat: c[..., lat].zero_()) - base
        assert full == pytest.approx(-float(per_latent[lat]), rel=0.25)  # whole ablation: same sign and size
    # per position: ablating the latent at one token only
    pos, lat = divmod(int(a.latents[SITE].abs().flatten().argmax()), 128)
    one = _metric_with(tiny, sae, metric, lambda c: c[..., pos, lat].zero_()) - base
    assert one == pytest.approx(-float(a.latents[SITE][pos, lat]), rel=0.25)
    assert a.latents[SITE][0].abs().max() == 0, "BOS is not spliced, so it gets no attribution"


def test_site_attribution_is_gradient_times_activation(tiny):
    metric = logit_diff(tiny, 5, 7)
    a = attribute(tiny, PROMPT, metric, sites=["blocks.1.mlp_out"])
    attr = a.sites["blocks.1.mlp_out"]
    base = float(metric(run_with_edits(tiny, PROMPT)[0][0]))
    last = attr.shape[0] - 1
    eps = 1e-2
    shrunk, _ = run_with_edits(tiny, PROMPT, [Splice("blocks.1.mlp_out", lambda x: x * (1 - eps), positions=[last])])
    assert (float(metric(shrunk[0])) - base) / eps == pytest.approx(-float(attr[last]), rel=0.02, abs=1e-6)
    table = a.positions()
    assert len(table) == attr.shape[0] and table["token"][0] == "<bos>"


def test_top_table_and_several_saes(tiny, sae):
    sae1 = SAE.from_config(SAEConfig(d_in=64, d_sae=32, architecture="topk", k=4, site="blocks.1.mlp_out"), seed=2)
    a = attribute(tiny, PROMPT, logprob(tiny, 5), saes=[sae, sae1], sites=SITE)
    assert set(a.latents) == {SITE, "blocks.1.mlp_out"} and set(a.sites) == {SITE}
    t = a.top(6)
    assert len(t) == 6 and t.columns == ["site", "position", "token", "latent", "activation", "attribution"]
    vals = [abs(v) for v in t["attribution"]]
    assert vals == sorted(vals, reverse=True)
    assert len(a.top(3, by_position=False)) == 3


def test_works_with_gradients_off_globally(tiny, sae):
    import torch

    with torch.no_grad():
        a = attribute(tiny, PROMPT, logprob(tiny, 5), saes=sae)
    assert a.latents[SITE].abs().max() > 0


def test_errors(tiny, sae):
    with pytest.raises(EmptyInputError, match="at least one SAE"):
        attribute(tiny, PROMPT, logprob(tiny, 5))
    with pytest.raises(ValueError, match="one prompt at a time"):
        attribute(tiny, ["a cat", "a dog"], logprob(tiny, 5), saes=sae)
    with pytest.raises(ValueError, match="exactly one token"):
        logprob(tiny, "The cat sat")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        logprob(tiny, 10**6)
    with pytest.raises(ValueError, match="scalar"):
        attribute(tiny, PROMPT, lambda logits: logits[-1], saes=sae)
    with pytest.raises(ValueError, match="one SAE per site"):
        attribute(tiny, PROMPT, logprob(tiny, 5), saes=[sae, sae])
