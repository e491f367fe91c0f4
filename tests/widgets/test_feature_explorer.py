from __future__ import annotations

import numpy as np
import pytest

from tests.widgets.backends import CTX_LEN, N_TOP, VOCAB, FeatureBackend
from tests.widgets.conftest import page
from toolkit.errors import FeatureIndexError, NonFiniteError
from widgets import FeatureExplorer, PayloadError, SteeringPanel


@pytest.fixture
def store():
    return FeatureBackend(2048)


def test_traits_and_repr(store):
    fx = FeatureExplorer.from_store(store, text_fn=store.text_fn, title="demo")
    assert fx.n_latents == 2048 and fx.selected == -1 and fx.title == "demo"
    assert fx.has_search and fx.has_text and not fx.can_steer
    assert np.array_equal(np.frombuffer(fx.density, np.float32), store.density)
    assert fx.labels[:2] == ["apple", "river"]
    assert fx.trait_metadata("selected", "sync") and fx.trait_metadata("density", "sync")
    assert repr(fx) == "FeatureExplorer(2048 latents, selected=-1)"
    fx.select(17)
    assert fx.selected == 17 and repr(fx) == "FeatureExplorer(2048 latents, selected=17)"
    fx.selected = -1


def test_bad_inputs_rejected_before_sync(store):
    d = store.density.copy()
    d[3] = np.nan
    with pytest.raises(NonFiniteError, match="density has 1 NaN/inf values"):
        FeatureExplorer(d, store.max_act, store.latent_details)
    with pytest.raises(PayloadError, match=r"firing fraction in \[0, 1\]"):
        FeatureExplorer(store.density * 3, store.max_act, store.latent_details)
    with pytest.raises(PayloadError, match="max_act has 10 values but there are 2048"):
        FeatureExplorer(store.density, store.max_act[:10], store.latent_details)
    with pytest.raises(PayloadError, match="labels has 1 entries"):
        FeatureExplorer(store.density, store.max_act, store.latent_details, labels=["x"])
    with pytest.raises(TypeError, match="search must be callable"):
        FeatureExplorer(store.density, store.max_act, store.latent_details, search=3)
    with pytest.raises(TypeError, match="object has no 'density'"):
        FeatureExplorer.from_store(object())
    fx = FeatureExplorer.from_store(store)
    with pytest.raises(FeatureIndexError, match=r"selected must be an integer in 0\.\.2047"):
        fx.selected = 2048


def test_details_answer_uses_buffers(store, sent):
    fx = FeatureExplorer.from_store(store)
    page(fx, {"type": "details", "id": 1, "latent": 42})
    content, bufs = sent[-1]
    assert content["type"] == "details" and content["id"] == 1
    d = content["data"]
    assert d["latent"] == 42 and len(d["top"]) == N_TOP and len(d["top"][0]["tokens"]) == CTX_LEN
    ref = d["top"][0]["acts"]
    acts = np.frombuffer(bufs[ref["$buf"]], np.float32)
    assert ref["dtype"] == "f4" and int(np.argmax(acts)) == 42 % CTX_LEN
    counts = np.frombuffer(bufs[d["hist"]["counts"]["$buf"]], np.int32)
    assert counts.tolist() == [(42 + b) % 9 + (5 if b == 2 else 0) for b in range(12)]
    assert d["promoted"][0] == [f" {VOCAB[42 % 11]}0", 3.0] and d["neighbours"][0] == [43, 0.9]
    assert store.calls == [42]


def test_details_errors_reach_the_page(store, sent):
    def bad(i):
        return {"top": [{"tokens": ["a", "b"], "acts": [1.0]}]}

    fx = FeatureExplorer(store.density, store.max_act, bad)
    page(fx, {"type": "details", "id": 2, "latent": 1})
    assert sent[-1][0]["type"] == "error" and "2 tokens but acts has shape (1,)" in sent[-1][0]["message"]
    fx = FeatureExplorer(store.density, store.max_act, lambda i: {"max_act": float("nan")})
    page(fx, {"type": "details", "id": 3, "latent": 1})
    assert sent[-1][0]["type"] == "error" and "NonFiniteError" in sent[-1][0]["message"]
    page(fx, {"type": "details", "id": 4, "latent": 99999})
    assert "FeatureIndexError" in sent[-1][0]["message"]


def test_search_and_text(store, sent):
    fx = FeatureExplorer.from_store(store, text_fn=store.text_fn)
    page(fx, {"type": "search", "id": 5, "query": "forest", "by": "token"})
    content, bufs = sent[-1]
    hits = np.frombuffer(bufs[content["data"]["latents"]["$buf"]], np.int32)
    assert hits.tolist() == [i for i in range(2048) if i % 11 == 10]
    page(fx, {"type": "search", "id": 6, "query": "apple", "by": "context"})
    hits = np.frombuffer(sent[-1][1][0], np.int32)
    assert 0 < len(hits) < 2048 and np.array_equal(hits, store.search("apple", "context"))
    page(fx, {"type": "search", "id": 7, "query": "x", "by": "label"})
    assert sent[-1][0]["type"] == "error" and "search by must be one of" in sent[-1][0]["message"]
    page(fx, {"type": "text", "id": 8, "text": "hello big world"})
    content, bufs = sent[-1]
    assert content["data"]["tokens"] == ["hello", " big", " world"]
    assert np.frombuffer(bufs[content["data"]["latents"][0]["ids"]["$buf"]], np.int32)[0] == (5 * 977) % 2048


def test_steer_hands_latent_to_linked_panel(store, sent):
    from tests.widgets.backends import fake_generate

    fx = FeatureExplorer.from_store(store)
    page(fx, {"type": "steer", "id": 9, "latent": 3})
    assert "no steering panel linked" in sent[-1][0]["message"]
    panel = SteeringPanel([], fake_generate)
    fx.link_steering(panel, site="blocks.6.resid_post", strength=1.5, sae="sae6")
    assert fx.can_steer
    page(fx, {"type": "steer", "id": 10, "latent": 3})
    assert sent[-1][0]["data"] == {"latent": 3, "items": 1}
    assert panel.items == [{"kind": "latent", "name": "blocks.6.resid_post/3", "site": "blocks.6.resid_post",
                            "method": "add", "positions": "all", "strength": 1.5, "min": -2.0, "max": 2.0,
                            "latent": 3, "sae": "sae6"}]


def test_selected_from_page_reaches_python(store):
    fx = FeatureExplorer.from_store(store)
    fx.set_state({"selected": 99})  # what a click in the page sends
    assert fx.selected == 99
