// The doctor's clinic board: today's visits, redrawn from the server's event stream (SSE) as
// patients arrive, enter the call and leave. No inline script (CSP script-src 'self'); every
// text comes from the server (translated) and is set with textContent, never as HTML.
"use strict";

(function () {
  const root = document.querySelector("[data-board]");
  if (!root || !window.EventSource) return;
  const rows = root.querySelector("[data-board-rows]");
  const empty = root.querySelector("[data-board-empty]");
  const liveBadge = root.querySelector("[data-board-live]");
  const msg = root.dataset;

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function row(v) {
    const tr = el("tr", {
      "data-visit": v.public_id,
      "data-state": v.state,
      class: "state-" + v.state,
      "data-testid": "board-row",
    });
    tr.append(el("td", {}, v.time));
    const who = el("td");
    who.append(el("a", { href: v.visit_url, "data-testid": "board-patient" }, v.patient));
    tr.append(who);
    const state = el("td");
    state.append(el("span", { class: "badge state state-" + v.state, "data-testid": "board-state" }, v.state_label));
    tr.append(state);
    const reports = el("td", { "data-testid": "board-reports" }, String(v.reports));
    if (v.new_reports) {
      reports.append(" ");
      reports.append(el("span", { class: "badge warn" }, v.reports_label));
    }
    tr.append(reports);
    const cell = el("td");
    const actions = el("div", { class: "actions" });
    cell.append(actions);
    if (v.admit_url) {
      const form = el("form", { method: "post", action: v.admit_url, class: "inline" });
      form.append(el("input", { type: "hidden", name: "csrf_token", value: msg.csrf }));
      form.append(el("button", { type: "submit", class: "primary", "data-testid": "board-admit" }, msg.msgAdmit));
      actions.append(form);
    }
    if (v.room_url) {
      actions.append(el("a", { class: "button", href: v.room_url, "data-testid": "board-room" }, msg.msgRoom));
    }
    tr.append(cell);
    return tr;
  }

  // The running-late choice follows the server too (set from another tab or device), unless
  // the doctor is choosing right now.
  const lateSelect = document.querySelector("[data-testid=late-minutes]");

  function draw(board) {
    rows.replaceChildren(...board.visits.map(row));
    if (empty) empty.hidden = board.visits.length > 0;
    if (lateSelect && document.activeElement !== lateSelect) lateSelect.value = String(board.late);
  }

  function status(live) {
    if (!liveBadge) return;
    liveBadge.hidden = false;
    liveBadge.textContent = live ? msg.msgLive : msg.msgOffline;
    liveBadge.classList.toggle("ok", live);
    liveBadge.classList.toggle("warn", !live);
    root.dataset.live = live ? "1" : "0";
  }

  const source = new EventSource(msg.eventsUrl);
  source.addEventListener("open", () => status(true));
  source.addEventListener("error", () => status(false)); // EventSource reconnects by itself
  source.addEventListener("message", (event) => {
    status(true);
    try {
      draw(JSON.parse(event.data));
    } catch (err) {
      // A malformed frame changes nothing on screen; the next one redraws it all.
    }
  });
  window.addEventListener("pagehide", () => source.close());
})();
