// Steering panel (after _common.js). The root's dataset mirrors: data-ready, data-busy, data-differs.

const METHODS = { latent: ["add", "clamp", "scale", "ablate"], vector: ["add", "project_out", "cap"] };
const POSITIONS = ["all", "prompt", "generated"];

function words(text) { return text.match(/\s+|\w+|[^\s\w]/gu) || []; }

// Longest common subsequence over word tokens: which tokens of each text are not shared.
function tokenDiff(a, b) {
  const n = a.length, m = b.length;
  const L = Array.from({ length: n + 1 }, () => new Uint16Array(m + 1));
  for (let i = n - 1; i >= 0; i--)
    for (let j = m - 1; j >= 0; j--) L[i][j] = a[i] === b[j] ? L[i + 1][j + 1] + 1 : Math.max(L[i + 1][j], L[i][j + 1]);
  const sameA = new Array(n).fill(false), sameB = new Array(m).fill(false);
  let i = 0, j = 0;
  while (i < n && j < m) {
    if (a[i] === b[j]) { sameA[i++] = true; sameB[j++] = true; }
    else if (L[i + 1][j] >= L[i][j + 1]) i++;
    else j++;
  }
  return { sameA, sameB };
}

function textPane(title, toks, same, cls) {
  const body = h("div", { class: `tk-gen ${cls}` });
  toks.forEach((t, i) => {
    body.append(same[i] || !t.trim() ? document.createTextNode(t) : h("mark", { class: "tk-changed", text: t }));
  });
  return h("div", { class: "tk-pane" }, h("h4", { text: title }), body);
}

function itemRow(item, k, update, remove) {
  const step = (item.max - item.min) / 200;
  const slider = h("input", { type: "range", class: "tk-strength-slider", min: item.min, max: item.max, step,
                              value: item.strength, "aria-label": `strength of ${item.name}` });
  const box = h("input", { type: "number", class: "tk-strength-box", step: "any", value: item.strength,
                           "aria-label": `strength value of ${item.name}` });
  slider.addEventListener("input", () => { box.value = slider.value; });
  slider.addEventListener("change", () => update(k, { strength: Number(slider.value) }));
  box.addEventListener("change", () => {
    const v = Number(box.value);
    if (Number.isFinite(v)) update(k, { strength: v, min: Math.min(item.min, v), max: Math.max(item.max, v) });
  });
  const method = h("select", { class: "tk-method", "aria-label": "method" },
    ...METHODS[item.kind].map((m) => h("option", { value: m, text: m, selected: m === item.method })));
  method.addEventListener("change", () => update(k, { method: method.value }));
  const pos = h("select", { class: "tk-positions", "aria-label": "positions" },
    ...POSITIONS.map((p) => h("option", { value: p, text: p, selected: p === item.positions })));
  pos.addEventListener("change", () => update(k, { positions: pos.value }));
  const el = h("div", { class: "tk-item", "data-kind": item.kind, "data-index": k },
    h("span", { class: `tk-kind tk-kind-${item.kind}`, text: item.kind }),
    h("span", { class: "tk-name", title: item.name, text: item.kind === "latent" && item.latent !== undefined ? `#${item.latent}` : item.name }),
    h("span", { class: "tk-site tk-muted", text: item.site }),
    slider, box, method, pos,
    h("button", { class: "tk-remove", title: "remove", text: "✕", onclick: () => remove(k) }));
  // Patch values in place (a re-render would drop focus while the user drags or types).
  const set = (it) => {
    item = it;
    slider.min = it.min; slider.max = it.max; slider.step = (it.max - it.min) / 200;
    if (Number(slider.value) !== it.strength) slider.value = it.strength;
    if (document.activeElement !== box && Number(box.value) !== it.strength) box.value = it.strength;
    method.value = it.method; pos.value = it.positions;
  };
  return { el, set, key: `${item.kind}:${item.name}:${item.site}` };
}

// The rows of steer items; edits go back to Python through the `items` trait.
function itemsView(model) {
  const el = h("div", { class: "tk-items" });
  const items = () => model.get("items").map((i) => ({ ...i }));
  const save = (list) => { model.set("items", list); model.save_changes(); };
  const update = (k, patch) => { const l = items(); Object.assign(l[k], patch); save(l); };
  const remove = (k) => { const l = items(); l.splice(k, 1); save(l); };
  let rowViews = [];
  const draw = () => {
    const l = model.get("items");
    const keys = l.map((it) => `${it.kind}:${it.name}:${it.site}`);
    if (keys.length === rowViews.length && keys.every((k, i) => k === rowViews[i].key)) {
      l.forEach((it, k) => rowViews[k].set(it));
      return;
    }
    rowViews = l.map((it, k) => itemRow(it, k, update, remove));
    el.replaceChildren(...rowViews.map((r) => r.el));
    if (!l.length) el.append(h("div", { class: "tk-muted", text: "No steer items: add latents from a feature explorer." }));
  };
  return { el, draw };
}

// Unsteered and steered text side by side, the tokens that differ marked.
function resultView(model, root) {
  const el = h("div", { class: "tk-outputs" });
  const draw = () => {
    const r = model.get("result") || {};
    if (r.steered === undefined) { el.replaceChildren(); delete root.dataset.differs; return; }
    const a = words(r.unsteered), b = words(r.steered);
    const { sameA, sameB } = tokenDiff(a, b);
    el.replaceChildren(textPane("Unsteered", a, sameA, "tk-unsteered"), textPane("Steered", b, sameB, "tk-steered"));
    root.dataset.differs = r.unsteered === r.steered ? "0" : "1";
  };
  return { el, draw };
}

function sweepTable(rows) {
  if (!rows.length) return [];
  const cols = Object.keys(rows[0]);
  const cell = (v) => h("td", { class: typeof v === "number" ? "tk-num" : "", text: typeof v === "number" ? fmt(v) : String(v) });
  return [h("table", { class: "tk-table tk-sweep-table" }, h("thead", {}, h("tr", {}, ...cols.map((c) => h("th", { text: c })))),
    h("tbody", {}, ...rows.map((row) => h("tr", {}, ...cols.map((c) => cell(row[c]))))))];
}

function render({ model, el }) {
  const { call, dispose } = rpc(model);
  const root = h("div", { class: "tk-root tk-steer" });
  ownKeys(root);
  const items = itemsView(model), result = resultView(model, root);
  const prompt = h("textarea", { class: "tk-prompt", rows: 2, placeholder: "Prompt", "aria-label": "prompt" });
  const gen = h("button", { class: "tk-generate", text: "Generate" });
  const cancel = h("button", { class: "tk-cancel", text: "Cancel", disabled: true });
  const sweepBtn = h("button", { class: "tk-sweep-run", text: "Sweep" });
  const sweepIn = h("input", { class: "tk-sweep-in", "aria-label": "sweep strengths" });
  const codeBtn = h("button", { class: "tk-copy-code", text: "Copy as code", disabled: !model.get("has_code") });
  const status = h("span", { class: "tk-status tk-muted" });
  const err = h("div", { class: "tk-err-box" });
  const sweepBox = h("div", { class: "tk-sweep" });
  const codeBox = h("pre", { class: "tk-code", hidden: true });

  const drawBusy = () => {
    const busy = model.get("busy");
    root.dataset.busy = busy ? "1" : "0";
    gen.disabled = busy; sweepBtn.disabled = busy || !model.get("has_sweep"); cancel.disabled = !busy;
    status.textContent = model.get("status");
    status.classList.toggle("tk-spin", busy);
  };
  const handlers = {
    "change:items": items.draw, "change:busy": drawBusy, "change:status": drawBusy, "change:result": result.draw,
    "change:error": () => err.replaceChildren(...(model.get("error") ? [errorBox(model.get("error"))] : [])),
    "change:sweep_rows": () => sweepBox.replaceChildren(...sweepTable(model.get("sweep_rows"))),
    "change:prompt": () => { if (prompt.value !== model.get("prompt")) prompt.value = model.get("prompt"); },
    "change:sweep_strengths": () => { sweepIn.value = model.get("sweep_strengths").join(", "); },
  };
  const guard = (p) => p.catch((e) => err.replaceChildren(errorBox(e.message)));
  const savePrompt = () => { model.set("prompt", prompt.value); model.save_changes(); };
  prompt.addEventListener("change", savePrompt);
  gen.addEventListener("click", () => { savePrompt(); guard(call("generate")); });
  cancel.addEventListener("click", () => guard(call("cancel")));
  sweepBtn.addEventListener("click", () => {
    const vals = sweepIn.value.split(/[,\s]+/).filter(Boolean).map(Number);
    if (!vals.length || vals.some((v) => !Number.isFinite(v))) { err.replaceChildren(errorBox("sweep strengths: numbers separated by commas")); return; }
    model.set("sweep_strengths", vals); savePrompt();
    guard(call("sweep"));
  });
  codeBtn.addEventListener("click", () => guard(call("code").then((r) => {
    codeBox.hidden = false;
    codeBox.textContent = r.code;
    if (navigator.clipboard) navigator.clipboard.writeText(r.code).catch(() => {});
    status.textContent = "code copied (also shown below)";
  })));

  for (const [ev, fn] of Object.entries(handlers)) model.on(ev, fn);
  root.append(h("div", { class: "tk-title", text: "Steering" }), items.el,
    h("div", { class: "tk-controls" }, prompt, h("div", { class: "tk-buttons" }, gen, cancel, status)), err, result.el,
    h("div", { class: "tk-controls" }, h("span", { class: "tk-muted", text: "sweep strengths" }), sweepIn, sweepBtn, codeBtn),
    sweepBox, codeBox);
  el.append(root);
  for (const fn of new Set(Object.values(handlers))) fn();
  root.dataset.ready = "1";
  return () => { for (const [ev, fn] of Object.entries(handlers)) model.off(ev, fn); dispose(); };
}

export default { render };
