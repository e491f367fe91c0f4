// Shared helpers, put in front of each widget's module by widgets/_base.py (anywidget loads one module per
// widget). No imports, no network: everything is drawn with the DOM, SVG and canvas.

const SVG_NS = "http://www.w3.org/2000/svg";

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c);
  return el;
}

function s(tag, attrs = {}) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
}

// A bytes trait arrives as a DataView; copy so the typed array is aligned whatever the view's offset.
function typed(view, Type) {
  if (!view) return new Type(0);
  const buf = view.buffer ? view.buffer.slice(view.byteOffset, view.byteOffset + view.byteLength) : view;
  return new Type(buf);
}

// Replace {"$buf": i, "dtype": "f4"|"i4"} in an answer by typed arrays over the message's buffers.
function unpack(obj, buffers) {
  if (Array.isArray(obj)) return obj.map((o) => unpack(o, buffers));
  if (obj && typeof obj === "object") {
    if ("$buf" in obj) return typed(buffers[obj.$buf], obj.dtype === "i4" ? Int32Array : Float32Array);
    const out = {};
    for (const [k, v] of Object.entries(obj)) out[k] = unpack(v, buffers);
    return out;
  }
  return obj;
}

// Requests to the kernel: send {type, id, ...}, resolve with the answer carrying the same id.
function rpc(model) {
  let next = 1;
  const pending = new Map();
  const onMsg = (msg, buffers) => {
    if (!msg || !pending.has(msg.id)) return;
    const { resolve, reject } = pending.get(msg.id);
    pending.delete(msg.id);
    if (msg.type === "error") reject(new Error(msg.message));
    else resolve(unpack(msg.data, buffers || []));
  };
  model.on("msg:custom", onMsg);
  return {
    call(type, payload = {}) {
      const id = next++;
      return new Promise((resolve, reject) => {
        pending.set(id, { resolve, reject });
        model.send({ type, id, ...payload });
      });
    },
    dispose() { model.off("msg:custom", onMsg); pending.clear(); },
  };
}

function fmt(x, digits = 3) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (x === 0) return "0";
  const a = Math.abs(x);
  if (a >= 1e4 || a < 1e-3) return x.toExponential(1);
  return Number(x.toPrecision(digits)).toString();
}

// Tokens shaded by activation: alpha = act / max (per context unless `scale` is given), value on hover.
function shadedTokens(ctx, scale) {
  const acts = ctx.acts;
  let m = scale || 0;
  if (!m) for (const a of acts) m = Math.max(m, Math.abs(a));
  const line = h("div", { class: "tk-ctx" });
  ctx.tokens.forEach((t, i) => {
    const a = acts[i] || 0;
    const alpha = m > 0 ? Math.min(1, Math.abs(a) / m) : 0;
    const span = h("span", {
      class: "tk-tok", text: t.replace(/\n/g, "⏎"), title: `${JSON.stringify(t)}: ${fmt(a, 4)}`,
      dataset: { act: String(a), alpha: alpha.toFixed(4) },
    });
    if (alpha > 0) span.style.background = `color-mix(in srgb, var(--tk-shade) ${Math.round(alpha * 100)}%, transparent)`;
    line.append(span);
  });
  return line;
}

// SVG bar histogram. Each bar carries its count (data-count, aria-label, <title>); onBar(i) on click.
function histogram({ edges, counts, width = 320, height = 90, label = "", logY = false, onBar = null, cls = "" }) {
  const n = counts.length;
  const svg = s("svg", { class: `tk-hist ${cls}`, width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
                         "aria-label": label });
  const pad = { l: 4, r: 4, t: 4, b: 16 };
  const w = (width - pad.l - pad.r) / Math.max(n, 1);
  let max = 0;
  for (const c of counts) max = Math.max(max, logY ? Math.log1p(c) : c);
  for (let i = 0; i < n; i++) {
    const c = counts[i];
    const v = logY ? Math.log1p(c) : c;
    const bh = max > 0 ? (v / max) * (height - pad.t - pad.b) : 0;
    const lo = edges[i], hi = edges[i + 1];
    const r = s("rect", { x: pad.l + i * w + 0.5, y: height - pad.b - bh, width: Math.max(w - 1, 0.5),
                          height: Math.max(bh, c > 0 ? 1 : 0), class: "tk-bar",
                          "data-count": c, "data-lo": lo, "data-hi": hi, "data-bin": i,
                          "aria-label": `${fmt(lo)} to ${fmt(hi)}: ${c}` });
    const t = s("title", {});
    t.textContent = `${fmt(lo)} – ${fmt(hi)}: ${c}`;
    r.append(t);
    if (onBar) r.addEventListener("click", () => onBar(i, lo, hi));
    svg.append(r);
  }
  const axis = s("text", { x: pad.l, y: height - 3, class: "tk-axis" });
  axis.textContent = `${fmt(edges[0])}`;
  const axis2 = s("text", { x: width - pad.r, y: height - 3, class: "tk-axis", "text-anchor": "end" });
  axis2.textContent = `${fmt(edges[n])}`;
  svg.append(axis, axis2);
  return svg;
}

// Equal-width bins over [lo, hi] of the values where keep(i) holds.
function binCounts(values, lo, hi, n, keep = null) {
  const counts = new Array(n).fill(0);
  const w = (hi - lo) / n || 1;
  for (let i = 0; i < values.length; i++) {
    if (keep && !keep(i)) continue;
    const b = Math.min(n - 1, Math.max(0, Math.floor((values[i] - lo) / w)));
    counts[b]++;
  }
  const edges = Array.from({ length: n + 1 }, (_, i) => lo + i * w);
  return { edges, counts };
}

// A table of [token, value] rows (logit lens), each value cell shaded by |value| / max.
function tokenTable(title, rows, cls = "") {
  const max = Math.max(1e-12, ...rows.map((r) => Math.abs(r[1])));
  const body = rows.map(([tok, v]) => {
    const cell = h("td", { class: "tk-num", text: fmt(v, 3) });
    cell.style.background = `color-mix(in srgb, var(--tk-shade) ${Math.round((Math.abs(v) / max) * 60)}%, transparent)`;
    return h("tr", {}, h("td", { class: "tk-tokcell", text: JSON.stringify(tok).slice(1, -1) }), cell);
  });
  return h("table", { class: `tk-table ${cls}` }, h("caption", { text: title }), h("tbody", {}, body));
}

// A virtualized list: only the rows in view (plus a few) exist in the DOM; rows have a fixed height.
class VirtualList {
  constructor({ rowHeight = 24, height = 400, renderRow, onUpdate = null }) {
    this.rowHeight = rowHeight;
    this.renderRow = renderRow;
    this.onUpdate = onUpdate;
    this.count = 0;
    this.el = h("div", { class: "tk-vlist", tabindex: "0" });
    this.el.style.height = `${height}px`;
    this.spacer = h("div", { class: "tk-vspacer" });
    this.rows = h("div", { class: "tk-vrows" });
    this.spacer.append(this.rows);
    this.el.append(this.spacer);
    this._raf = 0;
    this._onScroll = () => {
      if (this._raf) return;
      this._raf = requestAnimationFrame(() => { this._raf = 0; this.update(); });
    };
    this.el.addEventListener("scroll", this._onScroll);
  }
  setCount(n) {
    this.count = n;
    this.spacer.style.height = `${n * this.rowHeight}px`;
    this.update(true);
  }
  update(force = false) {
    const t0 = performance.now();
    const top = this.el.scrollTop;
    const view = this.el.clientHeight || parseFloat(this.el.style.height);
    const first = Math.max(0, Math.floor(top / this.rowHeight) - 4);
    const last = Math.min(this.count, Math.ceil((top + view) / this.rowHeight) + 4);
    if (!force && first === this._first && last === this._last) return;
    this._first = first;
    this._last = last;
    const frag = document.createDocumentFragment();
    for (let i = first; i < last; i++) {
      const row = this.renderRow(i);
      row.style.top = `${i * this.rowHeight}px`;
      row.style.height = `${this.rowHeight}px`;
      frag.append(row);
    }
    this.rows.replaceChildren(frag);
    if (this.onUpdate) this.onUpdate(performance.now() - t0);
  }
  scrollToRow(i) {
    const top = i * this.rowHeight;
    const view = this.el.clientHeight || parseFloat(this.el.style.height);
    if (top < this.el.scrollTop) this.el.scrollTop = top;
    else if (top + this.rowHeight > this.el.scrollTop + view) this.el.scrollTop = top + this.rowHeight - view;
    this.update(true);
  }
  dispose() {
    this.el.removeEventListener("scroll", this._onScroll);
    if (this._raf) cancelAnimationFrame(this._raf);
  }
}

function errorBox(message) {
  return h("div", { class: "tk-error", role: "alert", text: message });
}

// Keys typed inside a widget are the widget's: JupyterLab (bubbling keydown) would otherwise treat j/k, arrows
// and letters as notebook commands. Shift+Enter still runs the cell; Escape still leaves the widget.
function ownKeys(root) {
  root.addEventListener("keydown", (e) => {
    if ((e.key === "Enter" && e.shiftKey) || e.key === "Escape") return;
    e.stopPropagation();
  });
}
