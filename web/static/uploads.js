// Test-report panel: lists a visit's reports and uploads files one request each, with progress.
// Plain script, no build step. Server messages (already translated) are shown as they come.
(function () {
  "use strict";

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined) node.setAttribute(k, v);
    }
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function formatSize(bytes) {
    if (bytes >= 1024 * 1024) return (bytes / 1024 / 1024).toFixed(1) + " MB";
    return Math.max(1, Math.round(bytes / 1024)) + " KB";
  }

  function errorMessage(xhr, panel) {
    try {
      const body = JSON.parse(xhr.responseText);
      if (body && body.message) return body.message;
    } catch (e) { /* not JSON: a proxy's page */ }
    if (xhr.status === 413) return panel.dataset.msgTooLarge;
    return panel.dataset.msgFailed + (xhr.status ? " (" + xhr.status + ")" : "");
  }

  function setup(panel) {
    if (panel.dataset.ready) return;
    panel.dataset.ready = "1";
    const list = panel.querySelector("[data-reports-list]");
    const uploadBox = panel.querySelector("[data-reports-upload]");
    const progressList = panel.querySelector("[data-reports-progress]");
    const csrf = panel.dataset.csrf;
    let queue = Promise.resolve();

    function render(data) {
      list.replaceChildren();
      if (!data.reports.length) {
        list.append(el("li", { class: "muted" }, panel.dataset.msgEmpty));
      }
      for (const r of data.reports) {
        const li = el("li", { "data-report-id": String(r.id), "data-testid": "report-item" });
        const link = el("a", { href: r.url, target: "_blank", rel: "noopener" }, r.name);
        li.append(link, " ", el("span", { class: "muted" }, formatSize(r.size)), " ");
        li.append(el("a", { href: r.download_url, class: "muted" }, panel.dataset.msgDownload));
        if (r.delete_url) {
          const del = el("button", { type: "button", class: "link danger", "data-testid": "report-remove" },
            panel.dataset.msgRemove);
          del.addEventListener("click", () => remove(r.delete_url));
          li.append(" ", del);
        }
        list.append(li);
      }
      if (uploadBox) uploadBox.hidden = !data.can_edit;
    }

    function refresh() {
      return fetch(panel.dataset.listUrl, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then((r) => (r.ok ? r.json() : Promise.reject(r)))
        .then(render)
        .catch(() => {
          list.replaceChildren(el("li", { class: "alert error" }, panel.dataset.msgNetwork));
        });
    }

    function remove(url) {
      if (!window.confirm(panel.dataset.msgConfirmRemove)) return;
      fetch(url, { method: "DELETE", credentials: "same-origin", headers: { "X-CSRF-Token": csrf } })
        .then(() => refresh());
    }

    function uploadOne(file) {
      const row = el("li", { "data-testid": "upload-row" });
      const label = el("div", {}, file.name + " · " + panel.dataset.msgUploading);
      const bar = el("progress", { class: "progress", max: "100", value: "0", "data-testid": "upload-progress" });
      row.append(label, bar);
      progressList.append(row);
      return new Promise((resolve) => {
        const xhr = new XMLHttpRequest();
        xhr.open("POST", panel.dataset.uploadUrl);
        xhr.setRequestHeader("X-CSRF-Token", csrf);
        xhr.setRequestHeader("Accept", "application/json");
        xhr.upload.addEventListener("progress", (ev) => {
          if (ev.lengthComputable) bar.value = Math.round((ev.loaded / ev.total) * 100);
        });
        xhr.addEventListener("load", () => {
          if (xhr.status >= 200 && xhr.status < 300) {
            bar.value = 100;
            label.textContent = file.name + " · " + panel.dataset.msgDone;
            row.classList.add("ok");
            setTimeout(() => row.remove(), 2500);
          } else {
            label.textContent = file.name + " · " + errorMessage(xhr, panel);
            row.className = "alert error";
            row.setAttribute("data-testid", "upload-error");
            bar.remove();
          }
          resolve();
        });
        xhr.addEventListener("error", () => {
          label.textContent = file.name + " · " + panel.dataset.msgNetwork;
          row.className = "alert error";
          row.setAttribute("data-testid", "upload-error");
          bar.remove();
          resolve();
        });
        const body = new FormData();
        body.append("file", file, file.name);
        xhr.send(body);
      });
    }

    for (const input of panel.querySelectorAll("[data-reports-input]")) {
      input.addEventListener("change", () => {
        const files = Array.from(input.files || []);
        input.value = "";
        // One file per request, one after another: each gets its own progress and its own error.
        for (const file of files) {
          queue = queue.then(() => uploadOne(file)).then(refresh);
        }
      });
    }
    refresh();
  }

  function start() {
    document.querySelectorAll("[data-reports-panel]").forEach(setup);
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
