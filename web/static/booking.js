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

  // The date strip works as links (?day=) without script; here a tap fetches that day's times
  // (one small panel, fresh) and shows them in place. If the fetch fails, the link is followed.
  const strip = document.querySelector("[data-day-strip]");
  const panels = document.querySelector("[data-day-panels]");
  if (strip && panels) {
    const status = document.querySelector("[data-day-status]");
    const links = Array.from(strip.querySelectorAll("a[data-day]"));
    let pending = null;
    const mark = (link) => {
      for (const other of links) {
        other.classList.toggle("current", other === link);
        if (other === link) other.setAttribute("aria-current", "true");
        else other.removeAttribute("aria-current");
      }
    };
    const show = async (link) => {
      const controller = new AbortController();
      if (pending) pending.abort();
      pending = controller;
      const response = await fetch(link.dataset.dayUrl, {
        credentials: "same-origin",
        headers: { Accept: "text/html" },
        signal: controller.signal,
      });
      if (!response.ok) throw new Error("day " + response.status);
      const holder = document.createElement("template");
      holder.innerHTML = await response.text();
      const panel = holder.content.querySelector("[data-day-panel]");
      if (!panel || pending !== controller) return;
      pending = null;
      for (const old of panels.querySelectorAll("[data-day-panel]")) old.remove();
      const none = panels.querySelector("[data-testid=no-slots]");
      panels.insertBefore(panel, none);
      mark(link);
      const title = panel.querySelector("h2");
      if (status && title) status.textContent = title.textContent;
      const url = new URL(window.location.href);
      url.searchParams.set("day", link.dataset.day);
      window.history.replaceState(null, "", url);
    };
    for (const link of links) {
      link.addEventListener("click", (ev) => {
        if (ev.metaKey || ev.ctrlKey || ev.shiftKey || ev.altKey || !link.dataset.dayUrl) return;
        ev.preventDefault();
        show(link).catch((err) => {
          if (err && err.name === "AbortError") return;
          window.location.href = link.href; // the page itself, as without script
        });
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
