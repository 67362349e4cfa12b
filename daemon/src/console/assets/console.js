// sluice console: renders the daemon's overview and sends operator actions.
// No library, no inline handlers, text only through textContent (never markup from data).
"use strict";

let csrf = null;
let events = null;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function dollars(cents) {
  if (cents === null || cents === undefined) return "–";
  return "$" + (cents / 100).toFixed(2);
}

function dollarsMilli(millicents) {
  if (millicents === null || millicents === undefined) return "–";
  const d = millicents / 100000;
  return "$" + (d < 0.01 && d > 0 ? d.toFixed(5) : d.toFixed(2));
}

function when(t) {
  if (!t) return "–";
  const d = typeof t === "number" ? new Date(t * 1000) : new Date(t);
  if (isNaN(d)) return String(t);
  return d.toLocaleString();
}

function short(id) {
  return id && id.length > 18 ? id.slice(0, 15) + "…" : id || "";
}

// State changes: POST with the session's CSRF token.
async function post(path, body) {
  const r = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
    body: body === undefined ? "" : JSON.stringify(body),
    credentials: "same-origin",
  });
  let data = null;
  try { data = await r.json(); } catch (_) { data = null; }
  if (r.status === 401) { location.assign("/login"); }
  if (!r.ok) throw new Error((data && data.message) || ("HTTP " + r.status));
  return data;
}

function showErrors(list) {
  const box = document.getElementById("errors");
  box.replaceChildren(...list.map((m) => el("div", {}, m)));
  box.hidden = list.length === 0;
}

let actionError = null;

function renderHolds(holds) {
  const list = (holds && holds.holds) || [];
  const body = document.querySelector("#holds tbody");
  document.getElementById("holds-count").textContent = list.length ? "(" + list.length + ")" : "";
  document.getElementById("holds-empty").hidden = list.length > 0;
  document.getElementById("holds").hidden = list.length === 0;
  // Keep what the operator is typing in a note across updates.
  const notes = {};
  for (const input of body.querySelectorAll("input[data-hold]")) notes[input.dataset.hold] = input.value;
  body.replaceChildren(...list.map((h) => {
    const r = h.request || {};
    const target = [r.method, r.host, r.path].filter(Boolean).join(" ");
    const note = el("input", { type: "text", placeholder: "note (optional)", "data-hold": h.id });
    note.value = notes[h.id] || "";
    const approve = el("button", { type: "button", "data-action": "approve", "data-hold": h.id }, "Approve");
    const deny = el("button", { type: "button", class: "deny", "data-action": "deny", "data-hold": h.id }, "Deny");
    for (const b of [approve, deny]) {
      b.addEventListener("click", async () => {
        approve.disabled = deny.disabled = true;
        try {
          const text = note.value.trim();
          await post("/api/holds/" + encodeURIComponent(h.id) + "/" + b.dataset.action, text ? { note: text } : {});
          actionError = null;
        } catch (e) {
          actionError = "Hold " + h.id + ": " + e.message;
          approve.disabled = deny.disabled = false;
        }
        refreshErrors();
      });
    }
    return el("tr", { "data-hold-id": h.id },
      el("td", { class: "mono", title: h.id }, short(h.id)),
      el("td", {}, h.agent_id),
      el("td", {}, el("code", {}, r.action), el("div", { class: "mono" }, target)),
      el("td", { class: "num" }, dollarsMilli(r.cost_millicents)),
      el("td", {}, when(h.created_at)),
      el("td", {}, when(h.expires_at)),
      el("td", {}, note),
      el("td", {}, approve, " ", deny));
  }));
}

function meter(label, spentMilli, limitCents, resets) {
  const wrap = el("div", { class: "meter" });
  const limit = limitCents === null || limitCents === undefined ? null : limitCents * 1000;
  wrap.append(el("div", { class: "label" },
    el("span", {}, label),
    el("span", {}, dollarsMilli(spentMilli) + (limit === null ? " (no limit)" : " of " + dollars(limitCents)))));
  if (limit !== null) {
    const share = limit === 0 ? 1 : Math.min(1, spentMilli / limit);
    const fill = el("div", { class: "fill" + (share >= 0.8 ? " high" : "") });
    fill.style.width = (share * 100).toFixed(1) + "%";
    wrap.append(el("div", { class: "bar" }, fill));
  }
  wrap.append(el("div", { class: "resets" }, "resets " + when(resets)));
  return wrap;
}

// The stops in force (from the overview): who is frozen, since when, by whom.
let stops = { all: null, passports: [] };

function stoppedEntry(passportId) {
  return (stops.passports || []).find((p) => p.passport_id === passportId) || null;
}

// Stop or resume: one click, no dialog (an emergency stop must be quick). The note, if any, comes
// from the box in the emergency bar and is attested with the action.
async function stopAction(verb, body, button) {
  button.disabled = true;
  const note = document.getElementById("stop-note").value.trim();
  if (note) body.note = note;
  try {
    await post("/api/" + verb, body);
    actionError = null;
  } catch (err) {
    actionError = (verb === "stop" ? "Stop: " : "Resume: ") + err.message;
  }
  button.disabled = false;
  refreshErrors();
}

// Buttons per agent: stop it, or resume it if it is stopped by name.
function agentActions(a) {
  const stopped = stoppedEntry(a.passport_id);
  const b = stopped
    ? el("button", { type: "button", class: "quiet", "data-action": "resume" }, "Resume")
    : el("button", { type: "button", class: "danger", "data-action": "stop" }, "Stop");
  b.addEventListener("click", () => stopAction(stopped ? "resume" : "stop", { passport_id: a.passport_id }, b));
  return [b];
}

function renderStops() {
  const bar = document.getElementById("stop-bar");
  const all = stops.all;
  bar.className = "stopbar" + (all ? " stopped" : "");
  document.getElementById("stop-state").textContent = all
    ? "Every agent is stopped (since " + when(all.at) + (all.note ? ": " + all.note : "") + ")."
    : (stops.passports || []).length + " agent(s) stopped by name.";
  const b = document.getElementById("stop-all");
  b.textContent = all ? "Resume all" : "Stop all agents";
  b.className = all ? "quiet" : "danger";
}

function renderAgents(agents) {
  const list = (agents && agents.agents) || [];
  const box = document.getElementById("agents");
  document.getElementById("agents-count").textContent =
    "(" + list.length + (agents && agents.omitted ? ", " + agents.omitted + " more not shown" : "") + ")";
  document.getElementById("agents-empty").hidden = list.length > 0;
  box.replaceChildren(...list.map((a) => {
    const badges = el("div", {},
      el("span", { class: "badge" }, a.tier),
      a.revoked ? el("span", { class: "badge bad" }, "revoked") : null,
      a.expired ? el("span", { class: "badge bad" }, "expired") : null,
      stoppedEntry(a.passport_id) || stops.all ? el("span", { class: "badge bad" }, "stopped") : null,
      el("span", { class: "badge" }, a.sandboxes.length + " sandbox" + (a.sandboxes.length === 1 ? "" : "es")));
    const card = el("div", { class: "agent", "data-passport": a.passport_id },
      el("h3", {}, a.agent_name ? a.agent_name + " (" + a.agent_id + ")" : a.agent_id),
      el("div", { class: "sub mono" }, a.passport_id + " · expires " + when(a.expires_at)),
      badges);
    const s = a.state;
    if (s) {
      card.append(meter("Today", s.daily_cost_millicents, s.daily_cost_limit_cents, s.daily_resets_at));
      if (s.window !== "daily") {
        card.append(meter("This " + s.window.replace("ly", ""), s.window_cost_millicents, s.window_cost_limit_cents, s.window_resets_at));
      }
      const facts = el("dl", { class: "facts" },
        el("dt", {}, "Requests today"), el("dd", {}, s.daily_requests + (s.daily_request_limit ? " of " + s.daily_request_limit : "")),
        el("dt", {}, "Per action"), el("dd", {}, s.max_per_action_cents === null ? "no limit" : dollars(s.max_per_action_cents)),
        el("dt", {}, "Approval above"), el("dd", {}, s.approval_threshold_cents === null ? "never" : dollars(s.approval_threshold_cents)));
      for (const r of s.rate_limits || []) {
        facts.append(el("dt", {}, "Rate / " + r.period), el("dd", {}, r.remaining + " of " + r.limit + " left (full " + when(r.full_at) + ")"));
      }
      card.append(facts);
    } else if (a.state_error) {
      card.append(el("p", { class: "error" }, a.state_error));
    }
    for (const sb of a.sandboxes) {
      card.append(el("div", { class: "sub mono" }, sb.id + " · " + sb.cgroup + (sb.leader_pid ? " · pid " + sb.leader_pid : "")));
    }
    const actions = agentActions(a);
    if (actions.length) card.append(el("div", {}, ...actions));
    return card;
  }));
}

function renderRecords(records) {
  const list = ((records && records.records) || []).slice().reverse();
  document.querySelector("#records tbody").replaceChildren(...list.map(({ index, record: r }) => {
    const decision = r.decision || "";
    const cost = r.cost_millicents !== undefined ? dollarsMilli(r.cost_millicents)
      : r.cost_cents !== undefined ? dollars(r.cost_cents) : "";
    const target = [r.method, r.host].filter(Boolean).join(" ");
    return el("tr", { "data-index": index, "data-kind": r.kind || "" },
      el("td", { class: "num" }, index),
      el("td", {}, when(r.time)),
      el("td", {}, r.kind || ""),
      el("td", {}, r.agent_id || r.chain || ""),
      el("td", {}, el("code", {}, r.action || "")),
      el("td", { class: "mono" }, target),
      el("td", { class: "decision-" + decision }, decision),
      el("td", {}, (r.reason || "") + (r.reason && r.by && r.by.user ? " (by " + r.by.user + ")" : "")),
      el("td", { class: "num" }, cost));
  }));
}

function renderLog(checkpoint, verification) {
  const dl = document.getElementById("checkpoint");
  if (checkpoint) {
    dl.replaceChildren(
      el("dt", {}, "Origin"), el("dd", { class: "mono" }, checkpoint.origin),
      el("dt", {}, "Latest checkpoint"), el("dd", {}, checkpoint.size + " records"),
      el("dt", {}, "Root"), el("dd", { class: "mono" }, checkpoint.root));
  } else {
    dl.replaceChildren(el("dt", {}, "Checkpoint"), el("dd", {}, "none signed yet"));
  }
  const out = document.getElementById("verify-result");
  const problems = document.getElementById("verify-problems");
  if (!verification) {
    out.textContent = "not verified from the console yet";
    out.className = "verify";
    problems.replaceChildren();
    return;
  }
  out.className = "verify " + (verification.ok ? "ok" : "bad");
  out.textContent = (verification.ok ? "OK: " : "FAILED: ") + verification.records_checked + " records, " +
    verification.chains_checked + " chains, checkpoint " + verification.checkpoint_size + " (" + when(verification.verified_at) + ")" +
    (verification.ok ? "" : ", " + verification.problems_total + " problem(s)");
  problems.replaceChildren(...verification.problems.map((p) => el("li", {}, p)));
}

let overviewErrors = [];

function refreshErrors() {
  showErrors(actionError ? [actionError, ...overviewErrors] : overviewErrors);
}

// What each part was last drawn from: a part is drawn again only when its data changed, so
// a note being typed next to a hold keeps its focus while the counters tick elsewhere.
const drawn = {};

function changed(name, data) {
  const text = JSON.stringify(data === undefined ? null : data);
  if (drawn[name] === text) return false;
  drawn[name] = text;
  return true;
}

function render(o) {
  const h = o.health || {};
  document.getElementById("summary").textContent =
    (h.passports || 0) + " passports · " + (h.log_size || 0) + " records · " + (h.origin || "");
  const stopsChanged = changed("stops", o.stops);
  if (stopsChanged) { stops = o.stops || { all: null, passports: [] }; renderStops(); }
  if (changed("holds", o.holds)) renderHolds(o.holds);
  if (changed("agents", o.agents) || stopsChanged) renderAgents(o.agents);
  if (changed("records", o.records)) renderRecords(o.records);
  if (changed("log", [o.checkpoint, o.verification])) renderLog(o.checkpoint, o.verification);
  overviewErrors = o.errors || [];
  refreshErrors();
}

function setStatus(live) {
  const s = document.getElementById("status");
  s.textContent = live ? "live" : "reconnecting";
  s.className = "status " + (live ? "live" : "connecting");
}

function connect() {
  events = new EventSource("/api/events");
  events.addEventListener("open", () => setStatus(true));
  events.addEventListener("error", () => setStatus(false));
  events.addEventListener("overview", (e) => { setStatus(true); render(JSON.parse(e.data)); });
  events.addEventListener("logout", () => { events.close(); location.assign("/login"); });
}

async function start() {
  const r = await fetch("/api/session", { credentials: "same-origin" });
  if (!r.ok) { location.assign("/login"); return; }
  csrf = (await r.json()).csrf;
  document.getElementById("verify").addEventListener("click", async (e) => {
    const b = e.target;
    b.disabled = true;
    document.getElementById("verify-result").textContent = "verifying…";
    try { await post("/api/verify"); actionError = null; } catch (err) { actionError = "Verify: " + err.message; }
    b.disabled = false;
    refreshErrors();
  });
  document.getElementById("stop-all").addEventListener("click", (e) =>
    stopAction(stops.all ? "resume" : "stop", { all: true }, e.target));
  document.getElementById("logout").addEventListener("click", async () => {
    try { await post("/logout"); } catch (_) { /* the session is gone either way */ }
    location.assign("/login");
  });
  connect();
}

document.addEventListener("DOMContentLoaded", start);
