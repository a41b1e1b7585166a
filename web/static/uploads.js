// Test-report panel: lists a visit's reports and uploads files one request each, with progress.
// Plain script, no build step. Server messages (already translated) are shown as they come;
// the panel's own words come from its data-msg-* attributes.
(function () {
  "use strict";

  // What the server accepts (it checks the content again): by type, or by name when the phone
  // gives no type (HEIC photos often come without one).
  const TYPES = ["application/pdf", "image/jpeg", "image/png", "image/heic", "image/heif"];
  const EXTENSIONS = /\.(pdf|jpe?g|png|heic|heif)$/i;

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

  // Why a file cannot be sent at all (then it is not sent), or null.
  function refusal(file, panel) {
    const max = Number(panel.dataset.maxBytes || 0);
    if (max && file.size > max) return panel.dataset.msgTooLarge;
    // A file the phone could not name a type for goes to the server, which looks at its content.
    if (file.type && !TYPES.includes(file.type) && !EXTENSIONS.test(file.name)) return panel.dataset.msgWrongType;
    return null;
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
        const li = el("li", { class: "report-item", "data-report-id": String(r.id), "data-testid": "report-item" });
        const name = el("span", { class: "report-name" });
        name.append(el("a", { href: r.url, target: "_blank", rel: "noopener" }, r.name), " ",
          el("span", { class: "muted" }, formatSize(r.size)));
        li.append(name, el("a", { href: r.download_url, class: "button" }, panel.dataset.msgDownload));
        if (r.delete_url) {
          const del = el("button", {
            type: "button", class: "remove", "data-testid": "report-remove",
            "aria-label": panel.dataset.msgRemove + " " + r.name,
          }, panel.dataset.msgRemove);
          del.addEventListener("click", () => remove(r.delete_url));
          li.append(del);
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
        .then(() => refresh(), () => refresh());
    }

    // One row per chosen file: name, bar and percentage while it goes; on failure the reason,
    // "retry" (when sending again can help) and "remove"; on success it leaves the list.
    function fileRow(file) {
      const row = el("li", { class: "upload-row", "data-testid": "upload-row" });
      const name = el("div", { class: "upload-name" }, file.name);
      const status = el("span", { class: "upload-status" });
      name.append(" · ", status);
      const bar = el("progress", { class: "progress", max: "100", value: "0", "data-testid": "upload-progress" });
      const percent = el("span", { class: "upload-percent", "aria-hidden": "true", "data-testid": "upload-percent" }, "0%");
      const barBox = el("div", { class: "upload-bar" });
      barBox.append(bar, percent);
      bar.setAttribute("aria-label", file.name);
      const error = el("p", { class: "upload-error", role: "alert" });
      const actions = el("div", { class: "actions" });
      row.append(name, barBox, error, actions);
      progressList.append(row);

      function setProgress(value) {
        bar.value = value;
        percent.textContent = value + "%";
      }

      function fail(message, canRetry) {
        row.classList.add("failed");
        row.setAttribute("data-testid", "upload-error");
        status.textContent = panel.dataset.msgFailed;
        barBox.hidden = true;
        error.textContent = message;
        actions.replaceChildren();
        if (canRetry) {
          const retry = el("button", { type: "button", class: "primary", "data-testid": "upload-retry" },
            panel.dataset.msgRetry);
          retry.addEventListener("click", () => { queue = queue.then(attempt).then(refresh); });
          actions.append(retry);
        }
        const dismiss = el("button", { type: "button", class: "remove", "data-testid": "upload-dismiss" },
          panel.dataset.msgRemove);
        dismiss.addEventListener("click", () => row.remove());
        actions.append(dismiss);
      }

      function attempt() {
        row.classList.remove("failed");
        row.setAttribute("data-testid", "upload-row");
        error.textContent = "";
        actions.replaceChildren();
        barBox.hidden = false;
        status.textContent = panel.dataset.msgUploading;
        setProgress(0);
        return new Promise((resolve) => {
          const xhr = new XMLHttpRequest();
          xhr.open("POST", panel.dataset.uploadUrl);
          xhr.setRequestHeader("X-CSRF-Token", csrf);
          xhr.setRequestHeader("Accept", "application/json");
          xhr.upload.addEventListener("progress", (ev) => {
            if (ev.lengthComputable) setProgress(Math.round((ev.loaded / ev.total) * 100));
          });
          xhr.addEventListener("load", () => {
            if (xhr.status >= 200 && xhr.status < 300) {
              setProgress(100);
              status.textContent = panel.dataset.msgDone;
              row.classList.add("ok");
              setTimeout(() => row.remove(), 2500);
            } else {
              fail(errorMessage(xhr, panel), true);
            }
            resolve();
          });
          xhr.addEventListener("error", () => {
            fail(panel.dataset.msgNetwork, true);
            resolve();
          });
          const body = new FormData();
          body.append("file", file, file.name);
          xhr.send(body);
        });
      }

      return { attempt, fail };
    }

    for (const input of panel.querySelectorAll("[data-reports-input]")) {
      input.addEventListener("change", () => {
        const files = Array.from(input.files || []);
        input.value = "";
        // One file per request, one after another: each gets its own progress and its own error.
        for (const file of files) {
          const row = fileRow(file);
          const refused = refusal(file, panel);
          if (refused) row.fail(refused, false);
          else queue = queue.then(row.attempt).then(refresh);
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
