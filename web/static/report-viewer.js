// The consult room's report viewer. Every report arrives as pages of pixels (a photo is one
// page; a PDF's pages are rendered on the server), so one viewer serves both: fitted when
// opened, zoom (wheel, buttons, keys), pan by dragging, rotate in 90° steps, full screen,
// pages, thumbnails of the visit's reports and of an earlier visit's.
// Plain script, no build step; call-sidebar.js opens it. Styles go through the CSSOM only (CSP).
(function () {
  "use strict";

  const Consult = (window.Consult = window.Consult || {});
  const MIN_ZOOM = 0.5; // of the fitted size
  const MAX_ZOOM = 12;
  const STEP = 1.25;

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined) node.setAttribute(k, v);
    }
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function format(template, values) {
    let text = template || "";
    for (const [k, v] of Object.entries(values)) text = text.replace("{" + k + "}", String(v));
    return text;
  }

  async function getJSON(url) {
    const resp = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    let body = null;
    try {
      body = await resp.json();
    } catch (e) { /* not JSON: a proxy's page */ }
    if (!resp.ok) {
      const error = new Error((body && body.message) || String(resp.status));
      error.status = resp.status;
      throw error;
    }
    return body;
  }

  function create(root) {
    const $ = (sel) => root.querySelector(sel);
    const stage = $("[data-viewer-stage]");
    const img = $("[data-viewer-image]");
    const status = $("[data-viewer-status]");
    const title = $("[data-viewer-title]");
    const pageLabel = $("[data-viewer-page]");
    const pager = $("[data-viewer-pager]");
    const thumbs = $("[data-viewer-thumbs]");
    const download = $("[data-viewer-download]");
    const visitSelect = $("[data-viewer-visit]");
    const room = root.closest(".room") || document.body;

    const state = {
      listUrl: root.dataset.listUrl,
      reports: [], // the list shown as thumbnails
      report: null, // the open report: {id, name, kind, pages, download_url}
      index: 0, // into reports
      page: 0,
      rotation: 0,
      scale: 1,
      fitScale: 1,
      cx: 0,
      cy: 0,
      fitted: true, // follows the panel's size until the doctor zooms or pans
      token: 0, // the latest load; older answers are dropped
    };

    // -- geometry --------------------------------------------------------------------------

    function natural() {
      return { w: img.naturalWidth || 1, h: img.naturalHeight || 1 };
    }

    function rotatedSize() {
      const n = natural();
      return state.rotation % 180 === 0 ? n : { w: n.h, h: n.w };
    }

    function draw() {
      const n = natural();
      img.style.width = n.w + "px";
      img.style.height = n.h + "px";
      img.style.transform =
        "translate(" + state.cx + "px," + state.cy + "px) rotate(" + state.rotation + "deg) scale(" +
        state.scale + ") translate(" + -n.w / 2 + "px," + -n.h / 2 + "px)";
      root.dataset.scale = state.scale.toFixed(4);
      root.dataset.rotation = String(state.rotation);
    }

    function fit() {
      if (!img.naturalWidth) return;
      const box = stage.getBoundingClientRect();
      const r = rotatedSize();
      state.fitScale = Math.min(box.width / r.w, box.height / r.h);
      state.scale = state.fitScale;
      state.cx = box.width / 2;
      state.cy = box.height / 2;
      state.fitted = true;
      draw();
    }

    function zoom(factor, px, py) {
      if (!img.naturalWidth) return;
      const box = stage.getBoundingClientRect();
      const x = px === undefined ? box.width / 2 : px;
      const y = py === undefined ? box.height / 2 : py;
      const next = Math.min(Math.max(state.scale * factor, state.fitScale * MIN_ZOOM), state.fitScale * MAX_ZOOM);
      const f = next / state.scale;
      state.cx = x + (state.cx - x) * f; // the point under the pointer stays under it
      state.cy = y + (state.cy - y) * f;
      state.scale = next;
      state.fitted = false;
      draw();
    }

    function rotate() {
      state.rotation = (state.rotation + 90) % 360;
      fit();
    }

    function reset() {
      state.rotation = 0;
      fit();
    }

    // -- pages and reports -------------------------------------------------------------------

    function setStatus(text) {
      status.textContent = text || "";
      status.hidden = !text;
    }

    function showPage(n) {
      const pages = state.report ? state.report.pages : [];
      if (!pages.length) return;
      state.page = Math.min(Math.max(n, 0), pages.length - 1);
      pageLabel.textContent = format(root.dataset.msgPage, { n: state.page + 1, total: pages.length });
      pager.hidden = pages.length < 2;
      root.dataset.page = String(state.page + 1);
      root.dataset.pages = String(pages.length);
      $("[data-viewer=prev-page]").disabled = state.page === 0;
      $("[data-viewer=next-page]").disabled = state.page === pages.length - 1;
      img.hidden = true;
      delete root.dataset.loaded;
      setStatus(root.dataset.msgLoading);
      img.src = pages[state.page].url;
    }

    img.addEventListener("load", () => {
      img.hidden = false;
      setStatus("");
      fit();
      root.dataset.loaded = String(state.page + 1);
    });
    img.addEventListener("error", () => {
      if (!img.getAttribute("src")) return;
      img.hidden = true;
      setStatus(root.dataset.msgFailed);
    });

    function markThumbs() {
      for (const b of thumbs.querySelectorAll("[data-report-id]")) {
        const current = state.report && b.dataset.reportId === String(state.report.id);
        b.setAttribute("aria-current", current ? "true" : "false");
      }
    }

    async function openReport(index) {
      const item = state.reports[index];
      if (!item) return;
      const token = ++state.token;
      state.index = index;
      state.report = null;
      state.rotation = 0; // a report opens upright; its pages keep the rotation chosen for it
      title.textContent = item.name;
      download.href = item.download_url;
      img.hidden = true;
      img.removeAttribute("src");
      delete root.dataset.loaded;
      pager.hidden = true;
      setStatus(root.dataset.msgLoading);
      markThumbs();
      try {
        const report = await getJSON(item.pages_url);
        if (token !== state.token) return;
        state.report = report;
        root.dataset.reportId = String(report.id);
        markThumbs();
        showPage(0);
      } catch (error) {
        if (token !== state.token) return;
        setStatus(error.message && !/^\d+$/.test(error.message) ? error.message : root.dataset.msgFailed);
      }
    }

    function renderThumbs() {
      thumbs.replaceChildren();
      if (!state.reports.length) {
        thumbs.append(el("p", { class: "muted" }, root.dataset.msgEmpty));
        return;
      }
      state.reports.forEach((r, i) => {
        const isPdf = r.content_type === "application/pdf";
        const button = el("button", {
          type: "button",
          class: "viewer-thumb",
          "data-report-id": String(r.id),
          "data-testid": "viewer-thumb",
          title: r.name,
          "aria-label": r.name,
        });
        // Loaded once the opened report shows: a PDF's thumbnail is a render, and renders queue.
        const picture = el("img", { "data-src": r.thumb_url, alt: "", draggable: "false" });
        picture.addEventListener("error", () => picture.remove());
        button.append(picture, el("span", { class: "viewer-thumb-kind" },
          isPdf ? root.dataset.msgPdf : root.dataset.msgPhoto));
        button.append(el("span", { class: "viewer-thumb-name" }, r.name));
        button.addEventListener("click", () => openReport(i));
        thumbs.append(button);
      });
      markThumbs();
    }

    async function loadList(url, openId) {
      state.listUrl = url;
      try {
        const data = await getJSON(url);
        state.reports = data.reports || [];
      } catch (error) {
        state.reports = [];
        setStatus(error.message);
      }
      renderThumbs();
      let index = state.reports.findIndex((r) => String(r.id) === String(openId));
      if (index < 0) index = 0;
      if (state.reports.length) {
        await openReport(index);
        for (const picture of thumbs.querySelectorAll("img[data-src]")) {
          picture.src = picture.dataset.src;
          picture.removeAttribute("data-src");
        }
      } else {
        title.textContent = "";
        img.hidden = true;
        pager.hidden = true;
        setStatus(root.dataset.msgEmpty);
      }
    }

    // -- opening, closing, full screen ----------------------------------------------------------

    async function open(reportId, listUrl) {
      const url = listUrl || root.dataset.listUrl;
      root.hidden = false;
      room.classList.add("viewing");
      if (visitSelect) visitSelect.value = url;
      root.focus({ preventScroll: true });
      await loadList(url, reportId);
    }

    function close() {
      state.token++;
      if (document.fullscreenElement === root) document.exitFullscreen().catch(() => {});
      img.removeAttribute("src");
      img.hidden = true;
      root.hidden = true;
      room.classList.remove("viewing");
    }

    function fullscreen() {
      if (document.fullscreenElement === root) {
        document.exitFullscreen().catch(() => {});
      } else if (root.requestFullscreen) {
        root.requestFullscreen().catch(() => {});
      }
    }

    document.addEventListener("fullscreenchange", () => {
      root.classList.toggle("is-fullscreen", document.fullscreenElement === root);
      requestAnimationFrame(fit);
    });

    if (window.ResizeObserver) {
      new ResizeObserver(() => {
        if (state.fitted && !root.hidden) fit();
      }).observe(stage);
    }

    // -- input -----------------------------------------------------------------------------------

    const actions = {
      "prev-page": () => showPage(state.page - 1),
      "next-page": () => showPage(state.page + 1),
      "zoom-in": () => zoom(STEP),
      "zoom-out": () => zoom(1 / STEP),
      fit: fit,
      rotate: rotate,
      fullscreen: fullscreen,
      reset: reset,
      close: close,
      "prev-report": () => state.reports.length && openReport((state.index - 1 + state.reports.length) % state.reports.length),
      "next-report": () => state.reports.length && openReport((state.index + 1) % state.reports.length),
    };

    root.addEventListener("click", (event) => {
      const button = event.target.closest("[data-viewer]");
      if (button && actions[button.dataset.viewer]) actions[button.dataset.viewer]();
    });

    if (visitSelect) {
      visitSelect.addEventListener("change", () => loadList(visitSelect.value, null));
    }

    stage.addEventListener("wheel", (event) => {
      event.preventDefault();
      const box = stage.getBoundingClientRect();
      zoom(event.deltaY < 0 ? STEP : 1 / STEP, event.clientX - box.left, event.clientY - box.top);
    }, { passive: false });

    let drag = null;
    stage.addEventListener("pointerdown", (event) => {
      if (event.button !== 0 || img.hidden) return;
      drag = { x: event.clientX, y: event.clientY, cx: state.cx, cy: state.cy };
      stage.setPointerCapture(event.pointerId);
      stage.classList.add("dragging");
    });
    stage.addEventListener("pointermove", (event) => {
      if (!drag) return;
      state.cx = drag.cx + event.clientX - drag.x;
      state.cy = drag.cy + event.clientY - drag.y;
      state.fitted = false;
      draw();
    });
    const endDrag = () => {
      drag = null;
      stage.classList.remove("dragging");
    };
    stage.addEventListener("pointerup", endDrag);
    stage.addEventListener("pointercancel", endDrag);
    stage.addEventListener("dblclick", (event) => {
      const box = stage.getBoundingClientRect();
      if (state.fitted) zoom(2, event.clientX - box.left, event.clientY - box.top);
      else fit();
    });

    const KEYS = {
      "+": "zoom-in",
      "=": "zoom-in",
      "-": "zoom-out",
      _: "zoom-out",
      0: "fit",
      r: "rotate",
      R: "rotate",
      f: "fullscreen",
      F: "fullscreen",
      ArrowLeft: "prev-page",
      ArrowUp: "prev-page",
      PageUp: "prev-page",
      ArrowRight: "next-page",
      ArrowDown: "next-page",
      PageDown: "next-page",
      "[": "prev-report",
      "]": "next-report",
    };

    document.addEventListener("keydown", (event) => {
      if (root.hidden || !root.getClientRects().length || event.ctrlKey || event.metaKey || event.altKey) return;
      const target = event.target;
      // Typing in the chat, the notes or the prescription is typing, not a shortcut.
      if (target && target.closest && target.closest("input, textarea, select, [contenteditable]")) return;
      if (event.key === "Escape" && document.fullscreenElement !== root) {
        close();
        return;
      }
      const name = KEYS[event.key];
      if (!name) return;
      event.preventDefault();
      actions[name]();
    });

    return { open: open, close: close };
  }

  let viewer = null;
  Consult.reportViewer = {
    open(reportId) {
      const root = document.querySelector("[data-report-viewer]");
      if (!root) return false;
      viewer = viewer || create(root);
      viewer.open(reportId);
      return true;
    },
    // The reports of one visit (a report list URL): an earlier visit's, from its sidebar entry.
    openList(listUrl) {
      const root = document.querySelector("[data-report-viewer]");
      if (!root) return false;
      viewer = viewer || create(root);
      viewer.open(null, listUrl);
      return true;
    },
    close() {
      if (viewer) viewer.close();
    },
  };
})();
