// The "send a new code" button of the SMS-code pages: disabled, with a countdown, until the
// server will send another code. Without this script the button simply stays enabled and the
// server says how long to wait.
(function () {
  "use strict";
  for (const form of document.querySelectorAll("form[data-resend-in]")) {
    const button = form.querySelector("button");
    const note = form.querySelector("[data-template]");
    const until = Date.now() + (parseInt(form.dataset.resendIn, 10) || 0) * 1000;
    const tick = function () {
      const left = Math.ceil((until - Date.now()) / 1000);
      if (left <= 0) {
        button.disabled = false;
        note.hidden = true;
        return;
      }
      button.disabled = true;
      note.hidden = false;
      note.textContent = note.dataset.template.replace("{n}", String(left));
      setTimeout(tick, 1000);
    };
    tick();
  }
})();
