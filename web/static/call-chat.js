// The call's text chat: the message list, the form, and the patient's chat panel.
// Plain script, no build step; call.js creates it with the call's shared context (`ctx`).
(function () {
  "use strict";

  const Consult = (window.Consult = window.Consult || {});

  Consult.callChat = function (ctx) {
    const chatBox = ctx.$("[data-chat]");
    const chatLog = ctx.$("[data-chat-log]");
    let lastChatSent = 0;

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
      addChat(message.from === (ctx.isHost ? "host" : "guest") ? ctx.t("you") : "", message.text, false);
    }

    function onPeerAbsent() {
      // The server's `peer_absent` error right after sending: the message did not get through.
      if (Date.now() - lastChatSent < 3000) addChat("", ctx.t("chat_failed"), true);
    }

    return { setup: setupChat, toggle: toggleChat, onScreen, onMessage, onPeerAbsent };
  };
})();
