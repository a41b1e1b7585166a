// The call UI of both pages: the patient's phone page and the doctor's consult room.
// Plain script, no build step, nothing external. Protocol: signaling-client.js.
//
// This file holds the page's state and wires the parts together; the pages load them first,
// in this order, each adding a factory to `window.Consult`:
//   call-media.js      the camera and microphone, the mic meter, mute and camera switch
//   call-peer.js       the peer connection: perfect negotiation, trickle ICE, ICE restarts,
//                      stats samples
//   call-recording.js  recording consent and the send-only recording connection (only on
//                      the pages of a visit with a recording policy: see noRecording)
//   call-chat.js       the text chat
//   call-sidebar.js    the doctor's sidebar tabs and inline reports
// They share one context object (`ctx` below): the signaling client, the local stream, the
// two connections, the room's flags, and the small UI helpers.
//
// When the signaling socket had to reconnect, the other side throws its connection away
// (protocol), so this side starts a fresh one too.
(function () {
  "use strict";

  const root = document.querySelector("[data-call]");
  if (!root) return;
  const Consult = window.Consult;
  const T = JSON.parse((document.getElementById("i18n") || {}).textContent || "{}");
  const isHost = root.dataset.role === "host";

  const $ = (selector) => root.querySelector(selector);
  const $$ = (selector) => Array.from(root.querySelectorAll(selector));
  const statusEl = $("[data-status]");
  const countdownEl = $("[data-countdown]");
  const warningEl = $("[data-warning]");
  const remoteVideo = $("[data-remote-video]");
  const stageNote = $("[data-stage-note]");
  const admitButton = $("[data-action=admit]");

  let admitted = false;
  let peerPresent = false;
  let guestWaiting = false;
  let clockOffsetMs = 0;
  let endsAtMs = null;
  let countdownTimer = null;
  let queue = Promise.resolve();

  // What the parts share; they read and set these fields.
  const ctx = {
    root: root,
    isHost: isHost,
    polite: !isHost,
    $: $,
    $$: $$,
    t: t,
    setStatus: setStatus,
    setCheck: setCheck,
    sig: null, // the SignalingClient
    localStream: null, // call-media.js
    pc: null, // the peer connection (call-peer.js)
    rec: null, // the recording connection to the server (call-recording.js)
    joined: isHost, // the patient joins with a button (which also unlocks audio playback)
    ended: false,
    interrupted: false,
  };
  const media = Consult.callMedia(ctx);
  const peer = Consult.callPeer(ctx);
  // call-recording.js loads only for a visit with a recording policy (the page then shows the
  // consent box); without it nothing is ever recorded, and joining needs no consent.
  const recording = Consult.callRecording ? Consult.callRecording(ctx) : noRecording();
  const chat = Consult.callChat(ctx);
  const sidebar = Consult.callSidebar;

  // -- small helpers ----------------------------------------------------------------------

  function noRecording() {
    const nothing = () => {};
    return {
      onRecording: nothing,
      onRecordAnswer: nothing,
      retry: nothing,
      reset: nothing,
      showConsent: nothing,
      answerConsent: nothing,
      connectIfAllowed() {
        if (ctx.sig && ctx.sig.state === "idle") ctx.sig.connect();
      },
    };
  }

  function t(key, values) {
    let text = T[key] || key;
    for (const [k, v] of Object.entries(values || {})) text = text.replace("%(" + k + ")s", String(v));
    return text;
  }

  function setStatus(key, values) {
    if (!statusEl) return;
    statusEl.dataset.state = key;
    statusEl.textContent = t(key, values);
  }

  function show(screen) {
    root.dataset.screen = screen;
    for (const el of $$("[data-screen]")) el.hidden = el.dataset.screen !== screen;
    chat.onScreen(screen);
  }

  function setCheck(name, state, key) {
    const item = $("[data-check=" + name + "]");
    if (!item) return;
    item.dataset.state = state;
    const text = item.querySelector("[data-check-text]");
    if (text && key) text.textContent = t(key);
  }

  function serial(fn) {
    // Signaling messages are handled one at a time, in order: a candidate must not race
    // the description it belongs to.
    queue = queue.then(fn).catch((err) => console.warn("call:", err));
    return queue;
  }

  // -- the clock -----------------------------------------------------------------------------

  function onClock(message) {
    clockOffsetMs = message.now * 1000 - Date.now();
    endsAtMs = message.ends_at * 1000;
    clearInterval(countdownTimer);
    tick();
    countdownTimer = setInterval(tick, 250);
  }

  function tick() {
    if (!countdownEl || endsAtMs === null) return;
    const left = Math.max(0, Math.round((endsAtMs - (Date.now() + clockOffsetMs)) / 1000));
    const minutes = Math.floor(left / 60);
    const seconds = left % 60;
    countdownEl.textContent = minutes + ":" + String(seconds).padStart(2, "0");
    countdownEl.dataset.secondsLeft = String(left);
  }

  // -- the room's life -----------------------------------------------------------------------

  function updateAdmit() {
    if (admitButton) admitButton.hidden = !(isHost && guestWaiting && !admitted && !ctx.ended);
  }

  function peerGone(reasonKey) {
    peerPresent = false;
    peer.closePc();
    if (ctx.ended) return;
    setStatus(reasonKey);
    if (stageNote) {
      stageNote.textContent = t(reasonKey);
      stageNote.hidden = false;
    }
  }

  function enterCallIfReady() {
    if (!ctx.joined || ctx.ended) return;
    if (!isHost && !admitted) {
      show("waiting");
      setStatus("waiting_doctor");
      return;
    }
    show("call");
  }

  function onWelcome(welcome, reconnected) {
    // A new socket: the server says `recording` again if this visit records.
    recording.reset();
    admitted = welcome.admitted;
    if (welcome.clock) onClock(welcome.clock);
    setCheck("connect", "ok", "can_connect");
    peerPresent = welcome.peer_present;
    if (isHost) {
      guestWaiting = peerPresent && !admitted;
      updateAdmit();
    }
    if (reconnected) ctx.interrupted = true;
    if (peerPresent && admitted) {
      // A fresh connection on a (re)join: the other side starts a new one for us too.
      peer.newPc();
    } else {
      peer.closePc();
      if (isHost) setStatus(peerPresent ? "patient_waiting" : "waiting_patient");
      else setStatus("waiting_doctor");
    }
    enterCallIfReady();
  }

  function onMessage(message) {
    switch (message.type) {
      case "waiting":
        if (!isHost) setStatus("waiting_doctor");
        break;
      case "admitted":
        admitted = true;
        guestWaiting = false;
        updateAdmit();
        if (isHost && peerPresent) peer.newPc(); // the host offers once the patient is in
        enterCallIfReady();
        break;
      case "peer_joined":
        peerPresent = true;
        if (message.admitted) admitted = true;
        if (isHost && !message.admitted) {
          guestWaiting = true;
          updateAdmit();
          setStatus("patient_waiting");
          break;
        }
        if (stageNote) stageNote.hidden = true;
        peer.newPc(); // a new or reconnected peer: always a fresh connection
        enterCallIfReady();
        break;
      case "peer_left":
        if (isHost && !admitted) {
          guestWaiting = false;
          updateAdmit();
          peerPresent = false;
          setStatus("waiting_patient");
          break;
        }
        peerGone("peer_left");
        break;
      case "signal":
        return peer.onSignal(message.data || {});
      case "recording":
        return recording.onRecording(message);
      case "record_answer":
        return recording.onRecordAnswer(message);
      case "clock":
        onClock(message);
        break;
      case "warning":
        if (warningEl) {
          warningEl.textContent = t("warning", { seconds: message.seconds_left });
          warningEl.hidden = false;
        }
        break;
      case "chat":
        chat.onMessage(message);
        break;
      case "ended":
        finish("ended_" + message.reason);
        break;
      case "error":
        if (message.code === "peer_absent") chat.onPeerAbsent();
        if (message.code === "recording_failed") recording.retry(5000);
        break;
      default:
        break;
    }
  }

  function finish(reasonKey, title) {
    if (ctx.ended && reasonKey !== "refused") return;
    ctx.ended = true;
    peer.stopStats();
    clearInterval(countdownTimer);
    recording.reset();
    peer.closePc();
    media.stopMedia();
    updateAdmit();
    const titleEl = $("[data-ended-title]");
    if (titleEl && title) titleEl.textContent = title;
    const reasonEl = $("[data-ended-reason]");
    if (reasonEl) {
      reasonEl.textContent = T[reasonKey] ? t(reasonKey) : "";
      reasonEl.dataset.reason = reasonKey;
    }
    if (countdownEl && reasonKey.startsWith("ended")) countdownEl.textContent = "0:00";
    const rejoin = $("[data-action=rejoin]");
    if (rejoin) rejoin.hidden = reasonKey !== "left";
    setStatus(reasonKey.startsWith("ended") ? "ended" : reasonKey);
    show("ended");
  }

  function onClosed(detail) {
    if (ctx.ended) return;
    const error = detail.error;
    if (detail.code === 4000) finish(error ? "ended_room_ended" : "ended_time_limit");
    else if (detail.code === 4001) finish("replaced", t("replaced"));
    else if (detail.code === 1000) finish("left", t("left"));
    else {
      finish("refused", t("refused"));
      const reasonEl = $("[data-ended-reason]");
      if (reasonEl && error && error.message) reasonEl.textContent = error.message;
    }
  }

  // -- controls ------------------------------------------------------------------------------

  function setupControls() {
    root.addEventListener("click", (event) => {
      const button = event.target.closest("[data-action]");
      if (!button || !root.contains(button)) return;
      media.resumeAudio();
      switch (button.dataset.action) {
        case "join":
          ctx.joined = true;
          if (remoteVideo) remoteVideo.play().catch(() => {});
          if (ctx.sig.state === "closed") {
            onClosed({ code: 4003, error: ctx.sig.lastError });
            break;
          }
          enterCallIfReady();
          break;
        case "mute":
          media.toggleTrack("audio", button, "mute", "unmute");
          break;
        case "camera":
          media.toggleTrack("video", button, "camera_off", "camera_on");
          break;
        case "flip":
          media.flipCamera();
          break;
        case "chat":
          chat.toggle(button.getAttribute("aria-pressed") !== "true");
          break;
        case "admit":
          ctx.sig.send({ type: "admit" });
          button.hidden = true;
          break;
        case "end":
          if (window.confirm(t("confirm_end"))) ctx.sig.send({ type: "end" });
          break;
        case "leave":
          if (window.confirm(t("confirm_leave"))) ctx.sig.close(true);
          break;
        case "rejoin":
          window.location.reload();
          break;
        case "consent-yes":
          recording.answerConsent(true);
          break;
        case "consent-no":
          recording.answerConsent(false);
          break;
        case "close-report":
          sidebar.closeReport();
          break;
        default:
          break;
      }
    });
  }

  // -- start -----------------------------------------------------------------------------------

  async function hostToken() {
    // The page's token lives ten minutes; a reconnect later in the visit asks for a new one.
    const url = root.dataset.tokenUrl;
    if (!url || !ctx.sig || !ctx.sig.everOpened) return root.dataset.token;
    const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (!response.ok) return root.dataset.token;
    const body = await response.json();
    root.dataset.token = body.token;
    return body.token;
  }

  async function start() {
    sidebar.setup();
    if (root.dataset.initial === "ended") {
      finish("ended_room_ended");
      return;
    }
    setupControls();
    chat.setup();
    show(isHost ? "call" : "precheck");
    setStatus("connecting");
    setCheck("connect", "pending", "checking");
    await media.startMedia();
    const scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    const url = scheme + window.location.host + root.dataset.wsPath;
    const sig = new window.SignalingClient(url, isHost ? hostToken : () => root.dataset.token);
    ctx.sig = sig;
    window.__consultSignaling = sig;
    sig.addEventListener("open", (event) => {
      serial(() => onWelcome(event.detail.welcome, event.detail.reconnected));
    });
    sig.addEventListener("message", (event) => {
      const message = event.detail;
      if (message.type !== "welcome") serial(() => onMessage(message));
    });
    sig.addEventListener("reconnecting", () => {
      if (ctx.ended) return;
      ctx.interrupted = true;
      setStatus("reconnecting");
      if (!sig.everOpened) setCheck("connect", "failed", "cannot_connect");
    });
    sig.addEventListener("closed", (event) => serial(() => onClosed(event.detail)));
    // A recorded visit: connect only once this side has answered (and may join).
    recording.showConsent();
    recording.connectIfAllowed();
    peer.startSampling();
  }

  start();
})();
