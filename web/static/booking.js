// Booking pages: the date strip, the hold countdown and "copy link". No inline script (CSP script-src 'self').
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

  // The date strip works as links (?day=) without script; here a tap shows that day at once.
  const strip = document.querySelector("[data-day-strip]");
  if (strip) {
    const status = document.querySelector("[data-day-status]");
    const links = Array.from(strip.querySelectorAll("a[data-day]"));
    const show = (link) => {
      const day = link.dataset.day;
      const panel = document.querySelector('[data-day-panel="' + day + '"]');
      if (!panel) return false;
      for (const p of document.querySelectorAll("[data-day-panel]")) p.hidden = p !== panel;
      for (const other of links) {
        other.classList.toggle("current", other === link);
        if (other === link) other.setAttribute("aria-current", "true");
        else other.removeAttribute("aria-current");
      }
      const title = panel.querySelector("h2");
      if (status && title) status.textContent = title.textContent;
      const url = new URL(window.location.href);
      url.searchParams.set("day", day);
      window.history.replaceState(null, "", url);
      return true;
    };
    for (const link of links) {
      link.addEventListener("click", (ev) => {
        if (ev.metaKey || ev.ctrlKey || ev.shiftKey || ev.altKey) return;
        if (show(link)) ev.preventDefault();
      });
    }
    const current = strip.querySelector("a.current");
    if (current) current.scrollIntoView({ block: "nearest", inline: "center" });
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
