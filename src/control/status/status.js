// The status page: reads the admin API's JSON endpoints and /metrics every PERIOD seconds and
// renders them. Read-only; no external asset. Every value from the API is put in the page as
// text (never as HTML): agent ids, versions and labels come from agents.
"use strict";

const PERIOD = 5;
const MAX_ROWS = 500;
// Agents asked of /debug/agents per refresh: the filter runs in sluice, so a table of 100k
// agents never travels whole.
const MAX_AGENTS = 500;
const STATES = ["ready", "warming", "expired", "version_skew"];

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k === "style") e.style.cssText = v;
    else e.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function fill(tableId, rows) {
  const body = document.querySelector("#" + tableId + " tbody");
  body.replaceChildren(...rows);
}

function num(v, digits) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  return Number(v).toFixed(digits === undefined ? 0 : digits);
}

function state(s) {
  return el("span", { class: "state " + s }, s);
}

// Prometheus text → [{name, labels, value}].
function parseMetrics(text) {
  const out = [];
  const line = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
  const label = /(\w+)="((?:[^"\\]|\\.)*)"/g;
  for (const l of text.split("\n")) {
    if (l.startsWith("#")) continue;
    const m = line.exec(l);
    if (!m) continue;
    const labels = {};
    for (const lm of (m[2] || "").matchAll(label)) labels[lm[1]] = lm[2];
    out.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return out;
}

function sum(samples, name, match) {
  let total = 0;
  for (const s of samples) {
    if (s.name !== name) continue;
    if (Object.entries(match).every(([k, v]) => s.labels[k] === v)) total += s.value;
  }
  return total;
}

let previous = null; // {time, samples}

function rate(now, name, match) {
  if (!previous) return null;
  const dt = (now.time - previous.time) / 1000;
  if (dt <= 0) return null;
  const delta = sum(now.samples, name, match) - sum(previous.samples, name, match);
  return Math.max(0, delta) / dt;
}

async function get(path, text) {
  const r = await fetch(path, { cache: "no-store" });
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return text ? r.text() : r.json();
}

function renderListeners(listeners, now) {
  fill("listeners", listeners.map((l) => {
    const open = l.protocol === "quic"
      ? sum(now.samples, "sluice_quic_flows_active", { listener: l.name })
      : sum(now.samples, "sluice_connections_active", { listener: l.name });
    const accepted = l.protocol === "quic"
      ? rate(now, "sluice_quic_flows_total", { listener: l.name })
      : rate(now, "sluice_connections_accepted_total", { listener: l.name });
    const capacity = l.max_flows !== null && l.max_flows !== undefined
      ? l.max_flows + " flows"
      : (l.max_connections !== null && l.max_connections !== undefined ? l.max_connections + " connections" : "–");
    return el("tr", {},
      el("td", {}, l.name), el("td", {}, l.protocol), el("td", {}, l.bound || l.configured),
      el("td", { class: "num" }, num(open)), el("td", { class: "num" }, num(accepted, 1)),
      el("td", {}, capacity));
  }));
}

function target(r) {
  const t = r.target;
  if (t === "heartbeat") return "heartbeat API";
  if (t && t.pool) return "pool " + t.pool;
  if (t && t.resource) return "resource " + t.resource.kind + " " + t.resource.sni;
  return r.pool || "–";
}

function renderRoutes(routes, now) {
  fill("routes", routes.map((r) => el("tr", {},
    el("td", {}, r.name), el("td", {}, target(r)), el("td", { class: "num" }, num(r.active)),
    el("td", { class: "num" }, num(rate(now, "sluice_route_decisions_total", { route: r.name }), 1)),
    el("td", { class: "num" }, num(rate(now, "sluice_bytes_total", { route: r.name, direction: "to_backend" }), 0)),
    el("td", { class: "num" }, num(rate(now, "sluice_bytes_total", { route: r.name, direction: "to_client" }), 0)),
  )));
}

function renderPools(pools) {
  const box = document.getElementById("pools");
  box.replaceChildren(...pools.map((p) => el("div", { class: "pool" },
    el("h3", {}, "pool " + p.name, el("span", { class: "muted" }, " (" + p.balance + ")")),
    el("table", {},
      el("thead", {}, el("tr", {}, ["Backend", "Address", "State", "Health", "Weight", "Active"].map((h) => el("th", {}, h)))),
      el("tbody", {}, p.backends.map((b) => el("tr", { "data-backend": b.name },
        el("td", {}, b.name), el("td", {}, b.address), el("td", {}, state(b.state)),
        el("td", {}, state(b.health)), el("td", { class: "num" }, b.weight),
        el("td", { class: "num" }, b.active))))))));
}

function renderRollout(r) {
  document.getElementById("cluster").textContent = "Cluster version: " +
    (r.cluster_version || "not set (no version rule)");
  const chart = document.getElementById("chart");
  const most = Math.max(1, ...r.versions.map((v) => STATES.reduce((a, s) => a + v[s], 0)));
  chart.replaceChildren(
    el("div", { class: "legend" }, STATES.map((s) => el("span", {}, el("span", { class: "state " + s }, s)))),
    ...r.versions.map((v) => {
      const total = STATES.reduce((a, s) => a + v[s], 0);
      return el("div", { class: "row", "data-version": v.version },
        el("span", { class: "label" }, v.version),
        el("span", { class: "bar" }, STATES.filter((s) => v[s] > 0).map((s) =>
          el("span", { class: s, title: v[s] + " " + s, style: "width:" + (100 * v[s] / most) + "%" }))),
        el("span", { class: "muted" }, total + " (" + STATES.filter((s) => v[s] > 0).map((s) => v[s] + " " + s).join(", ") + ")"));
    }));
  fill("channels", Object.entries(r.channels || {}).map(([name, c]) => {
    const note = c.error || (c.clamped ? "clamped to the cluster version" : (c.too_old ? "more than one major version below the cluster" : ""));
    const share = c.adoption.share || 0;
    return el("tr", { "data-channel": name },
      el("td", {}, name), el("td", {}, c.target || "–"),
      el("td", {}, c.critical === null || c.critical === undefined ? "–" : (c.critical ? "yes" : "no")),
      el("td", {}, el("span", { class: "meter" }, el("span", { style: "width:" + (100 * share) + "%" })),
        " " + c.adoption.at_target + "/" + c.adoption.stable + " (" + Math.round(100 * share) + "%)"),
      el("td", {}, note));
  }));
  fill("skewed", r.skewed.map((s) => el("tr", {},
    el("td", {}, s.agent), el("td", {}, s.version || "–"), el("td", {}, s.reason))));
}

let agents = [];
let agentCounts = { total: 0, matching: 0 };

// A page of /debug/agents for the filter: the agents, and how many there are and match.
async function getAgents() {
  const q = document.getElementById("filter").value.trim();
  const path = "/debug/agents?limit=" + MAX_AGENTS + (q ? "&q=" + encodeURIComponent(q) : "");
  const r = await fetch(path, { cache: "no-store" });
  if (!r.ok) throw new Error("/debug/agents: HTTP " + r.status);
  const list = await r.json();
  return {
    list,
    total: Number(r.headers.get("x-total-count") || list.length),
    matching: Number(r.headers.get("x-matching-count") || list.length),
  };
}

function renderAgents() {
  const q = document.getElementById("filter").value.trim().toLowerCase();
  const rows = [];
  for (const a of agents) {
    for (const res of (a.resources && a.resources.length ? a.resources : ["(none)"])) {
      rows.push({ a, res });
    }
  }
  rows.sort((x, y) => x.res.localeCompare(y.res) || x.a.id.localeCompare(y.a.id));
  const shown = rows.filter(({ a, res }) => !q ||
    [a.id, res, a.version || "", a.state, a.address].some((f) => f.toLowerCase().includes(q)));
  const { total, matching } = agentCounts;
  document.getElementById("agent-count").textContent = total + " agents" +
    (matching < total ? ", " + matching + " matching" : "") +
    (matching > agents.length ? ", the first " + agents.length + " by id shown: narrow the filter" : "") +
    (shown.length > MAX_ROWS ? ", showing " + MAX_ROWS + " of " + shown.length + " rows" : "");
  fill("agents", shown.slice(0, MAX_ROWS).map(({ a, res }) => el("tr", { "data-agent": a.id },
    el("td", {}, a.id), el("td", {}, a.version || "–"), el("td", {}, state(a.state)),
    el("td", {}, a.address), el("td", {}, res), el("td", { class: "num" }, a.active_connections),
    el("td", { class: "num" }, a.expires_in_seconds === null || a.expires_in_seconds === undefined
      ? (a.source === "store" ? "lease" : "never") : num(a.expires_in_seconds, 0) + " s"))));
}

async function refresh() {
  const errors = [];
  const take = (p) => p.catch((e) => { errors.push(e.message); return null; });
  const [proc, listeners, routes, pools, rollout, list, metrics] = await Promise.all([
    take(get("/debug/process")), take(get("/debug/listeners")), take(get("/debug/routes")),
    take(get("/debug/pools")), take(get("/debug/rollout")), take(getAgents()),
    take(get("/metrics", true)),
  ]);
  const now = { time: Date.now(), samples: metrics ? parseMetrics(metrics) : [] };
  if (proc) {
    document.getElementById("process").textContent = "v" + proc.version + " · pid " + proc.pid +
      " · " + proc.state + " · up " + Math.round(proc.uptime_seconds) + " s · " + proc.connections + " connections";
  }
  if (listeners) renderListeners(listeners, now);
  if (routes) renderRoutes(routes, now);
  if (pools) renderPools(pools);
  if (rollout) renderRollout(rollout);
  if (list) { agents = list.list; agentCounts = list; renderAgents(); }
  if (metrics) previous = now;
  const box = document.getElementById("errors");
  box.hidden = errors.length === 0;
  box.textContent = errors.join("; ");
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  document.body.dataset.loaded = "true";
}

document.getElementById("period").textContent = PERIOD;
// A filter in the address (/status#q=TEXT) applies at load, so a view can be passed on;
// typing keeps the address in step.
const linked = new URLSearchParams(location.hash.slice(1)).get("q");
if (linked) document.getElementById("filter").value = linked;

// Typing narrows the rows at once, and asks sluice for the matching agents shortly after.
let refetch = null;
document.getElementById("filter").addEventListener("input", () => {
  const q = document.getElementById("filter").value.trim();
  history.replaceState(null, "", q ? "#q=" + encodeURIComponent(q) : location.pathname);
  renderAgents();
  clearTimeout(refetch);
  refetch = setTimeout(() => getAgents().then((page) => {
    agents = page.list; agentCounts = page; renderAgents();
  }).catch(() => {}), 300);
});
// A second sample soon after the first gives the rates something to compare.
refresh().then(() => setTimeout(refresh, 1000));
setInterval(refresh, PERIOD * 1000);
