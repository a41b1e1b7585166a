// The call's peer-to-peer connection: RTCPeerConnection with "perfect negotiation" (the
// doctor, host, is impolite and makes the offers; the patient, guest, is polite and rolls
// back when offers collide), trickled candidates (with end-of-candidates), liveness and ICE
// restarts, the quality verdict and audio-only mode, and the stats samples sent to the
// server. Plain script, no build step; call.js creates it with the call's shared context
// (`ctx`), and this keeps `ctx.pc` (and `window.__consultPc`, for tests and support).
//
// Liveness: the transport is checked every 500 ms; after 1 s without a byte received the
// media has stalled. The signaling socket is probed first (a ping answered within 1 s, or a
// new socket), then ICE restarts, so the restart offer never goes into a dead socket. The
// page says "restored" only once frames are decoded again (the receiver asks for a keyframe
// by itself: PLI). The peer connection does not depend on the socket: it lives through a
// signaling outage (docs/protocol.md, "Media survives signaling").
//
// Quality: every 2 s this side judges its uplink (outbound limitation, available outgoing
// bitrate, loss and round trip reported by the other side) and what it receives (frame rate,
// height, freezes, loss), tells the other side its uplink verdict (`quality`), and shows the
// worse of all three. When poor, audio only is offered; under AUDIO_ONLY_BELOW_BPS it is
// applied by itself; both sides then stop sending video and say so. Once a person on either side
// has turned video back on, neither page switches by itself again in this call: the person's
// choice wins over this side's verdicts, which also lag behind the network (the bandwidth
// estimate climbs back over seconds after a starved spell). Audio is protected first:
// RED preferred when the browser has it, Opus in-band FEC, audio sent with high priority, a
// video bitrate cap for phones and "balanced" degradation.
(function () {
  "use strict";

  const Consult = (window.Consult = window.Consult || {});

  const RESTART_AFTER_DISCONNECTED_MS = 3000;
  const RESTART_RETRY_MS = 3000;
  const STATS_EVERY_MS = 5000;
  const QUALITY_EVERY_MS = 2000;
  // Chrome reports "disconnected" only ~6 s after a path dies; silence on the transport
  // (RTP, RTCP and ICE consent checks all count) says so sooner.
  const SILENCE_CHECK_MS = 500;
  const SILENT_CHECKS = 2;
  const PROBE_MS = 1000;
  // A phone's video: enough for a face at 640x480, leaving room for audio on weak uplinks.
  const VIDEO_MAX_BITRATE = 800000;
  // Uplink verdicts from the available outgoing bitrate (bits/s).
  const POOR_BELOW_BPS = 200000;
  const FAIR_BELOW_BPS = 500000;
  const AUDIO_ONLY_BELOW_BPS = 100000;
  const LEVELS = ["good", "fair", "poor"];
  // The doctor's page prepares its connection (tracks, offer, candidates) while the patient
  // waits, and sends it the moment the patient is in the call; one older than this is made
  // afresh instead (TURN credentials and allocations age).
  const HELD_MAX_MS = 60000;

  // What the connection went through (the last 100 steps, ms since the page started), for
  // support and the network tests: window.__consultTrace.
  const trace = (window.__consultTrace = []);
  function note(what) {
    trace.push(Math.round(performance.now()) + " " + what);
    if (trace.length > 100) trace.shift();
    Consult.mark(what);
  }

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
    let probing = false;
    let keyframeKicked = false; // once per stall: see sendKeyframe
    let stallPair = null; // the candidate pair that went silent
    let lastFrames = -1;
    let lastAudioPackets = -1;
    let qualityTimer = null;
    let lastQualityReport = null;
    let lastFreezes = null;
    let myUplink = "good";
    let peerUplink = "good";
    let downlink = "good";
    let upHistory = [0, 0];
    let downHistory = [0, 0];
    let verySlow = 0; // consecutive verdicts under AUDIO_ONLY_BELOW_BPS
    let lastToldUplink = null;
    let toldAt = 0;
    let peerAudioOnly = false; // the other side's last word on audio only
    // Signals of a connection prepared ahead (newPc({hold: true})): kept here, not sent, until
    // release(); null when not holding. The server relays none before the patient's Join anyway.
    let held = null;
    let heldSince = 0;
    ctx.audioOnly = false;
    ctx.audioOnlyAuto = false; // switched by itself: the user may turn video back on
    ctx.audioOnlyDeclined = false; // a person turned video back on: no switching by itself

    // -- the connection ----------------------------------------------------------------------

    function closePc() {
      clearTimeout(restartTimer);
      restartTimer = null;
      held = null;
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

    function sendSignal(data) {
      if (held) held.push(data);
      else ctx.sig.send({ type: "signal", data: data });
    }

    // `hold`: prepare the connection but keep its offer and candidates until release().
    function newPc(options) {
      closePc();
      const sig = ctx.sig;
      if (options && options.hold) {
        held = [];
        heldSince = Date.now();
      }
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
      lastFrames = -1;
      lastAudioPackets = -1;
      silentChecks = 0;
      stalled = false;
      probing = false;
      lastFreezes = null;
      upHistory = [0, 0];
      downHistory = [0, 0];
      const localStream = ctx.localStream;
      if (localStream && localStream.getTracks().length) {
        for (const track of localStream.getTracks()) conn.addTrack(track, localStream);
      } else {
        conn.addTransceiver("audio", { direction: "recvonly" });
        conn.addTransceiver("video", { direction: "recvonly" });
      }
      preferAudioRed(conn);
      for (const transceiver of conn.getTransceivers()) Consult.preferCodecs(transceiver); // H.264 first
      conn.ontrack = (event) => {
        if (conn !== ctx.pc || !remoteVideo) return;
        const stream = event.streams[0] || new MediaStream([event.track]);
        if (remoteVideo.srcObject !== stream) remoteVideo.srcObject = stream;
        if (ctx.joined) remoteVideo.play().catch(() => {});
      };
      conn.onicecandidate = (event) => {
        if (conn !== ctx.pc) return;
        sendSignal({ candidate: event.candidate ? event.candidate.toJSON() : null });
      };
      conn.onnegotiationneeded = async () => {
        // The polite side leaves the first offer to the host; later ones (ICE restarts) are
        // fine either way, collisions are resolved below.
        if (conn !== ctx.pc || (ctx.polite && !negotiated)) return;
        try {
          makingOffer = true;
          await conn.setLocalDescription();
          note("offer sent");
          // Not sent if the socket is down: onSignalingBack sends the pending offer again.
          sendSignal({ description: conn.localDescription.toJSON() });
        } catch (err) {
          console.warn("offer failed", err);
        } finally {
          makingOffer = false;
        }
      };
      conn.oniceconnectionstatechange = () => {
        if (conn === ctx.pc) onIceState(conn);
      };
      if (!held) ctx.setStatus("peer_connecting");
      return conn;
    }

    // The other side is in the call: a connection prepared ahead sends what it held (its offer
    // and candidates, in order); none, or one too old, is made now.
    function release() {
      if (!held || !ctx.pc || Date.now() - heldSince > HELD_MAX_MS) {
        newPc();
        return;
      }
      const out = held;
      held = null;
      note("held offer released");
      for (const data of out) ctx.sig.send({ type: "signal", data: data });
      ctx.setStatus("peer_connecting");
    }

    function holding() {
      return held !== null && !!ctx.pc;
    }

    async function onSignal(data) {
      if (ctx.ended) return;
      if (!ctx.pc) newPc();
      const conn = ctx.pc;
      if (data.description) {
        const description = data.description;
        note(description.type + " received");
        const readyForOffer = !makingOffer && (conn.signalingState === "stable" || settingRemoteAnswer);
        const collision = description.type === "offer" && !readyForOffer;
        ignoreOffer = !ctx.polite && collision;
        if (ignoreOffer) return;
        settingRemoteAnswer = description.type === "answer";
        // rolls back our own offer if needed
        await conn.setRemoteDescription({ type: description.type, sdp: withOpusFec(description.sdp) });
        settingRemoteAnswer = false;
        if (description.type === "offer") {
          await conn.setLocalDescription();
          ctx.sig.send({ type: "signal", data: { description: conn.localDescription.toJSON() } });
        }
        negotiated = true;
        tuneSenders(conn);
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
      note("ice " + state);
      ctx.sig.send({ type: "ice_state", state: state });
      if (state === "connected" || state === "completed") {
        // After an interruption "restored" waits for decoded frames (watchTransport).
        if (!stalled && !ctx.interrupted) recovered();
        else kickOnce(conn);
      } else if (state === "disconnected") {
        keyframeKicked = false;
        ctx.interrupted = true;
        ctx.setStatus("reconnecting");
        scheduleRestart(RESTART_AFTER_DISCONNECTED_MS);
      } else if (state === "failed") {
        keyframeKicked = false;
        ctx.interrupted = true;
        ctx.setStatus("reconnecting");
        restartIce();
      }
    }

    function recovered() {
      note("decoding");
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
      note("ice restart (" + pc.signalingState + ")");
      ctx.sig.send({ type: "ice_restart" });
      if (pc.signalingState === "have-local-offer") {
        resendOffer(pc); // the last offer (maybe already a restart) got no answer
      } else if (typeof pc.restartIce === "function") {
        pc.restartIce(); // fires negotiationneeded: a new offer with fresh ICE credentials
      }
      scheduleRestart(RESTART_RETRY_MS); // and again if this one does not get through
    }

    // The path is back after a stall: the other side's decoder needs a keyframe, and its own
    // request (PLI) comes only once retransmissions were given up. Pausing the video encoding
    // for a moment restarts the encoder, which starts with a keyframe.
    async function sendKeyframe(conn) {
      if (ctx.audioOnly) return;
      for (const sender of conn.getSenders()) {
        if (!sender.track || sender.track.kind !== "video") continue;
        try {
          const params = sender.getParameters();
          if (!params.encodings || !params.encodings.length) continue;
          for (const encoding of params.encodings) encoding.active = false;
          await sender.setParameters(params);
          const again = sender.getParameters();
          for (const encoding of again.encodings) encoding.active = !ctx.audioOnly;
          await sender.setParameters(again);
          note("keyframe asked of the encoder");
        } catch (err) {
          console.warn("keyframe", err);
        }
      }
    }

    function kickOnce(conn) {
      if (keyframeKicked) return;
      keyframeKicked = true;
      sendKeyframe(conn);
    }

    function resendOffer(pc) {
      if (pc.localDescription && pc.localDescription.type === "offer") {
        ctx.sig.send({ type: "signal", data: { description: pc.localDescription.toJSON() } });
      }
    }

    // Media stalled: make sure the signaling socket is alive (or replaced) before the restart
    // offer goes out; with a new socket the restart happens in onSignalingBack.
    async function onStall() {
      if (probing || !ctx.sig) return;
      probing = true;
      note("stalled: probing the socket");
      const alive = await ctx.sig.probe(PROBE_MS);
      note(alive ? "socket alive" : "socket dead: replaced");
      probing = false;
      if (alive && stalled) restartIce();
    }

    // A new signaling socket (welcome) while this page kept its peer connection.
    function onSignalingBack() {
      const pc = ctx.pc;
      if (!pc || ctx.ended) return;
      note("signaling back");
      if (stalled || pc.iceConnectionState === "failed" || pc.iceConnectionState === "disconnected") {
        restartIce();
      } else if (pc.signalingState === "have-local-offer") {
        resendOffer(pc);
      }
    }

    // Media is arriving right now (the signaling socket may be down meanwhile).
    function mediaFlowing() {
      const pc = ctx.pc;
      if (!pc || stalled) return false;
      const state = pc.iceConnectionState;
      return (state === "connected" || state === "completed") && lastTransportBytes > 0;
    }

    async function watchTransport() {
      const conn = ctx.pc;
      if (!conn || ctx.ended) return;
      let bytes = 0;
      let frames = 0;
      let audioPackets = 0;
      let pairId = null;
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
          if (s.type === "transport" && s.selectedCandidatePairId) pairId = s.selectedCandidatePairId;
          // Firefox names its selected pair on the pair itself, not on a transport.
          if (s.type === "candidate-pair" && s.selected && !pairId) pairId = s.id;
          if (s.type === "inbound-rtp" && s.kind === "video") frames += s.framesDecoded || 0;
          if (s.type === "inbound-rtp" && s.kind === "audio") audioPackets += s.packetsReceived || 0;
        });
      } catch (err) {
        return;
      }
      // Firefox's "transport" stats have no byte counts: the pair's and the media's tell the same.
      if (!transports) bytes = otherBytes;
      if (conn !== ctx.pc) return;
      const flowing = bytes !== lastTransportBytes;
      lastTransportBytes = bytes;
      // Decoding again: video frames, or audio in audio-only mode (no video comes then).
      const decoding =
        (lastFrames >= 0 && frames > lastFrames) ||
        (ctx.audioOnly && lastAudioPackets >= 0 && audioPackets > lastAudioPackets);
      lastFrames = frames;
      lastAudioPackets = audioPackets;
      const state = conn.iceConnectionState;
      const up = state === "connected" || state === "completed";
      // Media arrives again over a new path (ICE restarted): our video needs a keyframe too.
      if (stalled && up && flowing && pairId && pairId !== stallPair) kickOnce(conn);
      if ((stalled || ctx.interrupted) && up && decoding) {
        recovered();
        return;
      }
      if (!up) {
        silentChecks = 0;
        return;
      }
      silentChecks = flowing ? 0 : silentChecks + 1;
      if (silentChecks === SILENT_CHECKS) {
        stalled = true;
        keyframeKicked = false;
        stallPair = pairId;
        ctx.interrupted = true;
        ctx.setStatus("reconnecting");
        onStall();
      }
    }

    // -- statistics and quality ----------------------------------------------------------------

    async function sendStats() {
      const conn = ctx.pc;
      if (!conn || held) return;
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
    }

    // -- quality verdicts and audio only --------------------------------------------------------

    async function assessQuality() {
      const conn = ctx.pc;
      if (!conn || ctx.ended || !negotiated) return;
      let report;
      try {
        report = await conn.getStats();
      } catch (err) {
        return;
      }
      if (conn !== ctx.pc) return;
      let out = null;
      let inVideo = null;
      let pair = null;
      let remoteLoss = 0;
      let remoteRtt = 0;
      report.forEach((s) => {
        if (s.type === "outbound-rtp" && s.kind === "video") out = s;
        if (s.type === "inbound-rtp" && s.kind === "video") inVideo = s;
        if (s.type === "candidate-pair" && s.nominated && s.state === "succeeded") pair = s;
        if (s.type === "remote-inbound-rtp") {
          remoteLoss = Math.max(remoteLoss, s.fractionLost || 0);
          remoteRtt = Math.max(remoteRtt, s.roundTripTime || 0);
        }
      });
      report.forEach((s) => {
        if (s.type === "transport" && s.selectedCandidatePairId) pair = report.get(s.selectedCandidatePairId) || pair;
      });
      const available = pair && pair.availableOutgoingBitrate;
      const limited = out && out.qualityLimitationReason === "bandwidth";
      const sentHeight = (out && out.frameHeight) || 0;
      // Uplink: what this side can send. A low estimate counts only while the encoder is held
      // back by bandwidth (not while it is just ramping up at the start of a call).
      let up = 0;
      if (limited && available && available < POOR_BELOW_BPS) up = 2;
      else if (limited && available && available < FAIR_BELOW_BPS) up = 1;
      if (limited && sentHeight && sentHeight <= 180) up = Math.max(up, 2);
      if (remoteLoss > 0.1 || remoteRtt > 1) up = 2;
      else if (remoteLoss > 0.03 || remoteRtt > 0.4) up = Math.max(up, 1);
      // Downlink: what arrives here (not while the call is audio only: no video comes).
      let down = 0;
      if (inVideo && !ctx.audioOnly && lastQualityReport) {
        const before = lastQualityReport.get(inVideo.id);
        const fps = inVideo.framesPerSecond || 0;
        const height = inVideo.frameHeight || 0;
        const freezes = inVideo.freezeCount || 0;
        if (before) {
          const got = inVideo.packetsReceived - before.packetsReceived;
          const lost = inVideo.packetsLost - before.packetsLost;
          const loss = got + lost > 0 ? lost / (got + lost) : 0;
          if (loss > 0.08 || fps < 5 || (height && height < 180)) down = 2;
          else if (loss > 0.02 || fps < 10 || (lastFreezes !== null && freezes > lastFreezes)) down = 1;
        }
        lastFreezes = freezes;
      }
      lastQualityReport = report;
      // A verdict holds once seen twice in a row (4 s): one bad reading is not a bad network.
      upHistory = [up, upHistory[0]];
      downHistory = [down, downHistory[0]];
      myUplink = LEVELS[Math.min(upHistory[0], upHistory[1])];
      downlink = LEVELS[Math.min(downHistory[0], downHistory[1])];
      verySlow = limited && available && available < AUDIO_ONLY_BELOW_BPS ? verySlow + 1 : 0;
      if (verySlow >= 2 && !ctx.audioOnly && !ctx.audioOnlyDeclined) setAudioOnly(true, true);
      tellUplink(false);
      showLevel();
    }

    function tellUplink(force) {
      const now = Date.now();
      if (!force && myUplink === lastToldUplink && now - toldAt < 10000) return;
      if (ctx.sig && ctx.sig.send({ type: "quality", uplink: myUplink, audio_only: ctx.audioOnly })) {
        lastToldUplink = myUplink;
        toldAt = now;
      }
    }

    // The other side's uplink verdict (and its audio-only switch), relayed by the server.
    function onPeerQuality(message) {
      peerUplink = LEVELS.includes(message.uplink) ? message.uplink : "good";
      // Follow the other side's switch when it changes it (its periodic reports may cross
      // this side's own switch in flight).
      const theirs = message.audio_only === true;
      if (theirs !== peerAudioOnly && theirs !== ctx.audioOnly) setAudioOnly(theirs, false, true);
      peerAudioOnly = theirs;
      showLevel();
    }

    function showLevel() {
      const worst = Math.max(LEVELS.indexOf(myUplink), LEVELS.indexOf(peerUplink), LEVELS.indexOf(downlink));
      const level = LEVELS[worst];
      if (qualityEl) {
        qualityEl.hidden = false;
        qualityEl.dataset.level = level;
        // Which side's network is the problem: this page's uplink or the other's.
        qualityEl.dataset.poorSide =
          myUplink === "poor" ? "self" : peerUplink === "poor" ? "peer" : downlink === "poor" ? "path" : "";
        qualityEl.textContent = ctx.t("quality_" + level);
      }
      if (ctx.onQuality) ctx.onQuality(level);
    }

    // Audio only for the whole call: neither side sends video (the encodings are switched
    // off, the tracks stay, so video comes back without renegotiating). `auto`: applied by
    // itself; `fromPeer`: the other side switched, nothing to announce back.
    async function setAudioOnly(on, auto, fromPeer) {
      ctx.audioOnly = on;
      ctx.audioOnlyAuto = on && auto === true;
      // Video back on is always a person's choice, on this side or the other (no page turns it
      // back by itself): neither page switches by itself again, whatever its verdicts say.
      if (!on) ctx.audioOnlyDeclined = true;
      // The button shows the switch in the same turn as ctx.audioOnly changes: a tap toggles
      // what the button says, never a switch still waiting on setParameters.
      if (ctx.onAudioOnly) ctx.onAudioOnly(on, ctx.audioOnlyAuto);
      const pc = ctx.pc;
      if (pc) {
        for (const sender of pc.getSenders()) {
          if (!sender.track || sender.track.kind !== "video") continue;
          const params = sender.getParameters();
          if (!params.encodings || !params.encodings.length) continue;
          for (const encoding of params.encodings) encoding.active = !on;
          try {
            await sender.setParameters(params);
          } catch (err) {
            console.warn("audio only: setParameters failed", err);
          }
        }
      }
      // Also when following the other side: its echo tells it that this side switched too.
      if (fromPeer) peerAudioOnly = on;
      tellUplink(true);
    }

    // -- protecting audio ------------------------------------------------------------------------

    // RED (redundant audio) first when this browser has it: a lost packet is rebuilt from the
    // next. Opus stays next in line for browsers (and answers) without RED.
    function preferAudioRed(conn) {
      const caps = window.RTCRtpReceiver && RTCRtpReceiver.getCapabilities && RTCRtpReceiver.getCapabilities("audio");
      if (!caps || !caps.codecs) return;
      const red = caps.codecs.filter((c) => c.mimeType.toLowerCase() === "audio/red");
      if (!red.length) return;
      const rest = caps.codecs.filter((c) => c.mimeType.toLowerCase() !== "audio/red");
      for (const t of conn.getTransceivers()) {
        const kind = (t.sender.track && t.sender.track.kind) || (t.receiver.track && t.receiver.track.kind);
        if (kind !== "audio" || typeof t.setCodecPreferences !== "function") continue;
        try {
          t.setCodecPreferences([...red, ...rest]);
        } catch (err) {
          console.warn("setCodecPreferences", err);
        }
      }
    }

    // The other side's description says how this side encodes: ask for Opus in-band FEC (the
    // encoder then protects speech in proportion to the loss it is told about). No DTX: its
    // silent gaps would look like a stalled transport in audio-only calls.
    function withOpusFec(sdp) {
      if (!sdp) return sdp;
      const pts = [];
      sdp.replace(/a=rtpmap:(\d+) opus\/48000/gi, (m, pt) => pts.push(pt));
      let out = sdp;
      for (const pt of pts) {
        out = out.replace(new RegExp("(a=fmtp:" + pt + " )([^\\r\\n]*)"), (m, head, params) =>
          /useinbandfec=1/.test(params) ? m : head + params + ";useinbandfec=1"
        );
      }
      return out;
    }

    async function tuneSenders(conn) {
      for (const sender of conn.getSenders()) {
        if (!sender.track) continue;
        const params = sender.getParameters();
        if (!params.encodings || !params.encodings.length) continue;
        const video = sender.track.kind === "video";
        for (const encoding of params.encodings) {
          if (video) {
            encoding.maxBitrate = VIDEO_MAX_BITRATE;
            encoding.active = !ctx.audioOnly;
          }
          encoding.priority = video ? "low" : "high";
          encoding.networkPriority = video ? "low" : "high";
        }
        if (video) params.degradationPreference = "balanced";
        try {
          await sender.setParameters(params);
        } catch (err) {
          console.warn("setParameters", err);
        }
      }
    }

    function startSampling() {
      statsTimer = setInterval(sendStats, STATS_EVERY_MS);
      qualityTimer = setInterval(assessQuality, QUALITY_EVERY_MS);
      setInterval(watchTransport, SILENCE_CHECK_MS);
    }

    function stopStats() {
      clearInterval(statsTimer);
      clearInterval(qualityTimer);
    }

    return {
      newPc,
      release,
      holding,
      closePc,
      onSignal,
      startSampling,
      stopStats,
      onSignalingBack,
      mediaFlowing,
      onPeerQuality,
      setAudioOnly,
    };
  };
})();
