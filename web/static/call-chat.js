// The call's text chat: the message list, the form, and the patient's chat panel.
// Plain script, no build step; call.js creates it with the call's shared context (`ctx`).
(function () {
  "use strict";

  const Consult = (window.Consult = window.Consult || {});

  Consult.callChat = function (ctx) {
    const chatBox = ctx.$("[data-chat]");
    const chatLog = ctx.$("[data-chat-log]");
    let lastChatSent = 0;

    function clockTime(ms) {
      const d = new Date(ms);
      return String(d.getHours()).padStart(2, "0") + ":" + String(d.getMinutes()).padStart(2, "0");
    }

    function addChat(who, text, system, atMs) {
      if (!chatLog) return;
      const item = document.createElement("li");
      item.className = system ? "system" : who ? "mine" : "theirs";
      item.dataset.testid = "chat-message";
      const body = document.createElement("span");
      body.className = "chat-text";
      body.textContent = text;
      // Each message shows when it was sent (HH:MM, the phone's own clock and time zone).
      const when = document.createElement("time");
      when.className = "chat-time";
      when.dataset.testid = "chat-time";
      const at = new Date(atMs || Date.now());
      when.dateTime = at.toISOString();
      when.textContent = clockTime(at.getTime());
      item.append(body, when);
      chatLog.append(item);
      chatLog.scrollTop = chatLog.scrollHeight;
      if (!who && !system) {
        const unread = document.querySelector("[data-unread]");
        const chatTab = document.querySelector("[data-tab=chat]");
        if (unread && chatTab && chatTab.getAttribute("aria-selected") !== "true") unread.hidden = false;
        if (!ctx.isHost && chatBox && chatBox.hidden && ctx.root.dataset.screen === "call") toggleChat(true);
      }
    }

    function setupChat() {
      const form = ctx.$("[data-chat-form]");
      if (!form) return;
      form.addEventListener("submit", (event) => {
        event.preventDefault();
        const input = form.elements.text;
        const text = input.value.trim();
        if (!text) return;
        lastChatSent = Date.now();
        if (ctx.sig.send({ type: "chat", text: text.slice(0, 2000) })) {
          addChat(ctx.t("you"), text, false);
          input.value = "";
        } else {
          addChat("", ctx.t("chat_failed"), true);
        }
      });
    }

    function toggleChat(open) {
      if (!chatBox) return;
      chatBox.dataset.open = open ? "1" : "0";
      chatBox.hidden = !open;
      const button = ctx.$("[data-action=chat]");
      if (button) button.setAttribute("aria-pressed", open ? "true" : "false");
    }

    function onScreen(screen) {
      // The patient's chat panel shows only during the call, and only when opened.
      if (chatBox && !ctx.isHost) chatBox.hidden = screen !== "call" || chatBox.dataset.open !== "1";
    }

    function onMessage(message) {
      // `at`: the server's unix time; the page's clock may differ a little, minutes are enough.
      const atMs = typeof message.at === "number" ? message.at * 1000 : Date.now();
      addChat(message.from === (ctx.isHost ? "host" : "guest") ? ctx.t("you") : "", message.text, false, atMs);
    }

    function onPeerAbsent() {
      // The server's `peer_absent` error right after sending: the message did not get through.
      if (Date.now() - lastChatSent < 3000) addChat("", ctx.t("chat_failed"), true);
    }

    return { setup: setupChat, toggle: toggleChat, onScreen, onMessage, onPeerAbsent };
  };
})();
