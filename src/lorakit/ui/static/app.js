// lorakit ui: one page, five views (#/runs, #/run/NAME, #/new, #/data, #/playground, #/export). No framework,
// no network beyond this dashboard: everything is drawn with the DOM and SVG. Every text from the server is put
// in with textContent (never innerHTML), so run names, logs and model answers cannot inject markup.
"use strict";

const params = new URLSearchParams(location.search);
if (params.get("token")) {  // keep the token for this tab, out of the address bar
  sessionStorage.setItem("lorakit-token", params.get("token"));
  history.replaceState(null, "", location.pathname + location.hash);
}
const TOKEN = sessionStorage.getItem("lorakit-token");
const main = document.getElementById("main");
let cleanup = [];  // timers and streams of the current view, stopped when the view changes
let INFO = null;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (TOKEN) headers.Authorization = `Bearer ${TOKEN}`;
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { ...options, headers, body: options.body === undefined ? undefined : JSON.stringify(options.body) });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error((data.error && data.error.message) || `HTTP ${response.status}`);
    error.fields = (data.error && data.error.fields) || {};
    throw error;
  }
  return data;
}

function toast(message, bad = false) {
  const t = document.getElementById("toast");
  t.textContent = message;
  t.className = bad ? "bad" : "";
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, 6000);
}

function every(ms, fn) { fn(); const id = setInterval(fn, ms); cleanup.push(() => clearInterval(id)); }
function fmt(x, digits = 4) { return typeof x === "number" ? x.toFixed(digits) : "–"; }
function bytes(n) { return n >= 2 ** 30 ? `${(n / 2 ** 30).toFixed(2)} GiB` : `${(n / 2 ** 20).toFixed(1)} MiB`; }
function badge(status) { return el("span", { class: `badge ${status}`, "data-status": status }, status); }
const q = encodeURIComponent;

// ---------------------------------------------------------------- routing
const views = { runs: viewRuns, run: viewRun, new: viewNew, data: viewData, playground: viewPlayground, export: viewExport };
async function route() {
  cleanup.forEach((stop) => stop());
  cleanup = [];
  const [page, ...rest] = location.hash.replace(/^#\/?/, "").split("/");
  const view = views[page] || viewRuns;
  document.querySelectorAll("header nav a").forEach((a) => a.classList.toggle("active", a.dataset.page === (views[page] ? page : "runs")));
  main.replaceChildren();
  try { await view(decodeURIComponent(rest.join("/"))); } catch (err) { main.append(el("p", { class: "bad" }, err.message)); }
}
window.addEventListener("hashchange", route);
(async () => {
  INFO = await api("/api/info").catch((err) => { main.append(el("p", { class: "bad" }, err.message)); return null; });
  if (INFO) document.getElementById("root").textContent = `runs: ${INFO.runs_root} · lorakit ${INFO.version}`;
  route();
})();

// ---------------------------------------------------------------- runs
async function viewRuns() {
  main.append(el("h1", {}, "Runs"));
  const body = el("tbody");
  main.append(el("div", { class: "card" }, el("table", { id: "runs" },
    el("thead", {}, el("tr", {}, ["run", "status", "step", "train loss", "eval loss", "started"].map((h) => el("th", {}, h)))), body)));
  every(2000, async () => {
    const { runs } = await api("/api/runs");
    body.replaceChildren(...(runs.length ? runs.map((r) => el("tr", { class: "link", "data-run": r.name, onclick: () => { location.hash = `#/run/${q(r.name)}`; } },
      el("td", {}, r.name), el("td", {}, badge(r.status)),
      el("td", {}, r.step === null ? "–" : `${r.step}${r.total_steps ? ` / ${r.total_steps}` : ""}`),
      el("td", {}, fmt(r.loss)), el("td", {}, fmt(r.eval_loss)), el("td", { class: "muted" }, r.started || ""))) :
      [el("tr", {}, el("td", { colspan: 6, class: "muted" }, "No runs yet under this root. Start one from New run."))]));
  });
}

async function viewRun(name) {
  const title = el("h1", {}, `Run ${name} `);
  const status = el("span");
  title.append(status);
  const actions = el("div", { class: "actions" });
  const chart = el("div", { class: "card chart" });
  const facts = el("div", { class: "muted", id: "facts" });
  const checkpoints = el("ul"), log = el("pre", { id: "log" }), config = el("pre"), plan = el("div");
  main.append(title, facts, actions, chart,
    el("div", { class: "grid2" },
      el("div", { class: "card" }, el("h2", {}, "Config"), config, el("h2", {}, "Memory plan"), plan),
      el("div", { class: "card" }, el("h2", {}, "Checkpoints"), checkpoints, el("h2", {}, "Log"), log)));

  const rows = [];
  const draw = () => drawChart(chart, rows);
  const stream = new EventSource(`/api/run/metrics?name=${q(name)}${TOKEN ? `&token=${q(TOKEN)}` : ""}`);
  stream.onmessage = (event) => {
    const msg = JSON.parse(event.data);
    if (msg.type === "reset") rows.length = 0;
    if (msg.type === "rows") rows.push(...msg.rows);
    if (msg.type === "status") refresh();  // the buttons follow the status at once, not at the next poll
    draw();
  };
  cleanup.push(() => stream.close());
  draw();

  let shownPlan = false;
  async function refresh() {
    const run = await api(`/api/run?name=${q(name)}`);
    status.replaceChildren(badge(run.status));
    facts.textContent = [run.step !== null ? `step ${run.step}${run.total_steps ? ` of ${run.total_steps}` : ""}` : null,
      run.pid ? `pid ${run.pid}` : null, run.detail, run.started ? `started ${run.started}` : null].filter(Boolean).join(" · ");
    const live = run.status === "running" || run.status === "starting";
    actions.replaceChildren(
      el("button", { id: "stop", disabled: !live, onclick: () => act("stop") }, "Stop"),
      el("button", { id: "resume", class: "secondary", disabled: live || !run.resumable || run.status === "finished", title: run.resumable ? "" : "started outside the dashboard: resume with lorakit train CONFIG --resume", onclick: () => act("resume") }, "Resume"),
      el("button", { class: "secondary", disabled: !run.has_adapter, onclick: () => { location.hash = `#/playground/${q(name)}`; } }, "Playground"),
      el("button", { class: "secondary", disabled: !run.has_adapter, onclick: () => { location.hash = `#/export/${q(name)}`; } }, "Export"),
      el("button", { id: "delete", class: "danger", disabled: live, onclick: remove }, "Delete"));
    checkpoints.replaceChildren(...(run.checkpoints.length ? run.checkpoints.map((c) => el("li", {}, c.name, c.complete ? "" : " (incomplete)")) : [el("li", { class: "muted" }, "none yet")]));
    log.textContent = run.log || "(no log: the run was started outside the dashboard)";
    log.scrollTop = log.scrollHeight;
    config.textContent = run.config || JSON.stringify(run.settings, null, 1) || "";
    if (!shownPlan && run.config) {
      shownPlan = true;
      api(`/api/run/plan?name=${q(name)}`).then((p) => plan.replaceChildren(planTable(p))).catch((err) => { plan.textContent = err.message; });
    }
  }
  every(2000, refresh);

  async function act(what) {
    try { await api(`/api/run/${what}?name=${q(name)}`, { method: "POST", body: {} }); toast(what === "stop" ? "asked to stop: it saves a checkpoint, then exits" : "resuming from the last checkpoint"); refresh(); }
    catch (err) { toast(err.message, true); }
  }
  async function remove() {
    if (!confirm(`Delete run ${name}? Its checkpoints, adapter and metrics are deleted; files lorakit did not write are kept.`)) return;
    try { const r = await api(`/api/run?name=${q(name)}`, { method: "DELETE", body: { confirm: name } }); toast(`deleted ${r.removed.join(", ") || "the run's record"}${r.kept.length ? `; kept ${r.kept.join(", ")}` : ""}`); location.hash = "#/runs"; }
    catch (err) { toast(err.message, true); }
  }
}

function drawChart(box, rows) {
  const series = [
    { key: "loss", label: "train loss", color: "#3b5bdb" },
    { key: "eval_loss", label: "validation loss", color: "#e8590c", dots: true },
    { key: "reward", label: "reward", color: "#2b8a3e" },
  ].map((s) => ({ ...s, points: rows.filter((r) => typeof r[s.key] === "number" && typeof r.step === "number").map((r) => [r.step, r[s.key]]) }))
    .filter((s) => s.points.length);
  const W = 900, H = 300, L = 56, R = 14, T = 12, B = 34;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("id", "curve");
  const add = (tag, attrs, text) => { const n = document.createElementNS(svg.namespaceURI, tag); for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v); if (text !== undefined) n.textContent = text; svg.append(n); return n; };
  const all = series.flatMap((s) => s.points);
  const points = rows.filter((r) => typeof r.loss === "number").length;
  svg.dataset.points = String(points);
  if (!all.length) {
    add("text", { x: W / 2, y: H / 2, "text-anchor": "middle", fill: "#6b7385" }, "waiting for the first logged step…");
    box.replaceChildren(svg);
    return;
  }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-6);
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R), sy = (y) => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const y = y0 + (y1 - y0) * i / 4, x = x0 + (x1 - x0) * i / 4;
    add("line", { x1: L, x2: W - R, y1: sy(y), y2: sy(y), stroke: "#eef0f5" });
    add("text", { x: L - 6, y: sy(y) + 4, "text-anchor": "end", "font-size": 11, fill: "#6b7385" }, y.toPrecision(3));
    add("text", { x: sx(x), y: H - B + 16, "text-anchor": "middle", "font-size": 11, fill: "#6b7385" }, Math.round(x));
  }
  add("text", { x: (W + L) / 2, y: H - 4, "text-anchor": "middle", "font-size": 11, fill: "#6b7385" }, "step");
  for (const s of series) {
    add("polyline", { points: s.points.map(([x, y]) => `${sx(x)},${sy(y)}`).join(" "), fill: "none", stroke: s.color, "stroke-width": 2, "data-series": s.key });
    if (s.dots) s.points.forEach(([x, y]) => add("circle", { cx: sx(x), cy: sy(y), r: 3.5, fill: s.color }));
  }
  const legend = el("div", { class: "legend" }, series.map((s) => el("span", {}, el("i", { style: `background:${s.color}` }), `${s.label} (${s.points.length})`)));
  box.replaceChildren(svg, legend);
}

function planTable(p) {
  return el("div", {},
    el("p", {}, `predicted peak ${bytes(p.peak_bytes)} (${p.phase}) on ${p.device}, ${p.dtype}, batch ${p.batch_size} × ${p.max_seq_len}`,
      p.available_bytes ? el("span", { class: p.fits ? "ok" : "bad" }, ` · ${bytes(p.available_bytes)} available: ${p.fits ? "fits" : "does NOT fit"}`) : ""),
    el("table", { class: "plan" }, el("tbody", {}, p.items.map((i) => el("tr", {}, el("td", {}, i.name), el("td", {}, bytes(i.bytes)), el("td", { class: "muted" }, i.note || ""))))),
    el("p", { class: "muted" }, `~${p.seconds_per_step.toPrecision(2)} s per optimizer step (rough)`));
}

// ---------------------------------------------------------------- new run
async function viewNew() {
  const { fields } = await api("/api/schema");
  const inputs = {};
  const errors = {};
  const name = el("input", { type: "text", id: "run-name", placeholder: "my-run", value: "" });
  errors["run name"] = el("div", { class: "error" });
  const extra = el("textarea", { id: "extra-yaml", rows: 4, placeholder: "eval:\n  every: 50" });
  errors[""] = el("div", { class: "error", id: "general-errors" });
  const sections = {};
  for (const f of fields) {
    const input = inputFor(f);
    inputs[f.name] = input;
    errors[f.name] = el("div", { class: "error" });
    const row = el("div", { class: "field", "data-field": f.name }, el("label", { for: `f-${f.name}` }, f.name + (f.required ? " *" : "")), input,
      el("div", { class: "help" }, f.help, f.default !== null && f.default !== "" && f.kind !== "bool" ? el("span", { class: "muted" }, ` (default ${JSON.stringify(f.default)})`) : ""), errors[f.name]);
    (sections[f.section] ||= []).push(row);
  }
  const open = new Set(["run", "model", "data", "train"]);
  const plan = el("div", { id: "plan" });
  main.append(el("h1", {}, "New run"),
    el("div", { class: "card" }, el("div", { class: "field" }, el("label", { for: "run-name" }, "run name *"), name,
      el("div", { class: "help" }, `a new directory under ${INFO ? INFO.runs_root : "the runs root"}`), errors["run name"]),
      el("div", { class: "actions" }, el("button", { class: "secondary", id: "fill-quickstart", onclick: fillQuickstart }, "Fill in the quickstart example"))),
    el("div", {}, Object.entries(sections).map(([section, rows]) => el("fieldset", {}, el("details", { open: open.has(section) }, el("summary", {}, section), rows)))),
    el("fieldset", {}, el("details", {}, el("summary", {}, "more settings (YAML: preference, rl, eval, tasks, sweep, model.quantization, …)"), extra)),
    errors[""],
    el("div", { class: "actions" },
      el("button", { class: "secondary", id: "check", onclick: check }, "Check and plan memory"),
      el("button", { class: "secondary", onclick: previewData }, "Preview data"),
      el("button", { id: "start", onclick: start }, "Start run")),
    plan);

  function inputFor(f) {
    const id = `f-${f.name}`;
    if (f.kind === "bool") return el("input", { type: "checkbox", id, checked: f.default === true });
    if (f.kind === "choice") {
      const options = (f.nullable ? [null] : []).concat(f.choices);
      return el("select", { id }, options.map((c) => el("option", { value: JSON.stringify(c), selected: JSON.stringify(c) === JSON.stringify(f.default) }, c === null ? "(none)" : String(c))));
    }
    if (f.kind === "yaml") return el("textarea", { id, rows: 1, placeholder: f.default === null ? "" : (typeof f.default === "string" ? f.default : JSON.stringify(f.default)) });
    return el("input", { type: f.kind === "str" ? "text" : "number", step: f.kind === "float" ? "any" : "1", id, placeholder: f.default === null ? (f.nullable ? "(none)" : "") : String(f.default) });
  }
  function values() {  // only what differs from the defaults, so the YAML written says what was chosen
    const out = {};
    for (const f of fields) {
      const input = inputs[f.name];
      if (f.kind === "bool") { if (input.checked !== (f.default === true)) out[f.name] = input.checked; continue; }
      if (f.kind === "choice") { const v = JSON.parse(input.value); if (JSON.stringify(v) !== JSON.stringify(f.default)) out[f.name] = v; continue; }
      if (input.value === "") continue;
      out[f.name] = f.kind === "int" ? parseInt(input.value, 10) : f.kind === "float" ? parseFloat(input.value) : input.value;
    }
    return out;
  }
  function form() { return { name: name.value.trim(), values: values(), extra_yaml: extra.value }; }
  function showErrors(byField) {
    for (const [key, box] of Object.entries(errors)) {
      const problems = byField[key] || [];
      box.textContent = problems.join("\n");
      const row = box.closest(".field");
      if (row) row.classList.toggle("bad", problems.length > 0);
      if (problems.length && row) row.closest("details").open = true;
    }
  }
  function fillQuickstart() {
    const qs = { ...INFO.quickstart, "model.dtype": "float32", "lora.r": 16, "lora.lora_alpha": 32, "lora.target_modules": "all-linear",
      "data.max_seq_len": 96, "train.max_steps": 300, "train.batch_size": 16, "train.lr": 0.003, "train.warmup_steps": 30,
      "train.lr_schedule": "linear", "train.eval_every": 50, "train.save_every": 50, "train.log_every": 10 };
    for (const [key, value] of Object.entries(qs)) {
      const input = inputs[key];
      if (!input) continue;
      if (input.tagName === "SELECT") input.value = JSON.stringify(value); else input.value = String(value);
    }
    if (!name.value) name.value = "quickstart";
  }
  async function check() {
    plan.replaceChildren(el("p", { class: "muted" }, "checking…"));
    try {
      const r = await api("/api/check", { method: "POST", body: form() });
      showErrors(r.fields || {});
      plan.replaceChildren(r.ok ? el("div", { class: "card" }, el("h2", {}, "Memory plan"), planTable(r.plan), el("h2", {}, "Run config"), el("pre", {}, r.yaml))
        : el("p", { class: "bad" }, "Fix the fields marked in red."));
    } catch (err) { plan.replaceChildren(el("p", { class: "bad" }, err.message)); }
  }
  async function previewData() {
    sessionStorage.setItem("lorakit-preview", JSON.stringify(form()));
    location.hash = "#/data/preview";
  }
  async function start() {
    try {
      const r = await api("/api/runs", { method: "POST", body: form() });
      toast(`run ${r.name} started (pid ${r.pid})`);
      location.hash = `#/run/${q(r.name)}`;
    } catch (err) { showErrors(err.fields); toast(err.message, true); }
  }
}

// ---------------------------------------------------------------- data
async function viewData(which) {
  const { runs } = await api("/api/runs");
  const choice = el("select", { id: "data-run" }, (which === "preview" ? [el("option", { value: "" }, "the new-run form")] : []),
    runs.map((r) => el("option", { value: r.name, selected: r.name === which }, r.name)));
  const split = el("select", { id: "data-split" }, el("option", { value: "train" }, "train"), el("option", { value: "validation" }, "validation"));
  const out = el("div", { id: "data-view" });
  main.append(el("h1", {}, "Data"), el("p", { class: "muted" }, "Examples as the model sees them; the tokens that carry loss are highlighted."),
    el("div", { class: "actions" }, choice, split, el("button", { onclick: show }, "Show")), out);
  if (which) show();
  async function show() {
    out.replaceChildren(el("p", { class: "muted" }, "tokenizing…"));
    const body = choice.value ? { run: choice.value } : JSON.parse(sessionStorage.getItem("lorakit-preview") || "{}");
    try {
      const d = await api("/api/data", { method: "POST", body: { ...body, split: split.value, count: 8 } });
      out.replaceChildren(el("div", {}, el("div", { class: "card" }, el("p", {}, d.summary),
        d.problems.length ? el("details", { open: true }, el("summary", {}, `dropped or cut records (${d.problems.length} listed)`), el("ul", {}, d.problems.map((p) => el("li", {}, p)))) : el("p", { class: "ok" }, "no records dropped")),
        d.examples.map((e, i) => el("div", { class: "card" }, el("div", { class: "muted" }, `example ${i + 1} (${e.source}): ${e.trained_tokens} of ${e.tokens} tokens carry loss`),
          el("div", { class: "example" }, e.pieces.map((p) => p.trained ? el("mark", {}, p.text) : p.text)),
          e.warnings.map((w) => el("p", { class: "warn" }, `warning: ${w}`)))),
        el("p", { class: "muted" }, `${d.examples.length} of ${d.total_examples} examples shown`)));
    } catch (err) { out.replaceChildren(el("p", { class: "bad" }, err.message)); }
  }
}

// ---------------------------------------------------------------- playground
async function viewPlayground(which) {
  const { runs } = await api("/api/runs");
  const withAdapter = runs.filter((r) => r.has_adapter);
  const boxes = withAdapter.map((r) => el("label", {}, el("input", { type: "checkbox", value: r.name, checked: r.name === which || (!which && withAdapter.length === 1) }), ` ${r.name} `));
  const state = el("p", { class: "muted", id: "pg-state" });
  const system = el("input", { type: "text", id: "pg-system", placeholder: "system prompt (optional)", style: "width:100%" });
  const prompt = el("textarea", { id: "pg-prompt", rows: 3, placeholder: "Ask something" });
  const temperature = el("input", { type: "number", id: "pg-temperature", value: "0", step: "0.1", min: "0", style: "width:80px" });
  const topP = el("input", { type: "number", value: "1", step: "0.05", min: "0", max: "1", style: "width:80px" });
  const maxTokens = el("input", { type: "number", id: "pg-max-tokens", value: "64", min: "1", style: "width:80px" });
  const seed = el("input", { type: "number", value: "0", style: "width:80px" });
  const columns = el("div", { class: "columns", id: "pg-columns" });
  let loaded = (await api("/api/playground")).loaded;
  // A chat per column: each column's own earlier answers are its side of the conversation.
  let turns = [];  // [{ user, replies: { model: text } }]
  main.append(el("h1", {}, "Playground"),
    el("div", { class: "card" }, el("div", {}, "Runs to compare with their base: ", boxes.length ? boxes : el("span", { class: "muted" }, "no run has an adapter yet")),
      el("div", { class: "actions" }, el("button", { id: "pg-load", onclick: load }, "Load"), state)),
    el("div", { class: "card" }, system, prompt,
      el("div", { class: "actions" }, "temperature ", temperature, " top_p ", topP, " max tokens ", maxTokens, " seed ", seed,
        el("button", { id: "pg-send", onclick: send }, "Send"), el("button", { class: "secondary", id: "pg-new", onclick: newChat }, "New chat"))),
    columns);
  showLoaded();

  function showLoaded() {
    state.textContent = loaded ? `loaded: ${loaded.base}` : "nothing loaded";
    turns = [];
    columns.replaceChildren(...(loaded ? loaded.columns.map((c) => el("div", { class: "card", "data-column": c.model }, el("h2", {}, c.label))) : []));
  }
  function newChat() { showLoaded(); prompt.value = ""; }
  async function load() {
    const chosen = boxes.map((b) => b.querySelector("input")).filter((i) => i.checked).map((i) => i.value);
    state.textContent = "loading the base and adapters…";
    try { loaded = (await api("/api/playground", { method: "POST", body: { runs: chosen } })).loaded; showLoaded(); }
    catch (err) { state.textContent = ""; toast(err.message, true); }
  }
  async function send() {
    if (!loaded) { toast("load runs first", true); return; }
    const turn = { user: prompt.value, replies: {} };
    await Promise.all(loaded.columns.map(async (c) => {
      const messages = (system.value ? [{ role: "system", content: system.value }] : [])
        .concat(turns.flatMap((t) => [{ role: "user", content: t.user }, { role: "assistant", content: t.replies[c.model] || "" }]))
        .concat([{ role: "user", content: turn.user }]);
      const answer = el("div", { class: "answer", "data-model": c.model });
      columns.querySelector(`[data-column="${CSS.escape(c.model)}"]`).append(el("div", { class: "you" }, turn.user), answer);
      turn.replies[c.model] = await streamInto(answer, { model: c.model, messages, stream: true, temperature: parseFloat(temperature.value),
        top_p: parseFloat(topP.value), max_tokens: parseInt(maxTokens.value, 10), seed: parseInt(seed.value, 10) });
    }));
    turns.push(turn);
    prompt.value = "";
  }
}

async function streamInto(box, request) {  // one OpenAI streamed chat completion, its deltas appended as they come
  box.textContent = "";
  box.dataset.done = "";
  const headers = { "Content-Type": "application/json" };
  if (TOKEN) headers.Authorization = `Bearer ${TOKEN}`;
  try {
    const response = await fetch("/playground/v1/chat/completions", { method: "POST", headers, body: JSON.stringify(request) });
    if (!response.ok) { const e = await response.json().catch(() => ({})); throw new Error((e.error && e.error.message) || `HTTP ${response.status}`); }
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).replace(/^data: /, "");
        buffer = buffer.slice(cut + 2);
        if (line === "[DONE]") continue;
        const chunk = JSON.parse(line);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) box.textContent += delta.content;
      }
    }
  } catch (err) { box.append(el("span", { class: "bad" }, `\n${err.message}`)); }
  box.dataset.done = "1";
  return box.textContent;
}

// ---------------------------------------------------------------- export
async function viewExport(which) {
  const { runs } = await api("/api/runs");
  const choice = el("select", { id: "ex-run" }, runs.filter((r) => r.has_adapter).map((r) => el("option", { value: r.name, selected: r.name === which }, r.name)));
  const format = el("select", { id: "ex-format" }, INFO.export_formats.map((f) => el("option", { value: f }, f)));
  const quant = el("select", { id: "ex-quant" }, INFO.export_quants.map((f) => el("option", { value: f }, f)));
  const progress = el("div", { id: "ex-progress" }), findings = el("div", { id: "ex-check" });
  main.append(el("h1", {}, "Export"),
    el("div", { class: "card" }, el("div", { class: "actions" }, "run ", choice, " format ", format, " quant (gguf, ollama) ", quant,
      el("button", { id: "ex-start", onclick: () => start(false) }, "Export"), el("button", { class: "secondary", id: "ex-check-btn", onclick: deployCheck }, "Deploy check"))),
    el("div", { class: "card" }, el("h2", {}, "Exports"), progress), el("div", { class: "card" }, el("h2", {}, "Deploy check"), findings));
  choice.addEventListener("change", () => { findings.replaceChildren(); });
  every(1000, async () => {
    if (!choice.value) { progress.textContent = "no run has an adapter yet"; return; }
    const { exports } = await api(`/api/run/exports?name=${q(choice.value)}`);
    progress.replaceChildren(...(exports.length ? exports.map((x) => el("div", { "data-format": x.format, "data-state": x.state },
      el("p", {}, el("b", {}, x.format), " → ", x.out, " ", badge(x.state === "done" ? "finished" : x.state)),
      el("pre", {}, x.log))) : [el("p", { class: "muted" }, "no export of this run yet")]));
  });
  async function start(overwrite) {
    try { const r = await api(`/api/run/export?name=${q(choice.value)}`, { method: "POST", body: { format: format.value, quant: quant.value, overwrite } }); toast(`exporting to ${r.out}`); }
    catch (err) {
      if (!overwrite && /exists/.test(err.message) && confirm(`${err.message}\n\nReplace it?`)) return start(true);
      toast(err.message, true);
    }
  }
  async function deployCheck() {
    findings.replaceChildren(el("p", { class: "muted" }, "checking…"));
    try {
      const r = await api(`/api/run/check?name=${q(choice.value)}`);
      findings.replaceChildren(el("p", {}, r.tensors),
        el("table", {}, el("tbody", {}, Object.entries(r.targets).map(([t, s]) => el("tr", { "data-target": t }, el("td", {}, t),
          el("td", { class: s === "ok" ? "ok" : s === "refused" ? "bad" : "warn" }, s),
          el("td", {}, r.findings.filter((f) => f.target === t).map((f) => el("div", {}, `${f.severity}: ${f.problem} — fix: ${f.fix}`))))))));
    } catch (err) { findings.replaceChildren(el("p", { class: "bad" }, err.message)); }
  }
}
