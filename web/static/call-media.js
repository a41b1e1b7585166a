// The call page's own camera and microphone: getUserMedia, the pre-call microphone meter,
// muting, turning the camera off and switching between front and back cameras.
// Plain script, no build step; call.js creates it with the call's shared context (`ctx`),
// and this keeps `ctx.localStream`.
(function () {
  "use strict";

  const Consult = (window.Consult = window.Consult || {});

  // The join's milestones as User Timing marks ("consult:<what>", the first of each name only),
  // for bench/join.py and support: how long the page took to each step of a join.
  const marked = new Set();
  Consult.mark = function (what) {
    if (marked.has(what) || marked.size > 50 || !window.performance || !performance.mark) return;
    marked.add(what);
    try {
      performance.mark("consult:" + what);
    } catch (err) {
      /* a name the browser refuses: no mark */
    }
  };

  // H.264 first when this browser has it, so that two browsers that both have it agree on it
  // (the other side's answer or offer decides what is common; VP8 stays as the fallback):
  // iPhones encode H.264 in hardware. Within H.264, packetization-mode=1 and Constrained
  // Baseline first (what Safari and the server's recorder take). Applied to the call's and the
  // recording leg's video transceivers before their offers and answers. Where the browser
  // lacks setCodecPreferences or getCapabilities (Safari before 13.1), nothing changes.
  Consult.preferCodecs = function (transceiver) {
    const receiver = transceiver.receiver;
    const kind = receiver && receiver.track && receiver.track.kind;
    if (kind !== "video" || typeof transceiver.setCodecPreferences !== "function") return;
    if (!window.RTCRtpReceiver || typeof RTCRtpReceiver.getCapabilities !== "function") return;
    const capabilities = RTCRtpReceiver.getCapabilities("video");
    if (!capabilities || !capabilities.codecs) return;
    const rank = (codec) => {
      if (codec.mimeType.toLowerCase() !== "video/h264") return 9;
      const fmtp = codec.sdpFmtpLine || "";
      return (fmtp.includes("packetization-mode=1") ? 0 : 2) + (fmtp.includes("profile-level-id=42e0") ? 0 : 1);
    };
    const codecs = capabilities.codecs.map((codec, i) => ({ codec, i }));
    codecs.sort((a, b) => rank(a.codec) - rank(b.codec) || a.i - b.i);
    try {
      transceiver.setCodecPreferences(codecs.map((x) => x.codec));
    } catch (err) {
      console.warn("codec preferences refused", err);
    }
  };

  Consult.callMedia = function (ctx) {
    let facing = "user";
    let audioContext = null;

    function showLocal() {
      for (const video of ctx.$$("[data-local-video]")) {
        if (video.srcObject !== ctx.localStream) video.srcObject = ctx.localStream;
      }
    }

    async function startMedia() {
      try {
        ctx.localStream = await navigator.mediaDevices.getUserMedia({
          audio: { echoCancellation: true, noiseSuppression: true },
          video: { facingMode: facing, width: { ideal: 640 }, height: { ideal: 480 } },
        });
        ctx.setCheck("camera", "ok", "camera_ok");
        startMeter(ctx.localStream);
      } catch (err) {
        console.warn("getUserMedia failed", err);
        ctx.localStream = new MediaStream();
        ctx.setCheck("camera", "failed", "camera_failed");
        ctx.setCheck("mic", "failed");
      }
      showLocal();
    }

    function startMeter(stream) {
      const meter = ctx.$("[data-mic-meter]");
      const Ctx = window.AudioContext || window.webkitAudioContext;
      if (!meter || !Ctx || !stream.getAudioTracks().length) return;
      audioContext = new Ctx();
      const analyser = audioContext.createAnalyser();
      analyser.fftSize = 512;
      audioContext.createMediaStreamSource(stream).connect(analyser);
      const samples = new Uint8Array(analyser.fftSize);
      let heard = false;
      const timer = setInterval(() => {
        if (ctx.root.dataset.screen !== "precheck") {
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
          ctx.setCheck("mic", "ok");
        }
      }, 100);
    }

    function resumeAudio() {
      // A click is a user gesture: the meter's audio context may start now.
      if (audioContext && audioContext.state === "suspended") audioContext.resume().catch(() => {});
    }

    function stopMedia() {
      if (ctx.localStream) for (const track of ctx.localStream.getTracks()) track.stop();
      if (audioContext) audioContext.close().catch(() => {});
    }

    function toggleTrack(kind, button, offKey, onKey) {
      const localStream = ctx.localStream;
      if (!localStream) return;
      const tracks = kind === "audio" ? localStream.getAudioTracks() : localStream.getVideoTracks();
      if (!tracks.length) return;
      const enabled = !tracks[0].enabled;
      for (const track of tracks) track.enabled = enabled;
      button.setAttribute("aria-pressed", enabled ? "false" : "true");
      button.textContent = ctx.t(enabled ? offKey : onKey);
    }

    async function flipCamera() {
      if (!ctx.localStream) return;
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
      const localStream = ctx.localStream;
      const track = fresh.getVideoTracks()[0];
      const old = localStream.getVideoTracks()[0];
      if (old) track.enabled = old.enabled;
      // The call and the recording leg (call-peer.js, call-recording.js) both send the camera.
      for (const conn of [ctx.pc, ctx.rec]) {
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

    return { startMedia, resumeAudio, stopMedia, toggleTrack, flipCamera };
  };
})();
