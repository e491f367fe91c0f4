"""The adapters against the real analysis objects on the tiny model: FeatureExplorer.from_store over a
FeatureStore, SteeringPanel.from_spec over a SteeringSpec (copy-as-code round trip). Skipped where those
modules are not there yet (the branches meet at merge)."""

from __future__ import annotations

import contextlib
import functools
import io

import numpy as np
import pytest
import torch

from tests.widgets.conftest import page
from widgets import FeatureExplorer, SteeringPanel

SITE = "blocks.1.resid_post"


@pytest.fixture(scope="module")
def sae():
    from toolkit.config import SAEConfig
    from toolkit.sae.sae import SAE

    return SAE.from_config(SAEConfig(d_in=64, d_sae=96, architecture="topk", k=6, site=SITE), seed=0)


def test_explorer_from_a_feature_store(tiny, sae, tmp_path, sent):
    fs = pytest.importorskip("toolkit.analysis.feature_store")
    ids = torch.randint(4, len(tiny.tokenizer), (8, 16), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = tiny.bos_token_id
    settings = fs.StoreSettings(top_k=4, n_samples=5, n_quantiles=2, bins=8, window=(3, 2), lens_k=3, n_neighbours=4)
    store = fs.build_feature_store(tiny, sae, ids, tmp_path, settings=settings, batch_size=4, progress=False)
    fx = FeatureExplorer.from_store(store, text_fn=functools.partial(fs.token_latents, tiny, sae))
    assert fx.n_latents == 96 and np.array_equal(np.frombuffer(fx.density, np.float32), store.density)
    j = int(np.argmax(store.max_act))
    page(fx, {"type": "details", "id": 1, "latent": j})
    d = sent[-1][0]["data"]
    assert d["latent"] == j and len(d["top"]) == 4 and len(d["promoted"]) == 3 and len(d["neighbours"]) == 4
    page(fx, {"type": "search", "id": 2, "query": d["promoted"][0][0], "by": "token"})
    assert j in np.frombuffer(sent[-1][1][0], np.int32)
    page(fx, {"type": "text", "id": 3, "text": "hello world"})
    assert sent[-1][0]["type"] == "text" and len(sent[-1][0]["data"]["tokens"]) >= 2
    page(fx, {"type": "text", "id": 4, "text": "  "})
    assert sent[-1][0]["type"] == "error" and "EmptyInputError" in sent[-1][0]["message"]


def test_panel_from_a_steering_spec_round_trips_code(tiny, sae, sent):
    steering = pytest.importorskip("toolkit.analysis.steering")
    vec = torch.randn(64, generator=torch.Generator().manual_seed(0))
    spec = steering.SteeringSpec([steering.LatentSteer(sae, 5, "add", 0.0, unit=3.0),
                                  steering.VectorSteer(vec, SITE, "add", 0.0, name="v")])
    panel = SteeringPanel.from_spec(spec, tiny, max_new_tokens=5, prompt="The cat")
    assert [i["kind"] for i in panel.items] == ["latent", "vector"] and panel.items[0]["latent"] == 5
    panel.set_strength(1, 8.0)
    r = panel.run()
    assert r["steered"] != r["unsteered"]
    page(panel, {"type": "code", "id": 1})
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(panel.code, {"model": tiny, "saes": spec.saes(), "vectors": spec.vectors()})
    assert out.getvalue().rstrip("\n") == r["steered"]
    page(panel, {"type": "sweep", "id": 2})
    assert panel.wait(60) and len(panel.sweep_rows) == len(panel.sweep_strengths)
