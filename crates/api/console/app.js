// The lakesync operator console: an overview of every synced table and ingest, a page per
// table (configuration, runs, lag chart, "Sync now") and per ingest (partitions). Plain
// JavaScript over the management API; every value is written as text (textContent), never as
// markup. The token lives only in this tab's sessionStorage.
"use strict";

const POLL_MS = 2000;
const TOKEN_KEY = "lakesync.token";

const state = {
  timer: null,
  route: null,
  search: "",
  // Per ingest partition: the last committed offset seen and when, for throughput.
  offsets: new Map(),
};

// ---------- small DOM helpers ----------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const svgNs = "http://www.w3.org/2000/svg";
function svg(tag, attrs, ...children) {
  const node = document.createElementNS(svgNs, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

function show(...nodes) {
  const main = document.getElementById("main");
  main.replaceChildren(...nodes);
}

function say(text) {
  document.getElementById("live").textContent = text;
}

// ---------- API ----------

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

class Unauthorized extends Error {}

async function api(path, options) {
  const headers = { Accept: "application/json" };
  if (token()) headers.Authorization = "Bearer " + token();
  const response = await fetch(path, { ...options, headers, cache: "no-store" });
  if (response.status === 401) throw new Unauthorized("the API wants a token");
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  if (!response.ok) {
    const message = (body && (body.error || body.message)) || response.statusText;
    throw new Error(response.status + ": " + message);
  }
  return body;
}

// ---------- formatting ----------

const FAILED = /FAILED/;

function failing(item) {
  return FAILED.test(item.state || "") || item.state === "failed" || Boolean(item.last_error);
}

function stateBadge(text) {
  const kind = FAILED.test(text) || text === "failed" ? "bad"
    : /PROVISIONING|TRIGGERED_UPDATE|starting|retrying/.test(text) ? "busy"
    : /ONLINE|running/.test(text) ? "good" : "idle";
  return el("span", { class: "state " + kind }, text);
}

function seconds(value) {
  if (value === null || value === undefined) return "–";
  if (value < 1) return value.toFixed(2) + " s";
  if (value < 120) return value.toFixed(1) + " s";
  if (value < 7200) return (value / 60).toFixed(1) + " min";
  return (value / 3600).toFixed(1) + " h";
}

function version(v) {
  return v === null || v === undefined ? "–" : "v" + v;
}

function lastRun(run) {
  if (!run) return "none yet";
  const rows = run.rows_inserted + run.rows_updated + run.rows_deleted;
  const parts = [run.mode, run.outcome, rows + " rows"];
  if (run.duration_seconds !== null && run.duration_seconds !== undefined) parts.push(seconds(run.duration_seconds));
  return parts.join(" · ");
}

function link(href, text) {
  return el("a", { href }, text);
}

function tableHref(name) {
  return "#/tables/" + encodeURIComponent(name);
}

function ingestHref(name) {
  return "#/ingests/" + encodeURIComponent(name);
}

// ---------- views ----------

function needToken(message) {
  show(
    el("section", { class: "notice" },
      el("h1", {}, "Token needed"),
      el("p", {}, message || "This lakesync asks for a token to read. Enter the management token (or a read token) above."),
    ),
  );
  document.getElementById("token").focus();
}

async function overview() {
  const [tables, ingests] = await Promise.all([api("/api/v1/synced-tables"), api("/api/v1/ingests")]);
  const query = state.search.trim().toLowerCase();
  const matches = (item) => !query || item.name.toLowerCase().includes(query) || (item.state || "").toLowerCase().includes(query);
  const byTrouble = (a, b) => Number(failing(b)) - Number(failing(a)) || a.name.localeCompare(b.name);
  const rows = tables.synced_tables.filter(matches).sort(byTrouble).map((t) =>
    el("tr", { dataset: { table: t.name }, class: failing(t) ? "failing" : "" },
      el("th", { scope: "row" }, link(tableHref(t.name), t.name), el("div", { class: "sub" }, t.target)),
      el("td", { "data-label": "State" }, stateBadge(t.state)),
      el("td", { "data-label": "Mode" }, t.mode),
      el("td", { "data-label": "Synced", class: "num synced" }, version(t.synced_version)),
      el("td", { "data-label": "Source", class: "num" }, version(t.source_version)),
      el("td", { "data-label": "Lag", class: "num" },
        t.lag_versions === null || t.lag_versions === undefined ? "–" : t.lag_versions + " versions",
        el("div", { class: "sub" }, seconds(t.lag_seconds))),
      el("td", { "data-label": "Last run" }, lastRun(t.last_run),
        t.last_error ? el("div", { class: "error" }, t.last_error) : null),
      el("td", { "data-label": "Owner" }, t.owner || "–"),
      el("td", { "data-label": "Actions" }, syncButton(t.name, document.getElementById("live"))),
    ));
  const ingestRows = ingests.ingests.filter(matches).sort(byTrouble).map((i) =>
    el("tr", { dataset: { ingest: i.name }, class: failing(i) ? "failing" : "" },
      el("th", { scope: "row" }, link(ingestHref(i.name), i.name), el("div", { class: "sub" }, i.topic + " → " + i.table)),
      el("td", { "data-label": "State" }, stateBadge(i.state)),
      el("td", { "data-label": "Lag", class: "num" }, i.lag_messages + " messages"),
      el("td", { "data-label": "Rows", class: "num" }, String(i.rows)),
      el("td", { "data-label": "Table version", class: "num" }, version(i.table_version)),
      el("td", { "data-label": "Error" }, i.last_error ? el("span", { class: "error" }, i.last_error) : "–"),
      el("td", { "data-label": "Owner" }, i.owner || "–"),
    ));
  const failingCount = tables.synced_tables.filter(failing).length + ingests.ingests.filter(failing).length;
  const search = el("input", {
    type: "search", id: "search", value: state.search, placeholder: "name or state",
    "aria-label": "Filter tables and ingests by name or state",
    oninput: (e) => { state.search = e.target.value; refresh(); },
  });
  const existing = document.getElementById("search");
  const hadFocus = existing && document.activeElement === existing;
  show(
    el("section", {},
      el("div", { class: "bar" },
        el("h1", {}, "Synced tables"),
        el("label", { class: "search" }, "Filter ", search),
        el("span", { class: failingCount ? "summary bad" : "summary" },
          tables.synced_tables.length + " tables, " + ingests.ingests.length + " ingests, " + failingCount + " failing"),
      ),
      rows.length
        ? el("div", { class: "scroll" }, el("table", { class: "grid" },
          el("thead", {}, el("tr", {}, ...["Table", "State", "Mode", "Synced", "Source", "Lag", "Last run", "Owner", "Actions"].map((h) => el("th", { scope: "col" }, h)))),
          el("tbody", {}, rows)))
        : el("p", {}, query ? "No table matches." : "No synced tables."),
    ),
    el("section", {},
      el("h2", {}, "Kafka ingests"),
      ingestRows.length
        ? el("div", { class: "scroll" }, el("table", { class: "grid" },
          el("thead", {}, el("tr", {}, ...["Ingest", "State", "Lag", "Rows", "Table version", "Error", "Owner"].map((h) => el("th", { scope: "col" }, h)))),
          el("tbody", {}, ingestRows)))
        : el("p", {}, query ? "No ingest matches." : "No ingests."),
    ),
  );
  if (hadFocus) {
    const input = document.getElementById("search");
    input.focus();
    input.setSelectionRange(input.value.length, input.value.length);
  }
}

function configList(config) {
  const items = [];
  for (const [key, value] of Object.entries(config || {})) {
    if (key === "storage_options") {
      for (const [k, v] of Object.entries(value || {})) {
        // A secret is only ever named by its variable (KEY_env); show that it is one.
        const shown = k.endsWith("_env") ? "from the environment variable " + v : JSON.stringify(v);
        items.push(el("dt", {}, "storage_options." + k), el("dd", {}, shown));
      }
      continue;
    }
    items.push(el("dt", {}, key), el("dd", {}, typeof value === "string" ? value : JSON.stringify(value)));
  }
  return el("dl", { class: "config" }, items);
}

function lagChart(history) {
  const width = 640, height = 160, pad = 36;
  const samples = history.samples || [];
  const figure = el("figure", { class: "chart" });
  if (!history.sampled_here) {
    figure.append(el("p", {}, "This replica does not run the table, so it keeps no lag history for it; its owner's console shows it."));
    return figure;
  }
  if (samples.length < 2) {
    figure.append(el("p", {}, "Collecting lag samples (one every " + history.interval_seconds + " s)…"));
    return figure;
  }
  const now = Date.now(), hour = 3600 * 1000;
  const max = Math.max(1, ...samples.map((s) => s.lag_seconds));
  const x = (at) => pad + ((Date.parse(at) - (now - hour)) / hour) * (width - pad - 8);
  const y = (v) => height - pad + 8 - (v / max) * (height - pad - 8);
  const points = samples.map((s) => x(s.at).toFixed(1) + "," + y(s.lag_seconds).toFixed(1)).join(" ");
  const latest = samples[samples.length - 1];
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": `Lag over the last hour: now ${seconds(latest.lag_seconds)}, at most ${seconds(max)}` },
    svg("line", { x1: pad, y1: height - pad + 8, x2: width - 8, y2: height - pad + 8, class: "axis" }),
    svg("line", { x1: pad, y1: 8, x2: pad, y2: height - pad + 8, class: "axis" }),
    svg("text", { x: 2, y: 16, class: "label" }, seconds(max)),
    svg("text", { x: 2, y: height - pad + 8, class: "label" }, "0"),
    svg("text", { x: pad, y: height - 8, class: "label" }, "1 h ago"),
    svg("text", { x: width - 40, y: height - 8, class: "label" }, "now"),
    svg("polyline", { points, class: "line" }),
  );
  figure.append(chart, el("figcaption", {}, "Lag (seconds) over the last hour, sampled every " + history.interval_seconds + " s; now " + seconds(latest.lag_seconds) + "."));
  return figure;
}

function runsTable(runs) {
  if (!runs.length) return el("p", {}, "No runs yet.");
  return el("div", { class: "scroll" }, el("table", { class: "grid runs" },
    el("thead", {}, el("tr", {}, ...["Run", "Started", "Kind", "Outcome", "Versions", "Inserted", "Updated", "Deleted", "Duration", "Replica", "Error"].map((h) => el("th", { scope: "col" }, h)))),
    el("tbody", {}, runs.map((r) => el("tr", { class: r.outcome === "failed" ? "failing" : "", dataset: { run: r.run_id } },
      el("td", { class: "num" }, String(r.run_id)),
      el("td", {}, r.started_at),
      el("td", {}, r.mode),
      el("td", {}, r.outcome),
      el("td", {}, version(r.from_version) + " → " + version(r.to_version)),
      el("td", { class: "num" }, String(r.rows_inserted)),
      el("td", { class: "num" }, String(r.rows_updated)),
      el("td", { class: "num" }, String(r.rows_deleted)),
      el("td", { class: "num" }, seconds(r.duration_seconds)),
      el("td", {}, r.replica || "–"),
      el("td", {}, r.error ? el("span", { class: "error" }, r.error) : ""),
    )))));
}

// A "Sync now" button for table `name`, reporting in `out`.
function syncButton(name, out) {
  const button = el("button", { type: "button", class: "sync-now", title: "Sync " + name + " now" }, "Sync now");
  button.addEventListener("click", () => syncNow(name, button, out));
  return button;
}

async function syncNow(name, button, out) {
  if (!token()) {
    out.textContent = "Enter the management token above to run actions.";
    document.getElementById("token").focus();
    return;
  }
  button.disabled = true;
  try {
    await api("/api/v1/synced-tables/" + encodeURIComponent(name) + "/sync", { method: "POST" });
    out.textContent = "Sync requested.";
    say("Sync of " + name + " requested");
  } catch (e) {
    out.textContent = e instanceof Unauthorized ? "The token was refused." : "Sync refused: " + e.message;
  } finally {
    button.disabled = false;
  }
}

async function tablePage(name) {
  const path = "/api/v1/synced-tables/" + encodeURIComponent(name);
  const [t, runs, history] = await Promise.all([api(path), api(path + "/runs?limit=50"), api(path + "/lag")]);
  const previous = document.getElementById("action-result");
  const out = el("span", { id: "action-result", role: "status" }, previous ? previous.textContent : "");
  const button = syncButton(name, out);
  button.id = "sync-now";
  show(
    el("p", {}, link("#/", "← All tables")),
    el("section", { dataset: { table: t.name }, class: "detail" },
      el("div", { class: "bar" }, el("h1", {}, t.name), stateBadge(t.state), button, out),
      el("dl", { class: "facts" },
        el("dt", {}, "Target"), el("dd", {}, t.target),
        el("dt", {}, "Source"), el("dd", {}, t.source),
        el("dt", {}, "Mode"), el("dd", {}, t.mode),
        el("dt", {}, "Synced version"), el("dd", { class: "synced" }, version(t.synced_version)),
        el("dt", {}, "Source version"), el("dd", {}, version(t.source_version)),
        el("dt", {}, "Lag"), el("dd", {}, (t.lag_versions ?? "–") + " versions, " + seconds(t.lag_seconds)),
        el("dt", {}, "Last commit synced"), el("dd", {}, t.synced_commit_timestamp || "–"),
        el("dt", {}, "Owner"), el("dd", {}, t.owner || "–"),
        el("dt", {}, "Last error"), el("dd", { class: t.last_error ? "error" : "" }, t.last_error || "none"),
      ),
    ),
    el("section", {}, el("h2", {}, "Lag"), lagChart(history)),
    el("section", {}, el("h2", {}, "Runs"), runsTable(runs.runs)),
    el("section", {}, el("h2", {}, "Configuration"), configList(t.config)),
  );
}

async function ingestPage(name) {
  const i = await api("/api/v1/ingests/" + encodeURIComponent(name));
  const now = Date.now();
  const rows = (i.partitions || []).map((p) => {
    const key = name + "/" + p.partition;
    const before = state.offsets.get(key);
    let rate = "–";
    if (before && p.committed_offset !== null && before.offset !== null && now > before.at) {
      rate = Math.max(0, ((p.committed_offset - before.offset) * 1000) / (now - before.at)).toFixed(1) + " msg/s";
    }
    if (!before || now - before.at >= POLL_MS) state.offsets.set(key, { offset: p.committed_offset, at: now });
    return el("tr", { dataset: { partition: p.partition } },
      el("td", { class: "num" }, String(p.partition)),
      el("td", { class: "num" }, p.committed_offset ?? "–"),
      el("td", { class: "num" }, String(p.high_watermark)),
      el("td", { class: "num" }, String(p.lag)),
      el("td", { class: "num" }, rate));
  });
  show(
    el("p", {}, link("#/", "← Overview")),
    el("section", { dataset: { ingest: i.name }, class: "detail" },
      el("div", { class: "bar" }, el("h1", {}, i.name), stateBadge(i.state)),
      el("dl", { class: "facts" },
        el("dt", {}, "Topic"), el("dd", {}, i.topic),
        el("dt", {}, "Table"), el("dd", {}, i.table),
        el("dt", {}, "Rows written"), el("dd", {}, String(i.rows)),
        el("dt", {}, "Commits"), el("dd", {}, String(i.commits)),
        el("dt", {}, "Dead letters"), el("dd", {}, String(i.dead_letters)),
        el("dt", {}, "Lag"), el("dd", {}, i.lag_messages + " messages"),
        el("dt", {}, "Owner"), el("dd", {}, i.owner || "–"),
        el("dt", {}, "Last error"), el("dd", { class: i.last_error ? "error" : "" }, i.last_error || "none"),
      ),
    ),
    el("section", {}, el("h2", {}, "Partitions"),
      el("div", { class: "scroll" }, el("table", { class: "grid" },
        el("thead", {}, el("tr", {}, ...["Partition", "Committed offset", "High watermark", "Lag", "Throughput"].map((h) => el("th", { scope: "col" }, h)))),
        el("tbody", {}, rows)))),
  );
}

// ---------- routing and polling ----------

function route() {
  const hash = location.hash || "#/";
  let m = hash.match(/^#\/tables\/(.+)$/);
  if (m) return { view: "table", name: decodeURIComponent(m[1]) };
  m = hash.match(/^#\/ingests\/(.+)$/);
  if (m) return { view: "ingest", name: decodeURIComponent(m[1]) };
  return { view: "overview" };
}

async function refresh() {
  clearTimeout(state.timer);
  const r = route();
  try {
    if (r.view === "table") await tablePage(r.name);
    else if (r.view === "ingest") await ingestPage(r.name);
    else await overview();
    document.body.classList.remove("offline");
  } catch (e) {
    if (e instanceof Unauthorized) {
      needToken(token() ? "The token was refused. Enter a valid token above." : null);
    } else {
      document.body.classList.add("offline");
      say("Cannot reach the API: " + e.message);
    }
  }
  state.timer = setTimeout(refresh, POLL_MS);
}

function tokenControls() {
  const form = document.getElementById("token-form");
  const input = document.getElementById("token");
  const forget = document.getElementById("forget");
  const update = () => {
    forget.hidden = !token();
    input.placeholder = token() ? "token set for this tab" : "management token";
  };
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    if (input.value) sessionStorage.setItem(TOKEN_KEY, input.value);
    input.value = "";
    update();
    say("Token set for this tab");
    refresh();
  });
  forget.addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    update();
    say("Token forgotten");
    refresh();
  });
  update();
}

window.addEventListener("hashchange", () => {
  const main = document.getElementById("main");
  refresh().then(() => main.focus({ preventScroll: true }));
});

document.addEventListener("DOMContentLoaded", () => {
  tokenControls();
  refresh();
});
