// Prescriptions: the doctor's form (rows, signed issue), the patient's list, the print button
// and the verification page's file picker. Plain script, no build step; messages come
// translated from the page's data attributes, errors from the server's JSON.
(function () {
  "use strict";
  if (window.__consultRx) return; // several partials may each include this script
  window.__consultRx = true;

  const FIELDS = ["drug", "strength", "dose", "frequency", "duration", "quantity", "instructions"];

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined) node.setAttribute(k, v);
    }
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  function submissionId() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function itemSummary(item) {
    return [item.drug, item.strength, item.dose, item.frequency, item.duration, item.quantity]
      .filter(Boolean)
      .join(" · ");
  }

  function renderPrescription(rx, msg) {
    const li = el("li", { "data-testid": "rx-item", "data-number": rx.number });
    li.append(el("strong", {}, rx.number), " ", el("span", { class: "muted" }, rx.doctor_name));
    const ul = el("ul", {});
    for (const item of rx.items) {
      const line = el("li", {}, itemSummary(item));
      if (item.instructions) line.append(el("div", { class: "pre muted" }, item.instructions));
      ul.append(line);
    }
    li.append(ul);
    const links = el("p", { class: "actions" });
    links.append(el("a", { href: rx.url, class: "button", "data-testid": "rx-open" }, msg.msgOpen || rx.number));
    links.append(el("a", { href: rx.download_url, class: "button", download: "" }, msg.msgDownload || ".json"));
    li.append(links);
    return li;
  }

  async function getJSON(url) {
    const resp = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    const data = await resp.json();
    if (!resp.ok) throw new Error(data.message || String(resp.status));
    return data;
  }

  // -- patient's visit page --------------------------------------------------------------------
  async function setupList(panel) {
    const msg = panel.dataset;
    const list = panel.querySelector("[data-rx-list]");
    try {
      const data = await getJSON(msg.listUrl);
      list.replaceChildren();
      if (!data.prescriptions.length) list.append(el("li", { class: "muted" }, msg.msgEmpty));
      for (const rx of data.prescriptions) list.append(renderPrescription(rx, msg));
      const adviceBox = panel.querySelector("[data-rx-advice-box]");
      if (data.advice) {
        panel.querySelector("[data-rx-advice]").textContent = data.advice;
        adviceBox.hidden = false;
      }
    } catch (e) {
      list.replaceChildren(el("li", { class: "alert error" }, msg.msgFailed));
    }
  }

  // -- doctor's form ---------------------------------------------------------------------------
  function setupForm(panel) {
    const msg = panel.dataset;
    const issued = panel.querySelector("[data-rx-issued]");
    const form = panel.querySelector("[data-rx-form]");
    const refresh = async () => {
      try {
        const data = await getJSON(msg.listUrl);
        issued.replaceChildren();
        if (!data.prescriptions.length) issued.append(el("li", { class: "muted" }, msg.msgEmpty));
        for (const rx of data.prescriptions) issued.append(renderPrescription(rx, {}));
      } catch (e) {
        /* the list is a convenience; the form still works */
      }
    };
    refresh();
    if (!form) return;
    const rows = form.querySelector("[data-rx-rows]");
    const template = form.querySelector("[data-rx-row-template]");
    const status = form.querySelector("[data-rx-status]");
    const submit = form.querySelector("button[type=submit]");
    let clientRef = submissionId();

    function renumber() {
      rows.querySelectorAll("[data-rx-row]").forEach((row, i) => {
        row.querySelector("[data-rx-row-title]").textContent = rows.dataset.msgRow.replace("{n}", String(i + 1));
        row.querySelector("[data-rx-remove-row]").hidden = rows.children.length === 1;
      });
    }

    function addRow() {
      const row = template.content.firstElementChild.cloneNode(true);
      row.querySelector("[data-rx-remove-row]").addEventListener("click", () => {
        row.remove();
        renumber();
      });
      rows.append(row);
      renumber();
      row.querySelector("[name=drug]").focus();
    }

    function clearErrors() {
      form.querySelectorAll("[aria-invalid]").forEach((n) => n.removeAttribute("aria-invalid"));
      form.querySelectorAll("[data-rx-row-error]").forEach((n) => {
        n.hidden = true;
        n.textContent = "";
      });
    }

    function showErrors(errors) {
      const rowNodes = rows.querySelectorAll("[data-rx-row]");
      for (const err of errors || []) {
        const row = err.item === null || err.item === undefined ? null : rowNodes[err.item];
        if (!row) continue;
        const box = row.querySelector("[data-rx-row-error]");
        box.textContent = box.textContent ? box.textContent + " " + err.message : err.message;
        box.hidden = false;
        if (err.field) {
          const input = row.querySelector("[name=" + err.field + "]");
          if (input) input.setAttribute("aria-invalid", "true");
        }
      }
    }

    form.querySelector("[data-rx-add-row]").addEventListener("click", addRow);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      clearErrors();
      const items = Array.from(rows.querySelectorAll("[data-rx-row]"), (row) => {
        const item = {};
        for (const f of FIELDS) item[f] = row.querySelector("[name=" + f + "]").value;
        return item;
      });
      submit.disabled = true;
      status.className = "";
      status.textContent = msg.msgIssuing;
      try {
        const resp = await fetch(msg.issueUrl, {
          method: "POST",
          credentials: "same-origin",
          headers: { "Content-Type": "application/json", "X-CSRF-Token": msg.csrf, Accept: "application/json" },
          body: JSON.stringify({ items: items, client_ref: clientRef }),
        });
        const data = await resp.json().catch(() => ({}));
        if (resp.ok) {
          status.className = "alert ok";
          status.textContent = msg.msgIssued.replace("{number}", data.prescription.number);
          clientRef = submissionId(); // the next prescription is a new one
          rows.replaceChildren();
          addRow();
          refresh();
        } else {
          status.className = "alert error";
          status.textContent = data.message || msg.msgFailed;
          showErrors(data.errors);
        }
      } catch (e) {
        // Same submission id on retry: the server returns the first one instead of a duplicate.
        status.className = "alert error";
        status.textContent = msg.msgNetwork;
      } finally {
        submit.disabled = false;
      }
    });
    addRow();
  }

  // -- verification page -----------------------------------------------------------------------
  function setupVerify(form) {
    const file = form.querySelector("[data-rx-verify-file]");
    const text = form.querySelector("[data-rx-verify-text]");
    if (!file || !text) return;
    file.addEventListener("change", () => {
      const chosen = file.files && file.files[0];
      if (!chosen) return;
      const reader = new FileReader(); // read here and posted as text: no upload handling needed
      reader.onload = () => {
        text.value = String(reader.result || "");
      };
      reader.readAsText(chosen);
    });
  }

  function init() {
    document.querySelectorAll("[data-rx-list-panel]").forEach(setupList);
    document.querySelectorAll("[data-rx-form-panel]").forEach(setupForm);
    document.querySelectorAll("[data-rx-verify-form]").forEach(setupVerify);
    document.querySelectorAll("[data-rx-print]").forEach((b) => b.addEventListener("click", () => window.print()));
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
