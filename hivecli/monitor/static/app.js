// hive monitor: asks /api/state every 2 s for what it does not have yet and redraws.
// Every string shown comes from strangers in the DHT: it goes in as text, never as HTML.
"use strict";

const POLL_MS = 2000;
const OVERLAP_S = 120; // ask again for the last two minutes: a report can reach the DHT late
const COLORS = ["#0366d6", "#d73a49", "#28a745", "#6f42c1", "#e36209", "#005cc5", "#b08800", "#22863a"];

const runs = {}; // prefix -> {summary, epoch, peers: {id: record + curve}, run_curve: [], rounds: []}
let since = -Infinity;
let charts = {}; // chart name -> {plot, key}

function appendNewer(list, points) {
  for (const p of points) {
    if (!list.length || p[0] > list[list.length - 1][0]) list.push(p);
  }
}

function merge(state) {
  for (const [prefix, incoming] of Object.entries(state.runs)) {
    const run = runs[prefix] || (runs[prefix] = { peers: {}, run_curve: [], rounds: [] });
    run.summary = incoming.summary;
    run.epoch = incoming.epoch;
    for (const [id, peer] of Object.entries(incoming.peers)) {
      const known = run.peers[id] || (run.peers[id] = { curve: [] });
      appendNewer(known.curve, peer.curve);
      Object.assign(known, peer, { curve: known.curve });
    }
    appendNewer(run.run_curve, incoming.run_curve);
    const seen = new Set(run.rounds.map((r) => r[0] + "/" + r[1]));
    for (const r of incoming.rounds) if (!seen.has(r[0] + "/" + r[1])) run.rounds.push(r);
    run.rounds.sort((a, b) => a[0] - b[0]);
    run.rounds = run.rounds.slice(-200);
  }
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function fmt(value, digits) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

function bytes(value) {
  if (value === null || value === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (value >= 1000 && i < units.length - 1) { value /= 1000; i += 1; }
  return value.toFixed(i ? 1 : 0) + " " + units[i];
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 90) return seconds.toFixed(0) + " s";
  if (seconds < 5400) return (seconds / 60).toFixed(0) + " min";
  return (seconds / 3600).toFixed(1) + " h";
}

function shortId(id) {
  return id.length > 14 ? id.slice(0, 6) + "…" + id.slice(-4) : id;
}

function selectedRun() {
  const prefixes = Object.keys(runs).sort();
  const select = document.getElementById("run");
  if (select.options.length !== prefixes.length) {
    const chosen = select.value;
    select.replaceChildren(...prefixes.map((p) => { const o = el("option", p); o.value = p; return o; }));
    if (prefixes.includes(chosen)) select.value = chosen;
  }
  select.hidden = prefixes.length < 2;
  return runs[select.value || prefixes[0]];
}

function card(label, value) {
  const node = el("div", null, "card");
  node.append(el("div", label, "label"), el("div", value, "value"));
  return node;
}

function renderSummary(run, live) {
  const s = run.summary || {};
  const steps = live.map((p) => p.step).filter((v) => v !== null);
  const runSamples = Math.max(0, ...Object.values(run.peers).map((p) => p.run_samples || 0));
  const speed = live.reduce((sum, p) => sum + (p.samples_per_s || 0), 0);
  const goal = Math.max(0, ...live.map((p) => p.goal_samples || 0));
  const cards = [
    card("run", run_name(run)),
    card("model / data", (s.model || "?") + " / " + (s.dataset || "?")),
    card("peers", live.length + (s.target_group_size ? " (group " + s.target_group_size + ")" : "")),
    card("step", steps.length ? Math.max(...steps) : "–"),
    card("samples/s", fmt(speed, 0)),
    card("samples", runSamples.toLocaleString() + (goal ? " / " + goal.toLocaleString() : "")),
  ];
  if (goal && speed > 0) cards.push(card("ETA", duration(Math.max(0, goal - runSamples) / speed)));
  if (run.epoch) {
    const e = run.epoch;
    const name = e.mode === "diloco" ? "outer step" : "epoch";
    cards.push(card(name, e.epoch + " (" + e.progress + "/" + e.target + ")"));
    if (e.eta_s !== null) cards.push(card("next " + name, "in " + duration(e.eta_s)));
  }
  document.getElementById("summary").replaceChildren(...cards);
}

function run_name(run) {
  for (const [prefix, r] of Object.entries(runs)) if (r === run) return prefix;
  return "?";
}

function renderPeers(run) {
  const rows = Object.entries(run.peers)
    .sort((a, b) => (b[1].step || 0) - (a[1].step || 0))
    .map(([id, p]) => {
      const tr = el("tr", null, p.live ? "" : "gone");
      const cell = el("td", shortId(id));
      cell.title = id;
      tr.append(
        cell, el("td", p.step ?? "–"), el("td", fmt(p.loss, 3)), el("td", fmt(p.samples_per_s, 0)),
        el("td", fmt(p.accuracy, 3)), el("td", p.reach || "–"), el("td", p.rounds ?? "–"),
        el("td", p.group_size ?? "–"), el("td", bytes(p.bytes_sent) + (p.pace_mbps ? " (paced to " + fmt(p.pace_mbps, 0) + " Mbit/s)" : "")),
        el("td", bytes(p.bytes_received)),
        el("td", p.live ? duration(p.last_report_s) + " ago" : "left"),
      );
      return tr;
    });
  document.querySelector("#peers tbody").replaceChildren(...rows);
}

function renderRounds(run) {
  const rows = run.rounds.slice(-20).reverse().map((r) => {
    const tr = el("tr");
    tr.append(
      el("td", new Date(r[0] * 1000).toLocaleTimeString()), el("td", shortId(r[1])), el("td", r[2]),
      el("td", fmt(r[3], 2) + " s"), el("td", r[4] ? "ok" : "failed"),
    );
    return tr;
  });
  document.querySelector("#rounds tbody").replaceChildren(...rows);
}

// One line per peer (and the run's mean where it has one) over time; uPlot.join aligns the times.
function drawChart(name, seriesList) {
  const node = document.getElementById(name + "-chart");
  const usable = seriesList.filter((s) => s.points.length);
  const key = usable.map((s) => s.label).join("|");
  if (!usable.length) {
    if (!node.childElementCount) node.append(el("p", "no data yet", "muted empty"));
    return;
  }
  node.querySelector(".empty")?.remove();
  const data = uPlot.join(usable.map((s) => [s.points.map((p) => p[0]), s.points.map((p) => p[1])]));
  let chart = charts[name];
  if (!chart || chart.key !== key) {
    if (chart) chart.plot.destroy();
    const series = [{}].concat(usable.map((s, i) => ({
      label: s.label, stroke: s.color || COLORS[i % COLORS.length], width: s.width || 1.5, spanGaps: true,
    })));
    const width = Math.max(320, Math.min(560, window.innerWidth / 2 - 60));
    chart = charts[name] = { key, plot: new uPlot({ width, height: 240, series, scales: { x: { time: true } } }, data, node) };
  } else {
    chart.plot.setData(data);
  }
}

function renderCharts(run) {
  const peers = Object.entries(run.peers).sort((a, b) => a[0].localeCompare(b[0]));
  const perPeer = (index) => peers.map(([id, p], i) => ({
    label: shortId(id), color: COLORS[i % COLORS.length],
    points: p.curve.filter((c) => c[index] !== null).map((c) => [c[0], c[index]]),
  }));
  const mean = (index, label) => ({
    label, color: "#24292e", width: 2.5,
    points: run.run_curve.filter((c) => c[index] !== null && c[1] > 0).map((c) => [c[0], c[index]]),
  });
  drawChart("loss", perPeer(2).concat([mean(2, "run mean")]));
  drawChart("accuracy", perPeer(3).concat([mean(3, "run mean")]));
  drawChart("speed", [mean(4, "run")]);
  const lossPoints = peers.reduce((n, [, p]) => n + p.curve.filter((c) => c[2] !== null).length, 0);
  document.body.dataset.lossPoints = String(lossPoints);
}

function render(state) {
  const status = document.getElementById("status");
  const run = selectedRun();
  if (!run) {
    status.textContent = state.error ? "DHT unreachable: " + state.error : "waiting for a run to be announced…";
    status.className = state.error ? "error" : "muted";
    document.body.dataset.peers = "0";
    return;
  }
  const live = Object.values(run.peers).filter((p) => p.live);
  document.body.dataset.peers = String(live.length);
  status.textContent = state.error ? "DHT read failed: " + state.error : "live · updated " + new Date().toLocaleTimeString();
  status.className = state.error ? "error" : "muted";
  renderSummary(run, live);
  renderPeers(run);
  renderRounds(run);
  renderCharts(run);
}

async function poll() {
  try {
    const response = await fetch("/api/state?since=" + (isFinite(since) ? since : "-inf"), { cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    const state = await response.json();
    merge(state);
    lastState = state;
    since = state.now - OVERLAP_S;
    render(state);
  } catch (error) {
    const status = document.getElementById("status");
    status.textContent = "monitor unreachable (" + error.message + "); retrying";
    status.className = "error";
  }
  setTimeout(poll, POLL_MS);
}

let lastState = { runs: {}, error: null };

document.getElementById("run").addEventListener("change", () => {
  for (const chart of Object.values(charts)) chart.plot.destroy();
  charts = {};
  render(lastState);
});

poll();
