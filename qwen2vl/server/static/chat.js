// qwen2vl chat page: talks to this server's own /v1/chat/completions (SSE), like any OpenAI client.
// State is explicit: `history` holds the finished turns in OpenAI message form (images stay in it as data: URLs,
// so later turns are still about them); `pending` holds the media attached to the next message.
"use strict";

const KEY_STORE = "qwen2vl-api-key";
const $ = (id) => document.getElementById(id);
const state = { config: null, history: [], pending: [], controller: null, busy: false };

function apiKey() { return sessionStorage.getItem(KEY_STORE) || ""; }

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey()) h["Authorization"] = "Bearer " + apiKey();
  return h;
}

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function showComposerError(message) {
  const p = $("composer-error");
  p.textContent = message;
  p.hidden = !message;
}

// ---- media: read, downscale to the server's pixel cap, preview ----
function readAsDataURL(blob) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(new Error("could not read the file"));
    r.readAsDataURL(blob);
  });
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("not an image this browser can decode"));
    img.src = url;
  });
}

// Pictures larger than the server's width*height cap would be refused: shrink them here (aspect kept), so a
// phone photo uploads as a picture the server accepts. The processor still resizes to the chat's max pixels.
async function prepareImage(file) {
  const url = await readAsDataURL(file);
  const img = await loadImage(url);
  const cap = state.config ? state.config.max_image_pixels : Infinity;
  const w = img.naturalWidth, h = img.naturalHeight;
  if (w * h <= cap) return { url, width: w, height: h, resized: false };
  const scale = Math.sqrt(cap / (w * h));
  const nw = Math.max(1, Math.floor(w * scale)), nh = Math.max(1, Math.floor(h * scale));
  const canvas = el("canvas", { width: nw, height: nh });
  canvas.getContext("2d").drawImage(img, 0, 0, nw, nh);
  return { url: canvas.toDataURL("image/png"), width: nw, height: nh, resized: true };
}

async function addFiles(files) {
  showComposerError("");
  for (const file of files) {
    try {
      if (file.type.startsWith("image/")) {
        const img = await prepareImage(file);
        state.pending.push({ kind: "image", name: file.name, ...img });
      } else if (file.type.startsWith("video/")) {
        const cap = state.config ? state.config.max_video_bytes : Infinity;
        if (file.size > cap) throw new Error(`the video is ${file.size} bytes; this server accepts at most ${cap}`);
        state.pending.push({ kind: "video", name: file.name, url: await readAsDataURL(file) });
      } else {
        throw new Error(`${file.type || "this file type"} is not an image or a video`);
      }
    } catch (err) {
      showComposerError(`${file.name}: ${err.message}`);
    }
  }
  renderAttachments();
}

function mediaElement(item) {
  if (item.kind === "video") return el("video", { src: item.url, controls: "", muted: "", "aria-label": item.name });
  return el("img", { src: item.url, alt: item.name || "attached image" });
}

function renderAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  state.pending.forEach((item, i) => {
    const fig = el("figure");
    fig.append(mediaElement(item));
    const note = item.resized ? ` (resized to ${item.width}x${item.height})` : "";
    const cap = el("figcaption", {}, (item.name || item.kind) + note);
    const remove = el("button", { type: "button", class: "secondary", "aria-label": `Remove ${item.name || item.kind}` },
                      "Remove");
    remove.addEventListener("click", () => { state.pending.splice(i, 1); renderAttachments(); });
    fig.append(cap, remove);
    box.append(fig);
  });
}

// ---- requests ----
function contentPart(item) {
  if (item.kind === "video") return { type: "video_url", video_url: { url: item.url } };
  const part = { type: "image_url", image_url: { url: item.url } };
  const maxPixels = parseInt($("max-pixels").value, 10);
  if (state.config && maxPixels && maxPixels !== state.config.default_max_pixels) {
    part.image_url.max_pixels = maxPixels;
  }
  return part;
}

function requestBody(messages) {
  const out = [];
  const system = $("system-prompt").value.trim();
  if (system) out.push({ role: "system", content: system });
  for (const m of messages) {
    if (m.role === "user") {
      out.push({ role: "user", content: [...m.media.map(contentPart), { type: "text", text: m.text }] });
    } else {
      out.push({ role: m.role, content: m.text });
    }
  }
  const body = { messages: out, stream: true, stream_options: { include_usage: true } };
  if (state.config) body.model = state.config.model;
  const t = parseFloat($("temperature").value);
  if (!Number.isNaN(t)) body.temperature = t;
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  return body;
}

async function errorMessage(resp) {
  let message = `HTTP ${resp.status}`;
  try {
    const data = await resp.json();
    if (data && data.error && data.error.message) message = data.error.message;
  } catch (_) { /* not JSON: keep the status */ }
  if (resp.status === 401) {
    $("key-form").hidden = false;
    return `API key rejected (401): ${message}`;
  }
  if (resp.status === 429) {
    const after = resp.headers.get("Retry-After");
    return `Server busy (429): ${message}` + (after ? ` Try again in ${after} s.` : "");
  }
  return `Error ${resp.status}: ${message}`;
}

// One streamed completion for `messages`; calls onDelta(text) per piece. Returns {text, usage, ttft, stopped}.
async function streamCompletion(messages, onDelta) {
  const controller = new AbortController();
  state.controller = controller;
  const t0 = performance.now();
  const out = { text: "", usage: null, ttft: null, first: null, stopped: false };
  let resp;
  try {
    resp = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), signal: controller.signal,
                                                 body: JSON.stringify(requestBody(messages)) });
  } catch (err) {
    if (err.name === "AbortError") { out.stopped = true; return out; }
    throw new Error("Could not reach the server: " + err.message);
  }
  if (!resp.ok) throw new Error(await errorMessage(resp));
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const obj = JSON.parse(data);
          if (obj.error) throw new Error(`Error: ${obj.error.message}`);
          if (obj.usage) out.usage = obj.usage;
          const delta = obj.choices && obj.choices[0] && obj.choices[0].delta;
          if (delta && delta.content) {
            if (out.first === null) { out.first = performance.now(); out.ttft = (out.first - t0) / 1000; }
            out.text += delta.content;
            onDelta(out.text);
          }
        }
      }
    }
  } catch (err) {
    if (err.name !== "AbortError") throw err;
    out.stopped = true;
  }
  out.elapsed = (performance.now() - (out.first ?? t0)) / 1000;
  return out;
}

function statsLine(r) {
  const parts = [];
  if (r.ttft !== null) parts.push(`time to first token ${r.ttft.toFixed(2)} s`);
  if (r.usage) {
    const n = r.usage.completion_tokens;
    if (n > 1 && r.elapsed > 0) parts.push(`${((n - 1) / r.elapsed).toFixed(1)} tokens/s`);
    parts.push(`${r.usage.prompt_tokens} prompt + ${n} completion tokens`);
  }
  if (r.stopped) parts.push("stopped");
  return parts.join(" · ");
}

function setBusy(busy) {
  state.busy = busy;
  $("send").disabled = busy;
  $("stop").hidden = !busy;
  if (!busy) state.controller = null;
}

function userBubble(turn) {
  const div = el("div", { class: "msg user" });
  if (turn.media.length) {
    const media = el("div", { class: "media" });
    turn.media.forEach((m) => media.append(mediaElement(m)));
    div.append(media);
  }
  div.append(document.createTextNode(turn.text));
  return div;
}

// Run one turn: the user's message after the finished history; on success both join the history.
async function runTurn(turn) {
  const log = $("log");
  const bubble = el("div", { class: "msg assistant", "aria-busy": "true" });
  const text = el("span", { class: "text" });
  bubble.append(text);
  log.append(bubble);
  bubble.scrollIntoView({ block: "end" });
  setBusy(true);
  try {
    const r = await streamCompletion([...state.history, turn], (t) => { text.textContent = t; });
    if (!r.text && r.stopped) text.textContent = "(stopped before the first token)";
    state.history.push(turn, { role: "assistant", text: r.text });
    bubble.append(el("span", { class: "stats" }, statsLine(r)));
    addActions(bubble, () => r.text, true);
  } catch (err) {
    bubble.classList.add("failed");
    bubble.setAttribute("role", "alert");
    text.textContent = err.message;
    addActions(bubble, null, false, turn);
  } finally {
    bubble.removeAttribute("aria-busy");
    setBusy(false);
  }
}

function addActions(bubble, getText, finished, failedTurn) {
  const actions = el("div", { class: "actions" });
  if (getText) {
    const copy = el("button", { type: "button", class: "copy" }, "Copy");
    copy.addEventListener("click", async () => {
      try { await navigator.clipboard.writeText(getText()); copy.textContent = "Copied"; }
      catch (_) { copy.textContent = "Copy failed"; }
    });
    actions.append(copy);
  }
  const retry = el("button", { type: "button", class: "retry" }, "Retry");
  retry.addEventListener("click", () => {
    if (state.busy) return;
    let turn = failedTurn;
    if (finished) {  // only the newest answer can be retried: it is the end of the history
      if (state.history[state.history.length - 1] === undefined) return;
      state.history.pop();
      turn = state.history.pop();
    }
    bubble.remove();
    runTurn(turn);
  });
  if (!finished || bubble === $("log").lastElementChild) actions.append(retry);
  bubble.append(actions);
  // an older answer loses its retry button once a newer one exists
  document.querySelectorAll(".msg.assistant .retry").forEach((b) => {
    if (b.closest(".msg") !== bubble && !b.closest(".failed")) b.remove();
  });
}

function send(ev) {
  if (ev) ev.preventDefault();
  if (state.busy) return;
  const prompt = $("prompt");
  const text = prompt.value.trim();
  if (!text && !state.pending.length) { showComposerError("Type a question (and attach a picture if you like)."); return; }
  showComposerError("");
  const turn = { role: "user", text, media: state.pending.slice() };
  state.pending = [];
  renderAttachments();
  prompt.value = "";
  $("empty").hidden = true;
  $("log").append(userBubble(turn));
  runTurn(turn);
}

// ---- wiring ----
async function init() {
  try {
    const resp = await fetch("/ui/config");
    state.config = await resp.json();
    $("model-name").textContent = state.config.model;
    $("max-pixels").value = state.config.default_max_pixels;
    $("max-pixels").max = state.config.max_image_pixels;
    if (state.config.auth_required && !apiKey()) $("key-form").hidden = false;
  } catch (err) {
    showComposerError("Could not read the server's settings: " + err.message);
  }
  $("composer").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) send(e);
  });
  $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("file-input").addEventListener("change", (e) => { addFiles([...e.target.files]); e.target.value = ""; });
  $("prompt").addEventListener("paste", (e) => {
    const files = [...(e.clipboardData ? e.clipboardData.files : [])];
    if (files.length) { e.preventDefault(); addFiles(files); }
  });
  const composer = $("composer");
  document.addEventListener("dragover", (e) => { e.preventDefault(); composer.classList.add("dragging"); });
  document.addEventListener("dragleave", () => composer.classList.remove("dragging"));
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    composer.classList.remove("dragging");
    if (e.dataTransfer && e.dataTransfer.files.length) addFiles([...e.dataTransfer.files]);
  });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
    $("api-key").value = "";
    $("key-form").hidden = true;
    showComposerError("");
  });
  $("change-key").addEventListener("click", () => { $("key-form").hidden = false; $("api-key").focus(); });
  $("new-chat").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.history = [];
    state.pending = [];
    renderAttachments();
    $("log").replaceChildren($("empty"));
    $("empty").hidden = false;
  });
}

document.addEventListener("DOMContentLoaded", init);
