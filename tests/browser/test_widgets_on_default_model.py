"""End to end on the default model (Gemma 3 270M, offline): SteeringPanel.from_spec over a SteeringSpec with a
DiffMean vector at layer 6, driven from the browser: Generate runs real steered generation; the copied
SteeringSpec code, run as a new cell, reproduces the steered text."""

from __future__ import annotations

import json

import pytest

from tests.browser.conftest import check_clean, close, open_notebook

CELLS = [
    """\
    import torch
    from toolkit.analysis.steering import SteeringSpec, VectorSteer, diffmean, site_unit
    from toolkit.models import load_model
    from widgets import SteeringPanel

    torch.set_grad_enabled(False)
    model = load_model("default")
    SITE = "blocks.6.resid_post"
    JOY = ["I love this. It is wonderful, great and beautiful.", "What a delightful, happy and lovely day."]
    GLOOM = ["I hate this. It is terrible, awful and ugly.", "What a miserable, sad and horrible day."]
    spec = SteeringSpec([VectorSteer(diffmean(model, SITE, JOY, GLOOM), SITE, "add", 0.0,
                                     unit=site_unit(model, SITE, JOY + GLOOM), name="joy-minus-gloom")])
    saes, vectors = spec.saes(), spec.vectors()   # the names copied code refers to
    panel = SteeringPanel.from_spec(spec, model, max_new_tokens=6, prompt="The movie was")
    """,
    "panel",
]


@pytest.mark.slow
def test_steering_panel_on_the_default_model(browser, lab):
    p = open_notebook(browser, lab, "default_model.ipynb", CELLS, '.tk-steer[data-ready="1"]', timeout_ms=600_000)
    try:
        sp = p.page.locator(".tk-steer")
        box = sp.locator('.tk-item[data-index="0"] .tk-strength-box')
        box.fill("0.5")
        box.press("Tab")
        t0 = p.page.evaluate("performance.now()")
        sp.locator(".tk-generate").click()
        p.page.wait_for_function("() => document.querySelector('.tk-steer').dataset.busy === '1'")
        p.page.wait_for_function("() => document.querySelector('.tk-steer').dataset.busy === '0'", timeout=300_000)
        gen_s = (p.page.evaluate("performance.now()") - t0) / 1000
        assert not sp.locator(".tk-err-box .tk-error").count(), sp.locator(".tk-err-box").inner_text()
        result = json.loads(p.kernel("import json; print(json.dumps([panel.items[0]['strength'], panel.result]))"))
        assert result[0] == 0.5
        steered, unsteered = result[1]["steered"], result[1]["unsteered"]
        assert steered != unsteered
        assert sp.locator(".tk-steered").inner_text().strip() == steered.strip()
        assert sp.locator(".tk-steered mark.tk-changed").count() > 0
        p.shot(sp, "default-model-steering")
        sp.locator(".tk-copy-code").click()
        code = sp.locator(".tk-code")
        code.wait_for()
        assert p.kernel(code.inner_text(), timeout=300).rstrip("\n") == steered
        print(f"\n[default model] notebook open (model load + vector): {p.open_s:.1f} s; Generate (2 × 6 tokens) "
              f"in the page: {gen_s:.1f} s; unsteered {unsteered!r} vs steered {steered!r}")
        check_clean(p)
    finally:
        close(p)
