// The call's peer-to-peer connection: RTCPeerConnection with "perfect negotiation" (the
// doctor, host, is impolite and makes the offers; the patient, guest, is polite and rolls
// back when offers collide), trickled candidates (with end-of-candidates), ICE restarts when
// ICE fails, stays disconnected for 3 s or the transport falls silent, and the stats samples
// sent to the server. Plain script, no build step; call.js creates it with the call's shared
// context (`ctx`), and this keeps `ctx.pc` (and `window.__consultPc`, for tests and support).
(function () {
  "use strict";

  const Consult = (window.Consult = window.Consult || {});

  const RESTART_AFTER_DISCONNECTED_MS = 3000;
  const RESTART_RETRY_MS = 6000;
  const STATS_EVERY_MS = 5000;
  // Chrome reports "disconnected" only ~6 s after a path dies; silence on the transport
  // (RTP, RTCP and ICE consent checks all count) says so sooner.
  const SILENCE_CHECK_MS = 1000;
  const SILENT_CHECKS = 3;

  Consult.callPeer = function (ctx) {
    const remoteVideo = ctx.$("[data-remote-video]");
    const stageNote = ctx.$("[data-stage-note]");
    const qualityEl = ctx.$("[data-quality]");

    let makingOffer = false;
    let ignoreOffer = false;
    let settingRemoteAnswer = false;
    let negotiated = false; // this pc has completed one offer/answer
    let restartTimer = null;
    let statsTimer = null;
    let lastInbound = null;
    let lastTransportBytes = -1;
    let silentChecks = 0;
    let stalled = false;

    // -- the connection ----------------------------------------------------------------------

    function closePc() {
      clearTimeout(restartTimer);
      restartTimer = null;
      if (!ctx.pc) return;
      const old = ctx.pc;
      ctx.pc = null;
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
      const sig = ctx.sig;
      const welcome = sig.welcome;
      const config = {
        iceServers: welcome.ice_servers || [],
        iceTransportPolicy: welcome.ice_transport_policy === "relay" ? "relay" : "all",
      };
      const conn = new RTCPeerConnection(config);
      ctx.pc = conn;
      window.__consultPc = conn; // for tests and support: harmless, the page already has it
      makingOffer = false;
      ignoreOffer = false;
      settingRemoteAnswer = false;
      negotiated = false;
      lastInbound = null;
      lastTransportBytes = -1;
      silentChecks = 0;
      stalled = false;
      const localStream = ctx.localStream;
      if (localStream && localStream.getTracks().length) {
        for (const track of localStream.getTracks()) conn.addTrack(track, localStream);
      } else {
        conn.addTransceiver("audio", { direction: "recvonly" });
        conn.addTransceiver("video", { direction: "recvonly" });
      }
      for (const transceiver of conn.getTransceivers()) Consult.preferCodecs(transceiver); // H.264 first
      conn.ontrack = (event) => {
        if (conn !== ctx.pc || !remoteVideo) return;
        const stream = event.streams[0] || new MediaStream([event.track]);
        if (remoteVideo.srcObject !== stream) remoteVideo.srcObject = stream;
        if (ctx.joined) remoteVideo.play().catch(() => {});
      };
      conn.onicecandidate = (event) => {
        if (conn !== ctx.pc) return;
        sig.send({ type: "signal", data: { candidate: event.candidate ? event.candidate.toJSON() : null } });
      };
      conn.onnegotiationneeded = async () => {
        // The polite side leaves the first offer to the host; later ones (ICE restarts) are
        // fine either way, collisions are resolved below.
        if (conn !== ctx.pc || (ctx.polite && !negotiated)) return;
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
        if (conn === ctx.pc) onIceState(conn);
      };
      ctx.setStatus("peer_connecting");
      return conn;
    }

    async function onSignal(data) {
      if (ctx.ended) return;
      if (!ctx.pc) newPc();
      const conn = ctx.pc;
      if (data.description) {
        const description = data.description;
        const readyForOffer = !makingOffer && (conn.signalingState === "stable" || settingRemoteAnswer);
        const collision = description.type === "offer" && !readyForOffer;
        ignoreOffer = !ctx.polite && collision;
        if (ignoreOffer) return;
        settingRemoteAnswer = description.type === "answer";
        await conn.setRemoteDescription(description); // rolls back our own offer if needed
        settingRemoteAnswer = false;
        if (description.type === "offer") {
          await conn.setLocalDescription();
          ctx.sig.send({ type: "signal", data: { description: conn.localDescription.toJSON() } });
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

    // -- ICE restarts and recovery -------------------------------------------------------------

    function onIceState(conn) {
      const state = conn.iceConnectionState;
      ctx.sig.send({ type: "ice_state", state: state });
      if (state === "connected" || state === "completed") {
        if (!stalled) recovered();
      } else if (state === "disconnected") {
        ctx.interrupted = true;
        ctx.setStatus("reconnecting");
        scheduleRestart(RESTART_AFTER_DISCONNECTED_MS);
      } else if (state === "failed") {
        ctx.interrupted = true;
        ctx.setStatus("reconnecting");
        restartIce();
      }
    }

    function recovered() {
      clearTimeout(restartTimer);
      restartTimer = null;
      silentChecks = 0;
      stalled = false;
      ctx.setStatus(ctx.interrupted ? "restored" : "in_call");
      ctx.interrupted = false;
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
      const pc = ctx.pc;
      if (!pc || ctx.ended) return;
      const state = pc.iceConnectionState;
      if (!stalled && (state === "connected" || state === "completed")) return;
      ctx.sig.send({ type: "ice_restart" });
      if (typeof pc.restartIce === "function") {
        pc.restartIce(); // fires negotiationneeded: a new offer with fresh ICE credentials
      }
      scheduleRestart(RESTART_RETRY_MS); // and again if this one does not get through
    }

    async function watchTransport() {
      const conn = ctx.pc;
      if (!conn || ctx.ended) return;
      const state = conn.iceConnectionState;
      if (state !== "connected" && state !== "completed") {
        silentChecks = 0;
        return;
      }
      let bytes = 0;
      let transports = 0;
      let otherBytes = 0;
      try {
        (await conn.getStats()).forEach((s) => {
          if (s.type === "transport" && s.bytesReceived !== undefined) {
            transports += 1;
            bytes += s.bytesReceived;
          } else if (s.type === "inbound-rtp" || (s.type === "candidate-pair" && (s.selected || s.nominated))) {
            otherBytes += s.bytesReceived || 0;
          }
        });
      } catch (err) {
        return;
      }
      // Firefox's "transport" stats have no byte counts: the pair's and the media's tell the same.
      if (!transports) bytes = otherBytes;
      if (conn !== ctx.pc) return;
      const flowing = bytes !== lastTransportBytes;
      silentChecks = flowing ? 0 : silentChecks + 1;
      lastTransportBytes = bytes;
      if (silentChecks === SILENT_CHECKS - 1) {
        // Say so early; the other side may well restart ICE first.
        stalled = true;
        ctx.interrupted = true;
        ctx.setStatus("reconnecting");
      } else if (silentChecks === SILENT_CHECKS) {
        restartIce();
      } else if (flowing && stalled) {
        recovered();
      }
    }

    // -- statistics and quality ----------------------------------------------------------------

    async function sendStats() {
      const conn = ctx.pc;
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
      if (conn !== ctx.pc) return;
      if (Object.keys(sample).length) ctx.sig.send({ type: "stats", sample: sample });
      const ice = { type: "ice_state", state: conn.iceConnectionState };
      if (pairType) ice.pair_type = pairType;
      if (rtt !== null) ice.rtt_ms = rtt;
      ctx.sig.send(ice);
      showQuality(sample);
    }

    function showQuality(sample) {
      if (!qualityEl) return;
      const loss = sample.loss_pct || 0;
      const rtt = sample.rtt_ms || 0;
      const level = loss > 8 || rtt > 600 ? "poor" : loss > 2 || rtt > 300 ? "fair" : "good";
      qualityEl.hidden = false;
      qualityEl.dataset.level = level;
      qualityEl.textContent = ctx.t("quality_" + level);
    }

    function startSampling() {
      statsTimer = setInterval(sendStats, STATS_EVERY_MS);
      setInterval(watchTransport, SILENCE_CHECK_MS);
    }

    function stopStats() {
      clearInterval(statsTimer);
    }

    return { newPc, closePc, onSignal, startSampling, stopStats };
  };
})();
