// The Roost app's page: a view of the local `roost app` process, over one WebSocket.
// All state worth keeping lives in the app (the SDK's client state); this page
// rebuilds from a snapshot and history pages on every (re)connect and merges
// what comes again by message id, so nothing shows twice.

import { dayKey, dayLabel, el, hhmm, setText, shortTime } from "./dom.js";

const TYPING_TTL = 5000; // ms an incoming "typing" shows unless refreshed
const TYPING_EVERY = 2000; // ms between two typing notices we send
const $ = (id) => document.getElementById(id);

const state = {
  me: null,
  connection: "connecting",
  detail: "",
  chats: new Map(), // conv -> chat
  current: null,
  messages: new Map(), // conv -> Map(message id -> message)
  more: new Map(), // conv -> older messages stored locally
  loadingOlder: false,
  typing: new Map(), // conv -> Map(user -> expires at, ms)
  presence: new Map(), // user -> {online, last_seen}
  readSent: new Map(), // conv -> highest seq we marked read
  typingSent: new Map(), // conv -> ms
  group: null, // the group info dialog's group
  progress: new Map(), // own file message id -> {done, total} of its upload to the server
  info: null, // the message the info dialog shows
  attach: null, // the file in the preview: {file, url, xhr}
};

// -- the socket to the app ---------------------------------------------------------

let socket = null;
let nextRef = 1;
const waiting = new Map();
let retryDelay = 500;

function connect() {
  socket = new WebSocket(`ws://${location.host}/ws`);
  socket.addEventListener("open", () => {
    retryDelay = 500;
  });
  socket.addEventListener("message", (e) => handle(JSON.parse(e.data)));
  socket.addEventListener("close", () => {
    for (const { reject } of waiting.values()) reject(new Error("the app stopped"));
    waiting.clear();
    setConnection("app-stopped", "");
    setTimeout(connect, retryDelay);
    retryDelay = Math.min(retryDelay * 2, 5000);
  });
}

function request(op, fields = {}) {
  const ref = String(nextRef++);
  return new Promise((resolve, reject) => {
    if (!socket || socket.readyState !== WebSocket.OPEN) {
      reject(new Error("the app is not reachable"));
      return;
    }
    waiting.set(ref, { resolve, reject });
    socket.send(JSON.stringify({ op, ref, ...fields }));
  }).then((reply) => {
    if (!reply.ok) throw new Error(reply.error || "failed");
    return reply;
  });
}

function handle(ev) {
  switch (ev.type) {
    case "reply": {
      const w = waiting.get(ev.ref);
      if (w) {
        waiting.delete(ev.ref);
        w.resolve(ev);
      }
      break;
    }
    case "snapshot":
      applySnapshot(ev);
      break;
    case "connection":
      if (ev.me) state.me = ev.me;
      setConnection(ev.state, ev.detail);
      if (ev.state === "connected") resync();
      break;
    case "message":
      onMessage(ev);
      break;
    case "sent":
      onSent(ev);
      break;
    case "receipt": {
      const chat = state.chats.get(ev.conv);
      if (chat) {
        chat.delivered = Math.max(chat.delivered, ev.delivered);
        chat.read = Math.max(chat.read, ev.read);
        renderChatList();
        if (ev.conv === state.current) renderMessages();
      }
      if (state.info && state.info.conv === ev.conv && $("info-dialog").open) loadInfo(state.info);
      break;
    }
    case "progress":
      onProgress(ev);
      break;
    case "unread": {
      const chat = state.chats.get(ev.conv);
      if (chat) {
        chat.unread = ev.conv === state.current ? 0 : ev.count;
        renderChatList();
      }
      break;
    }
    case "presence":
      state.presence.set(ev.user, { online: ev.online, last_seen: ev.last_seen });
      renderChatList();
      renderHeader();
      break;
    case "typing":
      onTyping(ev);
      break;
    case "waiting":
      for (const [conv, map] of state.messages) {
        const msg = map.get(ev.id);
        if (msg) {
          msg.waiting = ev.reason;
          if (conv === state.current) renderMessages();
        }
      }
      break;
    case "identity":
      for (const chat of state.chats.values()) {
        if (chat.peer === ev.user) Object.assign(chat, { key_changed: ev.key_changed, verified: ev.verified });
      }
      renderHeader();
      break;
    case "error":
      onError(ev);
      break;
  }
}

function applySnapshot(snap) {
  state.me = snap.me;
  setText($("me"), snap.me ? `you are ${snap.me}` : "");
  const chats = new Map();
  for (const chat of snap.chats) {
    const old = state.chats.get(chat.conv);
    if (old && old.last && (!chat.last || newer(old.last, chat.last))) chat.last = old.last;
    if (chat.presence && chat.peer) state.presence.set(chat.peer, chat.presence);
    chats.set(chat.conv, chat);
  }
  // Chats opened here that have no message yet stay listed.
  for (const [conv, chat] of state.chats) if (!chats.has(conv)) chats.set(conv, chat);
  state.chats = chats;
  setConnection(snap.connection, snap.detail);
  renderChatList();
  if (state.current) loadHistory(state.current);
}

function resync() {
  request("snapshot").then((r) => applySnapshot(r.snapshot)).catch(() => {});
}

function setConnection(name, detail) {
  state.connection = name;
  state.detail = detail || "";
  const labels = {
    connecting: "Connecting…",
    connected: "Connected",
    reconnecting: "Reconnecting…",
    offline: "Offline",
    "app-stopped": "App stopped",
  };
  const node = $("connection");
  node.dataset.state = name;
  setText(node, labels[name] || name);
  node.title = state.detail;
}

// -- messages ---------------------------------------------------------------------------

function newer(a, b) {
  // Is a after b? Stored messages by seq, pending ones after all stored ones.
  if (a.seq === null && b.seq !== null) return true;
  if (a.seq !== null && b.seq === null) return false;
  if (a.seq !== null && b.seq !== null) return a.seq > b.seq;
  return a.ts > b.ts;
}

function ensureChat(conv, fields = {}) {
  let chat = state.chats.get(conv);
  if (!chat) {
    chat = { conv, group: conv.startsWith("g:"), name: conv, peer: null, delivered: 0, read: 0, unread: 0, left: false, last: null };
    const pair = conv.startsWith("d:") ? conv.split(":").slice(1) : null;
    if (pair && state.me && pair.includes(state.me)) chat.name = chat.peer = pair[0] === state.me ? pair[1] : pair[0];
    state.chats.set(conv, chat);
  }
  for (const [k, v] of Object.entries(fields)) if (k !== "last" && v !== undefined) chat[k] = v;
  return chat;
}

function store(msg) {
  // Merge by message id: a pending own message becomes the stored one.
  let map = state.messages.get(msg.conv);
  // Not loaded: its history brings it when opened; but membership notes are
  // not in the local history, so they are kept from the start.
  if (!map && msg.kind === "system") state.messages.set(msg.conv, (map = new Map()));
  if (!map) return;
  const old = map.get(msg.id);
  if (old) {
    if (msg.seq !== null) Object.assign(old, { seq: msg.seq, ts: msg.ts });
  } else {
    map.set(msg.id, { ...msg });
  }
}

function onMessage(ev) {
  const msg = ev.message;
  const chat = ensureChat(msg.conv, ev.chat || {});
  if (!chat.last || newer(msg, chat.last) || chat.last.id === msg.id) chat.last = msg;
  store(msg);
  if (msg.kind === "in") {
    const users = state.typing.get(msg.conv);
    if (users) users.delete(msg.sender);
  }
  if (msg.conv === state.current) {
    chat.unread = 0;
    renderMessages();
    renderHeader();
    markRead(msg.conv);
  } else if (ev.unread !== undefined) {
    chat.unread = ev.unread;
  }
  renderChatList();
}

function onSent(ev) {
  const map = state.messages.get(ev.conv);
  const msg = map && map.get(ev.id);
  if (msg) Object.assign(msg, { seq: ev.seq, ts: ev.ts });
  const chat = state.chats.get(ev.conv);
  if (chat && chat.last && chat.last.id === ev.id) Object.assign(chat.last, { seq: ev.seq, ts: ev.ts });
  renderChatList();
  if (ev.conv === state.current) renderMessages();
}

function onError(ev) {
  for (const [conv, map] of state.messages) {
    const msg = map.get(ev.ref);
    if (msg) {
      msg.failed = `${ev.code}: ${ev.message}`;
      if (conv === state.current) renderMessages();
      return;
    }
  }
  toast(`${ev.code}: ${ev.message}`);
}

function tickOf(msg, chat) {
  if (msg.failed) return ["failed", "✗", `not sent: ${msg.failed}`];
  if (msg.seq === null) return ["pending", "…", msg.waiting ? `waiting: ${msg.waiting}` : "waiting to be sent"];
  if (chat.read >= msg.seq) return ["read", "✓✓", "read"];
  if (chat.delivered >= msg.seq) return ["delivered", "✓✓", "delivered"];
  return ["sent", "✓", "sent"];
}

function tickNode(msg, chat) {
  const [name, glyph, label] = tickOf(msg, chat);
  return el("span", { class: "tick", dataset: { tick: name }, role: "img", "aria-label": label, title: label }, glyph);
}

function markRead(conv) {
  const map = state.messages.get(conv);
  if (!map || document.visibilityState === "hidden") return;
  let top = 0;
  for (const m of map.values()) if (m.kind === "in" && m.seq > top) top = m.seq;
  if (top > (state.readSent.get(conv) || 0)) {
    state.readSent.set(conv, top);
    request("read", { conv, seq: top }).catch(() => state.readSent.delete(conv));
  }
}

document.addEventListener("visibilitychange", () => {
  if (state.current) markRead(state.current);
});

// -- the chat list --------------------------------------------------------------------------

function sortedChats() {
  const at = (c) => (c.last ? c.last.ts : 0);
  return [...state.chats.values()].sort((a, b) => at(b) - at(a) || a.name.localeCompare(b.name));
}

function renderChatList() {
  const list = $("chat-list");
  const items = sortedChats().map((chat) => {
    const online = chat.peer && state.presence.get(chat.peer)?.online;
    const last = chat.last;
    const preview = [];
    if (last && last.kind === "own") preview.push(tickNode(last, chat), " ");
    if (last && chat.group && last.kind === "in") preview.push(`${last.sender}: `);
    const lastText = last && (last.text || (last.attachment ? `${kindText(last.attachment.content_type)}: ${last.attachment.name}` : ""));
    preview.push(last ? lastText : chat.group ? "Group" : "No messages yet");
    const button = el(
      "button",
      {
        type: "button",
        class: "chat-item",
        dataset: { conv: chat.conv },
        "aria-current": chat.conv === state.current ? "true" : null,
        onclick: () => openChat(chat.conv, true),
      },
      el("span", { class: "chat-name" }, chat.name, online ? el("span", { class: "dot", role: "img", "aria-label": "online" }) : null),
      el("span", { class: "chat-time" }, last ? shortTime(last.ts) : ""),
      el("span", { class: "chat-preview" }, preview),
      chat.unread > 0 ? el("span", { class: "badge", "aria-label": `${chat.unread} unread` }, String(chat.unread)) : el("span"),
    );
    return el("li", {}, button);
  });
  list.replaceChildren(...items);
  $("chat-list-empty").hidden = items.length > 0;
}

// -- the conversation -----------------------------------------------------------------------

async function openChat(conv, focusComposer = false) {
  const chat = state.chats.get(conv);
  if (!chat) return;
  if (state.current !== conv) {
    state.loadingOlder = false;
    if (state.attach && !state.attach.xhr) closePreview(); // a file picked for another chat
  }
  state.current = conv;
  chat.unread = 0;
  $("app").classList.add("chat-open");
  $("composer").hidden = false;
  $("group-info-button").hidden = !chat.group;
  $("safety-button").hidden = chat.group;
  renderHeader();
  renderChatList();
  renderMessages();
  if (chat.group) loadMembers(conv);
  // Before the history comes: focusing after it could take the focus from
  // wherever the user went meanwhile (a file's preview, a dialog).
  if (focusComposer) $("composer-input").focus();
  await loadHistory(conv);
}

async function loadMembers(conv) {
  try {
    const { group } = await request("group_info", { conv });
    Object.assign(ensureChat(conv), { name: group.name, members: group.members });
    if (conv === state.current) renderHeader();
  } catch {
    // offline, or no longer a member: the header keeps what it had
  }
}

async function loadHistory(conv) {
  try {
    const page = await request("history", { conv });
    if (!state.messages.has(conv)) state.messages.set(conv, new Map());
    for (const m of page.messages) store(m);
    if (!state.more.has(conv)) state.more.set(conv, page.more);
    const chat = ensureChat(conv);
    chat.delivered = Math.max(chat.delivered, page.delivered);
    chat.read = Math.max(chat.read, page.read);
    if (conv === state.current) {
      renderMessages(true);
      markRead(conv);
    }
  } catch (err) {
    toast(`history: ${err.message}`);
  }
}

async function loadOlder() {
  const conv = state.current;
  const map = state.messages.get(conv);
  if (!conv || !map || state.loadingOlder || !state.more.get(conv)) return;
  const seqs = [...map.values()].map((m) => m.seq).filter((s) => s !== null);
  if (!seqs.length) return;
  state.loadingOlder = true;
  try {
    const page = await request("history", { conv, before: Math.min(...seqs) });
    for (const m of page.messages) store(m);
    state.more.set(conv, page.more);
    if (conv === state.current) renderMessages(false, true);
  } catch (err) {
    toast(`history: ${err.message}`);
  } finally {
    state.loadingOlder = false;
  }
}

function orderedMessages(conv) {
  const map = state.messages.get(conv);
  if (!map) return [];
  return [...map.values()].sort((a, b) => (newer(a, b) ? 1 : newer(b, a) ? -1 : 0));
}

function renderMessages(toBottom = false, keepOffset = false) {
  const box = $("messages");
  const conv = state.current;
  if (!conv) return;
  const chat = state.chats.get(conv);
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 60;
  const fromBottom = box.scrollHeight - box.scrollTop;
  const nodes = [];
  let day = null;
  for (const m of orderedMessages(conv)) {
    const key = dayKey(m.ts);
    if (key !== day) {
      day = key;
      nodes.push(el("div", { class: "day", role: "separator" }, dayLabel(m.ts)));
    }
    nodes.push(messageNode(m, chat));
  }
  if (!nodes.length) nodes.push(el("p", { class: "placeholder" }, "No messages yet. Say hello."));
  box.replaceChildren(...nodes);
  if (keepOffset) box.scrollTop = box.scrollHeight - fromBottom;
  else if (toBottom || atBottom) box.scrollTop = box.scrollHeight;
}

function messageNode(m, chat) {
  if (m.kind === "system") {
    return el("div", { class: "msg system", dataset: { id: m.id, seq: m.seq } }, el("span", { class: "text" }, m.text));
  }
  const own = m.kind === "own";
  const meta = el("span", { class: "meta" }, el("time", { datetime: new Date(m.ts).toISOString() }, hhmm(m.ts)));
  if (own) {
    meta.append(tickNode(m, chat));
    if (m.seq !== null) {
      meta.append(el("button", { type: "button", class: "info", "aria-label": "Message info", title: "Message info", onclick: () => showInfo(m) }, "i"));
    }
  }
  return el(
    "div",
    { class: own ? "msg own" : "msg in", dataset: { id: m.id, seq: m.seq ?? "" } },
    chat.group && !own ? el("span", { class: "sender" }, m.sender) : null,
    m.attachment ? attachmentNode(m) : null,
    m.text || !m.attachment ? el("span", { class: "text", dir: "auto" }, m.text) : null,
    meta,
  );
}

// Shown in the page; the app serves only these for display (roost/app/server.py INLINE_TYPES).
const IMAGES = new Set(["image/png", "image/jpeg", "image/gif", "image/webp"]);
const PLAYABLE = new Set([
  "audio/wav", "audio/x-wav", "audio/wave", "audio/mpeg", "audio/ogg", "audio/webm", "audio/mp4", "audio/aac",
  "video/mp4", "video/webm", "video/ogg",
]);
// Media nodes by URL, reused across renders: a player keeps playing, an image is not fetched again.
const mediaNodes = new Map();

function sizeText(bytes) {
  if (bytes >= 1048576) return `${(bytes / 1048576).toFixed(1)} MB`;
  return `${Math.max(1, Math.ceil(bytes / 1024))} KB`;
}

function kindText(type) {
  if (type.startsWith("image/")) return "Image";
  if (type.startsWith("video/")) return "Video";
  if (type.startsWith("audio/")) return "Audio";
  return "File";
}

function attachmentNode(m) {
  const a = m.attachment;
  if (m.seq === null && m.failed) return el("span", { class: "file-link" }, `${a.name} (${sizeText(a.size)}): not sent`);
  if (m.seq === null) return uploadNode(m);
  const url = `/media/${encodeURIComponent(m.conv)}/${m.seq}`;
  const label = `${a.name} (${sizeText(a.size)})`;
  const download = el("a", { class: "file-link download", href: url, download: a.name }, label);
  let media = mediaNodes.get(url);
  if (!media && IMAGES.has(a.content_type)) media = el("img", { class: "media", src: url, alt: a.name });
  else if (!media && PLAYABLE.has(a.content_type)) {
    // Fed by the local app, which downloads and decrypts it: the page never sees a key.
    const tag = a.content_type.startsWith("video/") ? "video" : "audio";
    media = el(tag, { class: "media", src: url, controls: true, preload: "metadata", "aria-label": `${kindText(a.content_type)}: ${a.name}` });
  }
  if (!media) return download;
  mediaNodes.set(url, media);
  setText(download, `Download ${label}`);
  return el("div", { class: "attachment" }, media, download);
}

function uploadNode(m) {
  const a = m.attachment;
  const p = state.progress.get(m.id);
  const bar = el("progress", { max: 100, dataset: { upload: m.id }, "aria-label": `Uploading ${a.name}` });
  const label = el("span", { class: "upload-state", dataset: { uploadState: m.id } });
  showUpload(bar, label, p);
  return el("div", { class: "upload" }, el("span", { class: "file-link" }, `${a.name} (${sizeText(a.size)})`), bar, label);
}

function showUpload(bar, label, p) {
  if (p && p.total > 0) {
    const percent = Math.floor((100 * p.done) / p.total);
    bar.value = percent;
    setText(label, p.done >= p.total ? "uploaded, sending…" : `uploading… ${percent}%`);
  } else {
    bar.removeAttribute("value"); // indeterminate until the first part is in
    setText(label, "uploading…");
  }
}

function onProgress(ev) {
  state.progress.set(ev.id, { done: ev.done, total: ev.total });
  // Only the bar changes: no re-render (players elsewhere in the chat keep playing).
  const bar = document.querySelector(`progress[data-upload="${CSS.escape(ev.id)}"]`);
  const label = document.querySelector(`[data-upload-state="${CSS.escape(ev.id)}"]`);
  if (bar && label) showUpload(bar, label, state.progress.get(ev.id));
}

function renderHeader() {
  const conv = state.current;
  if (!conv) return;
  const chat = state.chats.get(conv);
  setText($("conv-title"), chat.name);
  // Never a silent key switch: the banner stays until the number is verified again.
  $("key-banner").hidden = !chat.key_changed;
  if (chat.key_changed) setText($("key-banner-text"), `${chat.name}'s safety number changed: they reinstalled, or someone is in between.`);
  const status = $("conv-status");
  const now = Date.now();
  const typers = [...(state.typing.get(conv) || new Map())].filter(([, until]) => until > now).map(([u]) => u);
  if (typers.length) {
    status.dataset.typing = "true";
    setText(status, chat.group ? `${typers.join(", ")} ${typers.length > 1 ? "are" : "is"} typing…` : "typing…");
    return;
  }
  status.dataset.typing = "false";
  if (chat.left) setText(status, "you left this group");
  else if (chat.group) setText(status, chat.members ? memberList(chat.members) : "group");
  else setText(status, presenceText(state.presence.get(chat.peer)));
}

function memberList(members) {
  const others = members.filter((u) => u !== state.me).sort();
  return [...others, ...(members.includes(state.me) ? ["you"] : [])].join(", ");
}

function presenceText(p) {
  if (!p) return "";
  if (p.online) return "online";
  if (!p.last_seen) return "offline";
  const ms = p.last_seen * 1000;
  return dayKey(ms) === dayKey(Date.now()) ? `last seen ${hhmm(ms)}` : `last seen ${shortTime(ms)}`;
}

function onTyping(ev) {
  if (ev.user === state.me) return;
  let users = state.typing.get(ev.conv);
  if (!users) state.typing.set(ev.conv, (users = new Map()));
  if (ev.active) users.set(ev.user, Date.now() + TYPING_TTL);
  else users.delete(ev.user);
  if (ev.conv === state.current) renderHeader();
}

setInterval(() => {
  if (state.current && state.typing.get(state.current)?.size) renderHeader();
}, 1000);

// -- sending ------------------------------------------------------------------------------------

async function send() {
  const input = $("composer-input");
  const text = input.value;
  const conv = state.current;
  if (!conv || !text.trim()) return;
  // Cleared now, not at the reply: what is typed meanwhile is the next message.
  input.value = "";
  state.typingSent.delete(conv); // the next keystroke says "typing" again
  try {
    const reply = await request("send", { conv, text });
    // The page may hear the "message" event before this reply: store() merges by id.
    const chat = ensureChat(conv);
    if (!state.messages.has(conv)) state.messages.set(conv, new Map());
    store(reply.message);
    if (!chat.last || newer(reply.message, chat.last)) chat.last = reply.message;
    renderMessages(true);
    renderChatList();
  } catch (err) {
    if (!input.value) input.value = text; // nothing was queued: give the text back
    toast(`not sent: ${err.message}`);
  }
}

// -- files: pick or drop, preview, send with progress ------------------------------------------------

$("file-input").addEventListener("change", () => {
  const input = $("file-input");
  const file = input.files[0];
  input.value = "";
  if (file) showPreview(file);
});

function showPreview(file) {
  if (!state.current) return;
  closePreview();
  const url = file.type.startsWith("image/") ? URL.createObjectURL(file) : null;
  state.attach = { file, url, xhr: null, conv: state.current };
  const thumb = $("attach-thumb");
  thumb.hidden = !url;
  if (url) Object.assign(thumb, { src: url, alt: `Preview of ${file.name}` });
  setText($("attach-name"), file.name);
  setText($("attach-details"), `${kindText(file.type)} · ${sizeText(file.size)}${file.type ? ` · ${file.type}` : ""}`);
  setText($("attach-error"), "");
  $("attach-progress").hidden = true;
  $("attach-send").disabled = false;
  $("attach-preview").hidden = false;
  $("attach-send").focus();
}

function closePreview() {
  const a = state.attach;
  if (!a) return;
  if (a.xhr) a.xhr.abort();
  if (a.url) URL.revokeObjectURL(a.url);
  state.attach = null;
  $("attach-thumb").removeAttribute("src");
  $("attach-preview").hidden = true;
}

// The raw bytes over HTTP to the local app (streamed to disk there), not base64 in a socket frame.
function upload(a, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    a.xhr = xhr;
    xhr.open("POST", `/upload?conv=${encodeURIComponent(a.conv)}&name=${encodeURIComponent(a.file.name)}`);
    xhr.responseType = "json";
    xhr.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable) onProgress(e.loaded, e.total);
    });
    xhr.addEventListener("load", () => {
      const r = xhr.response;
      if (xhr.status === 200 && r && r.ok) resolve(r);
      else reject(new Error((r && r.error) || `the app answered ${xhr.status}`));
    });
    xhr.addEventListener("error", () => reject(new Error("the app is not reachable")));
    xhr.addEventListener("abort", () => reject(new Error("cancelled")));
    xhr.send(a.file);
  });
}

async function sendAttachment() {
  const a = state.attach;
  if (!a || a.xhr) return;
  const bar = $("attach-progress");
  bar.value = 0;
  bar.hidden = false;
  $("attach-send").disabled = true;
  try {
    const reply = await upload(a, (done, total) => (bar.value = Math.floor((100 * done) / total)));
    bar.value = 100;
    if (!state.messages.has(a.conv)) state.messages.set(a.conv, new Map());
    store(reply.message);
    a.xhr = null;
    closePreview();
    if (a.conv === state.current) {
      renderMessages(true);
      $("composer-input").focus();
    }
  } catch (err) {
    if (state.attach !== a) return; // cancelled
    a.xhr = null;
    bar.hidden = true;
    $("attach-send").disabled = false;
    setText($("attach-error"), `not sent: ${err.message}`);
  }
}

$("attach-send").addEventListener("click", sendAttachment);
$("attach-cancel").addEventListener("click", () => {
  closePreview();
  $("composer-input").focus();
});
$("attach-preview").addEventListener("keydown", (e) => {
  if (e.key === "Escape") {
    closePreview();
    $("composer-input").focus();
  }
});

// Drop a file anywhere on the open conversation; elsewhere a drop does nothing
// (the browser would otherwise leave the app to show the file).
const hasFiles = (e) => e.dataTransfer && [...e.dataTransfer.types].includes("Files");
for (const type of ["dragover", "drop"]) document.addEventListener(type, (e) => hasFiles(e) && e.preventDefault());
$("conversation").addEventListener("dragover", (e) => {
  if (!hasFiles(e) || !state.current) return;
  e.dataTransfer.dropEffect = "copy";
  $("conversation").classList.add("dropping");
});
$("conversation").addEventListener("dragleave", (e) => {
  if (!$("conversation").contains(e.relatedTarget)) $("conversation").classList.remove("dropping");
});
$("conversation").addEventListener("drop", (e) => {
  $("conversation").classList.remove("dropping");
  const file = e.dataTransfer && e.dataTransfer.files[0];
  if (file && state.current) showPreview(file);
});

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  send();
});

$("composer-input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});

$("composer-input").addEventListener("input", () => {
  const conv = state.current;
  const chat = conv && state.chats.get(conv);
  // A 1:1 exists on the server from its first message: no typing before.
  if (!chat || (!chat.group && !chat.last) || !$("composer-input").value.trim()) return;
  const now = Date.now();
  if (now - (state.typingSent.get(conv) || 0) < TYPING_EVERY) return;
  state.typingSent.set(conv, now);
  request("typing", { conv }).catch(() => {});
});

$("messages").addEventListener("scroll", () => {
  if ($("messages").scrollTop < 80) loadOlder();
});

$("back-button").addEventListener("click", () => {
  $("app").classList.remove("chat-open");
  const item = document.querySelector(`.chat-item[data-conv="${CSS.escape(state.current || "")}"]`);
  if (item) item.focus();
});

// -- dialogs ---------------------------------------------------------------------------------------

for (const dialog of document.querySelectorAll("dialog")) {
  for (const b of dialog.querySelectorAll("[data-close]")) b.addEventListener("click", () => dialog.close());
}

$("new-chat-button").addEventListener("click", () => {
  setText($("new-chat-error"), "");
  $("new-chat-form").reset();
  $("new-chat-dialog").showModal();
});

$("new-chat-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  try {
    const r = await request("new_chat", { user: $("new-chat-user").value });
    ensureChat(r.chat.conv, r.chat);
    $("new-chat-dialog").close();
    await openChat(r.chat.conv, true);
  } catch (err) {
    setText($("new-chat-error"), err.message);
  }
});

$("new-group-button").addEventListener("click", () => {
  setText($("new-group-error"), "");
  $("new-group-form").reset();
  $("new-group-dialog").showModal();
});

const splitUsers = (text) => text.split(/[\s,]+/).filter(Boolean);

$("new-group-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  try {
    const r = await request("new_group", { name: $("new-group-name").value, members: splitUsers($("new-group-members").value) });
    ensureChat(r.chat.conv, r.chat);
    $("new-group-dialog").close();
    await openChat(r.chat.conv, true);
  } catch (err) {
    setText($("new-group-error"), err.message);
  }
});

$("group-info-button").addEventListener("click", async () => {
  setText($("group-error"), "");
  $("group-dialog").showModal();
  try {
    renderGroup((await request("group_info", { conv: state.current })).group);
  } catch (err) {
    setText($("group-error"), err.message);
  }
});

function renderGroup(info) {
  state.group = info;
  const chat = ensureChat(info.group, { name: info.name, members: info.members });
  setText($("group-dialog-title"), info.name);
  if (info.group === state.current) renderHeader();
  const admin = info.admins.includes(state.me);
  const rows = [...info.members].sort().map((user) =>
    el(
      "li",
      { dataset: { user } },
      el("span", {}, user === state.me ? `${user} (you)` : user, info.admins.includes(user) ? el("span", { class: "admin" }, "admin") : null),
      admin && user !== state.me
        ? el("button", { type: "button", "aria-label": `Remove ${user}`, onclick: () => groupChange("group_remove", [user]) }, "Remove")
        : null,
    ),
  );
  $("group-members").replaceChildren(...rows);
  renderChatList();
  return chat;
}

async function groupChange(op, members) {
  setText($("group-error"), "");
  try {
    renderGroup((await request(op, { conv: state.group.group, members })).group);
  } catch (err) {
    setText($("group-error"), err.message);
  }
}

$("group-add-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const users = splitUsers($("group-add-user").value);
  if (users.length) groupChange("group_add", users).then(() => ($("group-add-user").value = ""));
});

$("group-leave").addEventListener("click", async () => {
  try {
    const r = await request("group_leave", { conv: state.group.group });
    ensureChat(r.chat.conv, r.chat);
    $("group-dialog").close();
    renderHeader();
  } catch (err) {
    setText($("group-error"), err.message);
  }
});

function showInfo(m) {
  state.info = m;
  setText($("info-text"), m.attachment ? `${kindText(m.attachment.content_type)}: ${m.attachment.name}` : m.text);
  $("info-list").replaceChildren();
  $("info-dialog").showModal();
  loadInfo(m);
}

function whenNode(kind, label, at, reached) {
  if (at) {
    const text = dayKey(at) === dayKey(Date.now()) ? hhmm(at) : `${shortTime(at)} ${hhmm(at)}`;
    return el("span", { dataset: { kind } }, `${label} `, el("time", { datetime: new Date(at).toISOString() }, text));
  }
  return el("span", { dataset: { kind } }, reached ? `${label} (time not known)` : `Not ${label.toLowerCase()} yet`);
}

async function loadInfo(m) {
  const list = $("info-list");
  try {
    const { marks } = await request("receipts", { conv: m.conv, seq: m.seq });
    if (state.info !== m) return;
    const rows = Object.entries(marks)
      .filter(([user]) => user !== state.me)
      .sort(([a], [b]) => a.localeCompare(b))
      .map(([user, mark]) =>
        el(
          "li",
          { dataset: { user } },
          el("span", { class: "who" }, user),
          el(
            "span",
            { class: "when" },
            whenNode("delivered", "Delivered", mark.delivered_at, mark.delivered >= m.seq),
            whenNode("read", "Read", mark.read_at, mark.read >= m.seq),
          ),
        ),
      );
    if (!rows.length) rows.push(el("li", {}, "No receipts yet."));
    list.replaceChildren(...rows);
  } catch (err) {
    list.replaceChildren(el("li", {}, err.message));
  }
}

async function showSafetyNumber() {
  const conv = state.current;
  const chat = state.chats.get(conv);
  setText($("safety-error"), "");
  setText($("safety-intro"), `Compare these numbers with ${chat.name}'s, in person or over a call. If they match, no one is in between.`);
  $("safety-digits").replaceChildren();
  $("safety-dialog").showModal();
  try {
    const r = await request("safety_number", { conv });
    $("safety-digits").replaceChildren(...r.groups.map((g) => el("span", {}, g)));
    renderSafetyState(r.verified);
  } catch (err) {
    setText($("safety-error"), err.message);
  }
}

function renderSafetyState(verified) {
  setText($("safety-state"), verified ? "Verified" : "Not verified");
  setText($("safety-verify"), verified ? "Clear verification" : "Mark as verified");
  $("safety-verify").dataset.verified = String(verified);
}

$("safety-button").addEventListener("click", showSafetyNumber);
$("key-banner-button").addEventListener("click", showSafetyNumber);
$("safety-verify").addEventListener("click", async () => {
  const verified = $("safety-verify").dataset.verified !== "true";
  try {
    const r = await request("verify", { conv: state.current, verified });
    ensureChat(r.chat.conv, r.chat);
    renderSafetyState(r.chat.verified);
    renderHeader();
  } catch (err) {
    setText($("safety-error"), err.message);
  }
});

// -- search -------------------------------------------------------------------------------------------

$("search-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const text = $("search-input").value.trim();
  if (!text) return;
  try {
    const { results } = await request("search", { text });
    const items = results.map((m) => {
      const chat = ensureChat(m.conv);
      return el(
        "li",
        {},
        el(
          "button",
          { type: "button", class: "result-item", dataset: { conv: m.conv, id: m.id }, onclick: () => openChat(m.conv, true) },
          el("span", { class: "chat-name" }, `${chat.name} · ${shortTime(m.ts)}`),
          el("span", { class: "chat-preview" }, m.kind === "own" ? `you: ${m.text}` : `${m.sender}: ${m.text}`),
        ),
      );
    });
    if (!items.length) items.push(el("li", { class: "empty" }, "Nothing found."));
    $("search-list").replaceChildren(...items);
    $("search-results").hidden = false;
  } catch (err) {
    toast(`search: ${err.message}`);
  }
});

$("search-clear").addEventListener("click", () => {
  $("search-results").hidden = true;
  $("search-input").value = "";
  $("search-input").focus();
});

// -- misc ------------------------------------------------------------------------------------------------

let toastTimer = null;
function toast(text) {
  let node = document.querySelector(".toast");
  if (!node) {
    node = el("div", { class: "toast", role: "alert" });
    document.body.append(node);
  }
  setText(node, text);
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => node.remove(), 5000);
}

// The first load carried the secret in the address; the cookie has it now.
if (location.search) history.replaceState(null, "", "/");
connect();
