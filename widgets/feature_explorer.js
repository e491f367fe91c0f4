// Feature explorer (after _common.js). State that matters to tests is mirrored on the root's dataset:
// data-ready, data-render-ms (first paint of the list), data-scroll-ms (last window update),
// data-select-ms (selection → contexts shown), data-n-visible (rows in the current filter).

function densityBins(density, n = 24) {
  let lo = 0;
  let alive = 0;
  let min = Infinity;
  for (const d of density) if (d > 0) { alive++; min = Math.min(min, d); }
  lo = alive ? Math.floor(Math.log10(min)) : -6;
  const logs = new Float32Array(density.length);
  for (let i = 0; i < density.length; i++) logs[i] = density[i] > 0 ? Math.log10(density[i]) : lo;
  const bins = binCounts(logs, lo, 0, n, (i) => density[i] > 0);
  return { ...bins, dead: density.length - alive };
}

function makeOrder({ n, density, maxAct, base, filter, range, sort, dense }) {
  const keep = [];
  const src = base || null;
  const len = src ? src.length : n;
  for (let k = 0; k < len; k++) {
    const i = src ? src[k] : k;
    const d = density[i];
    if (filter === "dead" && d !== 0) continue;
    if (filter === "alive" && d === 0) continue;
    if (filter === "dense" && d < dense) continue;
    if (range && !(d > 0 && Math.log10(d) >= range[0] && Math.log10(d) <= range[1])) continue;
    keep.push(i);
  }
  const order = Int32Array.from(keep);
  if (sort === "density-desc") order.sort((a, b) => density[b] - density[a] || a - b);
  else if (sort === "density-asc") order.sort((a, b) => density[a] - density[b] || a - b);
  else if (sort === "max-desc") order.sort((a, b) => maxAct[b] - maxAct[a] || a - b);
  return order;
}

function contextsBlock(title, ctxs, scale) {
  const box = h("div", { class: "tk-ctxs" }, h("h4", { text: title }));
  if (!ctxs.length) box.append(h("div", { class: "tk-muted", text: "No known activations" }));
  for (const c of ctxs) box.append(shadedTokens(c, scale));
  return box;
}

function detailsView(d, { onLatent, onSteer, canSteer }) {
  const head = h("div", { class: "tk-fx-head" },
    h("b", { text: `Latent #${d.latent}` }),
    h("span", { class: "tk-muted", text: ` density ${fmt(d.density)} · max ${fmt(d.max_act)}` }));
  if (canSteer) head.append(h("button", { class: "tk-steer-btn", text: "Steer with this latent", onclick: () => onSteer(d.latent) }));
  const hist = d.hist.counts.length
    ? histogram({ edges: d.hist.edges, counts: d.hist.counts, label: `activation histogram of latent ${d.latent}`, cls: "tk-act-hist" })
    : h("div", { class: "tk-muted", text: "no activations" });
  const lens = h("div", { class: "tk-lens" },
    tokenTable("Promoted tokens", d.promoted, "tk-promoted"), tokenTable("Suppressed tokens", d.suppressed, "tk-suppressed"));
  const nb = h("div", { class: "tk-neighbours" }, h("h4", { text: "Nearest latents (decoder cosine)" }),
    ...d.neighbours.map(([j, c]) => h("span", { class: "tk-chip", "data-latent": j, text: `#${j} ${fmt(c, 2)}`,
                                                  onclick: () => onLatent(j) })));
  const scale = d.max_act || 0;
  const top = contextsBlock("Top activations", d.top, scale);
  top.classList.add("tk-top");
  const quant = d.quantiles.map((q) => {
    const det = h("details", { class: "tk-quantile" }, h("summary", { text: q.label }));
    det.append(contextsBlock("", q.examples, scale));
    return det;
  });
  return h("div", { class: "tk-fx-details", "data-latent": d.latent },
    head, h("div", { class: "tk-fx-stats" }, h("div", {}, h("h4", { text: "Activation histogram" }), hist), lens),
    nb, top, ...quant);
}

function textBox(call, onLatent) {
  const area = h("textarea", { class: "tk-text-in", rows: 2, placeholder: "Type a text, then Run (Ctrl+Enter)" });
  const out = h("div", { class: "tk-text-out" });
  const lat = h("div", { class: "tk-text-latents" });
  const run = async () => {
    out.replaceChildren(h("span", { class: "tk-muted", text: "running…" }));
    lat.replaceChildren();
    try {
      const r = await call("text", { text: area.value });
      const top = r.latents.map((l) => (l.acts.length ? l.acts[0] : 0));
      const line = shadedTokens({ tokens: r.tokens, acts: top });
      line.querySelectorAll(".tk-tok").forEach((span, i) => {
        span.addEventListener("click", () => {
          lat.replaceChildren(h("span", { class: "tk-muted", text: `token ${JSON.stringify(r.tokens[i])}: ` }),
            ...Array.from(r.latents[i].ids).map((j, k) => h("span", { class: "tk-chip", "data-latent": j,
              text: `#${j} ${fmt(r.latents[i].acts[k])}`, onclick: () => onLatent(j) })));
        });
      });
      out.replaceChildren(line);
    } catch (e) { out.replaceChildren(errorBox(e.message)); }
  };
  area.addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); run(); } });
  return h("div", { class: "tk-textbox" }, h("h4", { text: "Latents on your text" }),
    h("div", { class: "tk-row-flex" }, area, h("button", { class: "tk-run", text: "Run", onclick: run })), out, lat);
}

function toolbar(model) {
  const opt = (v, t) => h("option", { value: v, text: t });
  const searchable = model.get("has_search");
  const t = {
    search: h("input", { class: "tk-search", type: "search", placeholder: "search…", "aria-label": "search latents" }),
    by: h("select", { class: "tk-search-by", "aria-label": "search by" }, opt("index", "index"),
      searchable ? opt("token", "promoted token") : null, searchable ? opt("context", "context word") : null),
    sort: h("select", { class: "tk-sort", "aria-label": "sort" }, opt("index", "index"), opt("density-desc", "density ↓"),
      opt("density-asc", "density ↑"), opt("max-desc", "max act ↓")),
    filt: h("select", { class: "tk-filter", "aria-label": "filter" }, opt("all", "all"), opt("alive", "alive"),
      opt("dead", "dead"), opt("dense", `dense (≥ ${model.get("dense_threshold")})`)),
    rangeChip: h("span", { class: "tk-chip tk-range", hidden: true }),
    count: h("span", { class: "tk-count" }),
  };
  t.el = h("div", { class: "tk-toolbar" }, t.search, t.by, t.sort, t.filt, t.rangeChip, t.count);
  return t;
}

// The virtual list of latents in `st.order`; click and j/k/arrows call choose(latent).
function latentList(model, st, density, labels, choose, onUpdate) {
  const rowOf = (i) => {
    const sel = i === model.get("selected");
    const d = density[i];
    const bar = h("span", { class: "tk-dbar" });
    bar.style.width = `${d > 0 ? Math.max(2, 100 * (1 + Math.log10(d) / 6)) : 0}%`;
    return h("div", { class: `tk-row${sel ? " tk-sel" : ""}`, "data-latent": i, role: "option", "aria-selected": String(sel) },
      h("span", { class: "tk-idx", text: `#${i}` }), h("span", { class: "tk-label", text: labels[i] || "" }),
      h("span", { class: "tk-dcell" }, bar), h("span", { class: "tk-dval", text: d === 0 ? "dead" : fmt(d) }));
  };
  const list = new VirtualList({ rowHeight: 24, height: 420, renderRow: (k) => rowOf(st.order[k]), onUpdate });
  list.el.setAttribute("role", "listbox");
  list.el.addEventListener("click", (e) => {
    const row = e.target.closest(".tk-row");
    if (row) choose(Number(row.dataset.latent));
  });
  list.el.addEventListener("keydown", (e) => {
    const step = { ArrowDown: 1, j: 1, ArrowUp: -1, k: -1, PageDown: 15, PageUp: -15 }[e.key];
    if (!step || !st.order.length) return;
    e.preventDefault();
    const pos = st.order.indexOf(model.get("selected"));
    choose(st.order[Math.min(st.order.length - 1, Math.max(0, pos < 0 ? 0 : pos + step))]);
  });
  return list;
}

function densityPanel(density, onRange) {
  const hist = densityBins(density);
  return h("div", { class: "tk-dhist" }, h("h4", { text: `Density (log10) · ${hist.dead} dead` }),
    histogram({ edges: hist.edges, counts: hist.counts, label: "latent density histogram", cls: "tk-density-hist",
      logY: true, onBar: (_i, lo, hi) => onRange([lo, hi]) }));
}

// Search: by index in the page; by promoted token or context word through the kernel's search callable.
function searcher(tb, n, call, status, apply) {
  let timer = 0, ticket = 0;
  const run = async () => {
    const q = tb.search.value.trim();
    const mine = ++ticket;
    status.replaceChildren();
    if (!q) return apply(null, q);
    if (tb.by.value === "index") {
      if (!/^\d+$/.test(q)) { status.replaceChildren(errorBox("index search takes digits")); return; }
      const hits = [];
      for (let i = 0; i < n; i++) if (String(i).startsWith(q)) hits.push(i);
      return apply(Int32Array.from(hits), q);
    }
    try {
      const r = await call("search", { query: q, by: tb.by.value });
      if (mine === ticket) apply(r.latents, q);
    } catch (e) { status.replaceChildren(errorBox(e.message)); }
  };
  tb.search.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(run, 200); });
  tb.search.addEventListener("keydown", (e) => { if (e.key === "Enter") { clearTimeout(timer); run(); } });
  tb.by.addEventListener("change", run);
  return () => clearTimeout(timer);
}

function render({ model, el }) {
  const t0 = performance.now();
  const { call, dispose } = rpc(model);
  const n = model.get("n_latents");
  const density = typed(model.get("density"), Float32Array);
  const maxAct = typed(model.get("max_act"), Float32Array);
  const st = { base: null, filter: "all", range: null, sort: "index", order: null, selectStart: 0 };
  const root = h("div", { class: "tk-root tk-fx" });
  ownKeys(root);
  const tb = toolbar(model);
  const status = h("div", { class: "tk-status" });
  const detail = h("div", { class: "tk-fx-detail-pane" }, h("div", { class: "tk-muted", text: "Select a latent." }));
  const choose = (i) => { st.selectStart = performance.now(); model.set("selected", i); model.save_changes(); };
  const list = latentList(model, st, density, model.get("labels") || [], choose,
    (ms) => { root.dataset.scrollMs = ms.toFixed(3); });

  function refilter() {
    st.order = makeOrder({ n, density, maxAct, base: st.base, filter: st.filter, range: st.range, sort: st.sort,
                           dense: model.get("dense_threshold") });
    root.dataset.nVisible = String(st.order.length);
    tb.count.textContent = `${st.order.length.toLocaleString()} of ${n.toLocaleString()} latents`;
    tb.rangeChip.hidden = !st.range;
    if (st.range) tb.rangeChip.textContent = `density 1e${fmt(st.range[0], 2)}–1e${fmt(st.range[1], 2)} ✕`;
    list.el.scrollTop = 0;
    list.setCount(st.order.length);
  }
  tb.rangeChip.addEventListener("click", () => { st.range = null; refilter(); });
  tb.sort.addEventListener("change", () => { st.sort = tb.sort.value; refilter(); });
  tb.filt.addEventListener("change", () => { st.filter = tb.filt.value; refilter(); });
  const stopSearch = searcher(tb, n, call, status, (base, q) => { st.base = base; refilter(); root.dataset.searched = q; });

  async function steer(i) {
    try {
      const r = await call("steer", { latent: i });
      status.replaceChildren(h("span", { class: "tk-muted", text: `latent #${r.latent} added to the steering panel (${r.items} items)` }));
    } catch (e) { status.replaceChildren(errorBox(e.message)); }
  }
  let ticket = 0;
  async function show(i) {
    list.update(true);
    if (i < 0) { detail.replaceChildren(h("div", { class: "tk-muted", text: "Select a latent." })); return; }
    const pos = st.order.indexOf(i);
    if (pos >= 0) list.scrollToRow(pos);
    const start = st.selectStart || performance.now();
    st.selectStart = 0;
    const mine = ++ticket;
    detail.dataset.loading = "1";
    try {
      const d = await call("details", { latent: i });
      if (mine !== ticket) return;
      detail.replaceChildren(detailsView(d, { onLatent: choose, canSteer: model.get("can_steer"), onSteer: steer }));
      root.dataset.selectMs = (performance.now() - start).toFixed(1);
    } catch (e) {
      if (mine === ticket) detail.replaceChildren(errorBox(`details of latent ${i}: ${e.message}`));
    } finally { if (mine === ticket) delete detail.dataset.loading; }
  }

  const title = model.get("title");
  root.append(title ? h("div", { class: "tk-title", text: title }) : null, tb.el, status,
    h("div", { class: "tk-fx-body" },
      h("div", { class: "tk-fx-left" }, list.el, densityPanel(density, (r) => { st.range = r; refilter(); })), detail),
    model.get("has_text") ? textBox(call, choose) : null);
  el.append(root);
  refilter();
  const onSel = () => show(model.get("selected"));
  model.on("change:selected", onSel);
  if (model.get("selected") >= 0) onSel();
  requestAnimationFrame(() => { root.dataset.renderMs = (performance.now() - t0).toFixed(1); root.dataset.ready = "1"; });
  return () => { model.off("change:selected", onSel); list.dispose(); dispose(); stopSearch(); };
}

export default { render };
