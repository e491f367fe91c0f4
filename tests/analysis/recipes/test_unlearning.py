import numpy as np
import pytest
import torch

from toolkit.analysis.recipes.latent_edit import LatentEdit
from toolkit.analysis.recipes.unlearning import (
    added_loss,
    choose_latents,
    cloze_correct,
    latent_frequencies,
    negative_clamp,
    unlearning_data,
    unlearning_table,
)
from toolkit.errors import (
    ArgumentError,
    EmptyInputError,
    FeatureIndexError,
    NonFiniteError,
    ShapeMismatchError,
)
from toolkit.tracing import run_with_edits

ITEMS = [{"prompt": "the cat sat on the", "right": " mat", "wrong": " moon"},
         {"prompt": "a dog ran in the", "right": " park", "wrong": " sea"}]


def test_latent_edit_modes(tiny, tiny_sae):
    site = tiny_sae.cfg.site
    text = ["the cat sat on the mat today"]
    _, base = run_with_edits(tiny, text, capture=[site])
    x = base[site][0, 1:]  # BOS is left untouched by the edit
    codes = tiny_sae.encode(x)
    lat = int((codes > 0).sum(0).argmax())
    rows = tiny_sae.W_dec[lat] / tiny_sae.input_scale
    for mode, value, new in (("zero", 0.0, torch.zeros_like(codes[:, lat])),
                             ("negative", 2.0, torch.where(codes[:, lat] > 0, -2.0, codes[:, lat])),
                             ("scale", 3.0, 3 * codes[:, lat])):
        _, out = run_with_edits(tiny, text, [LatentEdit(site, sae=tiny_sae, latents=[lat], mode=mode, value=value)],
                                capture=[site])
        want = x + (new - codes[:, lat])[:, None] * rows
        assert torch.allclose(out[site][0, 1:], want, atol=1e-4), mode
        assert torch.equal(out[site][0, 0], base[site][0, 0])
    _, out = run_with_edits(tiny, text, [LatentEdit(site, sae=tiny_sae, latents=[lat], mode="subtract", value=1.5)],
                            capture=[site])
    assert torch.allclose(out[site][0, 1:], x - 1.5 * rows, atol=1e-4)


def test_latent_edit_bad_input(tiny_sae):
    site = tiny_sae.cfg.site
    with pytest.raises(EmptyInputError):
        LatentEdit(site, sae=tiny_sae, latents=[])
    with pytest.raises(FeatureIndexError):
        LatentEdit(site, sae=tiny_sae, latents=[48])
    with pytest.raises(FeatureIndexError):
        LatentEdit(site, sae=tiny_sae, latents=[-1])
    with pytest.raises(ArgumentError, match="mode"):
        LatentEdit(site, sae=tiny_sae, latents=[1], mode="flip")
    with pytest.raises(NonFiniteError):
        LatentEdit(site, sae=tiny_sae, latents=[1], value=float("inf"))


def test_choose_latents():
    f = np.array([0.5, 0.3, 0.02, 0.4, 0.0])
    r = np.array([0.0, 0.005, 0.0, 0.2, 0.0])
    assert choose_latents(f, r, k=5) == [0, 2, 1]  # ratios 5000, 200, 59; latent 3 fires on retain text
    assert choose_latents(f, r, k=1) == [0]
    with pytest.raises(EmptyInputError, match="relax"):
        choose_latents(f, r, min_forget=0.9)
    with pytest.raises(ShapeMismatchError):
        choose_latents(f, r[:3])
    with pytest.raises(NonFiniteError):
        choose_latents(np.r_[np.nan, f[1:]], r)
    with pytest.raises(ArgumentError):
        choose_latents(f, r, k=0)


def test_cloze_loss_and_table_on_tiny(tiny, tiny_sae):
    ok = cloze_correct(tiny, ITEMS)
    assert ok.shape == (2,) and set(ok.tolist()) <= {0, 1}
    freq = latent_frequencies(tiny, tiny_sae, ["the cat sat on the mat"])
    assert freq.shape == (48,) and ((0 <= freq) & (freq <= 1)).all()
    edit = negative_clamp(tiny_sae, [int(freq.argmax())], 5.0)
    assert added_loss(tiny, ["the cat sat on the mat"], []) == pytest.approx(0.0, abs=1e-6)
    assert added_loss(tiny, ["the cat sat on the mat"], [edit]) != 0.0
    t = unlearning_table(tiny, tiny_sae, {"a": ITEMS}, {"none": [], "clamp": [edit]}, ["the cat sat"])
    assert t["condition"] == ["none", "clamp"] and t.rows[0]["added_loss"] == 0.0
    with pytest.raises(EmptyInputError):
        cloze_correct(tiny, [])
    with pytest.raises(ArgumentError):
        cloze_correct(tiny, [{"prompt": "x", "right": "", "wrong": " y"}])
    with pytest.raises(EmptyInputError):
        added_loss(tiny, [], [edit])


def test_written_data():
    d = unlearning_data()
    assert all(len(v) == 30 for v in d["items"].values()) and d["forget"] in d["items"]
