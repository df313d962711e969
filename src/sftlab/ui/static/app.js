// sftlab ui: one page, routed by the URL's #hash. Live data arrives as server-sent events (/api/events).
"use strict";

const $ = (sel, root) => (root || document).querySelector(sel);
const main = () => document.getElementById("main");
const COLORS = ["#0969da", "#cf222e", "#1a7f37", "#8250df", "#bc4c00", "#1b7c83"];
let stream = null;

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}
function num(v, digits) { return v === null || v === undefined ? "" : (+v).toFixed(digits ?? 4); }
function secs(s) {
  if (s === null || s === undefined) return "";
  s = Math.round(s); const h = Math.floor(s / 3600), m = Math.floor(s % 3600 / 60), x = s % 60;
  return (h ? h + ":" + String(m).padStart(2, "0") : m) + ":" + String(x).padStart(2, "0");
}
function stateBadge(s) { return `<span class="state ${esc(s)}" data-state="${esc(s)}">${esc(s)}</span>`; }
function runLink(name) { return `<a href="#/run/${encodeURIComponent(name)}">${esc(name)}</a>`; }

async function api(path, body) {
  const init = body === undefined ? {} :
    {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const r = await fetch(path, init);
  const data = await r.json().catch(() => ({error: r.statusText}));
  if (!r.ok && !data.errors) throw new Error(data.error || r.statusText);
  return data;
}

function listen(query, handlers) {
  if (stream) stream.close();
  stream = new EventSource("/api/events" + query);
  const conn = document.getElementById("conn");
  stream.onopen = () => conn.classList.add("live");
  stream.onerror = () => conn.classList.remove("live");
  for (const [ev, fn] of Object.entries(handlers)) stream.addEventListener(ev, e => fn(JSON.parse(e.data)));
}

// ---- runs ----------------------------------------------------------------------------------------------------
function renderRuns(rows) {
  const body = rows.map(r => `<tr data-run="${esc(r.name)}">
    <td>${runLink(r.name)}</td><td>${stateBadge(r.state)}</td><td>${esc(r.model)}</td><td>${esc(r.data)}</td>
    <td>${esc(r.finetuning_type)}</td><td class="num">${r.step}${r.max_steps ? " / " + r.max_steps : ""}</td>
    <td class="num">${num(r.last_loss)}</td><td class="num">${num(r.tokens_per_second, 1)}</td>
    <td class="num">${secs(r.eta_seconds)}</td></tr>`).join("");
  $("#runs").innerHTML = rows.length ? `<table><thead><tr><th>run</th><th>state</th><th>model</th><th>data</th>
    <th>type</th><th>steps</th><th>last loss</th><th>tokens/s</th><th>ETA</th></tr></thead><tbody>${body}</tbody></table>`
    : `<p class="muted">No runs in this workspace yet. <a href="#/new">Start one.</a></p>`;
}

function pageRuns() {
  main().innerHTML = `<h2>Runs</h2><div id="runs" class="card">loading…</div>`;
  listen("", {runs: renderRuns});
}

// ---- one run -------------------------------------------------------------------------------------------------
let predRows = [], predSort = {key: "f1", asc: true};

function drawRunCharts(d) {
  const raw = d.train.map(p => [p.step, p.loss]), smooth = d.train.map(p => [p.step, p.smoothed]);
  const series = [{name: "train loss (raw)", color: "#9ecae1", points: raw, dots: true},
                  {name: "train loss (smoothed)", color: "#08519c", points: smooth, width: 2.5}];
  if (d.eval.length) series.push({name: "eval loss", color: "#d94801", points: d.eval.map(p => [p.step, p.eval_loss]), dots: true});
  lineChart($("#chart-loss"), series, {title: "loss"});
  lineChart($("#chart-lr"), [{name: "learning rate", color: "#8250df", points: d.train.map(p => [p.step, p.learning_rate])}], {height: 160});
  lineChart($("#chart-tps"), [{name: "tokens/s", color: "#1a7f37", points: d.train.map(p => [p.step, p.tokens_per_second])}], {height: 160});
}

function renderRun(d) {
  $("#run-state").innerHTML = stateBadge(d.state) +
    ` step ${d.step}${d.max_steps ? " / " + d.max_steps : ""}` + (d.eta_seconds ? `, ETA ${secs(d.eta_seconds)}` : "");
  $("#btn-stop").disabled = d.state !== "running";
  $("#btn-resume").disabled = d.state === "running" || d.state === "finished";
  $("#checkpoints").textContent = d.checkpoints.length ? d.checkpoints.join(", ") : "none";
  drawRunCharts(d);
  $("#metrics").innerHTML = Object.keys(d.metrics).length ? "<table>" + Object.entries(d.metrics).sort()
    .map(([k, v]) => `<tr><td>${esc(k)}</td><td class="num">${typeof v === "number" ? num(v) : esc(v)}</td></tr>`).join("") + "</table>"
    : `<span class="muted">none yet</span>`;
  $("#logtail").textContent = d.log_tail || "";
  $("#modelcard").textContent = d.model_card || "(written when training ends)";
  const sel = $("#pred-file");
  const current = sel.value;
  sel.innerHTML = d.predictions.map(f => `<option ${f === current ? "selected" : ""}>${esc(f)}</option>`).join("");
  $("#pred-open").disabled = !d.predictions.length;
}

function renderPredictions() {
  const cols = ["row", "f1", "exact_match", "rouge-l", "bleu-4", "prompt", "predict", "label"];
  const k = predSort.key;
  const rows = [...predRows].sort((a, b) => (a[k] < b[k] ? -1 : a[k] > b[k] ? 1 : a.row - b.row) * (predSort.asc ? 1 : -1));
  $("#predictions").innerHTML = `<table id="pred-table"><thead><tr>${cols.map(c =>
    `<th class="sortable" data-key="${c}">${c}${c === k ? (predSort.asc ? " ▲" : " ▼") : ""}</th>`).join("")}</tr></thead><tbody>
    ${rows.map(r => `<tr>${cols.map(c => `<td class="${typeof r[c] === "number" ? "num" : ""}">${esc(r[c])}</td>`).join("")}</tr>`).join("")}
    </tbody></table>`;
  for (const th of document.querySelectorAll("#pred-table th")) th.onclick = () => {
    predSort = {key: th.dataset.key, asc: predSort.key === th.dataset.key ? !predSort.asc : true};
    renderPredictions();
  };
}

function pageRun(name) {
  main().innerHTML = `<h2>${esc(name)} <span id="run-state"></span></h2>
    <div class="card"><button id="btn-stop">Stop (save a checkpoint)</button> <button id="btn-resume">Resume</button>
      <span id="run-msg" class="muted"></span> <span class="muted">checkpoints: <span id="checkpoints"></span></span></div>
    <div class="row"><div class="grow card"><h3>Loss</h3><div id="chart-loss"></div></div>
      <div class="grow card"><h3>Learning rate</h3><div id="chart-lr"></div><h3>Tokens/s</h3><div id="chart-tps"></div></div></div>
    <div class="row"><div class="grow card"><h3>Metrics</h3><div id="metrics"></div></div>
      <div class="grow card"><h3>Log</h3><pre id="logtail"></pre></div></div>
    <div class="card"><h3>Predictions</h3><select id="pred-file"></select> <button id="pred-open">Show, worst first</button>
      <div id="predictions"></div></div>
    <div class="card"><h3>Model card</h3><pre id="modelcard" class="card-text"></pre></div>`;
  const act = async (what) => {
    $("#run-msg").textContent = "";
    try { await api("/api/" + what, {name}); $("#run-msg").textContent = what === "stop" ?
      "stop requested: the run saves a checkpoint after this step" : "resumed from the newest checkpoint"; }
    catch (e) { $("#run-msg").innerHTML = `<span class="err">${esc(e.message)}</span>`; }
  };
  $("#btn-stop").onclick = () => act("stop");
  $("#btn-resume").onclick = () => act("resume");
  $("#pred-open").onclick = async () => {
    predRows = await api(`/api/predictions?name=${encodeURIComponent(name)}&file=${encodeURIComponent($("#pred-file").value)}`);
    predSort = {key: "f1", asc: true};
    renderPredictions();
  };
  listen("?name=" + encodeURIComponent(name), {run: renderRun});
}

// ---- new run -------------------------------------------------------------------------------------------------
let schema = null, mode = "form";

function fieldInput(f) {
  const id = "f-" + f.name;
  if (f.kind === "bool" || f.kind === "choice") {
    const opts = f.kind === "bool" ? ["true", "false"] : f.choices;
    return `<select id="${id}" data-name="${f.name}"><option value="">default (${esc(f.default || "none")})</option>
      ${opts.map(o => `<option value="${esc(o)}">${esc(o)}</option>`).join("")}</select>`;
  }
  const type = f.kind === "int" || f.kind === "float" ? "text" : "text";
  return `<input id="${id}" type="${type}" data-name="${f.name}" placeholder="${esc(f.default ? "default: " + f.default : "")}">`;
}

function renderForm() {
  $("#form").innerHTML = schema.map(g => `<details ${g.open ? "open" : ""} data-group="${esc(g.group)}">
    <summary>${esc(g.group)} (${g.fields.length})</summary>
    ${g.fields.map(f => `<div class="field" data-field="${f.name}"><label for="f-${f.name}">${f.name}</label>${fieldInput(f)}
      <div class="help">${esc(f.help)}${f.default ? ` <em>default: ${esc(f.default)}</em>` : ""}</div>
      <div class="err" data-err="${f.name}"></div></div>`).join("")}</details>`).join("");
}

function formBody() {
  if (mode === "yaml") return {yaml: $("#yaml").value};
  const values = {};
  for (const el of document.querySelectorAll("#form [data-name]")) if (el.value.trim() !== "") values[el.dataset.name] = el.value.trim();
  return {values};
}

function showErrors(errors) {
  for (const el of document.querySelectorAll("[data-err]")) el.textContent = "";
  for (const el of document.querySelectorAll(".field.invalid")) el.classList.remove("invalid");
  $("#form-msg").innerHTML = "";
  for (const [k, msg] of Object.entries(errors || {})) {
    const slot = mode === "form" && document.querySelector(`[data-err="${k}"]`);
    if (slot) {
      slot.textContent = msg;
      const field = slot.closest(".field"); field.classList.add("invalid");
      const det = slot.closest("details"); if (det) det.open = true;
      field.scrollIntoView({block: "center"});
    } else $("#form-msg").innerHTML += `<div class="notice error" data-error="${esc(k)}">${esc(msg)}</div>`;
  }
}

function renderPreview(res) {
  const ex = (res.examples || []).map((e, i) => e.dropped ? `<div class="example">#${i} ${esc(e.source)}: dropped (${esc(e.dropped)})</div>` :
    `<div class="muted">#${i} ${esc(e.source)} (${esc(e.format)}): ${e.prompt_tokens} prompt + ${e.trained_tokens} trained tokens${e.truncated ? ", truncated" : ""}</div>
     <div class="example" data-example="${i}" data-source="${esc(e.source)}">${e.spans.map(s => s.trained ?
       `<mark class="trained" data-start="${s.start}" data-end="${s.end}">${esc(s.text)}</mark>` :
       `<span data-start="${s.start}" data-end="${s.end}">${esc(s.text)}</span>`).join("")}</div>`).join("");
  $("#preview").innerHTML = `<h3>Data</h3><pre class="card-text" id="summary">${esc((res.summary || []).join("\n"))}</pre>
    <h3>First examples (trained tokens highlighted, as <code>sftlab data preview</code>)</h3>${ex}
    <p class="muted">sftlab train ${esc((res.argv || []).join(" "))}</p>`;
}

async function checkForm(withPreview) {
  $("#preview").innerHTML = withPreview ? `<p class="muted">checking and reading the data…</p>` : "";
  const res = await api("/api/check", {...formBody(), preview: withPreview});
  showErrors(res.errors);
  if (res.ok && withPreview) renderPreview(res); else if (!res.ok) $("#preview").innerHTML = "";
  return res;
}

async function pageNew() {
  main().innerHTML = `<h2>New run</h2>
    <div class="card tabs"><button id="tab-form" class="active">Form</button> <button id="tab-yaml">YAML</button>
      <span class="muted">validated by the same checks as <code>sftlab train</code>; relative paths are inside the workspace</span></div>
    <div id="form-msg"></div>
    <div class="row"><div class="grow card"><div id="form">loading…</div>
      <textarea id="yaml" hidden placeholder="model_name_or_path: ...&#10;train_file: data/train.jsonl&#10;output_dir: saves/my-run"></textarea>
      <p><button id="btn-check">Check and preview data</button> <button id="btn-launch" class="primary">Launch</button></p></div>
    <div class="grow card" id="preview"></div></div>`;
  const setMode = m => { mode = m; $("#form").hidden = m !== "form"; $("#yaml").hidden = m !== "yaml";
    $("#tab-form").classList.toggle("active", m === "form"); $("#tab-yaml").classList.toggle("active", m === "yaml"); };
  $("#tab-form").onclick = () => setMode("form");
  $("#tab-yaml").onclick = () => setMode("yaml");
  setMode(mode);
  $("#btn-check").onclick = () => checkForm(true).catch(e => showErrors({_form: e.message}));
  $("#btn-launch").onclick = async () => {
    try {
      const res = await api("/api/launch", formBody());
      if (!res.ok) return showErrors(res.errors);
      location.hash = "#/run/" + encodeURIComponent(res.name);
    } catch (e) { showErrors({_form: e.message}); }
  };
  schema = schema || await api("/api/schema");
  renderForm();
  listen("", {});
}

// ---- compare -------------------------------------------------------------------------------------------------
async function pageCompare(names) {
  main().innerHTML = `<h2>Compare</h2><div class="card" id="pick">loading…</div><div id="cmp"></div>`;
  const runs = await api("/api/runs");
  const chosen = new Set(names);
  $("#pick").innerHTML = runs.map(r => `<label><input type="checkbox" value="${esc(r.name)}" ${chosen.has(r.name) ? "checked" : ""}>
    ${esc(r.name)}</label> ${stateBadge(r.state)}<br>`).join("") + `<p><button id="btn-compare" class="primary">Compare</button></p>`;
  $("#btn-compare").onclick = () => {
    const sel = [...document.querySelectorAll("#pick input:checked")].map(i => i.value);
    location.hash = "#/compare/" + sel.map(encodeURIComponent).join(",");
  };
  if (names.length < 2) { $("#cmp").innerHTML = `<p class="muted">Choose two or more runs.</p>`; return; }
  const d = await api("/api/compare?names=" + names.map(encodeURIComponent).join(","));
  $("#cmp").innerHTML = `<div class="card"><h3>Training loss (smoothed, solid) and eval loss (dashed)</h3><div id="chart-cmp"></div></div>
    <div class="card"><h3>Metrics and hyperparameters</h3><label><input type="checkbox" id="only-diff"> differences only</label>
    <table id="cmp-table"><thead><tr><th>key</th>${d.runs.map(r => `<th>${esc(r.name)}</th>`).join("")}</tr></thead><tbody>
    ${d.table.map(r => `<tr class="${r.differs ? "differs" : ""}" data-key="${esc(r.key)}"><td>${esc(r.key)}</td>${r.values.map(v =>
      `<td class="${typeof v === "number" ? "num" : ""}">${typeof v === "number" && !Number.isInteger(v) ? num(v) : esc(v)}</td>`).join("")}</tr>`).join("")}
    </tbody></table></div>`;
  const series = [];
  d.runs.forEach((r, i) => {
    series.push({name: r.name, color: COLORS[i % COLORS.length], points: r.train.map(p => [p.step, p.smoothed]), width: 2});
    if (r.eval.length) series.push({name: r.name + " eval", color: COLORS[i % COLORS.length], dash: "5 4", dots: true,
      points: r.eval.map(p => [p.step, p.eval_loss])});
  });
  lineChart($("#chart-cmp"), series, {height: 280});
  $("#only-diff").onchange = e => { for (const tr of document.querySelectorAll("#cmp-table tbody tr"))
    tr.hidden = e.target.checked && !tr.classList.contains("differs"); };
}

// ---- chat ----------------------------------------------------------------------------------------------------
let history = [];

function renderChat() {
  $("#chatlog").innerHTML = history.map(m => `<div class="msg ${m.role}">${esc(m.content)}</div>`).join("") ||
    `<p class="muted">Ask something. Each turn sends the whole conversation, formatted with the run's template.</p>`;
}

async function send() {
  const text = $("#chat-input").value.trim();
  if (!text) return;
  $("#chat-input").value = "";
  history.push({role: "user", content: text});
  const reply = {role: "assistant", content: ""};
  const asked = history.slice();
  history.push(reply);
  renderChat();
  const out = [...document.querySelectorAll("#chatlog .msg.assistant")].pop();
  out.dataset.streaming = "1";
  $("#chat-send").disabled = true;
  try {
    const r = await fetch("/api/chat", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({name: $("#chat-run").value, base: $("#chat-base").checked, messages: asked,
        max_new_tokens: +$("#chat-max").value || 128})});
    if (!r.ok) throw new Error((await r.json().catch(() => ({}))).error || r.statusText);
    const reader = r.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += dec.decode(value, {stream: true});
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut); buf = buf.slice(cut + 2);
        const ev = (block.match(/^event: (.*)$/m) || [])[1], data = JSON.parse((block.match(/^data: (.*)$/m) || [])[1] || "null");
        if (ev === "token") { reply.content += data; out.textContent = reply.content;
          out.dataset.pieces = String(+(out.dataset.pieces || 0) + 1); }
        if (ev === "error") throw new Error(data);
      }
    }
  } catch (e) {
    reply.content += `\n[error: ${e.message}]`; out.textContent = reply.content;
  } finally {
    delete out.dataset.streaming; out.dataset.done = "1";
    $("#chat-send").disabled = false;
  }
}

async function pageChat(name) {
  main().innerHTML = `<h2>Chat</h2><div class="card">Run <select id="chat-run"></select>
    <label><input type="checkbox" id="chat-base"> base model (with the run's template)</label>
    max new tokens <input id="chat-max" value="64" size="4"> <button id="chat-reset">Reset</button></div>
    <div class="card"><div id="chatlog"></div>
    <p><input id="chat-input" style="width:75%" placeholder="Message"> <button id="chat-send" class="primary">Send</button></p></div>`;
  const runs = (await api("/api/runs")).filter(r => r.state !== "running" && r.state !== "failed");
  $("#chat-run").innerHTML = runs.map(r => `<option ${r.name === name ? "selected" : ""}>${esc(r.name)}</option>`).join("");
  $("#chat-reset").onclick = () => { history = []; renderChat(); };
  $("#chat-run").onchange = () => { history = []; renderChat(); };
  $("#chat-send").onclick = send;
  $("#chat-input").onkeydown = e => { if (e.key === "Enter") send(); };
  renderChat();
  listen("", {});
}

// ---- routing -------------------------------------------------------------------------------------------------
function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/");
  const page = parts[0] || "runs", arg = decodeURIComponent(parts.slice(1).join("/"));
  for (const a of document.querySelectorAll("[data-nav]")) a.classList.toggle("active", a.dataset.nav === (page === "run" ? "runs" : page));
  const pages = {runs: pageRuns, run: () => pageRun(arg), new: pageNew, compare: () => pageCompare(arg ? arg.split(",").filter(Boolean) : []),
                 chat: () => pageChat(arg)};
  (pages[page] || pageRuns)();
}
window.addEventListener("hashchange", route);
route();
