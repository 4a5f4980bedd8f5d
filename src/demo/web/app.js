// The demo page: a terminal (xterm.js on the agent's PTY), the agent's event stream and a
// task's live output, all through Portcullis on this page's origin.
//
// Authentication: the demo banner prints a link to the proxy's own login page
// (`/.portcullis/login#token=...&next=/agents/demo/`). A fragment is never sent to a server, so
// the token is in no request line and no access log; the login page posts it to the proxy once,
// and the proxy sets it as the cookie `portcullis_token`: HttpOnly (no script, this one
// included, can read it), Secure, SameSite=Strict. Every call below (the terminal, the events,
// REST and SSE) rides on that cookie: this page never holds the token (docs/security.md, "Agent
// pages and the user's credentials").
"use strict";

const agent = document.currentScript.dataset.agent;
const base = `/agents/${agent}`;
const $ = (id) => document.getElementById(id);

$("auth-state").textContent = "signed in: HttpOnly cookie set by the proxy";
$("auth-state").className = "pill ok";
const wsBase = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}${base}`;

// ---------------------------------------------------------------------------------------------
// Terminal

function fallbackTerminal(el) {
  // Without xterm.js (npm packages not installed): a plain view of the output, keys sent as typed.
  const pre = document.createElement("pre");
  pre.id = "fallback";
  pre.tabIndex = 0;
  el.replaceWith(pre);
  const listeners = [];
  pre.addEventListener("keydown", (e) => {
    const keys = { Enter: "\r", Backspace: "\x7f", Tab: "\t", Escape: "\x1b" };
    const data = keys[e.key] || (e.key.length === 1 ? (e.ctrlKey ? String.fromCharCode(e.key.toUpperCase().charCodeAt(0) - 64) : e.key) : "");
    if (data) { e.preventDefault(); listeners.forEach((f) => f(data)); }
  });
  return {
    cols: 80, rows: 24,
    write(bytes) {
      const text = (typeof bytes === "string" ? bytes : new TextDecoder().decode(bytes)).replace(/\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r/g, "");
      pre.textContent += text;
      pre.scrollTop = pre.scrollHeight;
    },
    onData(f) { listeners.push(f); },
    onResize() {},
    focus() { pre.focus(); },
    fit() {},
  };
}

function makeTerminal() {
  const el = $("terminal");
  if (typeof Terminal === "undefined") {
    return fallbackTerminal(el);
  }
  const term = new Terminal({ cursorBlink: true, fontSize: 14, convertEol: false, scrollback: 5000 });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(el);
  term.fit = () => fit.fit();
  term.fit();
  // Fitted whenever its panel changes size: a window resize, and the grid reflowing when a
  // long event line arrives in the other column.
  new ResizeObserver(() => term.fit()).observe(el.parentElement);
  return term;
}

const term = makeTerminal();
window.portcullisTerminal = term;

function showSize() {
  $("term-size").textContent = `${term.rows}x${term.cols}`;
}

// The terminal's connection is a small state machine, drawn in the page (#term-state, and an
// overlay over the terminal when it needs the user):
//   connecting -> open
//   open -> reconnecting (connection lost): dropped without a close (1006); the page resumes
//           with the id the proxy issued (within the proxy's window: the same shell, with what
//           it printed meanwhile; after it, a new shell, and the proxy says so)
//   open -> reconnecting (<reason>): 1001 (a drain, a rebalance, the route removed, the
//           session's lifetime): a new session, with backoff
//   connecting -> refused: <the proxy's reason>: the handshake was refused (401, 403, 429);
//           a browser cannot read a refused handshake, so the page asks the agent's REST API
//           (same cookie, same checks) for the status and the proxy's reason
//   open -> closed 1008: session revoked / token expired, or closed <code>: ended; the overlay
//           offers to reconnect, nothing retries on its own
let resumeId = null;
let termSocket = null;
let reconnectDelay = 250;

// Every state the terminal went through, for the page's browser tests.
window.portcullisTermStates = [];

function termState(text, ok, overlay) {
  window.portcullisTermStates.push(text);
  $("term-state").textContent = text;
  $("term-state").className = ok ? "ok" : "bad";
  $("term-overlay").hidden = !overlay;
  if (overlay) $("term-overlay-text").textContent = overlay;
}

function retry(why) {
  termState(`reconnecting (${why})`, false, null);
  setTimeout(connectTerminal, reconnectDelay);
  reconnectDelay = Math.min(reconnectDelay * 2, 4000);
}

// Why the proxy refused the terminal's handshake, from the agent's REST API.
async function refusal() {
  try {
    const r = await fetch(`${base}/api/status`, { credentials: "same-origin" });
    if (r.ok) return null;
    const body = (await r.text()).trim();
    return `${r.status}${body ? " " + body : ""}`;
  } catch (_) {
    return null;
  }
}

function connectTerminal() {
  const ws = new WebSocket(resumeId ? `${wsBase}/terminal?resume=${encodeURIComponent(resumeId)}` : `${wsBase}/terminal`);
  ws.binaryType = "arraybuffer";
  termSocket = ws;
  let opened = false;
  termState(resumeId ? "reconnecting" : "connecting", true, null);
  ws.onopen = () => {
    opened = true;
    reconnectDelay = 250;
    termState("open", true, null);
    sendSize();
    term.focus();
  };
  // The shell's output is binary. The proxy's own frames are text: the resume id it issued a
  // fresh session (JSON), and its notice that a fresh session replaced a lost one.
  ws.onmessage = (m) => {
    if (typeof m.data !== "string") return term.write(new Uint8Array(m.data));
    let announced = null;
    try { announced = JSON.parse(m.data).portcullis.resume_id; } catch (_) {}
    if (typeof announced === "string") resumeId = announced;
    else term.write(m.data);
  };
  ws.onclose = async (e) => {
    if (termSocket !== ws) return;
    const closed = `closed ${e.code}${e.reason ? ": " + e.reason : ""}`;
    if (e.code === 1006 && !opened) {
      // Refused, or the network: the REST API says which.
      const why = await refusal();
      if (why) {
        termState(`refused: ${why}`, false, `The proxy refused the terminal: ${why}`);
        return;
      }
      return retry("connection lost");
    }
    if (e.code === 1006) return retry("connection lost");
    if (e.code === 1001) {
      // Going away (a drain, a rebalance): a new session, after a pause.
      resumeId = null;
      return retry(e.reason || "going away");
    }
    if (e.code === 1008 && e.reason === "session revoked") {
      return termState(closed, false, "This session was revoked by an operator.");
    }
    if (e.code === 1008 && e.reason === "token expired") {
      return termState(closed, false, "Your token expired: sign in again.");
    }
    termState(closed, false, `The terminal session ended (${closed}).`);
  };
  window.portcullisTerminalSocket = ws;
}

$("term-reconnect").addEventListener("click", () => {
  resumeId = null;
  reconnectDelay = 250;
  connectTerminal();
});

function sendSize() {
  showSize();
  if (termSocket && termSocket.readyState === WebSocket.OPEN) {
    termSocket.send(JSON.stringify({ type: "resize", cols: term.cols, rows: term.rows }));
  }
}

const encoder = new TextEncoder();
term.onData((d) => termSocket && termSocket.readyState === WebSocket.OPEN && termSocket.send(encoder.encode(d)));
term.onResize(sendSize);
connectTerminal();

// ---------------------------------------------------------------------------------------------
// Events (cookie auth)

function connectEvents() {
  const ws = new WebSocket(`${wsBase}/events`);
  let count = 0;
  ws.onopen = () => { $("events-state").textContent = "open"; $("events-state").className = "ok"; };
  ws.onmessage = (m) => {
    count += 1;
    let line = m.data;
    let seq = "?";
    try {
      // {"type":"agent.event","agent":"demo","seq":12,"ts":<epoch ms>,"status":"running"}
      const e = JSON.parse(m.data);
      seq = e.seq;
      const at = typeof e.ts === "number" ? new Date(e.ts).toLocaleTimeString() : "";
      line = `${at}  #${e.seq}  ${e.type || "event"}  ${e.status || ""}`.trim();
    } catch (_) {}
    $("events-count").textContent = String(count);
    $("events-seq").textContent = String(seq);
    const log = $("events-log");
    log.textContent = (line + "\n" + log.textContent).slice(0, 4000);
  };
  ws.onclose = (e) => {
    $("events-state").textContent = `closed ${e.code}${e.reason ? ": " + e.reason : ""}`;
    $("events-state").className = "bad";
  };
}

connectEvents();

// ---------------------------------------------------------------------------------------------
// REST status and a task's SSE output (cookie auth)

async function refreshStatus() {
  try {
    const r = await fetch(`${base}/api/status`, { credentials: "same-origin" });
    const s = r.ok ? await r.json() : null;
    $("agent-status").textContent = s ? `status: ${s.status} · up ${s.uptime_seconds}s · ${s.tasks} tasks` : `status: HTTP ${r.status}`;
    $("agent-status").className = "pill " + (r.ok ? "ok" : "bad");
  } catch (e) {
    $("agent-status").textContent = "status: unreachable";
  }
}

refreshStatus();
setInterval(refreshStatus, 5000);

$("run-task").addEventListener("click", async () => {
  const out = $("task-output");
  out.textContent = "";
  const r = await fetch(`${base}/api/tasks`, {
    method: "POST",
    credentials: "same-origin",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ name: "demo-task", steps: 6 }),
  });
  if (!r.ok) {
    $("task-state").textContent = `could not start: HTTP ${r.status}`;
    return;
  }
  const task = await r.json();
  $("task-state").textContent = `task ${task.id} running`;
  const es = new EventSource(`${base}/api/tasks/${task.id}/output`);
  es.addEventListener("line", (e) => { out.textContent += e.data + "\n"; });
  es.addEventListener("done", () => {
    $("task-state").textContent = `task ${task.id} done`;
    es.close();
  });
  es.onerror = () => { if (es.readyState === EventSource.CLOSED) $("task-state").textContent = "stream closed"; };
});
