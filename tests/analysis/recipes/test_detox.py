import pytest

from toolkit.analysis.recipes.detox import (
    contrast_latents,
    detox_data,
    detox_table,
    latent_tokens,
    unwanted_rate,
)
from toolkit.analysis.recipes.latent_edit import LatentEdit
from toolkit.errors import ArgumentError, EmptyInputError, FeatureIndexError

A = ["you stupid idiot", "damn this crap"]
B = ["thank you kindly", "please have a seat"]


def test_unwanted_rate():
    assert unwanted_rate(["You IDIOT!", "fine day", "idiotic"], ["idiot"]) == pytest.approx(1 / 3)
    with pytest.raises(EmptyInputError):
        unwanted_rate(["x"], [])
    with pytest.raises(EmptyInputError):
        unwanted_rate([], ["x"])


def test_contrast_latents_and_tokens(tiny, tiny_sae):
    lat = contrast_latents(tiny, tiny_sae, A, B, k=3)
    assert len(lat) == 3 and all(0 <= i < 48 for i in lat)
    toks = latent_tokens(tiny, tiny_sae, lat[0], A + B, k=4)
    assert len(toks) <= 4 and all(v > 0 for _, v in toks)
    assert [v for _, v in toks] == sorted((v for _, v in toks), reverse=True)
    with pytest.raises(ArgumentError):
        contrast_latents(tiny, tiny_sae, A, B, k=0)
    with pytest.raises(EmptyInputError):
        contrast_latents(tiny, tiny_sae, [], B)
    with pytest.raises(FeatureIndexError):
        latent_tokens(tiny, tiny_sae, 48, A)


def test_table_on_tiny(tiny, tiny_sae):
    e = LatentEdit(tiny_sae.cfg.site, sae=tiny_sae, latents=[1, 2], mode="subtract", value=50.0)
    t = detox_table(tiny, ["he shouted:", "she said:"], {"none": [], "subtract": [e]}, ["idiot"], max_new_tokens=4)
    assert t["condition"] == ["none", "subtract"] and all(0 <= u <= 1 for u in t["unwanted"])
    with pytest.raises(EmptyInputError):
        detox_table(tiny, ["x"], {}, ["idiot"])


def test_written_data():
    d = detox_data()
    assert len(d["hostile"]) == len(d["polite"]) == 16 and len(d["prompts"]) == 16 and d["lexicon"]
