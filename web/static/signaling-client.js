// The signaling protocol (docs/protocol.md) for browsers: hello/welcome, send, events, and
// reconnection with backoff. No UI and no WebRTC here; call.js builds on it.
//
//   const sig = new SignalingClient(wsUrl, () => token);
//   sig.addEventListener("open", (e) => e.detail.welcome, e.detail.reconnected);
//   sig.addEventListener("message", (e) => e.detail);   // every server message
//   sig.addEventListener("clock", (e) => ...);          // or one event per message type
//   sig.addEventListener("reconnecting", (e) => e.detail.delay);
//   sig.addEventListener("closed", (e) => e.detail.code, e.detail.error);  // final
//   sig.connect();  sig.send({type: "chat", text: "hi"});  sig.close();
//   await sig.probe(1000);   // true if the socket answered a ping in time; else it is replaced
//
// Every page instance has its own random `instance` id, sent in each hello: the other side
// keeps its media when this page merely reconnects (docs/protocol.md, "Media survives
// signaling").
(function (global) {
  "use strict";

  const PROTOCOL_VERSION = 1;
  // Close codes after which reconnecting would be wrong (ended, replaced, refused). 1000 is
  // final only after our own "leave": the server sends it for nothing else.
  const FINAL_CODES = new Set([4000, 4001, 4002, 4003]);

  class SignalingClient extends EventTarget {
    // getToken: () => string | Promise<string>, asked before every hello (a token may expire).
    constructor(url, getToken, options) {
      super();
      const o = options || {};
      this.url = url;
      this.getToken = getToken;
      this.minDelayMs = o.minDelayMs || 500;
      this.maxDelayMs = o.maxDelayMs || 8000;
      this.instance = o.instance || randomId();
      this.helloTimeoutMs = o.helloTimeoutMs || 10000;
      this.pingIntervalMs = o.pingIntervalMs || 10000;
      // No message for this long (pongs included) means a dead path, e.g. a phone that
      // changed networks: the TCP connection may take minutes to notice by itself.
      this.silenceMs = o.silenceMs || 25000;
      this.ws = null;
      this.state = "idle"; // idle | connecting | open | reconnecting | closed
      this.welcome = null;
      this.attempt = 0;
      this.everOpened = false;
      this.lastError = null;
      this._timer = null;
      this._pinger = null;
      this._lastHeard = 0;
      this._stopped = false;
      this._leaving = false;
      this._probes = [];
      this._onOnline = () => {
        if (this.state === "reconnecting") this._retryNow();
      };
      global.addEventListener("online", this._onOnline);
    }

    _emit(type, detail) {
      this.dispatchEvent(new CustomEvent(type, { detail: detail }));
    }

    connect() {
      if (this._stopped || this.ws) return;
      this._open();
    }

    get isOpen() {
      return this.state === "open" && this.ws !== null && this.ws.readyState === WebSocket.OPEN;
    }

    // Send one message; false when not connected (callers decide whether that matters).
    send(message) {
      if (!this.isOpen) return false;
      this.ws.send(JSON.stringify(message));
      return true;
    }

    // Stop for good: no reconnect. With `leave`, tell the server first (the visit goes on
    // and can be rejoined); it answers by closing with 1000, which ends in "closed".
    close(leave) {
      const canLeave = leave && this.isOpen;
      if (canLeave) {
        this._leaving = true;
        this.send({ type: "leave" });
      }
      this._stopped = true;
      this._clearTimers();
      global.removeEventListener("online", this._onOnline);
      if (canLeave) return;
      const ws = this.ws;
      this.ws = null;
      if (ws) ws.close(1000);
      this._final(1000, "closed by the page");
    }

    _clearTimers() {
      clearTimeout(this._timer);
      clearInterval(this._pinger);
      this._timer = null;
      this._pinger = null;
    }

    async _open() {
      this.state = this.everOpened ? "reconnecting" : "connecting";
      let ws;
      try {
        ws = new WebSocket(this.url);
      } catch (err) {
        this._scheduleReconnect(0, String(err));
        return;
      }
      this.ws = ws;
      let welcomed = false;
      const helloTimer = setTimeout(() => {
        if (!welcomed && this.ws === ws) this._abandon(ws, "hello timeout");
      }, this.helloTimeoutMs);

      ws.onopen = async () => {
        let token;
        try {
          token = await this.getToken();
        } catch (err) {
          this._abandon(ws, "no token");
          return;
        }
        if (this.ws === ws && ws.readyState === WebSocket.OPEN) {
          const hello = { type: "hello", version: PROTOCOL_VERSION, token: token, instance: this.instance };
          ws.send(JSON.stringify(hello));
        }
      };
      ws.onmessage = (event) => {
        if (this.ws !== ws) return;
        this._lastHeard = Date.now();
        this._settleProbes(true);
        let message;
        try {
          message = JSON.parse(event.data);
        } catch (err) {
          return;
        }
        if (!message || typeof message.type !== "string") return;
        if (message.type === "welcome") {
          welcomed = true;
          clearTimeout(helloTimer);
          const reconnected = this.everOpened;
          this.everOpened = true;
          this.attempt = 0;
          this.welcome = message;
          this.state = "open";
          this._startPinger(ws);
          this._emit("open", { welcome: message, reconnected: reconnected });
        } else if (message.type === "error" && !welcomed) {
          this.lastError = message;
        }
        this._emit("message", message);
        this._emit(message.type, message);
      };
      ws.onclose = (event) => {
        clearTimeout(helloTimer);
        if (this.ws !== ws) return; // abandoned or replaced by ourselves already
        this.ws = null;
        clearInterval(this._pinger);
        if (this._stopped || FINAL_CODES.has(event.code) || (this._leaving && event.code === 1000)) {
          this._final(event.code, event.reason);
        } else {
          this._scheduleReconnect(event.code, event.reason);
        }
      };
    }

    // Is this socket alive? Sends a ping and resolves true when anything arrives within
    // `timeoutMs`; otherwise the socket is given up (a dead path, e.g. after a network
    // switch: send() would still return true) and a new one is opened at once. Resolves
    // false too when there is no open socket.
    probe(timeoutMs) {
      const ws = this.ws;
      if (!this.isOpen) {
        if (this.state === "reconnecting") this._retryNow();
        return Promise.resolve(false);
      }
      return new Promise((resolve) => {
        const entry = { resolve: resolve, timer: null };
        entry.timer = setTimeout(() => {
          this._probes = this._probes.filter((p) => p !== entry);
          resolve(false);
          if (this.ws === ws) {
            this._abandon(ws, "probe unanswered");
            this._retryNow();
          }
        }, timeoutMs);
        this._probes.push(entry);
        ws.send(JSON.stringify({ type: "ping" }));
      });
    }

    _settleProbes(answered) {
      const probes = this._probes;
      this._probes = [];
      for (const p of probes) {
        clearTimeout(p.timer);
        p.resolve(answered);
      }
    }

    _startPinger(ws) {
      clearInterval(this._pinger);
      this._lastHeard = Date.now();
      this._pinger = setInterval(() => {
        if (this.ws !== ws) return;
        if (Date.now() - this._lastHeard > this.silenceMs) {
          this._abandon(ws, "silent");
          return;
        }
        if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "ping" }));
      }, this.pingIntervalMs);
    }

    // Give up on a socket without waiting for its closing handshake (which a dead path
    // would never complete) and reconnect.
    _abandon(ws, why) {
      if (this.ws !== ws) return;
      this.ws = null;
      clearInterval(this._pinger);
      this._settleProbes(false);
      try {
        ws.close();
      } catch (err) {
        /* already closed */
      }
      this._scheduleReconnect(1006, why);
    }

    _scheduleReconnect(code, reason) {
      if (this._stopped) return;
      this.state = "reconnecting";
      const base = Math.min(this.maxDelayMs, this.minDelayMs * Math.pow(2, this.attempt));
      const delay = Math.round(base / 2 + Math.random() * (base / 2)); // jitter: no thundering herd
      this.attempt += 1;
      this._emit("reconnecting", { code: code, reason: reason, attempt: this.attempt, delay: delay });
      clearTimeout(this._timer);
      this._timer = setTimeout(() => this._open(), delay);
    }

    _retryNow() {
      clearTimeout(this._timer);
      this._timer = null;
      if (!this.ws && !this._stopped) this._open();
    }

    _final(code, reason) {
      if (this.state === "closed") return;
      this.state = "closed";
      this._clearTimers();
      this._emit("closed", { code: code, reason: reason, error: this.lastError });
    }
  }

  function randomId() {
    const bytes = new Uint8Array(12);
    global.crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  global.SignalingClient = SignalingClient;
})(window);
