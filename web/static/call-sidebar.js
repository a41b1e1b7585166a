// The doctor's sidebar in the consult room: its tabs, and test reports opened in the viewer.
// Plain script, no build step; call.js sets it up.
(function () {
  "use strict";

  const Consult = (window.Consult = window.Consult || {});

  function select(tabs, tab) {
    for (const other of tabs.querySelectorAll("[data-tab]")) {
      other.setAttribute("aria-selected", other === tab ? "true" : "false");
    }
    for (const panel of tabs.querySelectorAll("[data-tab-panel]")) {
      panel.hidden = panel.dataset.tabPanel !== tab.dataset.tab;
    }
  }

  function setupTabs() {
    const tabs = document.querySelector("[data-tabs]");
    if (!tabs) return;
    tabs.addEventListener("click", (event) => {
      // An earlier visit's reports open in the viewer, on the reports tab.
      const earlier = event.target.closest("[data-earlier-reports]");
      if (earlier && Consult.reportViewer) {
        select(tabs, tabs.querySelector("[data-tab=reports]"));
        Consult.reportViewer.openList(earlier.dataset.earlierReports);
        return;
      }
      const tab = event.target.closest("[data-tab]");
      if (!tab) return;
      select(tabs, tab);
      if (tab.dataset.tab === "chat") {
        const unread = tab.querySelector("[data-unread]");
        if (unread) unread.hidden = true;
      }
    });
    // Reports open in the viewer beside the video (report-viewer.js), not in a new tab.
    const panel = tabs.querySelector("[data-tab-panel=reports]");
    if (!panel || !Consult.reportViewer) return;
    panel.addEventListener("click", (event) => {
      const link = event.target.closest("a[href]");
      if (!link || link.closest("[data-report-viewer]")) return;
      const match = /^\/reports\/(\d+)$/.exec(link.getAttribute("href"));
      if (!match) return;
      if (Consult.reportViewer.open(match[1])) event.preventDefault();
    });
  }

  function closeReport() {
    if (Consult.reportViewer) Consult.reportViewer.close();
  }

  Consult.callSidebar = { setup: setupTabs, closeReport: closeReport };
})();
