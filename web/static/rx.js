// Prescriptions: the doctor's form (rows, signed issue), the patient's list, the print button
// and the verification page's file picker. Plain script, no build step; messages come
// translated from the page's data attributes, errors from the server's JSON.
(function () {
  "use strict";
  if (window.__consultRx) return; // several partials may each include this script
  window.__consultRx = true;

  const FIELDS = ["drug", "strength", "dose", "dose_unit", "route", "frequency", "days", "quantity",
    "quantity_unit", "instructions"];
  const HEAD = ["sex", "age", "diagnosis", "allergies"];

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
    // The server words each line in the reader's language (format 1 and 2 alike).
    return [item.head, item.how].filter(Boolean).join(" · ");
  }

  function renderPrescription(rx, msg) {
    const li = el("li", { "data-testid": "rx-item", "data-number": rx.number, "data-status": rx.status });
    li.append(el("strong", {}, rx.number), " ", el("span", { class: "muted" }, rx.doctor_name));
    if (rx.diagnosis) li.append(el("div", { class: "rx-dx" }, rx.diagnosis));
    if (rx.status !== "issued") {
      const note = rx.status_label + (rx.review_note ? ": " + rx.review_note : "");
      li.append(el("div", { class: "alert warn", "data-testid": "rx-item-status" }, note));
    }
    const ul = el("ul", {});
    for (const item of rx.items) {
      const line = el("li", {}, itemSummary(item));
      if (item.instructions) line.append(el("div", { class: "pre muted" }, item.instructions));
      ul.append(line);
    }
    li.append(ul);
    const links = el("p", { class: "actions" });
    links.append(el("a", { href: rx.url, class: "button", "data-testid": "rx-open" }, msg.msgOpen || rx.number));
    if (msg.msgPdf) links.append(el("a", { href: rx.pdf_url, class: "button", "data-testid": "rx-pdf" }, msg.msgPdf));
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
        for (const rx of data.prescriptions) issued.append(renderPrescription(rx, msg));
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

    const previewPanel = panel.querySelector("[data-rx-preview]");
    const sheet = panel.querySelector("[data-rx-preview-sheet]");
    const sign = panel.querySelector("[data-rx-sign]");
    const signStatus = panel.querySelector("[data-rx-sign-status]");
    const headError = form.querySelector("[data-rx-head-error]");
    let previewed = null; // {body, hash}: what the preview showed; signing sends exactly that

    function collect() {
      const body = {};
      for (const f of HEAD) body[f] = form.querySelector("[name=" + f + "]").value;
      body.items = Array.from(rows.querySelectorAll("[data-rx-row]"), (row) => {
        const item = {};
        for (const f of FIELDS) item[f] = row.querySelector("[name=" + f + "]").value;
        return item;
      });
      return body;
    }

    function closePreview() {
      previewed = null;
      previewPanel.hidden = true;
      sheet.replaceChildren();
      signStatus.textContent = "";
      signStatus.className = "";
    }

    function showHeadErrors(errors) {
      for (const err of errors || []) {
        if (err.item !== null && err.item !== undefined) continue;
        headError.textContent = headError.textContent ? headError.textContent + " " + err.message : err.message;
        headError.hidden = false;
        if (err.field) {
          const input = form.querySelector("[data-rx-head][name=" + err.field + "]");
          if (input) input.setAttribute("aria-invalid", "true");
        }
      }
    }

    async function post(url, body) {
      const resp = await fetch(url, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": msg.csrf, Accept: "application/json" },
        body: JSON.stringify(body),
      });
      return [resp, await resp.json().catch(() => ({}))];
    }

    form.querySelector("[data-rx-add-row]").addEventListener("click", () => {
      if (rows.children.length < Number(rows.dataset.max || 5)) addRow();
    });
    // Any change after the preview withdraws it: what is signed is always what was seen.
    form.addEventListener("input", (event) => {
      closePreview();
      if (event.target && event.target.removeAttribute) event.target.removeAttribute("aria-invalid");
    });
    form.addEventListener("change", closePreview);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      clearErrors();
      headError.hidden = true;
      headError.textContent = "";
      closePreview();
      const body = collect();
      submit.disabled = true;
      status.className = "";
      status.textContent = msg.msgPreviewing;
      try {
        const [resp, data] = await post(msg.previewUrl, body);
        if (resp.ok) {
          status.textContent = "";
          sheet.innerHTML = data.html; // rendered and escaped by the server's template
          previewed = { body: body, hash: data.preview_hash };
          previewPanel.hidden = false;
          previewPanel.scrollIntoView({ block: "start" });
          sign.focus();
        } else {
          status.className = "alert error";
          status.textContent = data.message || msg.msgFailed;
          showErrors(data.errors);
          showHeadErrors(data.errors);
        }
      } catch (e) {
        status.className = "alert error";
        status.textContent = msg.msgNetwork;
      } finally {
        submit.disabled = false;
      }
    });
    panel.querySelector("[data-rx-edit]").addEventListener("click", () => {
      closePreview();
      form.querySelector("[name=diagnosis]").focus();
    });
    sign.addEventListener("click", async () => {
      if (!previewed) return;
      sign.disabled = true;
      signStatus.className = "";
      signStatus.textContent = msg.msgIssuing;
      try {
        const body = Object.assign({}, previewed.body, { preview_hash: previewed.hash, client_ref: clientRef });
        const [resp, data] = await post(msg.issueUrl, body);
        if (resp.ok) {
          const rx = data.prescription;
          const text = rx.status === "issued" ? msg.msgIssued : msg.msgPending;
          closePreview();
          status.className = "alert ok";
          status.textContent = text.replace("{number}", rx.number);
          clientRef = submissionId(); // the next prescription is a new one
          form.reset();
          rows.replaceChildren();
          addRow();
          refresh();
        } else {
          signStatus.className = "alert error";
          signStatus.textContent = data.message || msg.msgFailed;
        }
      } catch (e) {
        // Same submission id on retry: the server returns the first one instead of a duplicate.
        signStatus.className = "alert error";
        signStatus.textContent = msg.msgNetwork;
      } finally {
        sign.disabled = false;
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
