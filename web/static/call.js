// The call UI of both pages: the patient's phone page and the doctor's consult room.
// Plain script, no build step, nothing external. Protocol: signaling-client.js.
//
// Media is peer to peer with "perfect negotiation": the doctor (host) is impolite and makes
// the offers; the patient (guest) is polite and rolls back when offers collide. Candidates
// are trickled (with end-of-candidates). When ICE fails, or stays disconnected for 3 s, the
// page restarts ICE; when the signaling socket had to reconnect, the other side throws its
// connection away (protocol), so this side starts a fresh one too.
//
// Recording (docs/recording.md): when the visit is recorded, both pages ask for consent before
// connecting, and once the server says `recording`, each page opens a second, send-only
// connection to the server carrying its own camera and microphone (the call stays peer to
// peer). The red indicator shows while that connection is up.
(function () {
  "use strict";

  const root = document.querySelector("[data-call]");
  if (!root) return;
  const T = JSON.parse((document.getElementById("i18n") || {}).textContent || "{}");
  const isHost = root.dataset.role === "host";
  const polite = !isHost;

  const $ = (selector) => root.querySelector(selector);
  const $$ = (selector) => Array.from(root.querySelectorAll(selector));
  const statusEl = $("[data-status]");
  const countdownEl = $("[data-countdown]");
  const warningEl = $("[data-warning]");
  const qualityEl = $("[data-quality]");
  const remoteVideo = $("[data-remote-video]");
  const stageNote = $("[data-stage-note]");
  const admitButton = $("[data-action=admit]");
  const chatBox = $("[data-chat]");
  const chatLog = $("[data-chat-log]");
  const consentBox = $("[data-recording-consent]");
  const joinButton = $("[data-action=join]");

  const RESTART_AFTER_DISCONNECTED_MS = 3000;
  const RESTART_RETRY_MS = 6000;
  const STATS_EVERY_MS = 5000;
  // Chrome reports "disconnected" only ~6 s after a path dies; silence on the transport
  // (RTP, RTCP and ICE consent checks all count) says so sooner.
  const SILENCE_CHECK_MS = 1000;
  const SILENT_CHECKS = 3;

  let sig = null;
  let localStream = null;
  let pc = null;
  let makingOffer = false;
  let ignoreOffer = false;
  let settingRemoteAnswer = false;
  let negotiated = false; // this pc has completed one offer/answer
  let admitted = false;
  let peerPresent = false;
  let guestWaiting = false;
  let joined = isHost; // the patient joins with a button (which also unlocks audio playback)
  let ended = false;
  let interrupted = false;
  let restartTimer = null;
  let clockOffsetMs = 0;
  let endsAtMs = null;
  let countdownTimer = null;
  let statsTimer = null;
  let lastInbound = null;
  let lastTransportBytes = -1;
  let silentChecks = 0;
  let stalled = false;
  let facing = "user";
  let lastChatSent = 0;
  let queue = Promise.resolve();
  let rec = null; // the recording connection to the server
  let recordingWanted = false;
  let recRetryTimer = null;

  // -- small helpers ----------------------------------------------------------------------

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
    if (chatBox && !isHost) chatBox.hidden = screen !== "call" || chatBox.dataset.open !== "1";
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

  // -- local media and the pre-call check --------------------------------------------------

  function showLocal() {
    for (const video of $$("[data-local-video]")) {
      if (video.srcObject !== localStream) video.srcObject = localStream;
    }
  }

  async function startMedia() {
    try {
      localStream = await navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: true, noiseSuppression: true },
        video: { facingMode: facing, width: { ideal: 640 }, height: { ideal: 480 } },
      });
      setCheck("camera", "ok", "camera_ok");
      startMeter(localStream);
    } catch (err) {
      console.warn("getUserMedia failed", err);
      localStream = new MediaStream();
      setCheck("camera", "failed", "camera_failed");
      setCheck("mic", "failed");
    }
    showLocal();
  }

  let audioContext = null;

  function startMeter(stream) {
    const meter = $("[data-mic-meter]");
    const Ctx = window.AudioContext || window.webkitAudioContext;
    if (!meter || !Ctx || !stream.getAudioTracks().length) return;
    audioContext = new Ctx();
    const analyser = audioContext.createAnalyser();
    analyser.fftSize = 512;
    audioContext.createMediaStreamSource(stream).connect(analyser);
    const samples = new Uint8Array(analyser.fftSize);
    let heard = false;
    const timer = setInterval(() => {
      if (root.dataset.screen !== "precheck") {
        clearInterval(timer);
        return;
      }
      analyser.getByteTimeDomainData(samples);
      let sum = 0;
      for (const s of samples) sum += ((s - 128) / 128) ** 2;
      const level = Math.min(1, Math.sqrt(sum / samples.length) * 4);
      meter.value = level;
      if (level > 0.02 && !heard) {
        heard = true;
        setCheck("mic", "ok");
      }
    }, 100);
  }

  // -- the peer connection -----------------------------------------------------------------

  function closePc() {
    clearTimeout(restartTimer);
    restartTimer = null;
    if (!pc) return;
    const old = pc;
    pc = null;
    window.__consultPc = null;
    for (const t of old.getTransceivers()) {
      try {
        t.stop();
      } catch (err) {
        /* already stopped */
      }
    }
    old.close();
    if (remoteVideo) remoteVideo.srcObject = null;
  }

  function newPc() {
    closePc();
    const welcome = sig.welcome;
    const config = {
      iceServers: welcome.ice_servers || [],
      iceTransportPolicy: welcome.ice_transport_policy === "relay" ? "relay" : "all",
    };
    const conn = new RTCPeerConnection(config);
    pc = conn;
    window.__consultPc = conn; // for tests and support: harmless, the page already has it
    makingOffer = false;
    ignoreOffer = false;
    settingRemoteAnswer = false;
    negotiated = false;
    lastInbound = null;
    lastTransportBytes = -1;
    silentChecks = 0;
    stalled = false;
    if (localStream && localStream.getTracks().length) {
      for (const track of localStream.getTracks()) conn.addTrack(track, localStream);
    } else {
      conn.addTransceiver("audio", { direction: "recvonly" });
      conn.addTransceiver("video", { direction: "recvonly" });
    }
    conn.ontrack = (event) => {
      if (conn !== pc || !remoteVideo) return;
      const stream = event.streams[0] || new MediaStream([event.track]);
      if (remoteVideo.srcObject !== stream) remoteVideo.srcObject = stream;
      if (joined) remoteVideo.play().catch(() => {});
    };
    conn.onicecandidate = (event) => {
      if (conn !== pc) return;
      sig.send({ type: "signal", data: { candidate: event.candidate ? event.candidate.toJSON() : null } });
    };
    conn.onnegotiationneeded = async () => {
      // The polite side leaves the first offer to the host; later ones (ICE restarts) are
      // fine either way, collisions are resolved below.
      if (conn !== pc || (polite && !negotiated)) return;
      try {
        makingOffer = true;
        await conn.setLocalDescription();
        sig.send({ type: "signal", data: { description: conn.localDescription.toJSON() } });
      } catch (err) {
        console.warn("offer failed", err);
      } finally {
        makingOffer = false;
      }
    };
    conn.oniceconnectionstatechange = () => {
      if (conn === pc) onIceState(conn);
    };
    setStatus("peer_connecting");
    return conn;
  }

  async function onSignal(data) {
    if (ended) return;
    if (!pc) newPc();
    const conn = pc;
    if (data.description) {
      const description = data.description;
      const readyForOffer = !makingOffer && (conn.signalingState === "stable" || settingRemoteAnswer);
      const collision = description.type === "offer" && !readyForOffer;
      ignoreOffer = !polite && collision;
      if (ignoreOffer) return;
      settingRemoteAnswer = description.type === "answer";
      await conn.setRemoteDescription(description); // rolls back our own offer if needed
      settingRemoteAnswer = false;
      if (description.type === "offer") {
        await conn.setLocalDescription();
        sig.send({ type: "signal", data: { description: conn.localDescription.toJSON() } });
      }
      negotiated = true;
    } else if ("candidate" in data) {
      try {
        if (data.candidate && data.candidate.candidate) {
          await conn.addIceCandidate(data.candidate);
        } else {
          await conn.addIceCandidate(); // end-of-candidates
        }
      } catch (err) {
        if (!ignoreOffer) console.warn("candidate refused", err);
      }
    }
  }

  function onIceState(conn) {
    const state = conn.iceConnectionState;
    sig.send({ type: "ice_state", state: state });
    if (state === "connected" || state === "completed") {
      if (!stalled) recovered();
    } else if (state === "disconnected") {
      interrupted = true;
      setStatus("reconnecting");
      scheduleRestart(RESTART_AFTER_DISCONNECTED_MS);
    } else if (state === "failed") {
      interrupted = true;
      setStatus("reconnecting");
      restartIce();
    }
  }

  function recovered() {
    clearTimeout(restartTimer);
    restartTimer = null;
    silentChecks = 0;
    stalled = false;
    setStatus(interrupted ? "restored" : "in_call");
    interrupted = false;
    if (stageNote) stageNote.hidden = true;
    sendStats();
  }

  function scheduleRestart(delay) {
    if (restartTimer) return;
    restartTimer = setTimeout(() => {
      restartTimer = null;
      restartIce();
    }, delay);
  }

  function restartIce() {
    if (!pc || ended) return;
    const state = pc.iceConnectionState;
    if (!stalled && (state === "connected" || state === "completed")) return;
    sig.send({ type: "ice_restart" });
    if (typeof pc.restartIce === "function") {
      pc.restartIce(); // fires negotiationneeded: a new offer with fresh ICE credentials
    }
    scheduleRestart(RESTART_RETRY_MS); // and again if this one does not get through
  }

  async function watchTransport() {
    const conn = pc;
    if (!conn || ended) return;
    const state = conn.iceConnectionState;
    if (state !== "connected" && state !== "completed") {
      silentChecks = 0;
      return;
    }
    let bytes = 0;
    try {
      (await conn.getStats()).forEach((s) => {
        if (s.type === "transport") bytes += s.bytesReceived || 0;
      });
    } catch (err) {
      return;
    }
    if (conn !== pc) return;
    const flowing = bytes !== lastTransportBytes;
    silentChecks = flowing ? 0 : silentChecks + 1;
    lastTransportBytes = bytes;
    if (silentChecks === SILENT_CHECKS - 1) {
      // Say so early; the other side may well restart ICE first.
      stalled = true;
      interrupted = true;
      setStatus("reconnecting");
    } else if (silentChecks === SILENT_CHECKS) {
      restartIce();
    } else if (flowing && stalled) {
      recovered();
    }
  }

  // -- recording ------------------------------------------------------------------------------

  function showRecording(on) {
    root.dataset.recording = on ? "1" : "0";
    for (const el of $$("[data-recording-indicator]")) el.hidden = !on;
  }

  function stopRecording() {
    clearTimeout(recRetryTimer);
    recRetryTimer = null;
    showRecording(false);
    if (!rec) return;
    const old = rec;
    rec = null;
    window.__consultRecPc = null;
    for (const tr of old.getTransceivers()) {
      try {
        tr.stop();
      } catch (err) {
        /* already stopped */
      }
    }
    old.close();
  }

  async function startRecording() {
    stopRecording();
    if (ended || !recordingWanted || !localStream || !localStream.getTracks().length) return;
    const welcome = sig.welcome;
    const conn = new RTCPeerConnection({
      iceServers: welcome.ice_servers || [],
      iceTransportPolicy: welcome.ice_transport_policy === "relay" ? "relay" : "all",
    });
    rec = conn;
    window.__consultRecPc = conn;
    for (const track of localStream.getTracks()) {
      const transceiver = conn.addTransceiver(track, { direction: "sendonly", streams: [localStream] });
      if (track.kind === "video") capRecordingBitrate(transceiver.sender);
    }
    let offered = false;
    const early = [];
    conn.onicecandidate = (event) => {
      if (conn !== rec) return;
      const message = { type: "record_candidate", candidate: event.candidate ? event.candidate.toJSON() : null };
      if (offered) sig.send(message);
      else early.push(message);
    };
    conn.onconnectionstatechange = () => {
      if (conn !== rec) return;
      const state = conn.connectionState;
      showRecording(state === "connected");
      if (state === "failed") retryRecording(2000); // a new offer replaces the leg (new file)
    };
    try {
      await conn.setLocalDescription(await conn.createOffer());
    } catch (err) {
      console.warn("recording offer failed", err);
      return;
    }
    if (conn !== rec) return;
    sig.send({ type: "record_offer", sdp: conn.localDescription.sdp });
    offered = true;
    for (const message of early) sig.send(message);
  }

  function capRecordingBitrate(sender) {
    // The record is a record: keep the phone's second upload modest (docs/recording.md).
    try {
      const params = sender.getParameters();
      if (!params.encodings || !params.encodings.length) params.encodings = [{}];
      params.encodings[0].maxBitrate = 600000;
      sender.setParameters(params).catch(() => {});
    } catch (err) {
      /* not supported: the browser's default applies */
    }
  }

  function retryRecording(delay) {
    clearTimeout(recRetryTimer);
    recRetryTimer = setTimeout(() => {
      recRetryTimer = null;
      if (recordingWanted && !ended && sig.state === "open") startRecording();
    }, delay);
  }

  async function onRecordAnswer(message) {
    if (!rec || rec.signalingState !== "have-local-offer") return;
    try {
      await rec.setRemoteDescription({ type: "answer", sdp: message.sdp });
    } catch (err) {
      console.warn("recording answer refused", err);
      retryRecording(3000);
    }
  }

  // -- consent -------------------------------------------------------------------------------

  function consentAnswer() {
    return consentBox ? consentBox.dataset.answer : "yes";
  }

  function consentAllowsJoining() {
    if (!consentBox) return true;
    const answer = consentBox.dataset.answer;
    return answer === "yes" || (answer === "no" && consentBox.dataset.policy !== "always");
  }

  function showConsent() {
    if (!consentBox) return;
    const answer = consentBox.dataset.answer;
    for (const el of consentBox.querySelectorAll("[data-consent-state]")) el.hidden = el.dataset.consentState !== answer;
    if (joinButton) joinButton.hidden = !consentAllowsJoining();
  }

  async function answerConsent(consent) {
    const error = consentBox.querySelector("[data-consent-error]");
    if (error) error.hidden = true;
    let response;
    try {
      response = await fetch(consentBox.dataset.consentUrl, {
        method: "POST",
        credentials: "same-origin",
        headers: {
          "Content-Type": "application/json",
          Accept: "application/json",
          "X-CSRF-Token": consentBox.dataset.csrf,
        },
        body: JSON.stringify({ consent: consent }),
      });
    } catch (err) {
      response = null;
    }
    if (!response || !response.ok) {
      if (error) {
        error.textContent = t("consent_failed");
        error.hidden = false;
      }
      return;
    }
    consentBox.dataset.answer = consent ? "yes" : "no";
    showConsent();
    connectIfAllowed();
  }

  function connectIfAllowed() {
    if (!sig || sig.state !== "idle" || !consentAllowsJoining()) return;
    sig.connect();
  }

  // -- statistics and quality ------------------------------------------------------------

  async function sendStats() {
    const conn = pc;
    if (!conn) return;
    let report;
    try {
      report = await conn.getStats();
    } catch (err) {
      return;
    }
    let video = null;
    let pairId = null;
    let nominated = null;
    report.forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "video") video = s;
      if (s.type === "transport" && s.selectedCandidatePairId) pairId = s.selectedCandidatePairId;
      if (s.type === "candidate-pair" && s.nominated && s.state === "succeeded") nominated = s;
    });
    const pair = (pairId && report.get(pairId)) || nominated;
    const sample = {};
    if (video) {
      const now = video.timestamp;
      if (lastInbound && now > lastInbound.timestamp) {
        const bits = (video.bytesReceived - lastInbound.bytesReceived) * 8;
        sample.bitrate_kbps = Math.max(0, Math.round(bits / (now - lastInbound.timestamp)));
        const got = video.packetsReceived - lastInbound.packetsReceived;
        const lost = video.packetsLost - lastInbound.packetsLost;
        if (got + lost > 0) sample.loss_pct = Math.max(0, Math.round((100 * lost) / (got + lost)));
      }
      lastInbound = video;
      sample.packetsLost = video.packetsLost || 0;
      if (video.jitter !== undefined) sample.jitter_ms = Math.round(video.jitter * 1000);
      if (video.framesPerSecond !== undefined) sample.framesPerSecond = Math.round(video.framesPerSecond);
      if (video.frameWidth) sample.frameWidth = video.frameWidth;
      if (video.frameHeight) sample.frameHeight = video.frameHeight;
      sample.freezeCount = video.freezeCount || 0;
      sample.framesDecoded = video.framesDecoded || 0;
    }
    let pairType = null;
    let rtt = null;
    if (pair) {
      const local = report.get(pair.localCandidateId);
      const remote = report.get(pair.remoteCandidateId);
      const types = [local && local.candidateType, remote && remote.candidateType];
      pairType = types.includes("relay") ? "relay" : types[0] || null;
      if (pair.currentRoundTripTime !== undefined) rtt = Math.round(pair.currentRoundTripTime * 1000);
    }
    if (rtt !== null) sample.rtt_ms = rtt;
    if (conn !== pc) return;
    if (Object.keys(sample).length) sig.send({ type: "stats", sample: sample });
    const ice = { type: "ice_state", state: conn.iceConnectionState };
    if (pairType) ice.pair_type = pairType;
    if (rtt !== null) ice.rtt_ms = rtt;
    sig.send(ice);
    showQuality(sample);
  }

  function showQuality(sample) {
    if (!qualityEl) return;
    const loss = sample.loss_pct || 0;
    const rtt = sample.rtt_ms || 0;
    const level = loss > 8 || rtt > 600 ? "poor" : loss > 2 || rtt > 300 ? "fair" : "good";
    qualityEl.hidden = false;
    qualityEl.dataset.level = level;
    qualityEl.textContent = t("quality_" + level);
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
    if (admitButton) admitButton.hidden = !(isHost && guestWaiting && !admitted && !ended);
  }

  function peerGone(reasonKey) {
    peerPresent = false;
    closePc();
    if (ended) return;
    setStatus(reasonKey);
    if (stageNote) {
      stageNote.textContent = t(reasonKey);
      stageNote.hidden = false;
    }
  }

  function enterCallIfReady() {
    if (!joined || ended) return;
    if (!isHost && !admitted) {
      show("waiting");
      setStatus("waiting_doctor");
      return;
    }
    show("call");
  }

  function onWelcome(welcome, reconnected) {
    // A new socket: the server says `recording` again if this visit records.
    recordingWanted = false;
    stopRecording();
    admitted = welcome.admitted;
    if (welcome.clock) onClock(welcome.clock);
    setCheck("connect", "ok", "can_connect");
    peerPresent = welcome.peer_present;
    if (isHost) {
      guestWaiting = peerPresent && !admitted;
      updateAdmit();
    }
    if (reconnected) interrupted = true;
    if (peerPresent && admitted) {
      // A fresh connection on a (re)join: the other side starts a new one for us too.
      newPc();
    } else {
      closePc();
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
        if (isHost && peerPresent) newPc(); // the host offers once the patient is in
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
        newPc(); // a new or reconnected peer: always a fresh connection
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
        return onSignal(message.data || {});
      case "recording":
        recordingWanted = !!message.active && consentAnswer() === "yes";
        if (recordingWanted) return startRecording();
        stopRecording();
        break;
      case "record_answer":
        return onRecordAnswer(message);
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
        addChat(message.from === (isHost ? "host" : "guest") ? t("you") : "", message.text, false);
        break;
      case "ended":
        finish("ended_" + message.reason);
        break;
      case "error":
        if (message.code === "peer_absent" && Date.now() - lastChatSent < 3000) {
          addChat("", t("chat_failed"), true);
        }
        if (message.code === "recording_failed") retryRecording(5000);
        break;
      default:
        break;
    }
  }

  function finish(reasonKey, title) {
    if (ended && reasonKey !== "refused") return;
    ended = true;
    clearInterval(statsTimer);
    clearInterval(countdownTimer);
    recordingWanted = false;
    stopRecording();
    closePc();
    if (localStream) for (const track of localStream.getTracks()) track.stop();
    if (audioContext) audioContext.close().catch(() => {});
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
    if (ended) return;
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

  // -- chat ----------------------------------------------------------------------------------

  function addChat(who, text, system) {
    if (!chatLog) return;
    const item = document.createElement("li");
    item.className = system ? "system" : who ? "mine" : "theirs";
    item.dataset.testid = "chat-message";
    item.textContent = text;
    chatLog.append(item);
    chatLog.scrollTop = chatLog.scrollHeight;
    if (!who && !system) {
      const unread = document.querySelector("[data-unread]");
      const chatTab = document.querySelector("[data-tab=chat]");
      if (unread && chatTab && chatTab.getAttribute("aria-selected") !== "true") unread.hidden = false;
      if (!isHost && chatBox && chatBox.hidden && root.dataset.screen === "call") toggleChat(true);
    }
  }

  function setupChat() {
    const form = $("[data-chat-form]");
    if (!form) return;
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const input = form.elements.text;
      const text = input.value.trim();
      if (!text) return;
      lastChatSent = Date.now();
      if (sig.send({ type: "chat", text: text.slice(0, 2000) })) {
        addChat(t("you"), text, false);
        input.value = "";
      } else {
        addChat("", t("chat_failed"), true);
      }
    });
  }

  function toggleChat(open) {
    if (!chatBox) return;
    chatBox.dataset.open = open ? "1" : "0";
    chatBox.hidden = !open;
    const button = $("[data-action=chat]");
    if (button) button.setAttribute("aria-pressed", open ? "true" : "false");
  }

  // -- controls ------------------------------------------------------------------------------

  function toggleTrack(kind, button, offKey, onKey) {
    if (!localStream) return;
    const tracks = kind === "audio" ? localStream.getAudioTracks() : localStream.getVideoTracks();
    if (!tracks.length) return;
    const enabled = !tracks[0].enabled;
    for (const track of tracks) track.enabled = enabled;
    button.setAttribute("aria-pressed", enabled ? "false" : "true");
    button.textContent = t(enabled ? offKey : onKey);
  }

  async function flipCamera() {
    if (!localStream) return;
    const next = facing === "user" ? "environment" : "user";
    let fresh;
    try {
      fresh = await navigator.mediaDevices.getUserMedia({
        video: { facingMode: { exact: next }, width: { ideal: 640 }, height: { ideal: 480 } },
      });
    } catch (err) {
      try {
        fresh = await navigator.mediaDevices.getUserMedia({ video: { facingMode: next } });
      } catch (err2) {
        return; // one camera only
      }
    }
    const track = fresh.getVideoTracks()[0];
    const old = localStream.getVideoTracks()[0];
    if (old) track.enabled = old.enabled;
    for (const conn of [pc, rec]) {
      if (!conn) continue;
      for (const sender of conn.getSenders()) {
        if (sender.track && sender.track.kind === "video") await sender.replaceTrack(track);
      }
    }
    if (old) {
      localStream.removeTrack(old);
      old.stop();
    }
    localStream.addTrack(track);
    facing = next;
    showLocal();
  }

  function setupControls() {
    root.addEventListener("click", (event) => {
      const button = event.target.closest("[data-action]");
      if (!button || !root.contains(button)) return;
      if (audioContext && audioContext.state === "suspended") audioContext.resume().catch(() => {});
      switch (button.dataset.action) {
        case "join":
          joined = true;
          if (remoteVideo) remoteVideo.play().catch(() => {});
          if (sig.state === "closed") {
            onClosed({ code: 4003, error: sig.lastError });
            break;
          }
          enterCallIfReady();
          break;
        case "mute":
          toggleTrack("audio", button, "mute", "unmute");
          break;
        case "camera":
          toggleTrack("video", button, "camera_off", "camera_on");
          break;
        case "flip":
          flipCamera();
          break;
        case "chat":
          toggleChat(button.getAttribute("aria-pressed") !== "true");
          break;
        case "admit":
          sig.send({ type: "admit" });
          button.hidden = true;
          break;
        case "end":
          if (window.confirm(t("confirm_end"))) sig.send({ type: "end" });
          break;
        case "leave":
          if (window.confirm(t("confirm_leave"))) sig.close(true);
          break;
        case "rejoin":
          window.location.reload();
          break;
        case "consent-yes":
          answerConsent(true);
          break;
        case "consent-no":
          answerConsent(false);
          break;
        case "close-report":
          closeReport();
          break;
        default:
          break;
      }
    });
  }

  // -- the doctor's sidebar -----------------------------------------------------------------

  function setupTabs() {
    const tabs = document.querySelector("[data-tabs]");
    if (!tabs) return;
    tabs.addEventListener("click", (event) => {
      const tab = event.target.closest("[data-tab]");
      if (!tab) return;
      for (const other of tabs.querySelectorAll("[data-tab]")) {
        other.setAttribute("aria-selected", other === tab ? "true" : "false");
      }
      for (const panel of tabs.querySelectorAll("[data-tab-panel]")) {
        panel.hidden = panel.dataset.tabPanel !== tab.dataset.tab;
      }
      if (tab.dataset.tab === "chat") {
        const unread = tab.querySelector("[data-unread]");
        if (unread) unread.hidden = true;
      }
    });
    // Reports open inline (same origin; the server sandboxes them), not in a new tab.
    const panel = tabs.querySelector("[data-tab-panel=reports]");
    const viewer = tabs.querySelector("[data-report-viewer]");
    const frame = tabs.querySelector("[data-report-frame]");
    if (!panel || !viewer || !frame) return;
    panel.addEventListener("click", (event) => {
      const link = event.target.closest("a[href]");
      if (!link) return;
      const href = link.getAttribute("href");
      if (!/^\/reports\/\d+$/.test(href)) return;
      event.preventDefault();
      frame.src = href;
      viewer.hidden = false;
    });
  }

  function closeReport() {
    const viewer = document.querySelector("[data-report-viewer]");
    const frame = document.querySelector("[data-report-frame]");
    if (frame) frame.removeAttribute("src");
    if (viewer) viewer.hidden = true;
  }

  // -- start -----------------------------------------------------------------------------------

  async function hostToken() {
    // The page's token lives ten minutes; a reconnect later in the visit asks for a new one.
    const url = root.dataset.tokenUrl;
    if (!url || !sig || !sig.everOpened) return root.dataset.token;
    const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (!response.ok) return root.dataset.token;
    const body = await response.json();
    root.dataset.token = body.token;
    return body.token;
  }

  async function start() {
    setupTabs();
    if (root.dataset.initial === "ended") {
      finish("ended_room_ended");
      return;
    }
    setupControls();
    setupChat();
    show(isHost ? "call" : "precheck");
    setStatus("connecting");
    setCheck("connect", "pending", "checking");
    await startMedia();
    const scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    const url = scheme + window.location.host + root.dataset.wsPath;
    sig = new window.SignalingClient(url, isHost ? hostToken : () => root.dataset.token);
    window.__consultSignaling = sig;
    sig.addEventListener("open", (event) => {
      serial(() => onWelcome(event.detail.welcome, event.detail.reconnected));
    });
    sig.addEventListener("message", (event) => {
      const message = event.detail;
      if (message.type !== "welcome") serial(() => onMessage(message));
    });
    sig.addEventListener("reconnecting", () => {
      if (ended) return;
      interrupted = true;
      setStatus("reconnecting");
      if (!sig.everOpened) setCheck("connect", "failed", "cannot_connect");
    });
    sig.addEventListener("closed", (event) => serial(() => onClosed(event.detail)));
    // A recorded visit: connect only once this side has answered (and may join).
    showConsent();
    connectIfAllowed();
    statsTimer = setInterval(sendStats, STATS_EVERY_MS);
    setInterval(watchTransport, SILENCE_CHECK_MS);
  }

  start();
})();
