// roost dashboard: a hash-routed single page over the management API.
// Plain browser JavaScript, no build step, no external assets.
"use strict";

const AUTH_KEY = "roost-auth";
const REFRESH_MS = 2000;
const HISTORY = 60;
let timer = null;
let history = [];  // overview samples for the rates chart
const sortState = {};  // table id -> {key, dir}

// --- DOM helpers -------------------------------------------------------
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
const $ = (sel) => document.querySelector(sel);
const enc = encodeURIComponent;
const fmtRate = (r) => (r || 0).toFixed(1) + "/s";
const rate = (stats, key) => ((stats || {})[key + "_details"] || {}).rate || 0;
function status(text) { $("#status").textContent = text || ""; }

// --- API ---------------------------------------------------------------
async function api(method, path, body) {
  const auth = sessionStorage.getItem(AUTH_KEY);
  // X-Requested-With: no basic-auth challenge (browser dialog) on a 401.
  const headers = { "Authorization": "Basic " + auth, "X-Requested-With": "XMLHttpRequest" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch("/api/" + path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (resp.status === 401 && method === "GET" && path === "whoami") return null;
  const text = await resp.text();
  const data = text ? JSON.parse(text) : null;
  if (!resp.ok && !(path === "health/checks/alarms" && resp.status === 503)) {
    throw new Error((data && (data.reason || data.error)) || resp.statusText);
  }
  return data;
}

// --- login -------------------------------------------------------------
async function login(ev) {
  ev.preventDefault();
  const user = $("#login-user").value, pass = $("#login-password").value;
  sessionStorage.setItem(AUTH_KEY, btoa(unescape(encodeURIComponent(user + ":" + pass))));
  const me = await api("GET", "whoami").catch(() => null);
  if (!me) {
    sessionStorage.removeItem(AUTH_KEY);
    $("#login-error").textContent = "Login failed";
    return;
  }
  $("#login-error").textContent = "";
  start(me);
}

function start(me) {
  $("#login").hidden = true;
  $("#nav").hidden = false;
  $("#logout").hidden = false;
  $("#who").textContent = "User: " + me.name;
  if (!location.hash) location.hash = "#/overview";
  route();
}

function logout() {
  sessionStorage.removeItem(AUTH_KEY);
  clearTimeout(timer);
  $("#page").replaceChildren();
  $("#nav").hidden = true;
  $("#logout").hidden = true;
  $("#who").textContent = "";
  $("#login").hidden = false;
}

// --- routing -----------------------------------------------------------
const PAGES = { overview, queues, queue, exchanges, connections, admin };

function route() {
  clearTimeout(timer);
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  const name = PAGES[parts[0]] ? parts[0] : "overview";
  for (const a of document.querySelectorAll("#nav a")) {
    a.classList.toggle("active", a.dataset.page === (name === "queue" ? "queues" : name));
  }
  // A fresh container per visit: a refresh of the previous page still in
  // flight renders into its own (detached) container, not this one.
  const page = h("div", { "data-page": name });
  $("#page").replaceChildren(page);
  const render = PAGES[name];
  const tick = async () => {
    try {
      await render(page, parts.slice(1));
      status("");
    } catch (e) {
      status("Error: " + e.message);
    }
    if (page.isConnected && sessionStorage.getItem(AUTH_KEY)) timer = setTimeout(tick, REFRESH_MS);
  };
  tick();
}

// A section of the page, created on first render and refreshed in place.
function section(page, id, title) {
  let el = page.querySelector("#" + id);
  if (!el) {
    el = h("section", { id }, title ? h("h2", {}, title) : null, h("div", { class: "body" }));
    page.append(el);
  }
  return el.querySelector(".body");
}

// A sortable table: columns are {key, label, num, value(row), cell(row)}.
function table(id, columns, rows, defaultKey) {
  const state = sortState[id] || (sortState[id] = { key: defaultKey || columns[0].key, dir: 1 });
  const col = columns.find((c) => c.key === state.key) || columns[0];
  const val = col.value || ((r) => r[col.key]);
  rows = rows.slice().sort((a, b) => {
    const x = val(a), y = val(b);
    return (x < y ? -1 : x > y ? 1 : 0) * state.dir;
  });
  const head = h("tr", {}, columns.map((c) => h("th", {
    class: [c.num ? "num" : "", c.value !== null ? "sortable" : "",
            c.key === state.key ? (state.dir > 0 ? "sorted-asc" : "sorted-desc") : ""].join(" "),
    "data-key": c.key,
    onclick: () => {
      if (c.value === null) return;
      if (state.key === c.key) state.dir = -state.dir; else { state.key = c.key; state.dir = 1; }
      route();
    },
  }, c.label)));
  const body = rows.map((r) => h("tr", {}, columns.map((c) => h("td", { class: c.num ? "num" : "", "data-col": c.key },
    c.cell ? c.cell(r) : (c.value ? c.value(r) : r[c.key])))));
  return h("table", { id }, h("thead", {}, head), h("tbody", {}, body.length ? body : h("tr", {}, h("td", { colspan: columns.length }, "(none)"))));
}

// --- overview ----------------------------------------------------------
async function overview(page) {
  const [ov, alarms] = await Promise.all([api("GET", "overview"), api("GET", "health/checks/alarms")]);
  const ms = ov.message_stats || {};
  const qt = ov.queue_totals || {};
  history.push({ publish: rate(ms, "publish"), deliver: rate(ms, "deliver_get"), ack: rate(ms, "ack") });
  if (history.length > HISTORY) history.shift();

  const head = section(page, "ov-head");
  head.replaceChildren(h("h1", {}, "Overview"), h("p", {}, `${ov.product_name} ${ov.product_version} on ${ov.node}`));

  const al = section(page, "ov-alarms", "Alarms");
  const list = (alarms && alarms.alarms) || [];
  al.replaceChildren(...(list.length
    ? list.map((a) => h("div", { class: "alarm" }, `${a.resource || "resource"} alarm on ${a.node || ov.node}`))
    : [h("p", { class: "ok", id: "no-alarms" }, "No alarms")]));

  const totals = section(page, "ov-totals", "Totals");
  const ot = ov.object_totals || {};
  const card = (label, value, id) => h("div", { class: "card", id }, h("div", { class: "value" }, value), h("div", { class: "label" }, label));
  totals.replaceChildren(h("div", { class: "cards" },
    card("Messages", qt.messages || 0, "total-messages"),
    card("Ready", qt.messages_ready || 0, "total-ready"),
    card("Unacked", qt.messages_unacknowledged || 0, "total-unacked"),
    card("Queues", ot.queues || 0, "total-queues"),
    card("Exchanges", ot.exchanges || 0, "total-exchanges"),
    card("Connections", ot.connections || 0, "total-connections"),
    card("Channels", ot.channels || 0, "total-channels"),
    card("Consumers", ot.consumers || 0, "total-consumers"),
    card("Publish", fmtRate(rate(ms, "publish")), "rate-publish"),
    card("Deliver", fmtRate(rate(ms, "deliver_get")), "rate-deliver"),
  ));

  const chart = section(page, "ov-chart", "Message rates");
  let canvas = chart.querySelector("canvas");
  if (!canvas) {
    canvas = h("canvas", { id: "rates-chart", width: 720, height: 200 });
    const legend = h("div", { class: "legend" }, SERIES.map(([k, color]) => h("span", {}, h("i", { style: "background:" + color }), k)));
    chart.append(canvas, legend);
  }
  drawChart(canvas, history);

  const lst = section(page, "ov-listeners", "Listeners");
  lst.replaceChildren(table("listeners", [
    { key: "protocol", label: "Protocol" }, { key: "ip_address", label: "Address" }, { key: "port", label: "Port", num: true },
  ], ov.listeners || []));
}

const SERIES = [["publish", "#d9534f"], ["deliver", "#337ab7"], ["ack", "#5cb85c"]];

function drawChart(canvas, samples) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, pad = 36;
  ctx.clearRect(0, 0, W, H);
  const max = Math.max(1, ...samples.flatMap((s) => SERIES.map(([k]) => s[k])));
  ctx.strokeStyle = "#ddd"; ctx.fillStyle = "#777"; ctx.font = "11px sans-serif";
  for (let i = 0; i <= 4; i++) {
    const y = pad / 2 + (H - pad) * i / 4;
    ctx.beginPath(); ctx.moveTo(pad, y); ctx.lineTo(W - 8, y); ctx.stroke();
    ctx.fillText((max * (4 - i) / 4).toFixed(max < 10 ? 1 : 0), 2, y + 4);
  }
  ctx.fillText("msg/s, last " + (HISTORY * REFRESH_MS / 1000) + " s", pad, H - 4);
  const x = (i) => pad + (W - pad - 8) * i / (HISTORY - 1);
  const y = (v) => pad / 2 + (H - pad) * (1 - v / max);
  const off = HISTORY - samples.length;
  for (const [k, color] of SERIES) {
    ctx.strokeStyle = color; ctx.lineWidth = 2; ctx.beginPath();
    samples.forEach((s, i) => (i ? ctx.lineTo(x(i + off), y(s[k])) : ctx.moveTo(x(i + off), y(s[k]))));
    ctx.stroke(); ctx.lineWidth = 1;
  }
}

// --- queues ------------------------------------------------------------
async function queues(page) {
  const qs = await api("GET", "queues");
  section(page, "q-head").replaceChildren(h("h1", {}, "Queues"));
  const qlink = (q) => h("a", { href: `#/queue/${enc(q.vhost)}/${enc(q.name)}`, class: "queue-link" }, q.name);
  section(page, "q-list").replaceChildren(table("queues-table", [
    { key: "vhost", label: "Vhost" },
    { key: "name", label: "Name", cell: qlink },
    { key: "type", label: "Type" },
    { key: "state", label: "State" },
    { key: "messages_ready", label: "Ready", num: true },
    { key: "messages_unacknowledged", label: "Unacked", num: true },
    { key: "messages", label: "Total", num: true },
    { key: "consumers", label: "Consumers", num: true },
    { key: "publish_rate", label: "Incoming", num: true, value: (q) => rate(q.message_stats, "publish"), cell: (q) => fmtRate(rate(q.message_stats, "publish")) },
    { key: "deliver_rate", label: "Deliver/get", num: true, value: (q) => rate(q.message_stats, "deliver_get"), cell: (q) => fmtRate(rate(q.message_stats, "deliver_get")) },
    { key: "actions", label: "", value: null, cell: (q) => [
      h("button", { class: "purge", onclick: () => purge(q.vhost, q.name) }, "Purge"), " ",
      h("button", { class: "delete danger", onclick: () => deleteQueue(q.vhost, q.name) }, "Delete"),
    ] },
  ], qs, "name"));
}

async function purge(vhost, name) {
  if (!confirm(`Purge all messages from queue ${name}?`)) return;
  await api("DELETE", `queues/${enc(vhost)}/${enc(name)}/contents`).catch((e) => status("Error: " + e.message));
  route();
}

async function deleteQueue(vhost, name) {
  if (!confirm(`Delete queue ${name}?`)) return;
  await api("DELETE", `queues/${enc(vhost)}/${enc(name)}`).catch((e) => status("Error: " + e.message));
  location.hash = "#/queues";
  route();
}

async function queue(page, [vhost, name]) {
  const q = await api("GET", `queues/${enc(vhost)}/${enc(name)}`);
  section(page, "qd-head").replaceChildren(h("h1", {}, `Queue ${q.name}`), h("p", {}, `vhost ${q.vhost}, ${q.type || "classic"}, ${q.durable ? "durable" : "transient"}`),
    h("p", {}, h("a", { href: "#/queues" }, "\u2190 all queues")));
  section(page, "qd-stats").replaceChildren(h("div", { class: "cards" },
    ["messages", "messages_ready", "messages_unacknowledged", "consumers"].map((k) =>
      h("div", { class: "card", id: "q-" + k }, h("div", { class: "value" }, q[k] || 0), h("div", { class: "label" }, k.replace("messages_", "")))),
    h("div", { class: "card", id: "q-rate-publish" }, h("div", { class: "value" }, fmtRate(rate(q.message_stats, "publish"))), h("div", { class: "label" }, "incoming")),
  ));
  const actions = section(page, "qd-actions");
  if (!actions.childElementCount) {
    const payload = h("textarea", { id: "publish-payload" }, "hello from the dashboard");
    const getCount = h("input", { id: "get-count", type: "number", value: 1, min: 1 });
    const out = h("div", { id: "get-result" });
    actions.append(
      h("div", { class: "panel" }, h("h2", {}, "Publish message"),
        h("label", {}, "Payload", payload),
        h("button", { id: "publish-button", onclick: async () => {
          const r = await api("POST", `exchanges/${enc(vhost)}/amq.default/publish`, {
            properties: {}, routing_key: name, payload: payload.value, payload_encoding: "string",
          }).catch((e) => status("Error: " + e.message));
          if (r) status(r.routed ? "" : "Message published but not routed");
        } }, "Publish")),
      h("div", { class: "panel" }, h("h2", {}, "Get messages"),
        h("p", {}, "Messages are requeued (ackmode ack_requeue_true)."),
        h("label", {}, "Count ", getCount),
        h("button", { id: "get-button", onclick: async () => {
          const msgs = await api("POST", `queues/${enc(vhost)}/${enc(name)}/get`, {
            count: Number(getCount.value) || 1, ackmode: "ack_requeue_true", encoding: "auto", truncate: 50000,
          }).catch((e) => { status("Error: " + e.message); return null; });
          if (!msgs) return;
          out.replaceChildren(...(msgs.length ? msgs.map((m, i) => h("div", { class: "message" },
            h("strong", {}, `Message ${i + 1}`), ` exchange "${m.exchange}", routing key "${m.routing_key}", redelivered ${m.redelivered}`,
            h("pre", { class: "payload" }, m.payload))) : [h("p", {}, "Queue is empty")]));
        } }, "Get messages"), out),
      h("div", { class: "panel" },
        h("button", { id: "purge-button", class: "purge", onclick: () => purge(vhost, name) }, "Purge"), " ",
        h("button", { id: "delete-button", class: "delete danger", onclick: () => deleteQueue(vhost, name) }, "Delete queue")),
    );
  }
}

// --- exchanges and bindings ---------------------------------------------
async function exchanges(page) {
  const [exs, binds] = await Promise.all([api("GET", "exchanges"), api("GET", "bindings")]);
  section(page, "ex-head").replaceChildren(h("h1", {}, "Exchanges"));
  section(page, "ex-list").replaceChildren(table("exchanges-table", [
    { key: "vhost", label: "Vhost" },
    { key: "name", label: "Name", value: (e) => e.name || "(AMQP default)" },
    { key: "type", label: "Type" },
    { key: "features", label: "Features", value: (e) => [e.durable && "durable", e.auto_delete && "auto-delete", e.internal && "internal"].filter(Boolean).join(" ") },
    { key: "in", label: "In", num: true, value: (e) => rate(e.message_stats, "publish_in"), cell: (e) => fmtRate(rate(e.message_stats, "publish_in")) },
    { key: "out", label: "Out", num: true, value: (e) => rate(e.message_stats, "publish_out"), cell: (e) => fmtRate(rate(e.message_stats, "publish_out")) },
  ], exs, "name"));
  section(page, "b-list", "Bindings").replaceChildren(table("bindings-table", [
    { key: "vhost", label: "Vhost" },
    { key: "source", label: "Source", value: (b) => b.source || "(AMQP default)" },
    { key: "destination", label: "Destination" },
    { key: "destination_type", label: "Type" },
    { key: "routing_key", label: "Routing key" },
    { key: "arguments", label: "Arguments", value: (b) => JSON.stringify(b.arguments || {}) },
  ], binds, "source"));
}

// --- connections and channels --------------------------------------------
async function connections(page) {
  const [conns, chans] = await Promise.all([
    api("GET", "connections").catch(() => []), api("GET", "channels").catch(() => []),
  ]);
  section(page, "c-head").replaceChildren(h("h1", {}, "Connections"));
  section(page, "c-list").replaceChildren(table("connections-table", [
    { key: "name", label: "Name" },
    { key: "vhost", label: "Vhost" },
    { key: "user", label: "User" },
    { key: "state", label: "State" },
    { key: "channels", label: "Channels", num: true },
    { key: "client", label: "Client", value: (c) => ((c.client_properties || {}).product || "") },
    { key: "actions", label: "", value: null, cell: (c) => h("button", { class: "close danger", onclick: async () => {
      if (!confirm(`Close connection ${c.name}?`)) return;
      await api("DELETE", `connections/${enc(c.name)}`).catch((e) => status("Error: " + e.message));
      route();
    } }, "Close") },
  ], conns, "name"));
  section(page, "ch-list", "Channels").replaceChildren(table("channels-table", [
    { key: "name", label: "Channel" },
    { key: "vhost", label: "Vhost" },
    { key: "user", label: "User" },
    { key: "state", label: "State" },
    { key: "consumer_count", label: "Consumers", num: true },
    { key: "prefetch_count", label: "Prefetch", num: true },
    { key: "messages_unacknowledged", label: "Unacked", num: true },
  ], chans, "name"));
}

// --- users, vhosts, permissions -----------------------------------------
async function admin(page) {
  const [users, vhosts, perms] = await Promise.all([
    api("GET", "users").catch(() => []), api("GET", "vhosts"), api("GET", "permissions").catch(() => []),
  ]);
  section(page, "a-head").replaceChildren(h("h1", {}, "Admin"));
  section(page, "a-users", "Users").replaceChildren(table("users-table", [
    { key: "name", label: "Name" },
    { key: "tags", label: "Tags", value: (u) => (Array.isArray(u.tags) ? u.tags.join(", ") : u.tags || "") },
  ], users, "name"));
  section(page, "a-vhosts", "Virtual hosts").replaceChildren(table("vhosts-table", [
    { key: "name", label: "Name" },
    { key: "messages", label: "Messages", num: true, value: (v) => v.messages || 0 },
  ], vhosts, "name"));
  section(page, "a-perms", "Permissions").replaceChildren(table("permissions-table", [
    { key: "user", label: "User" }, { key: "vhost", label: "Vhost" },
    { key: "configure", label: "Configure" }, { key: "write", label: "Write" }, { key: "read", label: "Read" },
  ], perms, "user"));
}

// --- start ---------------------------------------------------------------
window.addEventListener("hashchange", () => { if (sessionStorage.getItem(AUTH_KEY)) route(); });
$("#login").addEventListener("submit", login);
$("#logout").addEventListener("click", logout);
(async () => {
  const me = sessionStorage.getItem(AUTH_KEY) ? await api("GET", "whoami").catch(() => null) : null;
  if (me) start(me); else logout();
})();
