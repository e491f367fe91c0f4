"""FeatureExplorer in JupyterLab over the fixture backend (65,536 latents)."""

from __future__ import annotations

import statistics

from tests.widgets.backends import CTX_LEN, N_TOP, VOCAB, FeatureBackend

N = 65_536
STORE = FeatureBackend(N)


def _wait_visible(page, n: int) -> None:
    page.page.wait_for_function("n => document.querySelector('.tk-fx').dataset.nVisible === String(n)", arg=n)


def test_list_is_virtual_scrolls_to_the_end_and_searches(page):
    p, fx = page.page, page.page.locator(".tk-fx")
    render_ms = float(fx.get_attribute("data-render-ms"))
    rows = fx.locator(".tk-vlist .tk-row")
    assert fx.get_attribute("data-n-visible") == str(N)
    assert 0 < rows.count() <= 60, rows.count()
    page.shot(fx, "feature-explorer-initial")

    scroll_ms = p.evaluate("""async () => {
        const root = document.querySelector('.tk-fx'), list = root.querySelector('.tk-vlist');
        const frame = () => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
        const out = [];
        for (let k = 1; k <= 30; k++) { list.scrollTop = k * 50000; await frame(); out.push(Number(root.dataset.scrollMs)); }
        list.scrollTop = list.scrollHeight; await frame();
        return out; }""")
    last = fx.locator(f'.tk-row[data-latent="{N - 1}"]')
    last.wait_for()
    assert last.is_visible() and rows.count() <= 60
    page.shot(fx, "feature-explorer-scrolled-to-end")

    # the global density histogram: one bar per bin, each carrying its count; together the alive latents
    bars = fx.locator(".tk-density-hist .tk-bar")
    counts = [int(c) for c in bars.evaluate_all("els => els.map(e => e.dataset.count)")]
    assert len(counts) == 24 and sum(counts) == int((STORE.density > 0).sum())
    assert all(lab.endswith(f": {c}") for lab, c in zip(bars.evaluate_all("els => els.map(e => e.getAttribute('aria-label'))"), counts, strict=True))

    search = fx.locator(".tk-search")
    search.fill("123")
    _wait_visible(page, sum(str(i).startswith("123") for i in range(N)))
    assert fx.locator(".tk-row").first.get_attribute("data-latent") == "123"
    fx.locator(".tk-search-by").select_option("token")
    _wait_visible(page, len(STORE.search("123", "token")))  # no label contains digits: nothing
    search.fill("forest")
    search.press("Enter")
    _wait_visible(page, len(STORE.search("forest", "token")))
    assert {int(x) for x in fx.locator(".tk-row").evaluate_all("els => els.map(e => e.dataset.latent)")} <= \
        set(STORE.search("forest", "token").tolist())
    fx.locator(".tk-search-by").select_option("context")
    search.fill("apple")
    search.press("Enter")
    _wait_visible(page, len(STORE.search("apple", "context")))
    fx.locator(".tk-filter").select_option("dead")
    dead = STORE.search("apple", "context")
    _wait_visible(page, int((STORE.density[dead] == 0).sum()))
    page.shot(fx, "feature-explorer-search-context-apple-dead")
    fx.locator(".tk-filter").select_option("all")
    fx.locator(".tk-search-by").select_option("index")
    search.fill("")
    search.press("Enter")
    _wait_visible(page, N)
    print(f"\n[feature explorer] initial render with {N} latents: {render_ms:.1f} ms; scroll update median "
          f"{statistics.median(scroll_ms):.2f} ms, max {max(scroll_ms):.2f} ms over {len(scroll_ms)} jumps")
    assert render_ms < 3000 and statistics.median(scroll_ms) < 50


def test_click_shows_contexts_and_selected_syncs_both_ways(page):
    p, fx = page.page, page.page.locator(".tk-fx")
    fx.locator(".tk-search").fill("1234")
    fx.locator(".tk-search").press("Enter")
    fx.locator('.tk-row[data-latent="1234"]').click()
    details = fx.locator('.tk-fx-details[data-latent="1234"]')
    details.wait_for()
    select_ms = float(fx.get_attribute("data-select-ms"))
    assert page.kernel("print(fx.selected)").strip() == "1234"

    ctxs = details.locator(".tk-top .tk-ctx")
    assert ctxs.count() == N_TOP
    for k in range(N_TOP):
        spans = ctxs.nth(k).locator(".tk-tok")
        assert spans.count() == CTX_LEN
        alphas = [float(a) for a in spans.evaluate_all("els => els.map(e => e.dataset.alpha)")]
        assert alphas.index(max(alphas)) == (1234 + k) % CTX_LEN
        assert alphas.count(max(alphas)) == 1
    peak = ctxs.nth(0).locator(".tk-tok").nth(1234 % CTX_LEN)
    assert peak.get_attribute("title").endswith(": 6")  # 2 + 1234 % 10; the value shows on hover
    assert details.locator(".tk-act-hist .tk-bar").count() == 12
    assert details.locator(".tk-act-hist .tk-bar").nth(2).get_attribute("data-count") == str((1234 + 2) % 9 + 5)
    promoted = details.locator(".tk-promoted tr .tk-tokcell").all_inner_texts()
    assert len(promoted) == 10 and promoted[0] == f" {VOCAB[1234 % 11]}0"
    assert details.locator(".tk-suppressed tr").count() == 10
    page.shot(fx, "feature-explorer-latent-1234")

    details.locator('.tk-neighbours .tk-chip[data-latent="1334"]').click()  # neighbour (i + 100)
    fx.locator('.tk-fx-details[data-latent="1334"]').wait_for()
    assert page.kernel("print(fx.selected)").strip() == "1334"

    fx.locator(".tk-search").fill("")
    fx.locator(".tk-search").press("Enter")
    _wait_visible(page, N)
    t0 = p.evaluate("performance.now()")
    page.kernel("fx.selected = 40000")
    fx.locator('.tk-fx-details[data-latent="40000"]').wait_for()
    row = fx.locator('.tk-row[data-latent="40000"]')
    assert row.is_visible() and "tk-sel" in row.get_attribute("class")
    py_ms = p.evaluate("performance.now()") - t0

    fx.locator(".tk-vlist").focus()
    p.keyboard.press("j")
    fx.locator('.tk-fx-details[data-latent="40001"]').wait_for()
    p.keyboard.press("ArrowDown")
    fx.locator('.tk-fx-details[data-latent="40002"]').wait_for()
    p.keyboard.press("k")
    fx.locator('.tk-fx-details[data-latent="40001"]').wait_for()
    assert page.kernel("print(fx.selected)").strip() == "40001"
    print(f"\n[feature explorer] click → contexts shown: {select_ms:.1f} ms; Python sets selected → page shows it: "
          f"{py_ms:.0f} ms (incl. kernel round trip of the test's client)")
    assert select_ms < 5000


def test_text_box_and_steer_hand_off(page):
    fx = page.page.locator(".tk-fx")
    fx.locator(".tk-text-in").fill("hello big world")
    fx.locator(".tk-run").click()
    toks = fx.locator(".tk-text-out .tk-tok")
    toks.first.wait_for()
    assert toks.all_inner_texts() == ["hello", " big", " world"]
    toks.nth(1).click()
    chip = fx.locator(".tk-text-latents .tk-chip").first
    expected = STORE.text_fn("hello big world")["latents"][1][0][0]
    assert chip.get_attribute("data-latent") == str(expected)
    chip.click()
    fx.locator(f'.tk-fx-details[data-latent="{expected}"]').wait_for()
    page.shot(fx, "feature-explorer-text-box")
    n_items = int(page.kernel("print(len(panel.items))"))
    fx.locator(".tk-steer-btn").click()
    fx.locator(".tk-status", has_text="added to the steering panel").wait_for()
    assert page.kernel("print(panel.items[-1]['latent'], len(panel.items))").split() == [str(expected), str(n_items + 1)]
    page.page.locator(f'.tk-steer .tk-item[data-index="{n_items}"]').wait_for()
    page.kernel("panel.items = panel.items[:-1]")
