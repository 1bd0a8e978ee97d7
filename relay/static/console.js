"use strict";
// The status page holds no data: it reads /api/* with the admin token, asked for once per tab.
// A token in the URL fragment (/#token=...; a fragment is never sent to the server) is taken
// instead of asking, and removed from the address bar. #q=<text> fills the search and runs it.
// Everything is drawn with the DOM API (textContent, never innerHTML): what the API returns
// (an endpoint's response excerpt) is shown as text, never run.
const KEY = "relay-admin-token";
const SVG = "http://www.w3.org/2000/svg";
const REFRESH_MS = 5000;

function fragment() {
  const params = new URLSearchParams(location.hash.replace(/^#/, ""));
  return { token: params.get("token"), q: params.get("q") };
}

const initial = fragment();
if (initial.token) {
  sessionStorage.setItem(KEY, initial.token);
  const keep = initial.q ? "#q=" + encodeURIComponent(initial.q) : "";
  history.replaceState(null, "", location.pathname + location.search + keep);
}

let asked = false;
function token() {
  let t = sessionStorage.getItem(KEY);
  if (!t && !asked) {
    asked = true;  // once per page load, even if cancelled; reload to be asked again
    t = window.prompt("sfox-relay admin token (RELAY_ADMIN_TOKEN)") || "";
    if (t) { sessionStorage.setItem(KEY, t); }
  }
  return t || "";
}

async function api(path, method) {
  const r = await fetch(path, {
    method: method || "GET",
    headers: { Authorization: "Bearer " + token() },
  });
  if (r.status === 401) {
    sessionStorage.removeItem(KEY);
    throw new Error("the admin token was refused: reload the page to enter it again");
  }
  if (r.status === 403) { throw new Error("the admin API is disabled: set RELAY_ADMIN_TOKEN"); }
  if (r.status === 404) { return null; }
  if (!r.ok) { throw new Error(path.split("?")[0] + ": HTTP " + r.status); }
  return r.json();
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text != null) { node.textContent = String(text); }
  if (cls) { node.className = cls; }
  return node;
}

function byId(id) { return document.getElementById(id); }

function showError(err) { byId("error").textContent = err ? String(err.message || err) : ""; }

// -- times: relative, with the absolute time on hover ------------------------------------------

function relative(seconds) {
  const s = Math.abs(seconds);
  const text = s < 1 ? "now" : s < 90 ? Math.round(s) + " s" : s < 5400 ? Math.round(s / 60) +
    " min" : s < 172800 ? Math.round(s / 3600) + " h" : Math.round(s / 86400) + " d";
  if (text === "now") { return text; }
  return seconds >= 0 ? text + " ago" : "in " + text;
}

function timeCell(node, iso) {
  if (!iso) {
    node.textContent = "-"; node.removeAttribute("title"); delete node.dataset.at; return node;
  }
  const at = new Date(iso);
  node.dataset.at = at.toISOString();
  node.textContent = relative((Date.now() - at.getTime()) / 1000);
  node.title = at.toISOString();
  return node;
}

// Relative times age in place; rows are rebuilt only when their data changed, so a button
// never moves under the pointer or loses keyboard focus to a refresh.
function tickTimes() {
  for (const node of document.querySelectorAll("[data-at]")) {
    node.textContent = relative((Date.now() - new Date(node.dataset.at).getTime()) / 1000);
  }
}
const shown = {};
function changed(key, data) {
  const text = JSON.stringify(data);
  if (shown[key] === text) { return false; }
  shown[key] = text;
  return true;
}

// -- the header ---------------------------------------------------------------------------------

function pill(id, ok, text) {
  const node = byId(id); node.textContent = text; node.className = "pill " + (ok ? "ok" : "bad");
}

function renderStatus(status) {
  byId("version").textContent = "v" + status.version;
  pill("feed", status.ready.feed, status.feed_state);
  pill("store", status.ready.store, status.ready.store ? "writable" : "unavailable");
  byId("inflight").textContent = status.in_flight;
  const age = byId("feed-age");
  if (status.feed_last_message_age_s == null) {
    age.textContent = "none yet"; age.removeAttribute("title");
  } else {
    const at = new Date(Date.now() - status.feed_last_message_age_s * 1000).toISOString();
    timeCell(age, at);
  }
  byId("reconnects").textContent = status.feed_reconnects;
  timeCell(byId("reconciled"), status.last_reconcile_at);
  byId("replica").textContent = status.replica;
}

// -- charts: inline SVG, written here ---------------------------------------------------------

const POINTS = 300;  // an hour in 12 s steps, five minutes second by second

function downsample(values, combine) {
  const step = Math.max(1, Math.ceil(values.length / POINTS));
  const out = [];
  for (let i = 0; i < values.length; i += step) {
    out.push(combine(values.slice(i, i + step)));
  }
  return out;
}
const mean = (xs) => xs.reduce((a, b) => a + b, 0) / xs.length;
const peak = (xs) => Math.max(...xs);

function niceMax(value) {
  if (value <= 0) { return 1; }
  const power = Math.pow(10, Math.floor(Math.log10(value)));
  for (const m of [1, 2, 5, 10]) { if (value <= m * power) { return m * power; } }
  return 10 * power;
}

function fmt(n) { return n >= 100 ? Math.round(n).toString() : (+n.toFixed(2)).toString(); }

function chart(title, minutes, lines) {
  const figure = el("figure");
  figure.append(el("figcaption", title));
  const top = niceMax(Math.max(0, ...lines.flatMap((l) => l.values)));
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", "0 0 600 110");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  const described = [];
  for (const y of [10, 55, 100]) {
    const grid = document.createElementNS(SVG, "line");
    grid.setAttribute("x1", "0"); grid.setAttribute("x2", "600");
    grid.setAttribute("y1", String(y)); grid.setAttribute("y2", String(y));
    grid.setAttribute("stroke", "#e3e6eb"); grid.setAttribute("vector-effect", "non-scaling-stroke");
    svg.append(grid);
  }
  for (const line of lines) {
    const n = line.values.length;
    const points = line.values.map((v, i) => {
      const x = n > 1 ? (600 * i) / (n - 1) : 600;
      return x.toFixed(1) + "," + (100 - (90 * v) / top).toFixed(1);
    });
    const poly = document.createElementNS(SVG, "polyline");
    poly.setAttribute("points", points.join(" "));
    poly.setAttribute("fill", "none");
    poly.setAttribute("stroke-width", "1.5");
    poly.setAttribute("vector-effect", "non-scaling-stroke");
    poly.setAttribute("class", "series " + line.cls);
    poly.setAttribute("stroke", getComputedStyle(document.documentElement)
      .getPropertyValue("--" + line.cls).trim() || "#333");
    poly.dataset.max = String(Math.max(0, ...line.values));
    svg.append(poly);
    described.push(line.label + " up to " + fmt(Math.max(0, ...line.values)));
  }
  svg.setAttribute("aria-label", title + ": " + described.join(", "));
  figure.append(svg);
  const legend = el("div", null, "legend");
  legend.append(el("span", "max " + fmt(top)));
  for (const line of lines) { legend.append(el("span", line.label, "key " + line.cls)); }
  legend.append(el("span", minutes + " min ago → now"));
  figure.append(legend);
  return figure;
}

function renderHistory(h) {
  byId("history-of").textContent = "(replica " + h.replica + ")";
  const minutes = Math.round(h.feed_messages.length / 60);
  const figures = [chart("Feed messages / s", minutes, [
    { label: "received", cls: "feed", values: downsample(h.feed_messages, mean) }])];
  for (const [name, s] of Object.entries(h.endpoints)) {
    figures.push(chart(name + ": deliveries / s", minutes, [
      { label: "delivered", cls: "delivered", values: downsample(s.delivered, mean) },
      { label: "failed", cls: "failed", values: downsample(s.failed, mean) }]));
    figures.push(chart(name + ": outbox depth", minutes, [
      { label: "pending", cls: "depth", values: downsample(s.depth, peak) }]));
  }
  byId("charts").replaceChildren(...figures);
}

// -- actions ---------------------------------------------------------------------------------

function confirmAction(text, verb) {
  const dialog = byId("confirm");
  byId("confirm-text").textContent = text;
  byId("confirm-ok").textContent = verb;
  dialog.returnValue = "";
  dialog.showModal();
  byId("confirm-cancel").focus();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
  });
}

function button(text, onClick, label) {
  const b = el("button", text);
  b.type = "button";
  if (label) { b.setAttribute("aria-label", label); }
  b.addEventListener("click", async () => {
    b.disabled = true;
    try { await onClick(); } catch (err) { showError(err); } finally { b.disabled = false; }
  });
  return b;
}

async function replayOne(id) {
  if (!(await confirmAction("Replay delivery " + id + "? It is sent again with the same " +
    "webhook-id, after any later events of its user.", "Replay"))) { return; }
  const r = await api("/api/deliveries/" + encodeURIComponent(id) + "/replay", "POST");
  byId("found-summary").textContent = r ? "re-queued " + r.replayed : "no such delivery";
  await refresh();
}

async function replayDead(endpoint, count) {
  if (!(await confirmAction("Replay all " + count + " dead deliveries of " + endpoint + "?",
    "Replay " + count))) { return; }
  const r = await api("/api/deliveries/replay?state=dead&endpoint=" +
    encodeURIComponent(endpoint), "POST");
  byId("found-summary").textContent = "re-queued " + r.replayed + " dead deliveries of " + endpoint;
  await refresh();
}

async function setState(endpoint, action) {
  await api("/api/endpoints/" + encodeURIComponent(endpoint) + "/" + action, "POST");
  await refresh();
}

// -- tables ----------------------------------------------------------------------------------

function cell(row, text, cls) {
  const td = row.insertCell(); td.textContent = text == null ? "-" : String(text);
  if (cls) { td.className = cls; }
  return td;
}

const STATE_CLASS = { active: "ok", open: "bad", disabled: "bad", paused: "warn", removed: "warn" };

function renderEndpoints(endpoints) {
  if (!changed("endpoints", endpoints)) { return; }
  const body = document.querySelector("#endpoints tbody");
  body.replaceChildren();
  for (const e of endpoints) {
    const row = body.insertRow();
    row.dataset.endpoint = e.name;
    cell(row, e.name + (e.configured ? "" : " (removed)"));
    cell(row, e.pending, "num"); cell(row, e.delivered, "num"); cell(row, e.dead, "num");
    const done = e.delivered + e.dead;
    cell(row, done ? (100 * e.delivered / done).toFixed(1) + "%" : "-", "num");
    const state = cell(row, null);
    if (e.state) {
      state.replaceChildren(el("span", e.state, "pill " + (STATE_CLASS[e.state] || "")));
    }
    timeCell(row.insertCell(), e.oldest_pending_at);
    cell(row, e.last_error);
    const actions = el("div", null, "actions");
    if (e.state && e.configured) {
      if (e.state !== "paused") {
        actions.append(button("Pause", () => setState(e.name, "pause"), "Pause " + e.name));
      }
      if (e.state !== "active") {
        actions.append(button("Resume", () => setState(e.name, "resume"), "Resume " + e.name));
      }
    }
    if (e.dead > 0) {
      actions.append(button("Replay dead (" + e.dead + ")", () => replayDead(e.name, e.dead),
        "Replay all " + e.dead + " dead deliveries of " + e.name));
    }
    row.insertCell().append(actions);
  }
}

function renderDead(dead) {
  if (!changed("dead", dead.items)) { return; }
  const body = document.querySelector("#dead tbody");
  body.replaceChildren();
  for (const d of dead.items) {
    const row = body.insertRow();
    cell(row, d.id, "id"); cell(row, d.endpoint); cell(row, d.user_id); cell(row, d.last_status);
    cell(row, d.attempts, "num"); cell(row, d.last_error);
    row.insertCell().append(button("Replay", () => replayOne(d.id), "Replay " + d.id));
  }
}

// -- find ------------------------------------------------------------------------------------

function queryFor(q) {
  if (q.startsWith("dlv_")) { return null; }
  const param = q.startsWith("evt_") ? "event_id" : "user_id";
  return "/api/deliveries?limit=20&" + param + "=" + encodeURIComponent(q);
}

function renderDelivery(d) {
  const card = el("article", null, "delivery");
  card.dataset.id = d.id;
  const head = el("h3");
  head.append(el("span", d.id), el("span", d.state, "pill " +
    ({ delivered: "ok", dead: "bad", pending: "warn", superseded: "warn" }[d.state] || "")));
  card.append(head);
  const facts = el("dl");
  const add = (name, value) => { facts.append(el("dt", name)); facts.append(value); };
  add("webhook-id", el("dd", d.event_id));
  add("endpoint", el("dd", d.endpoint));
  add("user", el("dd", d.user_id || "-"));
  add("created", timeCell(el("dd"), d.created_at));
  if (d.next_attempt_at) { add("next attempt", timeCell(el("dd"), d.next_attempt_at)); }
  card.append(facts);
  const table = el("table", null, "attempts");
  const headRow = table.createTHead().insertRow();
  for (const name of ["Attempt", "When", "Status", "Latency", "Error", "Response"]) {
    headRow.append(el("th", name));
  }
  const body = table.createTBody();
  (d.attempt_log || []).forEach((a, i) => {
    const row = body.insertRow();
    cell(row, i + 1, "num");
    timeCell(row.insertCell(), a.at);
    cell(row, a.status);
    cell(row, a.latency_ms == null ? null : a.latency_ms.toFixed(1) + " ms", "num");
    cell(row, a.error);
    const excerpt = row.insertCell();
    if (a.response_excerpt) { excerpt.append(el("pre", a.response_excerpt)); } else {
      excerpt.textContent = "-";
    }
  });
  if (!body.rows.length) {
    const row = body.insertRow(); const td = cell(row, "no attempt yet"); td.colSpan = 6;
  }
  const scroll = el("div", null, "scroll"); scroll.append(table);
  card.append(scroll);
  if (d.state === "dead") {
    card.append(button("Replay " + d.id, () => replayOne(d.id)));
  }
  return card;
}

async function find(q) {
  q = q.trim();
  const summary = byId("found-summary");
  if (!q) { summary.textContent = ""; byId("found").replaceChildren(); return; }
  history.replaceState(null, "", location.pathname + location.search + "#q=" +
    encodeURIComponent(q));
  summary.textContent = "searching…";
  byId("found").replaceChildren();  // never act on the previous search's results
  try {
    const path = queryFor(q);
    let ids;
    if (path === null) {
      ids = [q];
    } else {
      const page = await api(path);
      ids = page ? page.items.map((d) => d.id) : [];
    }
    const details = (await Promise.all(ids.map((id) => api("/api/deliveries/" +
      encodeURIComponent(id))))).filter(Boolean);
    byId("found").replaceChildren(...details.map(renderDelivery));
    summary.textContent = details.length ? details.length + " deliver" +
      (details.length === 1 ? "y" : "ies") + " for " + q : "nothing found for " + q;
    showError(null);
  } catch (err) {
    summary.textContent = "";
    showError(err);
  }
}

// -- refresh loop ----------------------------------------------------------------------------

async function refresh() {
  try {
    const [status, endpoints, dead, hist] = await Promise.all([
      api("/api/status"), api("/api/endpoints"), api("/api/deliveries?state=dead&limit=10"),
      api("/api/history?seconds=" + byId("range").value)]);
    renderStatus(status);
    renderEndpoints(endpoints);
    renderDead(dead);
    renderHistory(hist);
    tickTimes();
    showError(null);
    byId("updated").textContent = new Date().toLocaleTimeString();
    document.body.dataset.loaded = "1";
  } catch (err) {
    showError(err);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  byId("range").addEventListener("change", refresh);
  byId("find").addEventListener("submit", (ev) => { ev.preventDefault(); find(byId("q").value); });
  window.addEventListener("hashchange", () => {
    const q = fragment().q;
    if (q != null && q !== byId("q").value) { byId("q").value = q; find(q); }
  });
  refresh();
  if (initial.q) { byId("q").value = initial.q; find(initial.q); }
  setInterval(refresh, REFRESH_MS);
});
