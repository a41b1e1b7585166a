// Payment panel on the visit page, and the "waiting for payment" page that polls until the
// gateway's notification has confirmed the visit. Plain script, no build step.
(function () {
  "use strict";

  function getJSON(url) {
    return fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then((r) => (r.ok ? r.json() : Promise.reject(r)));
  }

  function link(href, text) {
    const a = document.createElement("a");
    a.href = href;
    a.className = "button";
    a.textContent = text;
    return a;
  }

  function setupPanel(panel) {
    if (panel.dataset.ready) return;
    panel.dataset.ready = "1";
    const state = panel.querySelector("[data-payment-state]");
    const links = panel.querySelector("[data-payment-links]");
    getJSON(panel.dataset.paymentUrl).then((data) => {
      const p = data.payment;
      if (!p) return;
      const label = {
        paid: panel.dataset.msgPaid, pending: panel.dataset.msgPending, refunded: panel.dataset.msgRefunded,
        failed: panel.dataset.msgFailed, cancelled: panel.dataset.msgCancelled,
      }[p.status] || p.status;
      const badge = document.createElement("span");
      badge.className = "badge " + (p.status === "paid" ? "ok" : "warn");
      badge.textContent = label;
      state.replaceChildren(badge);
      if (p.receipt_url) links.append(link(p.receipt_url, panel.dataset.msgReceipt));
      if (p.status === "pending" && p.status_url) links.append(link(p.status_url, panel.dataset.msgDetails));
    }).catch(() => { /* the panel still shows the fee and the Pay button */ });
  }

  function setupWait(box) {
    if (box.dataset.ready) return;
    box.dataset.ready = "1";
    const error = box.querySelector("[data-payment-error]");
    // Each poll is a read of the payment and writes an audit entry: never faster than every 2 s.
    const MIN_DELAY = 2000;
    const MAX_DELAY = 5000;
    let delay = MIN_DELAY;
    function poll() {
      getJSON(box.dataset.statusUrl).then((s) => {
        if (s.visit_status === "confirmed" && (s.status === "paid" || s.status === "refunded")) {
          window.location.assign(s.visit_url);
          return;
        }
        if (s.status === "refunded") {
          error.textContent = box.dataset.msgLost;
          error.hidden = false;
          return;
        }
        if (s.status === "failed" || s.status === "cancelled") {
          error.textContent = box.dataset.msgFailed;
          error.hidden = false;
          return;
        }
        setTimeout(poll, delay);
        delay = Math.min(delay * 1.3, MAX_DELAY);
      }).catch(() => setTimeout(poll, MAX_DELAY));
    }
    poll();
  }

  function start() {
    document.querySelectorAll("[data-payment-panel]").forEach(setupPanel);
    document.querySelectorAll("[data-payment-wait]").forEach(setupWait);
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
