"""The widgets follow JupyterLab's theme (their colours come from --jp-* variables): switch to the dark theme."""

from __future__ import annotations


def _luminance(rgb: str) -> float:
    r, g, b = (int(v) for v in rgb[rgb.index("(") + 1:rgb.index(")")].split(",")[:3])
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255


def test_dark_theme(page):
    p = page.page
    light = [_luminance(c) for c in p.locator(".tk-root").evaluate_all(
        "els => els.map(e => getComputedStyle(e).backgroundColor)")]
    p.evaluate("() => window.jupyterapp.commands.execute('apputils:change-theme', {theme: 'JupyterLab Dark'})")
    try:
        p.wait_for_function("() => document.body.dataset.jpThemeLight === 'false'", timeout=30_000)
        p.wait_for_timeout(500)  # the theme's stylesheet applies
        roots = p.locator(".tk-root")
        dark = [_luminance(c) for c in roots.evaluate_all("els => els.map(e => getComputedStyle(e).backgroundColor)")]
        text = [_luminance(c) for c in roots.evaluate_all("els => els.map(e => getComputedStyle(e).color)")]
        assert len(dark) == 3 and all(v > 0.8 for v in light) and all(v < 0.3 for v in dark), (light, dark)
        assert all(t > 0.6 for t in text), text
        for name, sel in (("feature-explorer", ".tk-fx"), ("model-diff", ".tk-diff"), ("steering", ".tk-steer")):
            page.shot(p.locator(sel), f"dark-{name}")
    finally:
        p.evaluate("() => window.jupyterapp.commands.execute('apputils:change-theme', {theme: 'JupyterLab Light'})")
        p.wait_for_function("() => document.body.dataset.jpThemeLight === 'true'", timeout=30_000)
