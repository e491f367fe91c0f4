"""SteeringPanel in JupyterLab over the fixture generate / sweep / to_code callbacks."""

from __future__ import annotations

import json
import time


def _py(page, expr: str):
    return json.loads(page.kernel(f"import json; print(json.dumps({expr}))"))


def _until(page, expr: str, want, timeout: float = 10.0):
    """Poll the kernel from here (a loop inside the kernel would block the widget messages it waits for)."""
    end = time.monotonic() + timeout
    while (got := _py(page, expr)) != want and time.monotonic() < end:
        time.sleep(0.1)
    return got


def test_strength_generate_cancel_sweep_and_copy_as_code(page):
    p, sp = page.page, page.page.locator(".tk-steer")
    page.kernel("panel.items = B.STEER_ITEMS; panel.result = {}")
    sp.locator('.tk-item[data-index="0"]').wait_for()

    box = sp.locator('.tk-item[data-index="0"] .tk-strength-box')
    box.fill("40")
    box.press("Tab")
    slider = sp.locator('.tk-item[data-index="1"] .tk-strength-slider')
    slider.focus()
    p.keyboard.press("ArrowRight")
    assert _until(page, "[i['strength'] for i in panel.items]", [40.0, 0.2]) == [40.0, 0.2]
    assert sp.locator('.tk-item[data-index="0"] .tk-strength-slider').input_value() == "40"

    t0 = p.evaluate("performance.now()")
    sp.locator(".tk-generate").click()
    steered = sp.locator(".tk-steered")
    steered.wait_for()
    p.wait_for_function("() => document.querySelector('.tk-steer').dataset.busy === '0'")
    gen_ms = p.evaluate("performance.now()") - t0
    result = _py(page, "panel.result")
    assert result["steered"] != result["unsteered"] and "dog40" in result["steered"]
    assert sp.get_attribute("data-differs") == "1"
    assert steered.inner_text().strip() == result["steered"]
    assert sp.locator(".tk-unsteered").inner_text().strip() == result["unsteered"]
    marked = steered.locator("mark.tk-changed").all_inner_texts()
    assert marked == ["dog40", "rug"], marked
    page.shot(sp, "steering-generated")

    # Cancel a slow callback: the page stops waiting at once and Python drops the late answer
    page.kernel("slow['delay'] = 30.0")
    sp.locator(".tk-generate").click()
    p.wait_for_function("() => document.querySelector('.tk-steer').dataset.busy === '1'")
    assert sp.locator(".tk-generate").is_disabled()
    page.shot(sp, "steering-busy")
    t0 = p.evaluate("performance.now()")
    sp.locator(".tk-cancel").click()
    p.wait_for_function("() => document.querySelector('.tk-steer').dataset.busy === '0'", timeout=5000)
    cancel_ms = p.evaluate("performance.now()") - t0
    assert _py(page, "[panel.busy, panel.status, panel.wait(5)]") == [False, "cancelled", True]
    assert _py(page, "panel.result") == result
    page.kernel("slow['delay'] = 0.0")

    sp.locator(".tk-sweep-in").fill("0, 20, 80")
    sp.locator(".tk-sweep-run").click()
    rows = sp.locator(".tk-sweep-table tbody tr")
    rows.nth(2).wait_for()
    assert rows.count() == 3 and "dog80" in rows.nth(2).inner_text()

    sp.locator(".tk-copy-code").click()
    code_box = sp.locator(".tk-code")
    code_box.wait_for()
    code = code_box.inner_text()
    assert code == _py(page, "panel.code")
    assert page.kernel(code).strip() == result["steered"]  # the copied code, run as a new cell
    page.shot(sp, "steering-sweep-and-code")
    print(f"\n[steering] Generate click → steered text shown: {gen_ms:.0f} ms; Cancel → idle: {cancel_ms:.0f} ms")
