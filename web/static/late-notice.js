// The patient's call page: the doctor's "running about N minutes late", live from the server's
// event stream (the call link is the credential). The text comes translated from the server.
(function () {
  "use strict";

  const box = document.querySelector("[data-late-notice]");
  if (!box || !window.EventSource) return;
  const source = new EventSource(box.dataset.url);
  source.addEventListener("message", (event) => {
    try {
      const notice = JSON.parse(event.data);
      box.textContent = notice.text || "";
      box.hidden = !notice.text;
    } catch (err) {
      // Malformed: keep what is shown; the next frame replaces it.
    }
  });
  window.addEventListener("pagehide", () => source.close());
})();
