// Model-diff explorer (after _common.js). Dataset mirrors: data-ready, data-n-visible, data-render-ms,
// data-select-ms; the scatter canvas carries its data→pixel map (data-x0/x1/y0/y1, data-pad) for tests.

const CLASS_VARS = ["--tk-c0", "--tk-c1", "--tk-c2", "--tk-c3", "--tk-c4", "--tk-c5"];

// Axis range over the valid values: all of them, unless a few outliers would squeeze the rest (then the
// 0.5–99.5% range, with outliers drawn on the border); always includes 0 and 1 (the ratios' landmarks).
function axisRange(values, keep) {
  const v = [];
  for (let i = 0; i < values.length; i++) if (keep[i]) v.push(values[i]);
  if (!v.length) return [0, 1];
  v.sort((a, b) => a - b);
  const q = (p) => v[Math.min(v.length - 1, Math.max(0, Math.round(p * (v.length - 1))))];
  const span = (a, b) => Math.max(b, 1) - Math.min(a, 0);
  const robust = span(q(0.005), q(0.995)) * 3 < span(v[0], v[v.length - 1]);
  const lo = Math.min(0, robust ? q(0.005) : v[0]), hi = Math.max(1, robust ? q(0.995) : v[v.length - 1]);
  const pad = (hi - lo) * 0.04;
  return [lo - pad, hi + pad];
}

// Histogram with a brush: drag over the bars to keep a norm_diff range; click without dragging clears it.
function brushHistogram({ values, onBrush, width = 360, height = 120 }) {
  const bins = binCounts(values, 0, 1, 50);
  const svg = histogram({ edges: bins.edges, counts: bins.counts, width, height, label: "decoder norm difference histogram",
                          cls: "tk-nd-hist", logY: true });
  const pad = 4;
  const inner = width - 2 * pad;
  const band = s("rect", { class: "tk-brush", x: 0, y: 0, width: 0, height: height - 16, visibility: "hidden" });
  svg.append(band);
  const toVal = (px) => Math.min(1, Math.max(0, (px - pad) / inner));
  const toPx = (v) => pad + v * inner;
  let start = null;
  const localX = (e) => { const r = svg.getBoundingClientRect(); return (e.clientX - r.left) * (width / r.width); };
  const show = (lo, hi) => {
    band.setAttribute("visibility", "visible");
    band.setAttribute("x", toPx(lo));
    band.setAttribute("width", Math.max(1, toPx(hi) - toPx(lo)));
  };
  svg.addEventListener("pointerdown", (e) => { start = localX(e); svg.setPointerCapture(e.pointerId); e.preventDefault(); });
  svg.addEventListener("pointermove", (e) => {
    if (start === null) return;
    const x = localX(e);
    show(toVal(Math.min(start, x)), toVal(Math.max(start, x)));
  });
  svg.addEventListener("pointerup", (e) => {
    if (start === null) return;
    const x = localX(e);
    const moved = Math.abs(x - start) > 3;
    const lo = toVal(Math.min(start, x)), hi = toVal(Math.max(start, x));
    start = null;
    onBrush(moved ? [lo, hi] : []);
  });
  return { svg, setBrush: (b) => { if (b && b.length === 2) show(b[0], b[1]); else band.setAttribute("visibility", "hidden"); } };
}

function scatter({ x, y, valid, kind, artifact, onPick, width = 360, height = 260 }) {
  const dpr = window.devicePixelRatio || 1;
  const canvas = h("canvas", { class: "tk-scatter", width: width * dpr, height: height * dpr,
                               "aria-label": "Latent Scaling scatter: nu_error against nu_recon" });
  canvas.style.width = `${width}px`;
  canvas.style.height = `${height}px`;
  const pad = 28;
  const [x0, x1] = axisRange(x, valid), [y0, y1] = axisRange(y, valid);
  Object.assign(canvas.dataset, { x0, x1, y0, y1, pad, w: width, h: height });
  const px = (v) => pad + ((Math.min(x1, Math.max(x0, v)) - x0) / (x1 - x0)) * (width - 2 * pad);
  const py = (v) => height - pad - ((Math.min(y1, Math.max(y0, v)) - y0) / (y1 - y0)) * (height - 2 * pad);
  const tip = h("div", { class: "tk-tip", hidden: true });
  const ctx = canvas.getContext("2d");
  const colours = () => {
    const cs = getComputedStyle(canvas);
    return { cls: CLASS_VARS.map((v) => cs.getPropertyValue(v).trim() || "#888"), art: cs.getPropertyValue("--tk-art").trim() || "#d32f2f",
             dim: cs.getPropertyValue("--tk-dim").trim() || "#ccc", axis: cs.getPropertyValue("--tk-axis").trim() || "#666" };
  };
  function draw(visible, selected) {
    const t0 = performance.now();
    const c = colours();
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, width, height);
    ctx.strokeStyle = c.axis; ctx.fillStyle = c.axis; ctx.lineWidth = 1; ctx.font = "10px sans-serif";
    ctx.strokeRect(pad, pad, width - 2 * pad, height - 2 * pad);
    ctx.textAlign = "left"; ctx.fillText(fmt(x0, 2), pad, height - pad + 12);
    ctx.textAlign = "right"; ctx.fillText(fmt(x1, 2), width - pad, height - pad + 12);
    ctx.textAlign = "center"; ctx.fillText("ν_ε (error)", width / 2, height - 4);
    ctx.textAlign = "right"; ctx.fillText(fmt(y0, 2), pad - 3, height - pad); ctx.fillText(fmt(y1, 2), pad - 3, pad + 8);
    ctx.save(); ctx.translate(10, height / 2); ctx.rotate(-Math.PI / 2); ctx.textAlign = "center";
    ctx.fillText("ν_r (recon)", 0, 0); ctx.restore(); ctx.textAlign = "left";
    for (let pass = 0; pass < 2; pass++) {
      for (let i = 0; i < x.length; i++) {
        if (!valid[i] || (visible[i] ? pass === 0 : pass === 1)) continue;
        ctx.fillStyle = !visible[i] ? c.dim : artifact[i] ? c.art : c.cls[kind[i] % c.cls.length];
        ctx.fillRect(px(x[i]) - 1.5, py(y[i]) - 1.5, 3, 3);
      }
    }
    if (selected >= 0 && valid[selected]) {
      ctx.strokeStyle = c.axis; ctx.lineWidth = 2;
      ctx.beginPath(); ctx.arc(px(x[selected]), py(y[selected]), 6, 0, 2 * Math.PI); ctx.stroke();
    }
    canvas.dataset.drawMs = (performance.now() - t0).toFixed(1);
  }
  let visibleRef = null;
  const nearest = (e) => {
    const r = canvas.getBoundingClientRect();
    const mx = e.clientX - r.left, my = e.clientY - r.top;
    let best = -1, bd = 36;
    for (let i = 0; i < x.length; i++) {
      if (!valid[i] || (visibleRef && !visibleRef[i])) continue;
      const dx = px(x[i]) - mx, dy = py(y[i]) - my, d = dx * dx + dy * dy;
      if (d < bd) { bd = d; best = i; }
    }
    return best;
  };
  canvas.addEventListener("mousemove", (e) => {
    const i = nearest(e);
    if (i < 0) { tip.hidden = true; return; }
    tip.hidden = false;
    tip.textContent = `#${i}  ν_ε ${fmt(x[i])}  ν_r ${fmt(y[i])}`;
    tip.style.left = `${px(x[i]) + 8}px`; tip.style.top = `${py(y[i]) - 8}px`;
  });
  canvas.addEventListener("mouseleave", () => { tip.hidden = true; });
  canvas.addEventListener("click", (e) => { const i = nearest(e); if (i >= 0) onPick(i); });
  const box = h("div", { class: "tk-scatter-box" }, canvas, tip);
  return { el: box, draw: (visible, selected) => { visibleRef = visible; draw(visible, selected); } };
}

function sideBySide(d, names) {
  let scale = 0;
  for (const c of [...d.base, ...d.ft]) for (const a of c.acts) scale = Math.max(scale, Math.abs(a));
  const col = (title, ctxs, cls) => h("div", { class: `tk-ctxs ${cls}` }, h("h4", { text: title }),
    ...(ctxs.length ? ctxs.map((c) => shadedTokens(c, scale)) : [h("div", { class: "tk-muted", text: "No known activations" })]));
  return h("div", { class: "tk-side" }, col(names[0], d.base, "tk-base"), col(names[1], d.ft, "tk-ft"));
}

// One chip per class (and one for flagged artifacts) with its count; a click toggles it in `classes`.
function classChips(model, names, kind, art) {
  const counts = names.map((_, k) => kind.reduce((a, v) => a + (v === k ? 1 : 0), 0));
  const chipFor = (name, c, k) => {
    const chip = h("span", { class: "tk-chip tk-class-chip", role: "button", "aria-pressed": "false",
                             "data-class": name, "data-count": c }, h("span", { class: "tk-swatch" }), ` ${name} ${c.toLocaleString()}`);
    chip.firstChild.style.background = name === "artifact" ? "var(--tk-art)" : `var(${CLASS_VARS[k % CLASS_VARS.length]})`;
    chip.addEventListener("click", () => {
      const on = new Set(model.get("classes"));
      if (on.has(name)) on.delete(name); else on.add(name);
      model.set("classes", [...on]); model.save_changes();
    });
    return chip;
  };
  return [...names.map((nm, k) => chipFor(nm, counts[k], k)), chipFor("artifact", art.reduce((a, v) => a + v, 0), 0)];
}

// The virtual list of the latents that pass the filters (order()), with j/k/arrow keys.
function diffList(model, order, a, choose) {
  const rowOf = (k) => {
    const i = order()[k];
    const sel = i === model.get("selected");
    return h("div", { class: `tk-row${sel ? " tk-sel" : ""}`, "data-latent": i },
      h("span", { class: "tk-idx", text: `#${i}` }),
      h("span", { class: "tk-cls", text: a.art[i] ? `${a.names[a.kind[i]]} (artifact)` : a.names[a.kind[i]] }),
      h("span", { class: "tk-num", text: fmt(a.nd[i]) }),
      h("span", { class: "tk-num", text: a.valid[i] ? fmt(a.nuE[i]) : "–" }),
      h("span", { class: "tk-num", text: a.valid[i] ? fmt(a.nuR[i]) : "–" }),
      h("span", { class: "tk-num", text: fmt(a.freq[i]) }));
  };
  const list = new VirtualList({ rowHeight: 22, height: 240, renderRow: rowOf });
  list.el.addEventListener("click", (e) => { const r = e.target.closest(".tk-row"); if (r) choose(Number(r.dataset.latent)); });
  list.el.addEventListener("keydown", (e) => {
    const step = { ArrowDown: 1, j: 1, ArrowUp: -1, k: -1 }[e.key];
    const o = order();
    if (!step || !o.length) return;
    e.preventDefault();
    const pos = o.indexOf(model.get("selected"));
    choose(o[Math.min(o.length - 1, Math.max(0, pos < 0 ? 0 : pos + step))]);
  });
  return list;
}

function render({ model, el }) {
  const t0 = performance.now();
  const { call, dispose } = rpc(model);
  const n = model.get("n_latents");
  const nd = typed(model.get("norm_diff"), Float32Array);
  const nuE = typed(model.get("nu_error"), Float32Array), nuR = typed(model.get("nu_recon"), Float32Array);
  const valid = typed(model.get("valid"), Uint8Array), kind = typed(model.get("kind"), Int8Array);
  const art = typed(model.get("artifact"), Uint8Array), freq = typed(model.get("freq"), Float32Array);
  const names = model.get("kind_names");
  const visible = new Uint8Array(n);
  let order = new Int32Array(0);

  const root = h("div", { class: "tk-root tk-diff" });
  ownKeys(root);
  const chips = classChips(model, names, kind, art);
  const shown = h("span", { class: "tk-count" });
  const clear = h("button", { class: "tk-clear", text: "clear filters", onclick: () => {
    model.set("brush", []); model.set("classes", []); model.save_changes(); } });
  const hist = brushHistogram({ values: nd, onBrush: (b) => { model.set("brush", b); model.save_changes(); } });
  const sc = scatter({ x: nuE, y: nuR, valid, kind, artifact: art, onPick: (i) => choose(i) });
  const detail = h("div", { class: "tk-diff-detail" }, h("div", { class: "tk-muted", text: "Select a latent." }));
  let selectStart = 0;
  const list = diffList(model, () => order, { names, kind, art, nd, nuE, nuR, valid, freq }, (i) => choose(i));
  const header = h("div", { class: "tk-row tk-head" }, ...["latent", "class", "Δnorm", "ν_ε", "ν_r", "freq"].map((t) => h("span", { text: t })));

  function refilter() {
    const b = model.get("brush"), on = new Set(model.get("classes"));
    const keep = [];
    for (let i = 0; i < n; i++) {
      let ok = !b.length || (nd[i] >= b[0] && nd[i] <= b[1]);
      if (ok && on.size) ok = on.has(names[kind[i]]) || (on.has("artifact") && art[i] === 1);
      visible[i] = ok ? 1 : 0;
      if (ok) keep.push(i);
    }
    order = Int32Array.from(keep);
    root.dataset.nVisible = String(order.length);
    shown.textContent = `${order.length.toLocaleString()} of ${n.toLocaleString()} latents shown`;
    for (const c of chips) c.setAttribute("aria-pressed", String(on.has(c.dataset.class)));
    hist.setBrush(b);
    sc.draw(visible, model.get("selected"));
    list.el.scrollTop = 0;
    list.setCount(order.length);
  }
  function choose(i) { selectStart = performance.now(); model.set("selected", i); model.save_changes(); }
  let ticket = 0;
  async function show() {
    const i = model.get("selected");
    sc.draw(visible, i);
    list.update(true);
    root.dataset.selected = String(i);
    if (i < 0) return;
    const pos = order.indexOf(i);
    if (pos >= 0) list.scrollToRow(pos);
    const start = selectStart || performance.now();
    selectStart = 0;
    const mine = ++ticket;
    try {
      const d = await call("details", { latent: i });
      if (mine !== ticket) return;
      const stats = h("div", { class: "tk-muted" }, `Latent #${i} · ${names[kind[i]]}${art[i] ? " · flagged artifact" : ""} · norm diff ${fmt(nd[i])}` +
        (valid[i] ? ` · ν_ε ${fmt(nuE[i])} · ν_r ${fmt(nuR[i])}` : "") + ` · freq ${fmt(freq[i])}`);
      detail.replaceChildren(h("div", { class: "tk-diff-details", "data-latent": i }, h("b", { text: `Latent #${i}` }), stats,
        sideBySide(d, ["Base model", "Fine-tuned model"]),
        h("div", { class: "tk-lens" }, ...d.lens.map(([title, rows]) => tokenTable(title, rows)))));
      root.dataset.selectMs = (performance.now() - start).toFixed(1);
    } catch (e) { if (mine === ticket) detail.replaceChildren(errorBox(`details of latent ${i}: ${e.message}`)); }
  }

  const title = model.get("title");
  root.append(title ? h("div", { class: "tk-title", text: title }) : null,
    h("div", { class: "tk-toolbar" }, ...chips, clear, shown),
    h("div", { class: "tk-plots" },
      h("div", {}, h("h4", { text: "Decoder norm difference (0 base-only … 1 fine-tune-only); drag to filter" }), hist.svg),
      h("div", {}, h("h4", { text: "Latent Scaling (ν_ε vs ν_r); click a point" }), sc.el)),
    h("div", { class: "tk-diff-body" }, h("div", {}, header, list.el), detail));
  el.append(root);
  refilter();
  const onFilter = () => refilter();
  model.on("change:brush", onFilter);
  model.on("change:classes", onFilter);
  model.on("change:selected", show);
  if (model.get("selected") >= 0) show();
  requestAnimationFrame(() => { sc.draw(visible, model.get("selected")); root.dataset.renderMs = (performance.now() - t0).toFixed(1); root.dataset.ready = "1"; });
  return () => { model.off("change:brush", onFilter); model.off("change:classes", onFilter); model.off("change:selected", show);
                 list.dispose(); dispose(); };
}

export default { render };
