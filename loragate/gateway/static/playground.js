// loragate playground: one prompt, several models side by side, each answer streamed into its own
// column. Talks to the server only through the public OpenAI-compatible API, with the API key
// (if any) kept in this tab's sessionStorage. Everything the server returns is shown as text
// (textContent), never as markup.
"use strict";

const KEY_STORAGE = "loragate.apiKey";
const SELECTION_STORAGE = "loragate.selectedModels";
const ADAPTER_REFRESH_MS = 3000;
const DEFAULT_COLUMNS = 6;

const $ = (id) => document.getElementById(id);

const state = {
  models: [],           // model cards from /v1/models, base first
  selected: new Set(),  // model ids picked for the next prompt
  base: null,           // the base model's id
  controllers: [],      // AbortControllers of the streams in flight
  adapterTimer: null,
};

// ------------------------------------------------------------------ API helpers

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = apiKey();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// The API's own error object ({"error": {"message", "type", "param", "code"}}) with its status.
async function readError(resp) {
  let error = { message: resp.statusText || "request failed", type: null, code: null };
  try {
    const body = await resp.json();
    if (body && body.error) error = body.error;
  } catch (_) { /* not JSON: keep the status text */ }
  return { status: resp.status, ...error };
}

function describe(err) {
  const parts = [];
  if (err.status) parts.push(String(err.status));
  if (err.type) parts.push(err.type);
  const head = parts.join(" ");
  const code = err.code ? ` (${err.code})` : "";
  return (head ? head + ": " : "") + (err.message || "error") + code;
}

function networkError(exc) {
  return { status: 0, type: "network_error", message: String(exc && exc.message ? exc.message : exc) };
}

// ------------------------------------------------------------------ banner

function showBanner(err) {
  const banner = $("banner");
  banner.textContent = describe(err);
  banner.hidden = false;
}

function hideBanner() {
  $("banner").hidden = true;
  $("banner").textContent = "";
}

// ------------------------------------------------------------------ models

async function loadModels() {
  let resp;
  try {
    resp = await fetch("/v1/models", { headers: headers(false) });
  } catch (exc) {
    showBanner(networkError(exc));
    return;
  }
  if (!resp.ok) {
    state.models = [];
    renderModels();
    showBanner(await readError(resp));
    return;
  }
  hideBanner();
  const body = await resp.json();
  const models = body.data || [];
  // base models (no parent) first, then adapters in the server's order
  state.models = models.filter((m) => !m.parent).concat(models.filter((m) => m.parent));
  const base = state.models.find((m) => !m.parent);
  state.base = base ? base.id : (models[0] && models[0].parent) || null;
  restoreSelection();
  renderModels();
}

function restoreSelection() {
  const ids = new Set(state.models.map((m) => m.id));
  let saved = null;
  try { saved = JSON.parse(sessionStorage.getItem(SELECTION_STORAGE) || "null"); } catch (_) { saved = null; }
  const kept = Array.isArray(saved) ? saved.filter((id) => ids.has(id)) : [];
  state.selected = new Set(kept.length ? kept : state.models.slice(0, DEFAULT_COLUMNS).map((m) => m.id));
}

function saveSelection() {
  sessionStorage.setItem(SELECTION_STORAGE, JSON.stringify([...state.selected]));
}

function renderModels() {
  const list = $("model-list");
  list.replaceChildren();
  for (const m of state.models) {
    const label = document.createElement("label");
    label.className = "chip" + (m.parent ? "" : " chip-base");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = m.id;
    box.checked = state.selected.has(m.id);
    box.addEventListener("change", () => {
      if (box.checked) state.selected.add(m.id); else state.selected.delete(m.id);
      saveSelection();
      renderIdleColumns();
    });
    const name = document.createElement("span");
    name.textContent = m.id;
    label.append(box, name);
    list.append(label);
  }
  if (!state.models.length) {
    const empty = document.createElement("span");
    empty.className = "muted";
    empty.textContent = "no models visible with this key";
    list.append(empty);
  }
  const info = $("base-info");
  if (state.base) {
    $("base-name").textContent = state.base;
    const n = state.models.filter((m) => m.parent).length;
    $("adapter-count").textContent = n === 1 ? "1 adapter" : `${n} adapters`;
    info.hidden = false;
  } else {
    info.hidden = true;
  }
  renderIdleColumns();
}

function selectedModels() {
  return state.models.map((m) => m.id).filter((id) => state.selected.has(id));
}

// ------------------------------------------------------------------ columns

function makeColumn(model) {
  const node = $("column-template").content.firstElementChild.cloneNode(true);
  node.dataset.model = model;
  node.dataset.state = "idle";
  node.querySelector(".model-name").textContent = model;
  const card = state.models.find((m) => m.id === model);
  node.querySelector(".kind").textContent = card && card.parent ? "adapter" : "base";
  node.querySelector(".state").textContent = "ready";
  return node;
}

// Before any prompt (or after changing the selection while idle): one empty column per model.
function renderIdleColumns() {
  if (state.controllers.length) return;  // never tear down columns that are streaming
  const columns = $("columns");
  const models = selectedModels();
  columns.replaceChildren(...models.map(makeColumn));
  columns.dataset.count = String(models.length);
}

function setColumnState(node, value, label) {
  node.dataset.state = value;
  node.querySelector(".state").textContent = label;
}

function updateStats(node, s) {
  const now = s.end || performance.now();
  node.querySelector(".ttft").textContent = s.first === null ? "–" : formatMs(s.first - s.start);
  node.querySelector(".ntok").textContent = String(s.tokens);
  let tps = "–";
  if (s.first !== null && s.tokens > 1 && now > s.first) {
    tps = ((s.tokens - 1) / ((now - s.first) / 1000)).toFixed(1);
  }
  node.querySelector(".tps").textContent = tps;
}

function formatMs(ms) {
  return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${Math.round(ms)} ms`;
}

function showColumnError(node, err) {
  const box = node.querySelector(".error");
  box.textContent = describe(err);
  box.hidden = false;
  setColumnState(node, "error", "error");
}

// One streamed chat completion into one column. Resolves when the stream ends (or fails).
async function streamInto(node, model, messages, params, controller) {
  const s = { start: performance.now(), first: null, end: null, tokens: 0, usage: null };
  const out = node.querySelector(".output");
  setColumnState(node, "waiting", "waiting…");
  let resp;
  try {
    resp = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(true),
      body: JSON.stringify({ model, messages, stream: true, stream_options: { include_usage: true }, ...params }),
      signal: controller.signal,
    });
  } catch (exc) {
    if (controller.signal.aborted) setColumnState(node, "stopped", "stopped");
    else showColumnError(node, networkError(exc));
    return;
  }
  if (!resp.ok) {
    showColumnError(node, await readError(resp));
    return;
  }
  setColumnState(node, "streaming", "streaming…");
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let finish = null;
  const handle = (data) => {
    if (data === "[DONE]") return;
    let chunk;
    try { chunk = JSON.parse(data); } catch (_) { return; }
    if (chunk.error) { showColumnError(node, chunk.error); return; }
    if (chunk.usage) s.usage = chunk.usage;
    for (const choice of chunk.choices || []) {
      const piece = choice.delta && choice.delta.content;
      if (piece) {
        if (s.first === null) s.first = performance.now();
        s.tokens += 1;
        out.textContent += piece;
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    updateStats(node, s);
  };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (line.startsWith("data:")) handle(line.slice(5).trim());
        }
      }
    }
  } catch (exc) {
    s.end = performance.now();
    updateStats(node, s);
    if (controller.signal.aborted) setColumnState(node, "stopped", "stopped");
    else showColumnError(node, networkError(exc));
    return;
  }
  s.end = performance.now();
  if (s.usage && typeof s.usage.completion_tokens === "number") s.tokens = s.usage.completion_tokens;
  updateStats(node, s);
  if (node.dataset.state !== "error") {
    setColumnState(node, "done", finish === "length" ? "done · max tokens" : "done");
  }
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  const models = selectedModels();
  if (!text) { $("prompt").focus(); return; }
  if (!models.length) {
    showBanner({ message: "Pick at least one model above." });
    return;
  }
  hideBanner();
  stopAll();
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push({ role: "user", content: text });
  const params = {};
  const temperature = parseFloat($("temperature").value);
  if (!Number.isNaN(temperature)) params.temperature = temperature;
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (!Number.isNaN(maxTokens)) params.max_tokens = maxTokens;

  const columns = $("columns");
  const nodes = models.map(makeColumn);
  columns.replaceChildren(...nodes);
  columns.dataset.count = String(nodes.length);
  state.controllers = models.map(() => new AbortController());
  $("stop").disabled = false;
  const runs = models.map((m, i) => streamInto(nodes[i], m, messages, params, state.controllers[i]));
  await Promise.allSettled(runs);
  state.controllers = [];
  $("stop").disabled = true;
  if (state.adapterTimer) refreshAdapters();  // requests served changed
}

function stopAll() {
  for (const c of state.controllers) c.abort();
  state.controllers = [];
  $("stop").disabled = true;
}

// ------------------------------------------------------------------ adapters (admin keys)

function formatBytes(n) {
  if (typeof n !== "number") return "–";
  if (n >= 1 << 30) return (n / (1 << 30)).toFixed(1) + " GiB";
  if (n >= 1 << 20) return (n / (1 << 20)).toFixed(1) + " MiB";
  if (n >= 1 << 10) return (n / (1 << 10)).toFixed(0) + " KiB";
  return n + " B";
}

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

async function refreshAdapters() {
  let resp;
  try {
    resp = await fetch("/v1/adapters", { headers: headers(false) });
  } catch (_) {
    return;  // the server is away; the models call reports that
  }
  const panel = $("adapters-panel");
  if (resp.status === 401 || resp.status === 403) {
    // not an admin key (or no valid key): stop asking until the key changes
    panel.hidden = true;
    $("admin-note").hidden = resp.status !== 403;
    stopAdapterRefresh();
    return;
  }
  if (!resp.ok) {
    panel.hidden = false;
    $("adapters-updated").textContent = describe(await readError(resp));
    return;
  }
  const body = await resp.json();
  const rows = (body.data || []).map((a) => {
    const tr = document.createElement("tr");
    tr.dataset.adapter = a.id;
    const tier = cell("", "");
    const badge = document.createElement("span");
    badge.className = "tier tier-" + String(a.tier || "unknown").toLowerCase();
    badge.textContent = a.tier || "–";
    tier.append(badge);
    tr.append(
      cell(a.id, "mono"),
      tier,
      cell(a.rank == null ? "–" : String(a.rank), "num"),
      cell(formatBytes(a.size_bytes), "num"),
      cell(String(a.requests_served ?? 0), "num"),
      cell(String(a.load_count ?? 0), "num"),
      cell(a.last_load_seconds == null ? "–" : formatMs(a.last_load_seconds * 1000), "num"),
      cell(a.pinned ? "yes" : "", ""),
      cell(a.error || "", "err"),
    );
    return tr;
  });
  $("adapters-table").tBodies[0].replaceChildren(...rows);
  $("adapters-updated").textContent = `${rows.length} registered · updated ${new Date().toLocaleTimeString()}`;
  panel.hidden = false;
  $("admin-note").hidden = true;
}

function startAdapterRefresh() {
  stopAdapterRefresh();
  state.adapterTimer = setInterval(refreshAdapters, ADAPTER_REFRESH_MS);
  refreshAdapters();
}

function stopAdapterRefresh() {
  if (state.adapterTimer) clearInterval(state.adapterTimer);
  state.adapterTimer = null;
}

// ------------------------------------------------------------------ key

function useKey(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORAGE, key); else sessionStorage.removeItem(KEY_STORAGE);
  reconnect();
}

function forgetKey() {
  sessionStorage.removeItem(KEY_STORAGE);
  $("api-key").value = "";
  reconnect();
}

function reconnect() {
  loadModels();
  startAdapterRefresh();
}

// ------------------------------------------------------------------ start

function init() {
  $("api-key").value = apiKey();
  $("key-form").addEventListener("submit", useKey);
  $("key-clear").addEventListener("click", forgetKey);
  $("prompt-form").addEventListener("submit", send);
  $("stop").addEventListener("click", stopAll);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("prompt-form").requestSubmit();
    }
  });
  $("select-all").addEventListener("click", () => {
    state.selected = new Set(state.models.map((m) => m.id));
    saveSelection();
    renderModels();
  });
  $("select-none").addEventListener("click", () => {
    state.selected = new Set();
    saveSelection();
    renderModels();
  });
  reconnect();
}

document.addEventListener("DOMContentLoaded", init);
