/*! learnloop chat widget. One tag on any page:
 *   <script src="https://HOST/widget.js" data-server="wss://HOST" data-site="shop" async></script>
 * Optional: data-user + data-user-hash (a verified customer), data-lang (en, zh; else the page's
 * lang), data-theme (light, dark, auto), data-title. Protocol: docs/protocol.md. Styles live in
 * a shadow root as a constructable stylesheet, so a strict CSP (style-src 'self') allows them.
 *
 * Delivery: every message and rating waits in an outbox (kept in localStorage) until the server
 * acknowledges it. A message is acked as ack {id: client_id, message_id} once stored; one that
 * was sent but not acked when the socket dropped is sent again, with the same client_id, after
 * the next ready. Messages go one at a time, in order, each after the previous reply is done.
 * Ratings are resent with the same id, which the server stores once. The server does not dedupe
 * messages: if a connection drops after the store and before the ack arrives, the resent
 * message is stored twice (at least once, never lost).
 */
(() => {
  "use strict";
  const me = document.currentScript;
  if (!me || window.__learnloopWidget) return;
  window.__learnloopWidget = 1;
  const d = me.dataset;
  const SITE = d.site || "";
  const USER = d.user || "";
  const LANG = /^zh/i.test(d.lang || document.documentElement.lang || "") ? "zh" : "en";
  const SERVER = d.server || new URL(me.src, location.href).origin.replace(/^http/, "ws");
  const KEY = `learnloop:${SITE}:${USER}`;
  const T = {
    en: {
      title: "Chat with us", open: "Open chat", close: "Close chat", log: "Conversation", input: "Message",
      placeholder: "Type a message…", send: "Send", stop: "Stop the reply", you: "You", bot: "Assistant",
      agent: "Agent (human)", up: "Good reply", down: "Bad reply", regen: "Regenerate the reply",
      why: "What was wrong?", comment: "Tell us more (optional)", submit: "Send feedback", skip: "Skip",
      thanks: "Thanks for your feedback", connecting: "Connecting…", online: "Online",
      offline: "Reconnecting… your messages will be sent when the connection is back.",
      queued: "Waiting to send", stopped: "Stopped", cut: "Interrupted: the connection dropped",
      joined: "A human agent joined the conversation.", left: "The agent left; the assistant answers again.",
      failed: "No reply this time. Please try again.", refused: "Chat is not available on this page",
      reasons: { incorrect: "Incorrect", unhelpful: "Not helpful", unclear: "Hard to understand", incomplete: "Incomplete", other: "Other" },
    },
    zh: {
      title: "在线咨询", open: "打开聊天", close: "关闭聊天", log: "对话", input: "消息",
      placeholder: "输入消息…", send: "发送", stop: "停止回复", you: "你", bot: "智能助手",
      agent: "人工客服", up: "回答有帮助", down: "回答没帮助", regen: "重新生成回答",
      why: "哪里有问题？", comment: "补充说明（可选）", submit: "提交反馈", skip: "跳过",
      thanks: "感谢你的反馈", connecting: "连接中…", online: "在线",
      offline: "正在重新连接…连接恢复后会发送你的消息。",
      queued: "等待发送", stopped: "已停止", cut: "连接中断，回答未完成",
      joined: "人工客服已加入对话。", left: "人工客服已离开，由智能助手继续回答。",
      failed: "这次没有得到回答，请重试。", refused: "本页面无法使用聊天",
      reasons: { incorrect: "不正确", unhelpful: "没有帮助", unclear: "难以理解", incomplete: "不完整", other: "其他" },
    },
  }[LANG];

  // ---- styles: CSS variables are the theme (docs: README, "Chat widget") ----
  const DARK = "--ll-bg:#181b22;--ll-text:#e6e8ee;--ll-muted:#a9b0bf;--ll-border:#363b48;--ll-bot-bg:#242833;" +
    "--ll-accent:#8ab4ff;--ll-accent-text:#0b1530;--ll-agent-bg:#3a3020;--ll-agent-text:#ffd27a;";
  const CSS = `
:host{all:initial;--ll-accent:#2454d6;--ll-accent-text:#fff;--ll-bg:#fff;--ll-text:#1d2330;--ll-muted:#596174;
--ll-border:#d5d9e3;--ll-bot-bg:#f0f2f7;--ll-user-bg:var(--ll-accent);--ll-user-text:var(--ll-accent-text);
--ll-agent-bg:#fff4d6;--ll-agent-text:#6b4500;--ll-font:system-ui,-apple-system,"Segoe UI",Roboto,"PingFang SC","Microsoft YaHei",sans-serif;
--ll-radius:14px;--ll-width:370px;--ll-height:560px;--ll-offset:20px;--ll-z:2147483000;--ll-shadow:0 8px 30px rgba(0,0,0,.2)}
:host([data-theme=dark]){${DARK}}
@media (prefers-color-scheme:dark){:host([data-theme=auto]){${DARK}}}
*{box-sizing:border-box}
[hidden]{display:none!important}
button,textarea,input{font:inherit;color:inherit}
button{cursor:pointer}
:focus-visible{outline:2px solid var(--ll-accent);outline-offset:2px}
.sr{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0);white-space:nowrap}
.bubble{position:fixed;right:var(--ll-offset);bottom:var(--ll-offset);z-index:var(--ll-z);width:56px;height:56px;
border:0;border-radius:50%;background:var(--ll-accent);color:var(--ll-accent-text);box-shadow:var(--ll-shadow);
display:grid;place-items:center}
svg{width:24px;height:24px;fill:currentColor}
.panel{position:fixed;right:var(--ll-offset);bottom:var(--ll-offset);z-index:var(--ll-z);display:flex;flex-direction:column;
width:min(var(--ll-width),calc(100vw - 2*var(--ll-offset)));height:min(var(--ll-height),calc(100vh - 2*var(--ll-offset)));
background:var(--ll-bg);color:var(--ll-text);font:15px/1.45 var(--ll-font);border:1px solid var(--ll-border);
border-radius:var(--ll-radius);box-shadow:var(--ll-shadow);overflow:hidden}
@media (max-width:480px){.panel{right:0;bottom:0;width:100vw;height:100vh;border-radius:0}}
.head{display:flex;align-items:center;gap:8px;padding:12px 12px 12px 16px;background:var(--ll-accent);color:var(--ll-accent-text)}
.head div{flex:1;min-width:0}
h2{margin:0;font-size:16px;font-weight:600}
.status{font-size:12px}
.icon{display:grid;place-items:center;width:36px;height:36px;padding:0;border:0;border-radius:8px;background:none}
.msgs{flex:1;overflow-y:auto;margin:0;padding:12px;list-style:none;display:flex;flex-direction:column;gap:10px}
.msg{max-width:85%;display:flex;flex-direction:column;gap:4px}
.msg:not([data-state=typing]) .text:empty{display:none}
.text{padding:8px 12px;border-radius:12px;white-space:pre-wrap;overflow-wrap:anywhere}
.user{align-self:flex-end}
.user .text{background:var(--ll-user-bg);color:var(--ll-user-text)}
.bot .text{background:var(--ll-bot-bg)}
.agent .text{background:var(--ll-agent-bg);border-left:4px solid var(--ll-agent-text)}
.agent .who{font-size:12px;font-weight:600;color:var(--ll-agent-text)}
.note{align-self:center;max-width:100%;font-size:13px;color:var(--ll-muted);text-align:center}
.meta{font-size:12px;color:var(--ll-muted)}
.msg[data-state=old]{opacity:.5}
.msg[data-state=typing] .text::after{content:"•••";letter-spacing:2px;animation:ll-blink 1s infinite}
@keyframes ll-blink{50%{opacity:.3}}
@media (prefers-reduced-motion:reduce){*{animation:none!important}}
.panel:not([data-offline]) .msg[data-state=queued] .meta{visibility:hidden}
.acts{display:flex;gap:2px}
.acts .icon{width:30px;height:30px;color:var(--ll-muted)}
.acts svg{width:18px;height:18px}
.acts [aria-pressed=true]{color:var(--ll-accent);background:var(--ll-bot-bg)}
.flip svg{transform:rotate(180deg)}
.regen{display:none!important}
.msgs>li.bot:last-child .regen{display:grid!important}
.panel[data-busy] .regen,.panel[data-operator] .regen,.panel[data-offline] .regen{display:none!important}
.why{display:flex;flex-direction:column;gap:6px;padding:8px;border:1px solid var(--ll-border);border-radius:10px}
.why p{margin:0;font-size:13px}
.chips{display:flex;flex-wrap:wrap;gap:4px}
.chips button,.why .row button{padding:3px 10px;border:1px solid var(--ll-border);border-radius:999px;background:var(--ll-bg);font-size:13px}
.chips [aria-pressed=true]{background:var(--ll-accent);color:var(--ll-accent-text);border-color:var(--ll-accent)}
.why input{padding:6px 8px;border:1px solid var(--ll-border);border-radius:8px;background:var(--ll-bg)}
.row{display:flex;gap:6px}
.banner{margin:0;padding:8px 12px;font-size:13px;background:var(--ll-bot-bg);border-top:1px solid var(--ll-border)}
form{display:flex;align-items:flex-end;gap:6px;padding:10px;border-top:1px solid var(--ll-border)}
textarea{flex:1;resize:none;max-height:120px;padding:8px 10px;border:1px solid var(--ll-border);border-radius:10px;background:var(--ll-bg)}
form .icon{color:var(--ll-accent)}
`;

  // ---- tiny DOM helpers (no innerHTML: fine under Trusted Types) ----
  const h = (tag, attrs = {}, ...kids) => {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else if (v === true) el.setAttribute(k, "");
      else if (v != null && v !== false) el.setAttribute(k, v);
    }
    el.append(...kids);
    return el;
  };
  const PATHS = {
    chat: "M20 2H4a2 2 0 0 0-2 2v18l4-4h14a2 2 0 0 0 2-2V4a2 2 0 0 0-2-2z",
    close: "M19 6.4 17.6 5 12 10.6 6.4 5 5 6.4l5.6 5.6L5 17.6 6.4 19l5.6-5.6 5.6 5.6 1.4-1.4-5.6-5.6z",
    send: "M2 21 23 12 2 3v7l15 2-15 2z",
    stop: "M6 6h12v12H6z",
    thumb: "M2 21h4V9H2zm20-11a2 2 0 0 0-2-2h-6.3l1-4.6v-.3c0-.4-.2-.8-.4-1.1L13.2 1 6.6 7.6C6.2 8 6 8.5 6 9v10a2 2 0 0 0 2 2h9c.8 0 1.5-.5 1.8-1.2l3-7.1.2-.7z",
    regen: "M17.7 6.3A8 8 0 1 0 19.7 14h-2.1A6 6 0 1 1 12 6c1.7 0 3.1.7 4.2 1.8L13 11h7V4z",
  };
  const icon = (name) => {
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    const path = document.createElementNS("http://www.w3.org/2000/svg", "path");
    svg.setAttribute("viewBox", "0 0 24 24");
    svg.setAttribute("aria-hidden", "true");
    svg.setAttribute("focusable", "false");
    path.setAttribute("d", PATHS[name]);
    svg.append(path);
    return svg;
  };
  const newId = () => Array.from(crypto.getRandomValues(new Uint8Array(12)), (b) => b.toString(16).padStart(2, "0")).join("");

  // ---- state, kept per site and user across page loads ----
  const saved = (() => {
    try { return JSON.parse(localStorage.getItem(KEY)) || {}; } catch { return {}; }
  })();
  const state = { cid: saved.cid || null, log: saved.log || [], outbox: saved.outbox || [], open: !!saved.open };
  for (const e of state.log) {
    if (e.st === "typing" || e.st === "streaming") e.st = "cut"; // the page went away mid-reply
    if (e.st === "old") e.st = "done";
  }
  const save = () => {
    try {
      state.log = state.log.slice(-100);
      localStorage.setItem(KEY, JSON.stringify(state));
    } catch { /* storage full or disabled: the widget still works for this page */ }
  };

  // ---- the view ----
  const host = h("learnloop-chat", { "data-theme": d.theme || "auto" });
  const root = host.attachShadow({ mode: "open" });
  if ("adoptedStyleSheets" in root) {
    const sheet = new CSSStyleSheet();
    sheet.replaceSync(CSS);
    root.adoptedStyleSheets = [sheet];
  } else root.append(h("style", {}, CSS)); // old browsers: needs style-src 'unsafe-inline' under a CSP
  const bubble = h("button", { class: "bubble", type: "button", "aria-label": T.open, "aria-expanded": "false", "aria-controls": "ll-panel", onclick: () => open(true) }, icon("chat"));
  const status = h("span", { class: "status" }, T.connecting);
  const list = h("ol", { class: "msgs", "aria-label": T.log });
  const banner = h("p", { class: "banner", hidden: true });
  const input = h("textarea", { id: "ll-input", rows: "1", maxlength: "4000", placeholder: T.placeholder });
  const stopBtn = h("button", { class: "icon", type: "button", "aria-label": T.stop, hidden: true, onclick: () => send({ type: "stop" }) }, icon("stop"));
  const form = h("form", {}, h("label", { for: "ll-input", class: "sr" }, T.input), input, stopBtn,
    h("button", { class: "icon", type: "submit", "aria-label": T.send }, icon("send")));
  const panel = h("div", { class: "panel", id: "ll-panel", role: "dialog", "aria-modal": "true", "aria-labelledby": "ll-title", hidden: true, "data-offline": true },
    h("div", { class: "head" }, h("div", {}, h("h2", { id: "ll-title" }, d.title || T.title), status),
      h("button", { class: "icon", type: "button", "aria-label": T.close, onclick: () => close() }, icon("close"))),
    list, banner, form);
  const live = h("div", { class: "sr", role: "log", "aria-live": "polite" }); // replies are announced once, when done
  root.append(bubble, panel, live);
  const els = new Map(); // log entry -> its <li>

  const flag = (name, on) => (on ? panel.setAttribute(name, "") : panel.removeAttribute(name));
  const announce = (text) => {
    live.append(h("p", {}, text));
    while (live.childNodes.length > 3) live.firstChild.remove();
  };
  const atBottom = () => list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  const toBottom = () => { list.scrollTop = list.scrollHeight; };

  function view(e) {
    const li = h("li", { class: `msg ${e.role}`, "data-state": e.st || "done", "data-id": e.id });
    if (e.role === "note") {
      li.append(e.text);
      return li;
    }
    const text = h("div", { class: "text" }, e.text || "");
    li.append(h("span", { class: e.role === "agent" ? "who" : "who sr" }, T[e.role === "user" ? "you" : e.role]), text);
    const note = { queued: T.queued, stopped: T.stopped, cut: T.cut, error: e.err || T.failed }[e.st];
    if (note) li.append(h("div", { class: "meta" }, note));
    if ((e.role === "bot" || e.role === "agent") && e.id && ["done", "stopped"].includes(e.st)) li.append(...actions(e));
    return li;
  }

  function actions(e) {
    const thumb = (value) => h("button", {
      class: value > 0 ? "icon" : "icon flip", type: "button", "data-act": value > 0 ? "up" : "down",
      "aria-label": value > 0 ? T.up : T.down, "aria-pressed": String(e.rating === value), onclick: () => rate(e, value),
    }, icon("thumb"));
    const row = h("div", { class: "acts" }, thumb(1), thumb(-1));
    if (e.role === "bot") row.append(h("button", { class: "icon regen", type: "button", "data-act": "regen", "aria-label": T.regen, onclick: () => regenerate(e) }, icon("regen")));
    const out = [row];
    if (e.ask) out.push(reasons(e));
    else if (e.rating && !e.pending) out.push(h("div", { class: "meta" }, T.thanks)); // stored: acked
    return out;
  }

  function reasons(e) {
    let picked = null;
    const chips = Object.entries(T.reasons).map(([code, label]) => h("button", {
      type: "button", "aria-pressed": "false", "data-reason": code,
      onclick: (ev) => {
        picked = picked === code ? null : code;
        for (const c of chips) c.setAttribute("aria-pressed", String(c === ev.currentTarget && picked !== null));
      },
    }, label));
    const comment = h("input", { type: "text", maxlength: "2000", "aria-label": T.comment, placeholder: T.comment });
    const finish = (keep) => {
      const text = comment.value.trim();
      e.ask = 0;
      if (keep && (picked || text)) rate(e, -1, picked, text);
      else update(e);
      focusIn(e, "down");
    };
    comment.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && !ev.isComposing) { ev.preventDefault(); finish(true); }
    });
    return h("div", { class: "why", role: "group", "aria-label": T.why }, h("p", {}, T.why), h("div", { class: "chips" }, ...chips), comment,
      h("div", { class: "row" }, h("button", { type: "button", "data-act": "submit", onclick: () => finish(true) }, T.submit),
        h("button", { type: "button", onclick: () => finish(false) }, T.skip)));
  }

  function add(e) {
    const stick = atBottom();
    state.log.push(e);
    const li = view(e);
    els.set(e, li);
    list.append(li);
    if (stick || e.role === "user") toBottom();
    return li;
  }
  function update(e) {
    const old = els.get(e);
    if (!old) return;
    const act = root.activeElement && old.contains(root.activeElement) && root.activeElement.dataset.act;
    const li = view(e);
    els.set(e, li);
    old.replaceWith(li);
    if (act) focusIn(e, act);
  }
  function focusIn(e, act) {
    const target = els.get(e)?.querySelector(`[data-act="${act}"]`);
    if (target) target.focus();
  }
  function removeEntry(e) {
    state.log = state.log.filter((x) => x !== e);
    els.get(e)?.remove();
    els.delete(e);
  }
  const note = (text) => { add({ role: "note", text }); announce(text); };

  // ---- opening and closing, keyboard ----
  function open(focus) {
    panel.hidden = false;
    bubble.hidden = true;
    bubble.setAttribute("aria-expanded", "true");
    state.open = true;
    save();
    toBottom();
    if (focus) input.focus();
    connect();
  }
  function close() {
    panel.hidden = true;
    bubble.hidden = false;
    bubble.setAttribute("aria-expanded", "false");
    state.open = false;
    save();
    bubble.focus();
  }
  panel.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape") { ev.preventDefault(); close(); return; }
    if (ev.key !== "Tab") return;
    const stops = [...panel.querySelectorAll("button,textarea,input")].filter((x) => !x.disabled && x.getClientRects().length);
    if (!stops.length) return;
    const first = stops[0], last = stops[stops.length - 1], cur = root.activeElement;
    if (ev.shiftKey && (cur === first || !panel.contains(cur))) { ev.preventDefault(); last.focus(); }
    else if (!ev.shiftKey && (cur === last || !panel.contains(cur))) { ev.preventDefault(); first.focus(); }
  });
  input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing && ev.keyCode !== 229) { ev.preventDefault(); form.requestSubmit(); }
  });
  input.addEventListener("input", () => {
    input.style.height = "auto"; // CSSOM, not a style attribute in markup: allowed by a strict CSP
    input.style.height = `${Math.min(input.scrollHeight, 120)}px`;
  });
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = input.value.trim();
    if (!text) return;
    input.value = "";
    input.style.height = "auto";
    const id = newId();
    state.outbox.push({ kind: "message", id, text });
    add({ role: "user", cid: id, text, st: "queued" });
    save();
    wake();
    pump();
  });

  // ---- the connection ----
  let ws = null, ready = false, attempt = 0, timer = 0, fatal = false;
  let asleep = false; // closed with 4408 (idle): no reconnect until the visitor comes back to the chat
  let inflight = null; // the outbox message sent on this connection and not acked yet
  let reply = null; // {e, node}: the reply being written
  let operator = false, wasOperator = false;
  let hold = 0; // after a refusal with retry_after: nothing is sent before this time
  const sentRatings = new Set();

  const send = (frame) => { if (ws && ws.readyState === 1) ws.send(JSON.stringify(frame)); };
  const setStatus = (text, offline) => {
    if (fatal) return;
    status.textContent = text;
    flag("data-offline", offline);
    banner.hidden = !offline || attempt < 2; // a blip is not worth a banner
    if (offline) banner.textContent = T.offline;
  };

  function connect() {
    if (fatal || ws) return;
    asleep = false;
    clearTimeout(timer);
    let sock;
    try { sock = new WebSocket(SERVER); } catch { return refuse("bad data-server"); }
    ws = sock;
    let opened = false;
    sock.onopen = () => { opened = true; hello(); };
    sock.onmessage = (ev) => { try { receive(JSON.parse(ev.data)); } catch (err) { console.error("learnloop widget:", err); } };
    sock.onclose = (ev) => {
      if (ws !== sock) return;
      ws = null;
      if (!opened) checkOrigin();
      dropped(ev.code === 4408);
    };
  }
  function checkOrigin() {
    // the handshake failed: a page sees no HTTP status, so ask the server whether this page's origin may
    // chat; the probe's close code answers (1008: never from this page; anything else: try again later)
    let probe;
    try { probe = new WebSocket(new URL("/origin", SERVER).href); } catch { return; }
    probe.onclose = (ev) => { if (ev.code === 1008) refuse("forbidden"); };
  }
  function hello() {
    send({ type: "hello", site: SITE || undefined, user: USER || undefined, user_hash: d.userHash || undefined, conversation_id: state.cid || undefined });
  }
  function dropped(idle) {
    ready = false;
    inflight = null;
    wasOperator = operator;
    operator = false;
    flag("data-operator", false);
    if (reply) endReply("cut");
    if (idle) {
      // the server frees sockets of tabs left open (server.idle_timeout_s): stay closed, quietly, until
      // the visitor focuses or opens the chat or sends (see wake); reconnecting at once would undo it
      asleep = true;
      attempt = 0;
      setStatus("", false);
      return;
    }
    setStatus(T.connecting, true);
    if (fatal) return;
    // exponential backoff with jitter: 0.5 s doubling to 20 s, each wait drawn from its upper half
    const cap = Math.min(20000, 500 * 2 ** Math.min(attempt++, 6));
    timer = setTimeout(connect, cap / 2 + Math.random() * (cap / 2));
  }
  function refuse(why) {
    fatal = true;
    banner.hidden = false;
    banner.textContent = `${T.refused} (${why})`;
    status.textContent = "";
    if (ws) ws.close();
  }
  addEventListener("online", () => { if (!ws && !fatal && !asleep) { attempt = 0; connect(); } });
  const wake = () => { if (asleep) connect(); };
  input.addEventListener("focus", wake);
  input.addEventListener("keydown", wake);

  function pump() {
    if (!ready || Date.now() < hold) return;
    for (const r of state.outbox) {
      if (r.kind !== "rating" || sentRatings.has(r.id)) continue;
      sentRatings.add(r.id);
      send({ type: "rating", message_id: r.message_id, value: r.value, id: r.id, reason: r.reason || undefined, comment: r.comment || undefined });
    }
    if (inflight || reply) return;
    inflight = state.outbox.find((o) => o.kind === "message") || null;
    if (inflight) send({ type: "message", text: inflight.text, client_id: inflight.id });
  }
  const later = (seconds) => {
    const ms = Math.max(1, seconds || 1) * 1000;
    hold = Date.now() + ms;
    setTimeout(pump, ms + 10);
  };

  function startReply(of) {
    const e = { role: "bot", text: "", st: "typing", of };
    const li = add(e);
    reply = { e, node: null, li };
    flag("data-busy", true);
    stopBtn.hidden = false;
  }
  function endReply(st, err) {
    const { e } = reply;
    reply = null;
    flag("data-busy", false);
    stopBtn.hidden = true;
    e.st = st;
    if (err) e.err = err;
    const old = e.of && state.log.find((x) => x.id === e.of && x.st === "old");
    if (old) {
      if (st === "done" || st === "stopped") removeEntry(old);
      else { old.st = "done"; update(old); }
    }
    update(e);
    if (st === "done" || st === "stopped") announce(`${T.bot}: ${e.text || T.stopped}`);
    else if (st === "cut" || st === "error") announce(st === "cut" ? T.cut : err || T.failed);
    save();
  }

  function receive(f) {
    // a takeover still on after a reconnect is announced again right after ready: no second note
    if (f.type !== "ready" && f.type !== "operator_joined") wasOperator = false;
    switch (f.type) {
      case "ready":
        ready = true;
        attempt = 0;
        state.cid = f.conversation_id;
        sentRatings.clear();
        setStatus(T.online, false);
        save();
        pump();
        break;
      case "ack": {
        const i = state.outbox.findIndex((o) => o.id === f.id);
        if (i >= 0) state.outbox.splice(i, 1);
        const rated = state.log.find((x) => x.pending === f.id);
        if (rated) {
          rated.pending = null;
          if (!rated.ask) update(rated); // an open reason picker keeps its choice and focus
        }
        if (f.message_id) {
          const e = state.log.find((x) => x.cid === f.id);
          if (e) { e.id = f.message_id; e.st = "done"; update(e); }
          if (inflight && inflight.id === f.id) inflight = null;
          if (!operator && !reply) startReply();
        }
        save();
        pump();
        break;
      }
      case "token": {
        if (!reply) startReply();
        const { e } = reply;
        if (!reply.node) {
          e.id = f.message_id;
          e.st = "streaming";
          reply.li.dataset.id = e.id;
          reply.li.dataset.state = e.st;
          reply.node = document.createTextNode("");
          reply.li.querySelector(".text").append(reply.node);
        }
        const stick = atBottom();
        reply.node.appendData(f.delta);
        e.text += f.delta;
        if (stick) toBottom();
        break;
      }
      case "done":
        if (!reply) break;
        reply.e.id = f.message_id;
        endReply(f.finish_reason === "cancelled" ? "stopped" : "done");
        pump();
        break;
      case "error":
        failed(f);
        break;
      case "operator_joined":
        operator = true;
        flag("data-operator", true);
        if (!wasOperator) note(T.joined);
        break;
      case "operator_message": {
        const e = { role: "agent", id: f.message_id, text: f.text, st: "done" };
        add(e);
        announce(`${T.agent}: ${f.text}`);
        save();
        break;
      }
      case "operator_left":
        operator = wasOperator = false;
        flag("data-operator", false);
        note(T.left);
        break;
    }
  }

  function failed(f) {
    if (!ready) {
      if (f.code === "not_found" && state.cid) {
        // the stored conversation is gone (erased, or another user's): start a new one, keep what waits
        state.cid = null;
        for (const e of [...state.log]) if (e.st !== "queued") removeEntry(e);
        save();
        return hello();
      }
      if (["rate_limited", "overloaded", "internal", "unavailable"].includes(f.code)) return ws && ws.close();
      return refuse(f.code);
    }
    const item = f.id && state.outbox.find((o) => o.id === f.id);
    if (item) {
      if (inflight === item) inflight = null;
      if (["rate_limited", "busy", "overloaded"].includes(f.code)) {
        sentRatings.delete(item.id);
        return later(f.retry_after); // still in the outbox: sent again
      }
      state.outbox.splice(state.outbox.indexOf(item), 1);
      const e = state.log.find((x) => x.cid === item.id);
      if (e) { e.st = "error"; e.err = f.message; update(e); }
      const rated = state.log.find((x) => x.pending === item.id);
      if (rated) { rated.pending = null; rated.rating = 0; update(rated); } // refused: not stored
      save();
      return pump();
    }
    if (reply) {
      endReply("error", f.code === "overloaded" ? T.failed : undefined);
      if (f.retry_after) later(f.retry_after);
      else pump();
    }
  }

  function rate(e, value, reason, comment) {
    const r = { kind: "rating", id: newId(), message_id: e.id, value };
    if (reason) r.reason = reason;
    if (comment) r.comment = comment;
    state.outbox.push(r);
    e.rating = value;
    e.pending = r.id;
    e.ask = value < 0 && !reason && !comment ? 1 : 0; // thumbs down: ask why (optional)
    update(e);
    if (e.ask) els.get(e).querySelector("[data-reason]").focus();
    save();
    pump();
  }
  function regenerate(e) {
    if (!ready || reply || operator) return;
    e.st = "old";
    update(e);
    send({ type: "regenerate", message_id: e.id });
    startReply(e.id);
    input.focus(); // the regenerate button hides while the new reply streams
  }

  // ---- start ----
  const mount = () => {
    document.body.append(host);
    for (const e of state.log) {
      const li = view(e);
      els.set(e, li);
      list.append(li);
    }
    if (state.open) open(false);
    else if (state.cid || state.outbox.length) connect(); // a conversation goes on across page loads
  };
  if (document.body) mount();
  else addEventListener("DOMContentLoaded", mount);
})();
