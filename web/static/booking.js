// Booking pages: the hold countdown and "copy link". No inline script (CSP script-src 'self').
"use strict";

(function () {
  const countdown = document.querySelector("[data-hold-seconds]");
  if (countdown) {
    const deadline = Date.now() + Number(countdown.dataset.holdSeconds) * 1000;
    const tick = () => {
      const left = Math.max(0, Math.round((deadline - Date.now()) / 1000));
      countdown.textContent = Math.floor(left / 60) + ":" + String(left % 60).padStart(2, "0");
      if (left === 0) {
        clearInterval(timer);
        // The server decides what an expired hold means; show its page.
        setTimeout(() => window.location.reload(), 1500);
      }
    };
    const timer = setInterval(tick, 1000);
    tick();
  }

  for (const button of document.querySelectorAll("button[data-copy]")) {
    button.addEventListener("click", async () => {
      const input = document.querySelector(button.dataset.copy);
      if (!input) return;
      try {
        await navigator.clipboard.writeText(input.value);
      } catch (err) {
        input.select();
        document.execCommand("copy");
      }
      button.classList.add("done");
    });
  }
})();
