// The patient's call page opens its signaling socket as soon as the protocol library
// (signaling-client.js) has run, without waiting for the other call scripts: the patient shows
// up in the doctor's waiting room (and can be admitted) while the page is still loading. The
// socket only says hello: no camera, no media, no `join` (that is the Join button, call.js).
// A recorded visit asks for consent first (call-recording.js connects after the answer), so
// its page does not connect here.
//
// call.js takes the client over with `Consult.bootSignaling.take(listeners)`: the events that
// came before (welcome, admitted, ...) are handed to its listeners first, in order.
(function () {
  "use strict";

  const root = document.querySelector("[data-call]");
  if (!root || root.dataset.role !== "guest" || !window.SignalingClient) return;
  if (root.querySelector("[data-recording-consent]")) return;
  const Consult = (window.Consult = window.Consult || {});
  const TYPES = ["open", "message", "reconnecting", "closed"];

  const scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
  const sig = new window.SignalingClient(scheme + window.location.host + root.dataset.wsPath, () => root.dataset.token);
  const missed = [];
  const keep = (event) => missed.push(event);
  for (const type of TYPES) sig.addEventListener(type, keep);

  Consult.bootSignaling = {
    sig: sig,
    // listeners: {open, message, reconnecting, closed}: each gets the events it missed, then
    // the client's events as they come.
    take(listeners) {
      Consult.bootSignaling = null;
      for (const type of TYPES) {
        sig.removeEventListener(type, keep);
        if (listeners[type]) sig.addEventListener(type, listeners[type]);
      }
      for (const event of missed.splice(0)) {
        if (listeners[event.type]) listeners[event.type](event);
      }
      return sig;
    },
  };
  if (Consult.mark) Consult.mark("socket");
  sig.connect();
})();
