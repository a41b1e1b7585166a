// The patient's call page before the visit's link opens: a countdown to the opening and a
// device test (camera preview, microphone level) that stays on the phone. When the countdown
// reaches the opening the page reloads itself and the server shows the pre-call check.
// Plain script, no build step; uses call-media.js for the camera and the meter.
(function () {
  "use strict";

  const root = document.querySelector("[data-call-early]");
  if (!root) return;
  const T = JSON.parse((document.getElementById("i18n") || {}).textContent || "{}");
  const countdownEl = root.querySelector("[data-early-countdown]");
  const opensAtMs = Number(root.dataset.opensAt) * 1000;
  // The phone's clock may be off: count against the server's, read when the page was made.
  const offsetMs = Number(root.dataset.serverNow) * 1000 - Date.now();
  const loadedAt = Date.now();
  let timer = null;

  function t(key) {
    return T[key] || key;
  }

  function two(n) {
    return String(n).padStart(2, "0");
  }

  function tick() {
    const leftMs = opensAtMs - (Date.now() + offsetMs);
    if (leftMs <= 0) {
      clearInterval(timer);
      countdownEl.textContent = t("opening");
      root.dataset.opening = "1";
      // Never reload in a loop: at least two seconds after the page came.
      const wait = Math.max(0, 2000 - (Date.now() - loadedAt));
      setTimeout(() => window.location.reload(), wait + 300);
      return;
    }
    const left = Math.ceil(leftMs / 1000);
    const hours = Math.floor(left / 3600);
    const minutes = Math.floor((left % 3600) / 60);
    const seconds = left % 60;
    countdownEl.textContent = (hours ? hours + ":" + two(minutes) : String(minutes)) + ":" + two(seconds);
    countdownEl.dataset.secondsLeft = String(left);
  }

  // The device test: call-media.js with the small part of the call's context it uses.
  const ctx = {
    root: root,
    $: (selector) => root.querySelector(selector),
    $$: (selector) => Array.from(root.querySelectorAll(selector)),
    t: t,
    setCheck(name, state, key) {
      const item = root.querySelector("[data-check=" + name + "]");
      if (!item) return;
      item.dataset.state = state;
      const text = item.querySelector("[data-check-text]");
      if (text && key) text.textContent = t(key);
    },
    localStream: null,
  };
  root.dataset.screen = "precheck"; // the meter runs while this is so

  root.addEventListener("click", async (event) => {
    const button = event.target.closest("[data-action=test-devices]");
    if (!button) return;
    button.hidden = true;
    for (const el of root.querySelectorAll("[data-local-video], [data-device-checks]")) el.hidden = false;
    const media = window.Consult.callMedia(ctx);
    await media.startMedia();
    media.resumeAudio();
    // Leaving or reloading the page ends the test (and the camera light with it).
    window.addEventListener("pagehide", () => media.stopMedia());
  });

  tick();
  timer = setInterval(tick, 250);
})();
