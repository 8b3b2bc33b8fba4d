// blynk-bridge status page: fetches /status.json every few seconds and draws it.
// No dependencies; plots are plain SVG paths. Every value goes in with textContent, never as
// HTML, because dead-letter details and error texts come from the outside world.
"use strict";

const REFRESH_MS = 3000;
const SVG = "http://www.w3.org/2000/svg";
const W = 600, H = 200, LEFT = 48, RIGHT = 8, TOP = 8, BOTTOM = 22;
const THROUGHPUT = [
  ["ingested", "ingest", "#1f77b4"],
  ["transformed", "transform", "#2ca02c"],
  ["written", "egress (values)", "#9467bd"],
  ["downlinks", "downlink", "#ff7f0e"],
  ["dead", "dead letters", "#d62728"],
];
const LATENCY = [["p50", "p50", "#1f77b4"], ["p99", "p99", "#d62728"]];
const GROUP_COLORS = ["#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"];

function el(tag, attrs, text) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4))
                                      : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function fmt(v) {
  if (v === null || v === undefined) return "-";
  if (Math.abs(v) >= 1000) return (v / 1000).toFixed(v >= 10000 ? 0 : 1) + "k";
  return Number.isInteger(v) ? String(v) : v.toFixed(v < 10 ? 2 : 1);
}

// Draws series (name → values aligned with t) into svg; returns the points drawn per series.
function plot(svg, legend, t, series) {
  svg.replaceChildren();
  legend.replaceChildren();
  const n = t.length;
  let max = 0;
  for (const s of series) for (const v of s.values) if (v !== null && v > max) max = v;
  max = niceMax(max);
  const x = (i) => LEFT + (n > 1 ? (i * (W - LEFT - RIGHT)) / (n - 1) : 0);
  const y = (v) => TOP + (H - TOP - BOTTOM) * (1 - v / max);
  for (const frac of [0, 0.5, 1]) {
    const yy = y(max * frac);
    svg.append(el("svg:line", {class: frac ? "grid" : "axis", x1: LEFT, x2: W - RIGHT, y1: yy, y2: yy}));
    svg.append(el("svg:text", {x: LEFT - 4, y: yy + 3, "text-anchor": "end"}, fmt(max * frac)));
  }
  svg.append(el("svg:line", {class: "axis", x1: LEFT, x2: LEFT, y1: TOP, y2: H - BOTTOM}));
  const span = n ? (t[n - 1] - t[0]) / 60000 : 0;
  for (const frac of [0, 1 / 3, 2 / 3, 1]) {
    const label = frac === 1 ? "now" : "-" + Math.round(span * (1 - frac)) + " min";
    svg.append(el("svg:text", {x: LEFT + frac * (W - LEFT - RIGHT), y: H - 6,
                               "text-anchor": frac === 0 ? "start" : frac === 1 ? "end" : "middle"}, label));
  }
  const drawn = {};
  for (const s of series) {
    let d = "", points = 0, pen = false;
    s.values.forEach((v, i) => {
      if (v === null || v === undefined) { pen = false; return; }
      d += (pen ? "L" : "M") + x(i).toFixed(1) + "," + y(v).toFixed(1);
      pen = true;
      points += 1;
    });
    drawn[s.name] = points;
    const path = el("svg:path", {class: "series", d: d || "M0,0", stroke: s.color,
                                 "data-series": s.name, "data-points": points});
    path.append(el("svg:title", {}, s.label));
    svg.append(path);
    // A point with no neighbour draws no line: mark it with a dot so it shows.
    const has = (i) => i >= 0 && i < n && s.values[i] !== null && s.values[i] !== undefined;
    s.values.forEach((v, i) => {
      if (has(i) && !has(i - 1) && !has(i + 1)) {
        svg.append(el("svg:circle", {class: "dot", cx: x(i).toFixed(1), cy: y(v).toFixed(1), r: 2.5,
                                     fill: s.color, "data-series": s.name}));
      }
    });
    const item = el("span");
    const swatch = el("i");
    swatch.style.backgroundColor = s.color;  // CSSOM, not a style attribute: allowed by the CSP
    item.append(swatch, document.createTextNode(s.label));
    legend.append(item);
  }
  return drawn;
}

function rows(tableId, data, cells) {
  const body = document.querySelector("#" + tableId + " tbody");
  body.replaceChildren();
  for (const item of data) {
    const tr = el("tr");
    for (const c of cells(item)) {
      if (c instanceof Node) { const td = el("td"); td.append(c); tr.append(td); continue; }
      const numeric = typeof c === "number";
      tr.append(el("td", numeric ? {class: "num"} : {}, numeric ? fmt(c) : c));
    }
    body.append(tr);
  }
  if (!data.length) {
    const cols = document.querySelectorAll("#" + tableId + " thead th").length;
    const tr = el("tr");
    tr.append(el("td", {colspan: cols, class: "muted"}, "none"));
    body.append(tr);
  }
}

function ago(ms, now) {
  const s = Math.max(0, (now - ms) / 1000);
  if (s < 90) return Math.round(s) + " s ago";
  if (s < 5400) return Math.round(s / 60) + " min ago";
  if (s < 172800) return (s / 3600).toFixed(1) + " h ago";
  return (s / 86400).toFixed(1) + " d ago";
}

async function replay(id, button) {
  const result = document.getElementById("replay-result");
  const token = document.getElementById("admin-token").value.trim();
  if (!token) { result.textContent = "enter the admin token (monitor.admin_token) first"; return; }
  button.disabled = true;
  try {
    const resp = await fetch("/dead/replay", {
      method: "POST",
      headers: {"Content-Type": "application/json", "Authorization": "Bearer " + token},
      body: JSON.stringify({ids: [id]}),
      credentials: "omit",
    });
    const body = await resp.json();
    if (!resp.ok) { result.textContent = "replay refused: " + (body.error || resp.status); return; }
    const done = body.replayed.map((r) => r.id + " → " + r.stream);
    const not = body.refused.map((r) => r.id + ": " + r.why).concat(body.missing.map((m) => m + ": gone"));
    result.textContent = (done.length ? "replayed " + done.join(", ") : "") +
                         (not.length ? " not replayed: " + not.join("; ") : "");
    result.dataset.replayed = String(done.length);
    refresh();
  } catch (err) {
    result.textContent = "replay failed: " + err;
  } finally {
    button.disabled = false;
  }
}

function render(s) {
  const h = s.history;
  const lastSlot = h.t.length ? h.t[h.t.length - 1] : s.now_ms;
  document.getElementById("updated").textContent =
    "updated " + new Date(s.now_ms).toLocaleTimeString() + " · " + h.slot_s + " s resolution";
  plot(document.getElementById("plot-throughput"), document.getElementById("legend-throughput"), h.t,
       THROUGHPUT.map(([k, label, color]) => ({name: k, label, color, values: h.rate[k]})));
  plot(document.getElementById("plot-latency"), document.getElementById("legend-latency"), h.t,
       LATENCY.map(([k, label, color]) => ({name: k, label, color, values: h.latency_ms[k]})));
  plot(document.getElementById("plot-backlog"), document.getElementById("legend-backlog"), h.t,
       Object.entries(h.backlog).map(([group, values], i) =>
         ({name: group, label: group, color: GROUP_COLORS[i % GROUP_COLORS.length], values})));
  document.body.dataset.lastSlot = String(lastSlot);

  const streamRows = [];
  for (const st of s.streams) {
    if (!st.groups.length) streamRows.push([st.stream, st.length, "-", "", "", "", ""]);
    for (const g of st.groups) {
      streamRows.push([st.stream, st.length, g.group, g.lag_exact ? g.lag : ">=" + g.lag, g.pending,
                       g.consumers, g.oldest_pending_age_s ? g.oldest_pending_age_s + " s" : "-"]);
    }
  }
  rows("streams", streamRows, (r) => r);
  rows("integrations", s.integrations, (i) => {
    const state = el("span", {class: "state-" + i.state}, i.state);
    return [i.kind, i.name, state, ago(i.since_ms, s.now_ms), i.last_error || "-", i.owner || "-"];
  });
  rows("blynk", Object.entries(s.blynk.by_status), ([status, n]) => [status, n]);
  rows("replicas", s.replicas, (r) => [r.name, ago(r.last_seen_ms, s.now_ms)]);
  document.getElementById("dead-total").textContent = "(" + s.dead.total + " in the dead stream)";
  rows("dead-reasons", Object.entries(s.dead.by_reason), ([reason, n]) => [reason, n]);
  rows("dead-latest", s.dead.latest, (d) => {
    const button = el("button", {type: "button", class: "replay", "data-id": d.id}, "replay");
    button.disabled = !s.replay_enabled;
    button.title = s.replay_enabled ? "append it to its origin stream again"
                                    : "replay is disabled: set monitor.admin_token";
    button.addEventListener("click", () => replay(d.id, button));
    return [d.id, d.time || "", d.stage || "", d.reason || d.error || "", d.detail || "", button];
  });
  const unmapped = [];
  for (const [template, u] of Object.entries(s.unmapped)) {
    for (const [key, n] of Object.entries(u.keys)) unmapped.push([template, key, n]);
    if (u.more) unmapped.push([template, "… " + u.more + " more keys", ""]);
  }
  rows("unmapped", unmapped, (r) => r);
}

let timer = null;
async function refresh() {
  clearTimeout(timer);
  const error = document.getElementById("fetch-error");
  try {
    const resp = await fetch("/status.json", {cache: "no-store", credentials: "omit"});
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    render(await resp.json());
    error.hidden = true;
    document.body.dataset.renders = String(Number(document.body.dataset.renders || 0) + 1);
  } catch (err) {
    error.hidden = false;
    error.textContent = "cannot read /status.json: " + err.message;
  } finally {
    timer = setTimeout(refresh, REFRESH_MS);
  }
}

document.addEventListener("DOMContentLoaded", refresh);
