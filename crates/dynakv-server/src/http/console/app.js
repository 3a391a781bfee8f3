// The dynakv console: polls the node's own /admin and /stats JSON every two seconds and
// draws them. Everything a client named (buckets, keys, node names) is set as text, never
// as markup.
"use strict";

const POLL_MS = 2000;
const HISTORY_POINTS = 150; // five minutes of samples
const COLORS = ["#4f7cac", "#d1495b", "#66a182", "#edae49", "#8e6c8a", "#00798c", "#c97b63",
  "#6b8f71", "#3d5a80", "#a23b72"];
const OPS = ["get", "put", "delete"];
const history = []; // {at, rates: {get, put, delete}}
let previous = null; // {at, counts}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function setText(id, text) {
  document.getElementById(id).textContent = String(text);
}

function rows(tableId, data, cells, hideEmpty) {
  const body = document.querySelector(`#${tableId} tbody`);
  if (hideEmpty) document.getElementById(tableId).hidden = data.length === 0;
  body.replaceChildren(...data.map((item) => {
    const tr = el("tr");
    for (const [value, cls] of cells(item)) tr.append(el("td", value, cls));
    return tr;
  }));
}

async function fetchJson(path) {
  const response = await fetch(path, { credentials: "same-origin", cache: "no-store" });
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

function colorOf(names, name) {
  const i = names.indexOf(name);
  return i < 0 ? "#999" : COLORS[i % COLORS.length];
}

function drawMembers(members) {
  const list = members.members || [];
  setText("member-count", list.length);
  setText("members-up", `${list.filter((m) => m.up).length} up`);
  rows("members", list, (m) => [
    [m.name], [m.status], [m.up ? "up" : "down", m.up ? "up" : "down"], [m.zone || "-"],
    [m.partitions ?? "-", "num"], [m.partitions_next ?? "-", "num"],
    [m.protocol ?? "-", "num protocol"], [m.http_addr],
  ]);
}

function drawRing(ring) {
  const owners = ring.owners || [];
  const next = ring.next_owners || null;
  const names = [...new Set(owners.concat(next || []))].sort();
  setText("partition-count", ring.partitions ?? owners.length);
  setText("ring-state", ring.settled ? `version ${ring.version}, settled`
    : `version ${ring.version}, in transition`);
  const grid = document.getElementById("ring");
  grid.replaceChildren(...owners.map((owner, p) => {
    const cell = el("div", p);
    cell.style.background = colorOf(names, owner);
    const to = next ? next[p] : owner;
    cell.title = to === owner ? `partition ${p}: ${owner}` : `partition ${p}: ${owner} -> ${to}`;
    if (to !== owner) cell.classList.add("moving");
    cell.dataset.owner = owner;
    return cell;
  }));
  const legend = document.getElementById("ring-legend");
  legend.replaceChildren(...names.map((name) => {
    const item = el("span", `${name} (${owners.filter((o) => o === name).length})`);
    item.style.setProperty("--c", colorOf(names, name));
    return item;
  }));
}

function drawHandoffs(handoffs) {
  const held = (handoffs.hints && handoffs.hints.held_per_target) || [];
  setText("hints-total", held.reduce((sum, h) => sum + (h.keys || 0), 0));
  rows("hints", held, (h) => [[h.target], [h.keys, "num"]], true);
  const moving = handoffs.partitions_moving || [];
  setText("moving-count", moving.length);
  rows("moving", moving, (m) => [[m.partition, "num"], [m.from], [m.to]], true);
}

function drawRequests(stats) {
  const now = Date.now();
  const counts = Object.fromEntries(OPS.map((op) => [op, stats[`node_${op}s_total`] || 0]));
  if (previous) {
    const seconds = Math.max((now - previous.at) / 1000, 0.001);
    const rates = Object.fromEntries(OPS.map((op) =>
      [op, Math.max(counts[op] - previous.counts[op], 0) / seconds]));
    history.push({ at: now, rates });
    if (history.length > HISTORY_POINTS) history.shift();
  }
  previous = { at: now, counts };
  const last = history.length ? history[history.length - 1].rates : null;
  const ms = (us) => (us / 1000).toFixed(2);
  setText("window", stats.recent_window_seconds
    ? `latency over the last ${Math.round(stats.recent_window_seconds / 60 * 10) / 10} min`
    : "latency since the first look (the window grows to 5 min)");
  rows("latency", OPS, (op) => [
    [op], [last ? last[op].toFixed(1) : "…", "num"], [stats[`node_${op}s_recent`] ?? 0, "num"],
    [ms(stats[`node_${op}_fsm_time_median_recent`] || 0), "num"],
    [ms(stats[`node_${op}_fsm_time_99_recent`] || 0), "num"],
    [ms(stats[`node_${op}_fsm_time_999_recent`] || 0), "num"],
  ]);
  const svg = document.getElementById("rate-chart");
  const max = Math.max(1, ...history.flatMap((h) => OPS.map((op) => h.rates[op])));
  const ns = "http://www.w3.org/2000/svg";
  svg.replaceChildren(...OPS.map((op, i) => {
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("stroke", COLORS[i]);
    line.setAttribute("points", history.map((h, x) =>
      `${(x / (HISTORY_POINTS - 1)) * 600},${120 - (h.rates[op] / max) * 110}`).join(" "));
    return line;
  }));
}

function histogramRows(tableId, perBucket, field) {
  const totals = {};
  for (const stats of Object.values(perBucket || {})) {
    const le = (stats[field] && stats[field].le) || {};
    let below = 0;
    for (const [bound, cumulative] of Object.entries(le)) {
      totals[bound] = (totals[bound] || 0) + (cumulative - below);
      below = cumulative;
    }
  }
  const entries = Object.entries(totals);
  const max = Math.max(1, ...entries.map(([, n]) => n));
  rows(tableId, entries, ([bound, n]) => [[`≤ ${bound}`], [n, "num"], [""]]);
  const body = document.querySelector(`#${tableId} tbody`);
  [...body.children].forEach((tr, i) => {
    const bar = el("div", null, "bar");
    bar.style.width = `${(entries[i][1] / max) * 100}%`;
    tr.lastChild.append(bar);
    tr.lastChild.style.width = "50%";
  });
}

function drawCausality(stats) {
  const causality = stats.causality || {};
  setText("sibling-warning", causality.sibling_warning ?? 25);
  setText("over-warning", causality.reads_over_sibling_warning_total ?? 0);
  histogramRows("siblings-histogram", causality.per_bucket, "siblings");
  histogramRows("clock-histogram", causality.per_bucket, "clock_entries");
  rows("top-keys", causality.top_keys_by_siblings || [], (t) => [
    [t.bucket], [t.key], [t.siblings, "num"], [t.clock_entries, "num"],
  ], true);
}

function drawAae(aae) {
  const partitions = aae.partitions || [];
  const never = partitions.filter((p) => p.last_exchange_seconds_ago === null).length;
  const repaired = partitions.reduce((sum, p) => sum + (p.keys_repaired_total || 0), 0);
  setText("aae-summary",
    `${partitions.length} partitions held here, ${never} never exchanged, ${repaired} keys repaired`);
  rows("aae", partitions, (p) => [
    [p.partition, "num"], [p.keys, "num"], [p.exchanges, "num"],
    [p.last_exchange_seconds_ago === null ? "never" : p.last_exchange_seconds_ago.toFixed(1), "num"],
    [p.last_peer || "-"], [p.keys_repaired_last, "num"], [p.keys_repaired_total, "num"],
  ]);
}

async function refresh() {
  try {
    const [status, members, ring, handoffs, aae, stats] = await Promise.all([
      fetchJson("/admin/status"), fetchJson("/admin/members"), fetchJson("/admin/ring"),
      fetchJson("/admin/handoffs"), fetchJson("/admin/aae"), fetchJson("/stats"),
    ]);
    setText("node", `node ${status.node} of cluster ${status.cluster} (dynakv ${status.version})`);
    drawMembers(members);
    drawRing(ring);
    drawHandoffs(handoffs);
    drawRequests(stats);
    drawCausality(stats);
    drawAae(aae);
    setText("updated", `updated ${new Date().toLocaleTimeString()}`);
    document.getElementById("error").hidden = true;
    document.body.dataset.loaded = "true";
  } catch (e) {
    const error = document.getElementById("error");
    error.textContent = `cannot reach the node: ${e.message}`;
    error.hidden = false;
  }
}

refresh();
setInterval(refresh, POLL_MS);
