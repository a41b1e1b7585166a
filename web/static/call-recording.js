// Recording (docs/recording.md): when the visit is recorded, both pages ask for consent before
// connecting, and once the server says `recording`, each page opens a second, send-only
// connection to the server carrying its own camera and microphone (the call stays peer to
// peer). The red indicator shows while that connection is up.
// Plain script, no build step; call.js creates it with the call's shared context (`ctx`), and
// this keeps `ctx.rec` (and `window.__consultRecPc`, for tests).
(function () {
  "use strict";

  const Consult = (window.Consult = window.Consult || {});

  Consult.callRecording = function (ctx) {
    const consentBox = ctx.$("[data-recording-consent]");
    const joinButton = ctx.$("[data-action=join]");

    let recordingWanted = false;
    let recRetryTimer = null;

    // -- the recording leg ---------------------------------------------------------------------

    function showRecording(on) {
      ctx.root.dataset.recording = on ? "1" : "0";
      for (const el of ctx.$$("[data-recording-indicator]")) el.hidden = !on;
    }

    function stopRecording() {
      clearTimeout(recRetryTimer);
      recRetryTimer = null;
      showRecording(false);
      if (!ctx.rec) return;
      const old = ctx.rec;
      ctx.rec = null;
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
      const localStream = ctx.localStream;
      if (ctx.ended || !recordingWanted || !localStream || !localStream.getTracks().length) return;
      const sig = ctx.sig;
      const welcome = sig.welcome;
      const conn = new RTCPeerConnection({
        iceServers: welcome.ice_servers || [],
        iceTransportPolicy: welcome.ice_transport_policy === "relay" ? "relay" : "all",
      });
      ctx.rec = conn;
      window.__consultRecPc = conn;
      for (const track of localStream.getTracks()) {
        const transceiver = conn.addTransceiver(track, { direction: "sendonly", streams: [localStream] });
        if (track.kind === "video") capRecordingBitrate(transceiver.sender);
        Consult.preferCodecs(transceiver); // the call's preference: H.264 is recorded as it comes
      }
      let offered = false;
      const early = [];
      conn.onicecandidate = (event) => {
        if (conn !== ctx.rec) return;
        const message = { type: "record_candidate", candidate: event.candidate ? event.candidate.toJSON() : null };
        if (offered) sig.send(message);
        else early.push(message);
      };
      conn.onconnectionstatechange = () => {
        if (conn !== ctx.rec) return;
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
      if (conn !== ctx.rec) return;
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
        if (recordingWanted && !ctx.ended && ctx.sig.state === "open") startRecording();
      }, delay);
    }

    async function onRecordAnswer(message) {
      const rec = ctx.rec;
      if (!rec || rec.signalingState !== "have-local-offer") return;
      try {
        await rec.setRemoteDescription({ type: "answer", sdp: message.sdp });
      } catch (err) {
        console.warn("recording answer refused", err);
        retryRecording(3000);
      }
    }

    function onRecording(message) {
      // The server's `recording` message: record only with this side's consent.
      recordingWanted = !!message.active && consentAnswer() === "yes";
      if (recordingWanted) return startRecording();
      stopRecording();
    }

    function reset() {
      // A new socket (the server says `recording` again if this visit records) or the end.
      recordingWanted = false;
      stopRecording();
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
          error.textContent = ctx.t("consent_failed");
          error.hidden = false;
        }
        return;
      }
      consentBox.dataset.answer = consent ? "yes" : "no";
      showConsent();
      connectIfAllowed();
    }

    function connectIfAllowed() {
      // A recorded visit: connect only once this side has answered (and may join).
      const sig = ctx.sig;
      if (!sig || sig.state !== "idle" || !consentAllowsJoining()) return;
      sig.connect();
    }

    return {
      onRecording,
      onRecordAnswer,
      retry: retryRecording,
      reset,
      showConsent,
      answerConsent,
      connectIfAllowed,
    };
  };
})();
