"""ModelDiffExplorer in JupyterLab over the fixture diff table (4,096 latents)."""

from __future__ import annotations

import json

from tests.widgets.backends import KNOWN, DiffTableLike

TABLE = DiffTableLike(4096)


def _n_visible(dx) -> int:
    return int(dx.get_attribute("data-n-visible"))


def test_chips_brush_and_click_on_a_point(page):
    p, dx = page.page, page.page.locator(".tk-diff")
    assert _n_visible(dx) == 4096
    chips = dx.locator(".tk-class-chip")
    shown = dict(zip(chips.evaluate_all("els => els.map(e => e.dataset.class)"),
                     map(int, chips.evaluate_all("els => els.map(e => e.dataset.count)")), strict=True))
    want = {c: int((TABLE.cls == c).sum()) for c in ("base-only", "shared", "ft-only", "other")}
    assert shown == {**want, "artifact": int(TABLE.artifact.sum())}
    render_ms = float(dx.get_attribute("data-render-ms"))

    # brush over the right end of the histogram: the list keeps what Python's filter keeps
    dx.locator(".tk-plots").scroll_into_view_if_needed()
    box = dx.locator(".tk-nd-hist").bounding_box()
    y = box["y"] + box["height"] / 2
    p.mouse.move(box["x"] + box["width"] * 0.85, y)
    p.mouse.down()
    p.mouse.move(box["x"] + box["width"] * 0.93, y, steps=4)
    p.mouse.move(box["x"] + box["width"] * 0.995, y, steps=4)
    p.mouse.up()
    p.wait_for_function("() => document.querySelector('.tk-diff').dataset.nVisible !== '4096'")
    brush, n_py = json.loads(page.kernel("import json; print(json.dumps([dx.brush, len(dx.visible())]))"))
    assert 0.8 < brush[0] < brush[1] <= 1.0
    assert _n_visible(dx) == n_py == int(((TABLE.norm_diff >= brush[0]) & (TABLE.norm_diff <= brush[1])).sum())
    page.shot(dx, "model-diff-brushed")

    # click the known latent's point (isolated at nu_error 1.25, nu_recon 1.2) on the canvas
    canvas = dx.locator(".tk-scatter")
    m = {k: float(v) for k, v in canvas.evaluate("c => ({...c.dataset})").items()}
    cb = canvas.bounding_box()
    px = m["pad"] + (1.25 - m["x0"]) / (m["x1"] - m["x0"]) * (m["w"] - 2 * m["pad"])
    py = m["h"] - m["pad"] - (1.2 - m["y0"]) / (m["y1"] - m["y0"]) * (m["h"] - 2 * m["pad"])
    p.mouse.move(cb["x"] + px + 2, cb["y"] + py + 1)
    tip = dx.locator(".tk-tip")
    assert tip.is_visible() and tip.inner_text().startswith(f"#{KNOWN} ")
    p.mouse.click(cb["x"] + px + 2, cb["y"] + py + 1)
    details = dx.locator(f'.tk-diff-details[data-latent="{KNOWN}"]')
    details.wait_for()
    assert page.kernel("print(dx.selected)").strip() == str(KNOWN)
    assert details.locator(".tk-base .tk-ctx").count() == 3 and details.locator(".tk-ft .tk-ctx").count() == 3
    base = details.locator(".tk-base .tk-ctx").first.locator(".tk-tok").all_inner_texts()
    assert base == details.locator(".tk-ft .tk-ctx").first.locator(".tk-tok").all_inner_texts()
    assert details.locator(".tk-table tr").count() == 16
    select_ms = float(dx.get_attribute("data-select-ms"))
    page.shot(dx, "model-diff-known-latent")

    # chips: artifact only, within the brush
    dx.locator('.tk-class-chip[data-class="artifact"]').click()
    p.wait_for_function(f"() => document.querySelector('.tk-diff').dataset.nVisible !== '{n_py}'")
    n_art = int(page.kernel("print(len(dx.visible()))"))
    assert _n_visible(dx) == n_art == int((TABLE.artifact & (TABLE.norm_diff >= brush[0])
                                           & (TABLE.norm_diff <= brush[1])).sum())
    assert page.kernel("print(dx.classes)").strip() == "['artifact']"
    page.shot(dx, "model-diff-artifact-chip")
    dx.locator(".tk-clear").click()
    p.wait_for_function("() => document.querySelector('.tk-diff').dataset.nVisible === '4096'")
    assert page.kernel("print(dx.brush, dx.classes)").strip() == "[] []"
    print(f"\n[model diff] initial render with 4096 latents: {render_ms:.1f} ms; click → contexts: {select_ms:.1f} ms; "
          f"scatter draw {canvas.get_attribute('data-draw-ms')} ms")
