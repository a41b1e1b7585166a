// The doctor's sidebar in the consult room: its tabs, and test reports opened inline.
// Plain script, no build step; call.js sets it up.
(function () {
  "use strict";

  const Consult = (window.Consult = window.Consult || {});

  function setupTabs() {
    const tabs = document.querySelector("[data-tabs]");
    if (!tabs) return;
    tabs.addEventListener("click", (event) => {
      const tab = event.target.closest("[data-tab]");
      if (!tab) return;
      for (const other of tabs.querySelectorAll("[data-tab]")) {
        other.setAttribute("aria-selected", other === tab ? "true" : "false");
      }
      for (const panel of tabs.querySelectorAll("[data-tab-panel]")) {
        panel.hidden = panel.dataset.tabPanel !== tab.dataset.tab;
      }
      if (tab.dataset.tab === "chat") {
        const unread = tab.querySelector("[data-unread]");
        if (unread) unread.hidden = true;
      }
    });
    // Reports open inline (same origin; the server sandboxes them), not in a new tab.
    const panel = tabs.querySelector("[data-tab-panel=reports]");
    const viewer = tabs.querySelector("[data-report-viewer]");
    const frame = tabs.querySelector("[data-report-frame]");
    if (!panel || !viewer || !frame) return;
    panel.addEventListener("click", (event) => {
      const link = event.target.closest("a[href]");
      if (!link) return;
      const href = link.getAttribute("href");
      if (!/^\/reports\/\d+$/.test(href)) return;
      event.preventDefault();
      frame.src = href;
      viewer.hidden = false;
    });
  }

  function closeReport() {
    const viewer = document.querySelector("[data-report-viewer]");
    const frame = document.querySelector("[data-report-frame]");
    if (frame) frame.removeAttribute("src");
    if (viewer) viewer.hidden = true;
  }

  Consult.callSidebar = { setup: setupTabs, closeReport: closeReport };
})();
