// Visit notes: autosave about a second after typing stops, one save in flight at a time.
// Each save carries the version it was based on; the server answers 409 when another window
// saved in between, and then we stop rather than overwrite. Plain script, no build step.
(function () {
  "use strict";
  if (window.__consultNotes) return; // the partial may be included more than once
  window.__consultNotes = true;

  const DEBOUNCE_MS = 1000;
  const MAX_RETRY_MS = 30000;

  function setup(panel) {
    if (panel.dataset.ready) return;
    panel.dataset.ready = "1";
    const msg = panel.dataset;
    const url = msg.url;
    const text = panel.querySelector("[data-notes-text]");
    const advice = panel.querySelector("[data-notes-advice]");
    const status = panel.querySelector("[data-notes-status]");
    let version = 0;
    let saved = { text: "", advice: "" };
    let inFlight = false;
    let stopped = true; // until loaded
    let timer = null;
    let retryDelay = 1000;

    function setStatus(message, state) {
      status.textContent = message || "";
      status.dataset.state = state || "";
    }

    function dirty() {
      return text.value !== saved.text || advice.value !== saved.advice;
    }

    function schedule(delay) {
      clearTimeout(timer);
      timer = setTimeout(() => save(false), delay);
    }

    function retryLater() {
      setStatus(msg.msgRetrying, "retrying");
      schedule(retryDelay);
      retryDelay = Math.min(retryDelay * 2, MAX_RETRY_MS);
    }

    async function save(keepalive) {
      if (stopped || inFlight || !dirty()) return;
      const body = { text: text.value, advice: advice.value, version: version };
      inFlight = true;
      setStatus(msg.msgSaving, "saving");
      let resp;
      let data = null;
      try {
        resp = await fetch(url, {
          method: "PUT",
          credentials: "same-origin",
          keepalive: !!keepalive,
          headers: { "Content-Type": "application/json", "X-CSRF-Token": msg.csrf, Accept: "application/json" },
          body: JSON.stringify(body),
        });
        data = await resp.json().catch(() => null);
      } catch (e) {
        inFlight = false;
        retryLater();
        return;
      }
      inFlight = false;
      if (resp.ok && data && data.note) {
        version = data.note.version;
        saved = { text: body.text, advice: body.advice };
        retryDelay = 1000;
        if (dirty()) schedule(DEBOUNCE_MS);
        else setStatus(msg.msgSaved, "saved");
      } else if (resp.status === 409 && data && data.error === "stale_version") {
        stopped = true; // keep the doctor's text on screen; never overwrite the other window's
        setStatus(msg.msgConflict, "conflict");
      } else if (resp.status >= 500 || resp.status === 408 || resp.status === 429) {
        retryLater();
      } else {
        // A refusal that repeating will not fix (signed out, too long, visit closed).
        setStatus((data && data.message) || msg.msgFailed, "failed");
      }
    }

    function onInput() {
      if (stopped) return;
      schedule(DEBOUNCE_MS);
    }

    async function load() {
      setStatus(msg.msgLoading, "loading");
      let data;
      try {
        const resp = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
        data = await resp.json();
        if (!resp.ok) {
          setStatus(data.message || msg.msgFailed, "failed");
          return;
        }
      } catch (e) {
        setStatus(msg.msgFailed, "failed");
        setTimeout(load, 3000);
        return;
      }
      version = data.note.version;
      saved = { text: data.note.text, advice: data.note.advice };
      text.value = saved.text;
      advice.value = saved.advice;
      if (data.editable) {
        text.disabled = advice.disabled = false;
        stopped = false;
        setStatus(version ? msg.msgSaved : "", version ? "saved" : "");
      } else {
        setStatus(msg.msgReadonly, "readonly");
      }
    }

    text.addEventListener("input", onInput);
    advice.addEventListener("input", onInput);
    // Leaving the page: send what is pending (keepalive lets it outlive the page).
    window.addEventListener("pagehide", () => {
      if (!stopped && dirty() && !inFlight) {
        clearTimeout(timer);
        save(true);
      }
    });
    window.addEventListener("beforeunload", (event) => {
      if (!stopped && (dirty() || inFlight)) event.preventDefault();
    });
    load();
  }

  function init() {
    document.querySelectorAll("[data-notes-panel]").forEach(setup);
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
