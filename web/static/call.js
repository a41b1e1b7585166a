// The call UI of both pages: the patient's phone page and the doctor's consult room.
// Plain script, no build step, nothing external. Protocol: signaling-client.js.
//
// This file holds the page's state and wires the parts together; the pages load them first,
// in this order, each adding a factory to `window.Consult`:
//   call-media.js      the camera and microphone, the mic meter, mute and camera switch
//   call-boot.js       (the patient's page only) opens the signaling socket before the other
//                      scripts have run; start() takes it over with the events it missed
//   call-peer.js       the peer connection: perfect negotiation, trickle ICE, ICE restarts,
//                      stats samples
//   call-recording.js  recording consent and the send-only recording connection (only on
//                      the pages of a visit with a recording policy: see noRecording)
//   call-chat.js       the text chat
//   call-sidebar.js    the doctor's sidebar tabs and inline reports (the consult room only)
// They share one context object (`ctx` below): the signaling client, the local stream, the
// two connections, the room's flags, and the small UI helpers.
//
// Signaling and media are independent: when a socket reconnects, each side keeps its peer
// connection as long as the other page is the same instance (the instance id in hello and
// `peer_joined`); only a reloaded page gets a fresh one (docs/protocol.md, "Media survives
// signaling"). The socket connects while getUserMedia is still asking for the camera; its
// messages are handled once the camera is settled.
//
// Nothing leaves the patient's phone before the patient presses Join: the pre-call check uses
// the camera locally only; the socket connects early (to wait and be admitted), but the peer
// connection (with its tracks) is made only once the patient pressed Join, which is also when
// the page tells the server `join` (the visit clock starts then; docs/protocol.md, "Joining
// the call"). The doctor's page negotiates only once the server says the patient is ready;
// it prepares its connection (tracks, offer, candidates) while the patient waits and holds it
// (call-peer.js, newPc({hold: true})), so that the offer goes out the moment the patient is in.
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
  const captionEl = $("[data-caption]");
  const qualityEl = $("[data-quality]");
  const remoteCameraOff = $("[data-remote-camera-off]");
  const remoteMuted = $("[data-remote-muted]");

  let admitted = false;
  let peerPresent = false;
  let guestWaiting = false;
  let guestReady = false; // host: the patient pressed Join (the server said peer_ready)
  let peerInstance = null; // the other page's instance id: a new one needs a new connection
  let clockOffsetMs = 0;
  let endsAtMs = null;
  let countdownTimer = null;
  let captionTimer = null;
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
    // The patient joins with a button (which also unlocks audio playback); before it no media
    // is sent. The doctor is in the call on opening the consult room.
    joined: isHost,
    ended: false,
    interrupted: false,
  };
  const media = Consult.callMedia(ctx);
  const peer = Consult.callPeer(ctx);
  // call-recording.js loads only for a visit with a recording policy (the page then shows the
  // consent box); without it nothing is ever recorded, and joining needs no consent.
  const recording = Consult.callRecording ? Consult.callRecording(ctx) : noRecording();
  const chat = Consult.callChat(ctx);
  // The doctor's sidebar (call-sidebar.js): only the consult room loads it.
  const sidebar = Consult.callSidebar || { setup() {}, closeReport() {} };

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

  // The connection's state as a large caption over the video, for the states someone
  // watching the call must understand (connecting, a shaky network, back again); "restored"
  // fades after a few seconds, the rest last until the next state.
  const CAPTIONED = { peer_connecting: true, reconnecting: true, restored: true };

  function setStatus(key, values) {
    if (!statusEl) return;
    statusEl.dataset.state = key;
    statusEl.textContent = t(key, values);
    if (!captionEl) return;
    clearTimeout(captionTimer);
    captionEl.hidden = !CAPTIONED[key] || ctx.ended;
    captionEl.dataset.state = key;
    captionEl.textContent = CAPTIONED[key] ? t(key) : "";
    if (key === "restored") captionTimer = setTimeout(() => (captionEl.hidden = true), 4000);
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
    // While the visit runs, a lost socket is retried quickly (at most every 2 s).
    if (ctx.sig) ctx.sig.maxDelayMs = 2000;
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

  function warningText(secondsLeft) {
    // The server counts seconds; people count minutes ("2 minutes left", never "120 seconds").
    // One text per whole minute, plurals done by the catalogue (calls/views.py warning_strings).
    const seconds = Math.max(0, Number(secondsLeft) || 0);
    if (seconds < 60) return t("warning_soon");
    const minutes = Math.round(seconds / 60);
    let n = minutes;
    while (n > 1 && !T["warning_minutes_" + n]) n -= 1;
    return t("warning_minutes_" + n);
  }

  // -- the other side's microphone and camera ---------------------------------------------------
  // Each side tells the other when it mutes or turns its camera off, in a `signal` whose data is
  // `{media: {audio, video}}` (docs/protocol.md): a disabled track still sends (silence, black
  // frames), so the receiving side cannot see it. Said again after every description received,
  // so a new or restarted connection learns the state too.

  function localMediaState() {
    const stream = ctx.localStream;
    const on = (tracks) => tracks.length > 0 && tracks.some((track) => track.enabled);
    return {
      audio: stream ? on(stream.getAudioTracks()) : false,
      video: stream ? on(stream.getVideoTracks()) : false,
    };
  }

  function sendMediaState() {
    if (!ctx.sig || ctx.ended || !ctx.joined || !inCall()) return;
    ctx.sig.send({ type: "signal", data: { media: localMediaState() } });
  }

  function showRemoteMedia(state) {
    const audio = !state || state.audio !== false;
    const video = !state || state.video !== false;
    if (remoteMuted) remoteMuted.hidden = audio || ctx.ended;
    if (remoteCameraOff) remoteCameraOff.hidden = video || ctx.ended;
    root.dataset.remoteVideo = video ? "on" : "off";
  }

  // -- the room's life -----------------------------------------------------------------------

  function updateAdmit() {
    if (admitButton) admitButton.hidden = !(isHost && guestWaiting && !admitted && !ctx.ended);
  }

  function peerGone(reasonKey) {
    peerPresent = false;
    peer.closePc();
    showRemoteMedia(null);
    if (ctx.ended) return;
    setStatus(reasonKey);
    if (stageNote) {
      stageNote.textContent = t(reasonKey);
      stageNote.hidden = false;
    }
  }

  // Both in the call: the guest admitted and ready (pressed Join), the other side present.
  function inCall() {
    return peerPresent && admitted && (isHost ? guestReady : ctx.joined);
  }

  function pcAlive() {
    const pc = ctx.pc;
    return !!pc && pc.connectionState !== "closed" && pc.connectionState !== "failed";
  }

  // The other page's instance: true when it is the one our peer connection talks to.
  function samePeer(instance) {
    const same = !!instance && instance === peerInstance;
    if (instance) peerInstance = instance;
    return same;
  }

  // `fresh`: the other page is a new instance, its old connection is gone.
  function startPcIfInCall(fresh) {
    if (inCall()) {
      if (fresh || !pcAlive()) peer.newPc();
      else if (peer.holding()) peer.release(); // prepared while waiting: its offer goes now
    } else {
      prepareOrClose(fresh);
      if (isHost && peerPresent && admitted) setStatus("patient_admitted_not_joined");
    }
  }

  // The doctor's page, while the patient is there but not yet in the call (waiting to be
  // admitted, or admitted and still on the pre-call check): its connection is made and its
  // offer and candidates gathered now, and held (call-peer.js) until the patient is in the
  // call, so that the call starts one step sooner. Nothing leaves either page before that.
  function prepareOrClose(fresh) {
    if (isHost && peerPresent && !ctx.ended) {
      if (fresh || !pcAlive() || !peer.holding()) peer.newPc({ hold: true });
    } else {
      peer.closePc();
    }
  }

  function sendJoin() {
    // Idempotent on the server: sent on Join and again on every new socket while joined.
    if (!isHost && ctx.joined && ctx.sig) ctx.sig.send({ type: "join" });
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
      guestReady = peerPresent && welcome.peer_ready === true;
      updateAdmit();
    }
    sendJoin(); // a new socket is a new seat connection: say it again
    const same = samePeer(welcome.peer && welcome.peer.instance);
    if (reconnected && pcAlive() && (welcome.peer_away || (peerPresent && admitted && same))) {
      // Only this socket was gone: the media went on (or recovers over the new socket).
      peerPresent = true;
      if (isHost) guestReady = true;
      peer.onSignalingBack();
      if (!peer.mediaFlowing()) setStatus("reconnecting");
    } else if (peerPresent && admitted) {
      if (reconnected) ctx.interrupted = true;
      startPcIfInCall(!same);
    } else {
      prepareOrClose(!same);
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
        Consult.mark("admitted");
        admitted = true;
        guestWaiting = false;
        if (isHost && message.ready === true) guestReady = true;
        updateAdmit();
        // The host offers once the patient is in the call: admitted and pressed Join.
        if (isHost && peerPresent) startPcIfInCall(false);
        enterCallIfReady();
        break;
      case "peer_joined":
        peerPresent = true;
        if (samePeer(message.instance) && pcAlive() && message.admitted) {
          // The same page on a new socket: its peer connection still talks to ours. (A
          // guest's new socket says `join` again; peer_ready follows.)
          break;
        }
        if (message.admitted) admitted = true;
        if (isHost) guestReady = message.ready === true; // a new connection joins again
        if (isHost && !message.admitted) {
          guestWaiting = true;
          updateAdmit();
          prepareOrClose(true); // a new page instance: a fresh connection, held
          setStatus("patient_waiting");
          break;
        }
        if (stageNote) stageNote.hidden = true;
        startPcIfInCall(true); // a new page instance: a fresh connection
        enterCallIfReady();
        break;
      case "peer_ready": {
        if (!isHost) break;
        guestReady = true;
        if (stageNote) stageNote.hidden = true;
        const kept = pcAlive() && !peer.holding();
        startPcIfInCall(false);
        // The patient's page came back on a new socket with its connection: an ICE restart
        // offer of ours that went nowhere meanwhile goes out again now.
        if (kept) peer.onSignalingBack();
        break;
      }
      case "peer_away":
        // Its socket dropped; media between the pages does not need it (peer_left follows
        // only if it does not come back within the grace).
        break;
      case "quality":
        peer.onPeerQuality(message);
        break;
      case "peer_left":
        if (isHost) guestReady = false; // its next connection says join again
        if (isHost && !admitted) {
          guestWaiting = false;
          updateAdmit();
          peerPresent = false;
          peer.closePc(); // the one prepared for this patient's page
          setStatus("waiting_patient");
          break;
        }
        peerGone("peer_left");
        break;
      case "signal": {
        if (!ctx.joined) return; // never answer with media before Join (the server relays none)
        const data = message.data || {};
        if (data.media) {
          showRemoteMedia(data.media);
          break;
        }
        return peer.onSignal(data).then(() => {
          if (data.description) sendMediaState();
        });
      }
      case "recording":
        return recording.onRecording(message);
      case "record_answer":
        return recording.onRecordAnswer(message);
      case "clock":
        onClock(message);
        break;
      case "warning":
        if (warningEl && !ctx.ended) {
          warningEl.textContent = warningText(message.seconds_left);
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
        if (message.code === "rate_limited") setTimeout(sendJoin, 1000); // a dropped join
        break;
      default:
        break;
    }
  }

  // -- poor network and audio only -------------------------------------------------------------

  const audioOnlyButton = $("[data-action=audio-only]");

  ctx.onQuality = (level) => {
    // Offered when the network is poor, and shown while audio only is on (to turn it off).
    if (audioOnlyButton) audioOnlyButton.hidden = !(level === "poor" || ctx.audioOnly) || ctx.ended;
  };

  ctx.onAudioOnly = (on, auto) => {
    if (audioOnlyButton) {
      audioOnlyButton.hidden = false;
      audioOnlyButton.setAttribute("aria-pressed", on ? "true" : "false");
      audioOnlyButton.textContent = t(on ? "video_back" : "audio_only");
    }
    root.dataset.audioOnly = on ? (auto ? "auto" : "on") : "";
    if (stageNote) {
      stageNote.textContent = on ? t(auto ? "audio_only_auto" : "audio_only_on") : "";
      stageNote.hidden = !on;
    }
  };

  function finish(reasonKey, title) {
    if (ctx.ended && reasonKey !== "refused") return;
    ctx.ended = true;
    peer.stopStats();
    clearInterval(countdownTimer);
    clearTimeout(captionTimer);
    recording.reset();
    peer.closePc();
    media.stopMedia();
    // The camera's light goes off: no element keeps the stopped stream.
    for (const video of $$("[data-local-video]")) video.srcObject = null;
    updateAdmit();
    const over = reasonKey.startsWith("ended");
    // One end screen: its title says what happened once; the reason adds only what the title
    // does not (why it ended, or the server's refusal), and the header's live parts go away.
    const titleEl = $("[data-ended-title]");
    if (titleEl && title) titleEl.textContent = title;
    const reasonEl = $("[data-ended-reason]");
    if (reasonEl) {
      const said = !title && reasonKey !== "ended_room_ended" && T[reasonKey] ? t(reasonKey) : "";
      reasonEl.textContent = said;
      reasonEl.hidden = !said;
      reasonEl.dataset.reason = reasonKey;
    }
    const nextSteps = $("[data-next-steps]");
    if (nextSteps) nextSteps.hidden = !over;
    for (const el of [warningEl, qualityEl, statusEl, countdownEl, captionEl, stageNote]) {
      if (el) el.hidden = true;
    }
    showRemoteMedia(null);
    const rejoin = $("[data-action=rejoin]");
    if (rejoin) rejoin.hidden = reasonKey !== "left";
    if (statusEl) statusEl.dataset.state = over ? "ended" : reasonKey;
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
      // The server's error frame carries a code; the words for it are the page's, in the
      // reader's language (its `message` is an English note for developers).
      const reasonEl = $("[data-ended-reason]");
      const key = error && error.code ? "error_" + error.code : "";
      if (reasonEl && key && T[key]) {
        reasonEl.textContent = t(key);
        reasonEl.hidden = false;
      }
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
          if (ctx.joined) break;
          ctx.joined = true;
          Consult.mark("join");
          if (remoteVideo) remoteVideo.play().catch(() => {});
          if (ctx.sig.state === "closed") {
            onClosed({ code: 4003, error: ctx.sig.lastError });
            break;
          }
          // In order with the signaling messages: from now on this page may send media.
          serial(() => {
            sendJoin();
            if (inCall()) peer.newPc();
            enterCallIfReady();
          });
          break;
        case "mute":
          media.toggleTrack("audio", button, "mute", "unmute");
          serial(sendMediaState);
          break;
        case "camera":
          media.toggleTrack("video", button, "camera_off", "camera_on");
          root.dataset.selfVideo = button.getAttribute("aria-pressed") === "true" ? "off" : "on";
          serial(sendMediaState);
          break;
        case "flip":
          media.flipCamera();
          break;
        case "audio-only":
          peer.setAudioOnly(!ctx.audioOnly, false);
          break;
        case "chat":
          chat.toggle(button.getAttribute("aria-pressed") !== "true");
          break;
        case "admit":
          ctx.sig.send({ type: "admit" });
          button.hidden = true;
          // The patient has pressed Join already (the server said peer_ready): the offer
          // prepared while the patient waited follows the admission at once, on the same
          // socket, instead of after the server's "admitted" has come back to this page. The
          // server handles a socket's messages in order: it relays the offer only once it
          // has admitted the patient, and refuses it if the admission failed.
          serial(() => {
            if (guestReady && peerPresent && !admitted && peer.holding()) peer.release();
          });
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
    Consult.mark("start");
    sidebar.setup();
    if (root.dataset.initial === "ended") {
      finish("ended_room_ended");
      return;
    }
    setupControls();
    // The button works from now on (the page renders it disabled: a tap before would be lost).
    const joinButton = $("[data-action=join]");
    if (joinButton) joinButton.disabled = false;
    Consult.mark("join-ready");
    chat.setup();
    show(isHost ? "call" : "precheck");
    setStatus("connecting");
    setCheck("connect", "pending", "checking");
    // The camera and the socket start together; messages wait for the camera (serial), so
    // that a peer connection is never made without the local tracks.
    serial(() => media.startMedia().then(() => Consult.mark("media")));
    const listeners = {
      open(event) {
        Consult.mark("welcome");
        serial(() => onWelcome(event.detail.welcome, event.detail.reconnected));
      },
      message(event) {
        const message = event.detail;
        if (message.type !== "welcome") serial(() => onMessage(message));
      },
      reconnecting() {
        if (ctx.ended) return;
        if (peer.mediaFlowing()) return; // the call goes on without the socket
        ctx.interrupted = true;
        setStatus("reconnecting");
        if (!ctx.sig.everOpened) setCheck("connect", "failed", "cannot_connect");
      },
      closed(event) {
        serial(() => onClosed(event.detail));
      },
    };
    let sig;
    if (Consult.bootSignaling) {
      // The patient's page opened its socket while the scripts loaded (call-boot.js).
      sig = Consult.bootSignaling.take(listeners);
    } else {
      const scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
      const url = scheme + window.location.host + root.dataset.wsPath;
      sig = new window.SignalingClient(url, isHost ? hostToken : () => root.dataset.token);
      for (const [type, listener] of Object.entries(listeners)) sig.addEventListener(type, listener);
    }
    ctx.sig = sig;
    window.__consultSignaling = sig;
    // A recorded visit: connect only once this side has answered (and may join).
    recording.showConsent();
    recording.connectIfAllowed();
    peer.startSampling();
  }

  start();
})();
