// The consult room opened from the clinic board's "Admit" (a POST with CSRF that put a
// short-lived ticket in this page's address, checked by the server before it included this
// script): admit the waiting patient as soon as the room shows them waiting, once, by pressing
// the room's own admit button (call.js sends the admit message).
"use strict";

(function () {
  const button = document.querySelector("[data-action=admit]");
  if (!button) return;
  let done = false;
  const observer = new MutationObserver(check);

  function check() {
    if (done || button.hidden) return;
    done = true;
    observer.disconnect();
    button.click();
  }

  observer.observe(button, { attributes: true, attributeFilter: ["hidden"] });
  // The patient may have left meanwhile: stop watching after two minutes (the ticket's life).
  setTimeout(() => observer.disconnect(), 120000);
  // The address keeps no ticket: a reload must not admit again.
  if (window.history && window.location.search.includes("admit=")) {
    window.history.replaceState(null, "", window.location.pathname);
  }
  check();
})();
