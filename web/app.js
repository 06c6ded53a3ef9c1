// Courier demo client: the reference client of protocol v1 (docs/protocol.md).
//
// Everything shown is derived from the user's log: the server sends `hello`, then every event
// after this device's cursor, then live events; the client applies each event once (by `seq`),
// acks it, and renders. The only thing kept in the browser is a copy of the log events this
// device has already received (localStorage, per server, user and device), so that a reload can
// rebuild the same state without the server replaying what was already acked. Losing that copy
// loses nothing on the server: "Resync this device" unlinks and relinks the device, and the
// server replays the whole stored log.
'use strict';
(function () {
  // ---------------------------------------------------------------------------------------------
  // Small helpers

  const $ = (id) => document.getElementById(id);
  const ID_RE = /^[A-Za-z0-9_.-]{1,64}$/;

  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    if (attrs) {
      for (const [k, v] of Object.entries(attrs)) {
        if (v === undefined || v === null || v === false) continue;
        if (k === 'class') node.className = v;
        else if (k === 'text') node.textContent = v;
        else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
        else node.setAttribute(k, v === true ? '' : String(v));
      }
    }
    for (const c of children.flat()) {
      if (c === undefined || c === null || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  // Message ids are decimal strings of u64s (beyond 2^53): compare by length, then text.
  function cmpId(a, b) {
    a = String(a || '');
    b = String(b || '');
    if (a.length !== b.length) return a.length < b.length ? -1 : 1;
    return a < b ? -1 : a > b ? 1 : 0;
  }
  const maxId = (a, b) => (!a ? b : !b ? a : cmpId(a, b) >= 0 ? a : b);

  let clientIdCounter = 0;
  // Client ids are the idempotency keys of this device and the server remembers the last
  // 10,000 per device across restarts: they must never repeat, also not after a reload.
  function newClientId(prefix) {
    const rand = Math.random().toString(36).slice(2, 10);
    clientIdCounter += 1;
    return `${prefix}${Date.now().toString(36)}-${rand}-${clientIdCounter}`;
  }

  function fmtTime(ts) {
    if (!ts) return '';
    const d = new Date(ts);
    const now = new Date();
    const hm = d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
    if (d.toDateString() === now.toDateString()) return hm;
    return `${d.toLocaleDateString([], { month: 'short', day: 'numeric' })} ${hm}`;
  }

  function splitIds(text) {
    return String(text || '')
      .split(/[\s,;]+/)
      .map((s) => s.trim())
      .filter(Boolean);
  }

  // sessionStorage, where the browser allows it (not in some embedded frames).
  function session(key, value) {
    try {
      if (value === undefined) return sessionStorage.getItem(key);
      sessionStorage.setItem(key, value);
    } catch (_) { /* no storage here: only the convenience is lost */ }
    return null;
  }

  function defaultWsUrl() {
    const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const host = location.host || '127.0.0.1:7070';
    return `${proto}//${host}/v1/ws`;
  }

  // ---------------------------------------------------------------------------------------------
  // The local copy of the log (what the log gave this device; see the header comment)

  class LogCache {
    constructor(server, user, device) {
      this.prefix = `courier:v1:${server}:${user}:${device}:`;
      this.chunkSize = 200;
      this.buffer = [];
      this.ok = true;
      try {
        const probe = '__courier_probe__';
        localStorage.setItem(probe, '1');
        localStorage.removeItem(probe);
      } catch (_) {
        this.ok = false;
      }
      this.meta = this.ok ? this.readMeta() : { chunks: 0, last: 0 };
      this.tail = this.meta.chunks > 0 ? this.readChunk(this.meta.chunks - 1) : [];
    }
    readMeta() {
      try {
        const m = JSON.parse(localStorage.getItem(this.prefix + 'meta') || 'null');
        if (m && Number.isInteger(m.chunks) && Number.isInteger(m.last)) return m;
      } catch (_) { /* corrupt: start over */ }
      return { chunks: 0, last: 0 };
    }
    readChunk(i) {
      try {
        return JSON.parse(localStorage.getItem(this.prefix + 'c' + i) || '[]');
      } catch (_) {
        return [];
      }
    }
    get last() {
      return this.buffer.length ? this.buffer[this.buffer.length - 1].seq : this.meta.last;
    }
    load() {
      const out = [];
      for (let i = 0; i < this.meta.chunks; i++) out.push(...this.readChunk(i));
      return out;
    }
    append(ev) {
      if (this.ok) this.buffer.push(ev);
    }
    // Writes buffered events; called before acking them.
    flush() {
      if (!this.ok || this.buffer.length === 0) return;
      try {
        this.write();
      } catch (_) {
        // Quota: make room by dropping the copies of other identities, then try once more.
        this.dropOthers();
        try {
          this.write();
        } catch (_e) {
          // Stop keeping a copy; the log on the server is unaffected.
          this.ok = false;
          this.clear();
          banner('This browser has no room to keep the log: a reload will show only new events.', ['Resync this device', resync]);
        }
      }
      this.buffer = [];
    }
    write() {
      const meta = { ...this.meta };
      let tail = this.tail.slice();
      for (const ev of this.buffer) {
        if (tail.length >= this.chunkSize) {
          localStorage.setItem(this.prefix + 'c' + (meta.chunks - 1), JSON.stringify(tail));
          tail = [];
        }
        if (tail.length === 0) meta.chunks += 1;
        tail.push(ev);
        meta.last = ev.seq;
      }
      localStorage.setItem(this.prefix + 'c' + (meta.chunks - 1), JSON.stringify(tail));
      localStorage.setItem(this.prefix + 'meta', JSON.stringify(meta));
      this.meta = meta;
      this.tail = tail;
    }
    dropOthers() {
      try {
        const doomed = [];
        for (let i = 0; i < localStorage.length; i++) {
          const k = localStorage.key(i);
          if (k && k.startsWith('courier:v1:') && !k.startsWith(this.prefix)) doomed.push(k);
        }
        for (const k of doomed) localStorage.removeItem(k);
      } catch (_) { /* nothing more to do */ }
    }
    clear() {
      try {
        for (let i = 0; i < this.meta.chunks; i++) localStorage.removeItem(this.prefix + 'c' + i);
        localStorage.removeItem(this.prefix + 'meta');
      } catch (_) { /* nothing to do */ }
      this.meta = { chunks: 0, last: 0 };
      this.tail = [];
      this.buffer = [];
    }
  }

  // ---------------------------------------------------------------------------------------------
  // State

  const S = {
    conf: null, // {ws, mode, user, device, token}
    ws: null,
    wsGen: 0,
    conn: 'idle',
    closeInfo: '',
    me: null,
    device: null,
    hello: null,
    lastSeq: 0, // highest seq applied to the state
    ackedSeq: 0, // highest seq acked on this connection
    ackTimer: null,
    cache: null,
    chats: new Map(),
    devices: new Map(),
    pending: new Map(), // client id -> {id, to, body, state, msg, ts, error}
    ops: new Map(), // id of a non-send frame -> description, to explain its error
    typing: new Map(), // chat -> Map(from -> expiry ms)
    readSent: new Map(), // chat -> up_to sent on this connection
    openChat: null,
    editing: null, // {chat, msg}
    wantOpen: null,
    typingOut: { chat: null, sentAt: 0, stopTimer: null },
    reconnectAttempt: 0,
    reconnectTimer: null,
    stopped: true,
    resyncing: false,
    everHello: false,
    deviceLimit: false,
    frameLog: [],
    renderQueued: false,
  };

  function resetLogState() {
    S.lastSeq = 0;
    S.ackedSeq = 0;
    S.chats = new Map();
    S.devices = new Map();
    S.typing = new Map();
    S.readSent = new Map();
    S.openChat = null;
    S.editing = null;
  }

  function getChat(id) {
    let chat = S.chats.get(id);
    if (!chat) {
      chat = {
        id,
        group: id.startsWith('g:'),
        msgs: new Map(),
        readUpTo: '',
        delivered: new Map(), // member -> up_to
        read: new Map(), // member -> up_to
        members: [], // join order, as far as the log tells
        membersComplete: false,
        admin: null,
        member: true,
        lastTs: 0,
        olderExhausted: false,
        draft: '',
      };
      S.chats.set(id, chat);
    }
    return chat;
  }

  // ---------------------------------------------------------------------------------------------
  // Applying log events (pure state changes; rendering happens later)

  function applyEvent(ev) {
    switch (ev.kind) {
      case 'msg': {
        const chat = getChat(ev.chat);
        if (!chat.msgs.has(ev.msg)) {
          chat.msgs.set(ev.msg, {
            msg: ev.msg, from: ev.from, dev: ev.dev, body: ev.body, ts: ev.ts, seq: ev.seq,
            edited: !!ev.edited, deleted: false, hidden: false,
          });
        }
        chat.lastTs = Math.max(chat.lastTs, ev.ts || 0);
        if (chat.group && ev.from && !chat.members.includes(ev.from) && !chat.membersComplete) {
          chat.members.push(ev.from);
        }
        settlePending(chat, ev);
        // A message means whoever sent it stopped typing.
        const t = S.typing.get(ev.chat);
        if (t) t.delete(ev.from);
        break;
      }
      case 'receipt': {
        const chat = getChat(ev.chat);
        if (chat.group && !chat.membersComplete && !chat.members.includes(ev.by)) chat.members.push(ev.by);
        if (ev.status === 'read') {
          chat.read.set(ev.by, maxId(chat.read.get(ev.by), ev.up_to));
        }
        chat.delivered.set(ev.by, maxId(chat.delivered.get(ev.by), ev.up_to));
        break;
      }
      case 'read': {
        const chat = getChat(ev.chat);
        chat.readUpTo = maxId(chat.readUpTo, ev.up_to);
        break;
      }
      case 'edit': {
        const m = S.chats.get(ev.chat)?.msgs.get(ev.msg);
        if (m) {
          m.body = ev.body;
          m.edited = true;
        }
        break;
      }
      case 'delete': {
        const m = S.chats.get(ev.chat)?.msgs.get(ev.msg);
        if (m) {
          if (ev.scope === 'me') m.hidden = true;
          else {
            m.deleted = true;
            m.body = '';
          }
        }
        if (S.editing && S.editing.msg === ev.msg) S.editing = null;
        break;
      }
      case 'group': {
        const fresh = !S.chats.has(ev.chat);
        const chat = getChat(ev.chat);
        chat.group = true;
        if (fresh) chat.member = false; // until the event says we are in
        const members = Array.isArray(ev.members) ? ev.members : [];
        if (ev.op === 'created') {
          chat.members = members.slice();
          chat.membersComplete = true;
          chat.admin = members[0] || ev.by;
          chat.member = members.includes(S.me);
          chat.lastTs = Math.max(chat.lastTs, ev.ts || 0);
          if (S.wantOpen === ev.chat && ev.by === S.me) {
            S.wantOpen = null;
            openChat(ev.chat);
          }
        } else if (ev.op === 'added') {
          if (members.includes(S.me) && !chat.member) {
            // Our first event of this group: the log names who was added, not who was there.
            chat.member = true;
            if (!chat.members.includes(ev.by)) chat.members.push(ev.by);
            chat.lastTs = Math.max(chat.lastTs, ev.ts || 0);
          }
          for (const m of members) if (!chat.members.includes(m)) chat.members.push(m);
        } else if (ev.op === 'removed' || ev.op === 'left') {
          chat.members = chat.members.filter((m) => !members.includes(m));
          if (members.includes(S.me)) chat.member = false;
          if (chat.admin && !chat.members.includes(chat.admin)) chat.admin = chat.members[0] || null;
        }
        break;
      }
      case 'device': {
        if (ev.op === 'linked') {
          const d = S.devices.get(ev.device) || { device: ev.device, online: false, cursor: null };
          S.devices.set(ev.device, d);
        } else if (ev.op === 'unlinked') {
          S.devices.delete(ev.device);
        }
        break;
      }
      default:
        break; // unknown kinds are skipped (forward compatible)
    }
  }

  // The log copy of a message this device sent replaces its pending entry. `sent` names the
  // message id, but the log copy usually arrives first (the sender's log is committed before the
  // recipient's) and carries no client id: it is matched to the oldest pending send of that chat
  // with the same body (one device's sends to one chat keep their order).
  function settlePending(chat, ev) {
    for (const [id, p] of S.pending) {
      if (p.msg === ev.msg) {
        S.pending.delete(id);
        return;
      }
    }
    if (ev.from !== S.me || ev.dev !== S.device) return;
    for (const p of S.pending.values()) {
      if (p.to === chat.id && !p.msg && !p.logMsg && p.state !== 'failed' && p.body === ev.body) {
        p.logMsg = ev.msg;
        return;
      }
    }
  }

  function onEvent(ev) {
    if (typeof ev.seq !== 'number' || ev.seq <= S.lastSeq) {
      scheduleAck();
      return; // already applied (a resend after a reconnect)
    }
    applyEvent(ev);
    S.lastSeq = ev.seq;
    if (S.cache) S.cache.append(ev);
    scheduleAck();
    if (ev.kind === 'device') requestDevices();
    render();
  }

  function scheduleAck() {
    if (S.ackTimer) return;
    S.ackTimer = setTimeout(flushAck, 40);
  }

  function flushAck() {
    S.ackTimer = null;
    if (S.cache) S.cache.flush(); // keep the copy before the server forgets the events for us
    if (S.lastSeq > S.ackedSeq && wsOpen()) {
      sendFrame({ t: 'ack', seq: S.lastSeq });
      S.ackedSeq = S.lastSeq;
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Connection

  function wsOpen() {
    return S.ws && S.ws.readyState === WebSocket.OPEN;
  }

  function sendFrame(obj) {
    if (!wsOpen()) return false;
    const text = JSON.stringify(obj);
    S.ws.send(text);
    logFrame('out', obj.t === 'ack' ? null : text);
    return true;
  }

  function wsUrl() {
    const c = S.conf;
    const base = c.ws || defaultWsUrl();
    const url = new URL(base, location.href);
    if (c.mode === 'token') {
      url.searchParams.set('token', c.token);
    } else {
      url.searchParams.set('user', c.user);
      url.searchParams.set('device', c.device);
    }
    return url.toString();
  }

  function setConn(state, text) {
    S.conn = state;
    S.closeInfo = text || '';
    render();
  }

  function connect() {
    clearTimeout(S.reconnectTimer);
    S.reconnectTimer = null;
    S.stopped = false;
    const gen = ++S.wsGen;
    let ws;
    try {
      ws = new WebSocket(wsUrl());
    } catch (e) {
      setConn('closed', `bad WebSocket URL: ${e.message}`);
      S.stopped = true;
      return;
    }
    S.ws = ws;
    S.gotHello = false;
    setConn('connecting', S.reconnectAttempt ? `reconnecting (try ${S.reconnectAttempt + 1})` : 'connecting');
    ws.onmessage = (e) => {
      if (gen !== S.wsGen) return;
      let f;
      try {
        f = JSON.parse(e.data);
      } catch (_) {
        logFrame('in', String(e.data));
        return;
      }
      logFrame('in', e.data);
      onFrame(f);
    };
    ws.onclose = (e) => {
      if (gen !== S.wsGen) return;
      onClose(e);
    };
  }

  function onClose(e) {
    S.ws = null;
    clearTimeout(S.ackTimer);
    S.ackTimer = null;
    if (S.cache) S.cache.flush();
    S.typing = new Map();
    const code = e.code;
    if (S.resyncing && code === 4003) {
      // We unlinked ourselves to be replayed from the start.
      S.resyncing = false;
      if (S.cache) S.cache.clear();
      resetLogState();
      S.everHello = false;
      S.me = null;
      S.reconnectAttempt = 0;
      connect();
      return;
    }
    if (S.stopped) {
      setConn('closed', 'signed out');
      return;
    }
    if (code === 4001) {
      S.stopped = true;
      setConn('closed', 'closed 4001: this device connected elsewhere (replaced)');
      banner('This device was opened in another tab or window, which replaced this connection (4001).',
        ['Take it back', reconnectNow]);
      return;
    }
    if (code === 4003) {
      S.stopped = true;
      const why = S.deviceLimit ? 'the user has too many devices' : 'this device was unlinked';
      setConn('closed', `closed 4003: ${why}`);
      banner(S.deviceLimit
        ? 'This user already has the maximum number of devices (4003). Unlink one from another device, then sign in again.'
        : 'This device was unlinked (4003). Connecting again links it as a new device, which replays the whole log.',
      ['Connect again', reconnectNow]);
      return;
    }
    const base = Math.min(30000, 500 * 2 ** S.reconnectAttempt);
    const delay = Math.round(base / 2 + Math.random() * base / 2);
    S.reconnectAttempt += 1;
    const hint = S.gotHello ? '' : ' (server down, or credentials refused)';
    setConn('connecting', `closed ${code || ''}${e.reason ? ' ' + e.reason : ''}${hint}; retry in ${(delay / 1000).toFixed(1)} s`);
    S.reconnectTimer = setTimeout(connect, delay);
  }

  function onFrame(f) {
    switch (f.t) {
      case 'hello': return onHello(f);
      case 'ev': return onEvent(f);
      case 'sent': return onSent(f);
      case 'error': return onError(f);
      case 'typing': return onTyping(f);
      case 'devices': return onDevices(f);
      case 'history': return onHistory(f);
      default: return undefined; // unknown frames are ignored
    }
  }

  function onHello(hello) {
    const server = new URL(S.ws.url).host;
    const sameIdentity = S.me === hello.user && S.device === hello.device && S.everHello;
    if (!sameIdentity) {
      resetLogState();
      S.me = hello.user;
      S.device = hello.device;
      S.cache = new LogCache(server, hello.user, hello.device);
      // A new link (cursor 0) or a server that lost its data starts from nothing.
      if (hello.cursor === 0 || S.cache.last > hello.head) S.cache.clear();
      for (const ev of S.cache.load()) {
        if (ev.seq <= S.lastSeq) continue;
        applyEvent(ev);
        S.lastSeq = ev.seq;
      }
    } else if (hello.head < S.lastSeq || (hello.cursor === 0 && S.lastSeq > 0)) {
      // The server's log is not the one we followed (data reset, or this device was unlinked
      // and linked again while away): start over from what the server replays.
      resetLogState();
      if (S.cache) S.cache.clear();
    }
    S.hello = hello;
    S.everHello = true;
    S.gotHello = true;
    S.deviceLimit = false;
    S.ackedSeq = hello.cursor;
    S.readSent = new Map();
    S.reconnectAttempt = 0;
    if (S.lastSeq < hello.cursor && hello.cursor >= (hello.low || 1)) {
      banner(`This browser has no copy of events ${S.lastSeq + 1}–${hello.cursor} of this device, which it acknowledged earlier. ` +
        'Chats shown may be incomplete: "Load older messages" fetches history, "Resync this device" replays the whole log.',
      ['Resync this device', resync]);
    } else if (hello.gap) {
      banner('Some events of this device were removed by retention before it caught up.');
    } else {
      banner(null);
    }
    setConn('open', `connected · seq ${S.lastSeq}/${hello.head}`);
    // Sends that never got `sent` are retried with the same id: the server deduplicates.
    for (const p of S.pending.values()) {
      if (p.state === 'pending') sendFrame({ t: 'send', id: p.id, to: p.to, body: p.body });
    }
    requestDevices();
    render();
  }

  function onSent(f) {
    const p = S.pending.get(f.id);
    if (!p) return;
    p.state = 'sent';
    p.msg = f.msg;
    p.ts = f.ts;
    if (p.logMsg !== f.msg) p.logMsg = null;
    const chat = S.chats.get(p.to);
    if (chat && chat.msgs.has(f.msg)) S.pending.delete(f.id);
    render();
  }

  function onError(f) {
    const p = f.id ? S.pending.get(f.id) : null;
    if (p) {
      if ((f.code === 'busy' || f.code === 'rate_limited') && p.state === 'pending') {
        const wait = (f.retry_ms || 500) + Math.round(Math.random() * 100);
        setTimeout(() => {
          if (S.pending.get(p.id) === p && p.state === 'pending') {
            sendFrame({ t: 'send', id: p.id, to: p.to, body: p.body });
          }
        }, wait);
        return;
      }
      p.state = 'failed';
      p.error = `${f.code}${f.reason ? ': ' + f.reason : ''}`;
      render();
      return;
    }
    if (f.code === 'device_limit') {
      S.deviceLimit = true;
      return;
    }
    const op = f.id ? S.ops.get(f.id) : null;
    if (f.id) S.ops.delete(f.id);
    if (op && op.startsWith('History of ')) {
      const chat = S.chats.get(op.slice('History of '.length));
      if (chat) chat.loadingOlder = false;
      render();
    }
    if (op === 'typing') return; // typing is best effort
    if (op && op.startsWith('read ') && f.code === 'rate_limited') {
      S.readSent = new Map(); // the mark will be sent again on the next render
      return;
    }
    toast(`${op ? op + ': ' : ''}${f.code}${f.reason ? ' — ' + f.reason : ''}`, 'error');
  }

  function onTyping(f) {
    let m = S.typing.get(f.chat);
    if (!m) {
      m = new Map();
      S.typing.set(f.chat, m);
    }
    if (f.on) {
      m.set(f.from, Date.now() + 6000);
      setTimeout(render, 6100);
    } else {
      m.delete(f.from);
    }
    render();
  }

  function onDevices(f) {
    const next = new Map();
    for (const d of f.list || []) next.set(d.device, { device: d.device, online: !!d.online, cursor: d.cursor });
    S.devices = next;
    S.devicesAt = Date.now();
    render();
  }

  function onHistory(f) {
    const chat = getChat(f.chat);
    chat.loadingOlder = false;
    const msgs = f.msgs || [];
    if (msgs.length === 0) chat.olderExhausted = true;
    for (const ev of msgs) {
      if (!chat.msgs.has(ev.msg)) {
        chat.msgs.set(ev.msg, {
          msg: ev.msg, from: ev.from, dev: ev.dev, body: ev.body, ts: ev.ts, seq: ev.seq,
          edited: !!ev.edited, deleted: false, hidden: false,
        });
        chat.lastTs = Math.max(chat.lastTs, ev.ts || 0);
      }
    }
    render();
  }

  // An operation frame other than `send`, with an `id` so that its error can be matched.
  function sendOp(obj, description) {
    const id = newClientId('op');
    S.ops.set(id, description);
    if (S.ops.size > 500) S.ops.delete(S.ops.keys().next().value);
    if (!sendFrame({ ...obj, id })) {
      toast('Not connected', 'error');
      S.ops.delete(id);
      return false;
    }
    return true;
  }

  function requestDevices() {
    sendFrame({ t: 'devices' });
  }

  // ---------------------------------------------------------------------------------------------
  // User actions

  function sendMessage(chatId, body) {
    const id = newClientId('c');
    const p = { id, to: chatId, body, state: 'pending', created: Date.now() };
    S.pending.set(id, p);
    getChat(chatId);
    sendFrame({ t: 'send', id, to: chatId, body });
    render();
  }

  function retryPending(id) {
    const p = S.pending.get(id);
    if (!p) return;
    p.state = 'pending';
    p.error = null;
    sendFrame({ t: 'send', id: p.id, to: p.to, body: p.body });
    render();
  }

  function openChat(id) {
    if (S.openChat !== id) stopTyping();
    S.openChat = id;
    S.editing = null;
    const chat = getChat(id);
    $('composer-input').value = chat.draft || '';
    S.justOpened = true; // scroll to the newest message and focus the composer
    render();
  }

  // Messages show in log order (the order every device of the user saw them): ids minted on
  // different shards can interleave by a few milliseconds. Every message carries its seq, also
  // those from `history`; the id only breaks ties for the unexpected.
  function logOrder(a, b) {
    if (typeof a.seq === 'number' && typeof b.seq === 'number' && a.seq !== b.seq) return a.seq - b.seq;
    return cmpId(a.msg, b.msg);
  }

  function newestFromOthers(chat) {
    let newest = '';
    for (const m of chat.msgs.values()) if (m.from !== S.me) newest = maxId(newest, m.msg);
    return newest;
  }

  function unreadCount(chat) {
    let n = 0;
    for (const m of chat.msgs.values()) {
      if (m.from !== S.me && !m.hidden && !m.deleted && cmpId(m.msg, chat.readUpTo) > 0) n++;
    }
    return n;
  }

  // While a chat is open and the page visible, everything in it is read.
  function markRead() {
    if (!S.openChat || !wsOpen() || document.visibilityState === 'hidden') return;
    const chat = S.chats.get(S.openChat);
    if (!chat || unreadCount(chat) === 0) return;
    const upTo = newestFromOthers(chat);
    if (!upTo || cmpId(upTo, chat.readUpTo) <= 0) return;
    if (S.readSent.get(chat.id) === upTo) return;
    S.readSent.set(chat.id, upTo);
    sendOp({ t: 'read', chat: chat.id, up_to: upTo }, `read ${chat.id}`);
  }

  function typingInput() {
    const chat = S.openChat;
    if (!chat || chat === S.me || !wsOpen()) return;
    const c = S.chats.get(chat);
    if (c && c.group && !c.member) return;
    const t = S.typingOut;
    const now = Date.now();
    // At most one `typing` every 2.5 s while typing (the server allows 5/s): the receiver
    // shows the indicator for 6 s after the last one.
    if (t.chat !== chat || now - t.sentAt > 2500) {
      if (t.chat && t.chat !== chat) stopTyping();
      sendOp({ t: 'typing', chat, on: true }, 'typing');
      t.chat = chat;
      t.sentAt = now;
    }
    clearTimeout(t.stopTimer);
    t.stopTimer = setTimeout(stopTyping, 4000);
  }

  function stopTyping() {
    const t = S.typingOut;
    clearTimeout(t.stopTimer);
    t.stopTimer = null;
    if (t.chat) {
      sendOp({ t: 'typing', chat: t.chat, on: false }, 'typing');
      t.chat = null;
      t.sentAt = 0;
    }
  }

  function startEdit(chatId, m) {
    S.editing = { chat: chatId, msg: m.msg };
    $('composer-input').value = m.body;
    render();
    $('composer-input').focus();
  }

  function signIn(conf) {
    S.conf = conf;
    S.me = null;
    S.device = null;
    S.everHello = false;
    S.pending = new Map();
    S.reconnectAttempt = 0;
    resetLogState();
    $('signin-view').hidden = true;
    $('app-view').hidden = false;
    for (const id of ['devices-toggle', 'log-toggle', 'signout']) $(id).hidden = false;
    connect();
  }

  function signOut() {
    S.stopped = true;
    stopTyping();
    clearTimeout(S.reconnectTimer);
    if (S.cache) S.cache.flush();
    if (S.ws) S.ws.close(1000, 'signed out');
    S.ws = null;
    S.wsGen++;
    S.me = null;
    S.device = null;
    S.everHello = false;
    S.cache = null;
    S.pending = new Map();
    resetLogState();
    setConn('idle', 'not connected');
    $('signin-view').hidden = false;
    $('app-view').hidden = true;
    for (const id of ['devices-toggle', 'log-toggle', 'signout']) $(id).hidden = true;
    banner(null);
    const u = new URL(location.href);
    for (const k of ['user', 'device', 'token']) u.searchParams.delete(k);
    history.replaceState(null, '', u.toString());
  }

  // ---------------------------------------------------------------------------------------------
  // Rendering (batched: one pass for a burst of frames)

  function render() {
    if (S.renderQueued) return;
    S.renderQueued = true;
    // A timer, not requestAnimationFrame: that one pauses in background tabs and windows, and a
    // tab in the background must still update its unread counts and title.
    setTimeout(() => {
      S.renderQueued = false;
      renderNow();
    }, 10);
  }

  function renderNow() {
    renderTop();
    if (!$('app-view').hidden) {
      renderChatList();
      renderConversation();
      renderDevices();
      markRead();
    }
  }

  function renderTop() {
    const st = document.querySelector('[data-testid="conn-status"]');
    st.dataset.state = S.conn;
    st.querySelector('.conn-text').textContent =
      S.conn === 'open' ? `connected · seq ${S.lastSeq}` : S.closeInfo || S.conn;
    st.title = S.closeInfo;
    $('who').textContent = S.me ? `${S.me} · ${S.device}` : S.conf && S.conf.mode === 'dev' ? `${S.conf.user} · ${S.conf.device}` : '';
    $('who').dataset.user = S.me || '';
    $('who').dataset.device = S.device || '';
    document.title = S.me ? `${totalUnread() ? `(${totalUnread()}) ` : ''}${S.me}/${S.device} · Courier` : 'Courier';
  }

  function totalUnread() {
    let n = 0;
    for (const c of S.chats.values()) n += unreadCount(c);
    return n;
  }

  function lastVisible(chat) {
    let last = null;
    for (const m of chat.msgs.values()) if (!m.hidden && (!last || logOrder(m, last) > 0)) last = m;
    return last;
  }

  function typingNames(chatId) {
    const m = S.typing.get(chatId);
    if (!m) return [];
    const now = Date.now();
    const names = [];
    for (const [from, until] of m) {
      if (until > now) names.push(from);
      else m.delete(from);
    }
    return names;
  }

  function pendingFor(chatId) {
    const out = [];
    for (const p of S.pending.values()) if (p.to === chatId) out.push(p);
    return out;
  }

  function renderChatList() {
    const list = $('chat-list');
    const chats = [...S.chats.values()].sort((a, b) => {
      const ta = Math.max(a.lastTs, ...pendingFor(a.id).map((p) => p.created));
      const tb = Math.max(b.lastTs, ...pendingFor(b.id).map((p) => p.created));
      return tb - ta || a.id.localeCompare(b.id);
    });
    $('chat-list-empty').hidden = chats.length > 0;
    list.replaceChildren(...chats.map((chat) => {
      const unread = unreadCount(chat);
      const last = lastVisible(chat);
      const typing = typingNames(chat.id);
      let preview = '';
      if (typing.length) preview = chat.group ? `${typing.join(', ')} typing…` : 'typing…';
      else if (last) preview = `${last.from === S.me ? 'You: ' : chat.group ? last.from + ': ' : ''}${last.deleted ? 'message deleted' : last.body}`;
      else if (chat.group) preview = chat.member ? 'group' : 'you left';
      return h('li', {
        class: `chat-item${chat.id === S.openChat ? ' active' : ''}${unread ? ' unread' : ''}`,
        'data-testid': 'chat-item',
        'data-chat': chat.id,
        'data-unread': unread,
        onclick: () => openChat(chat.id),
      },
      h('div', { class: 'avatar' + (chat.group ? ' group' : '') }, chat.group ? '#' : chat.id.slice(0, 1).toUpperCase()),
      h('div', { class: 'chat-main' },
        h('div', { class: 'chat-name', 'data-testid': 'chat-name' }, chatTitle(chat)),
        h('div', { class: `chat-preview${typing.length ? ' is-typing' : ''}`, 'data-testid': 'chat-preview' }, preview)),
      h('div', { class: 'chat-meta' },
        h('div', { class: 'chat-time' }, last ? fmtTime(last.ts) : ''),
        unread ? h('span', { class: 'badge', 'data-testid': 'unread-badge' }, String(unread)) : null));
    }));
  }

  function chatTitle(chat) {
    if (chat.group) return chat.id.slice(2);
    if (chat.id === S.me) return `${chat.id} (you)`;
    return chat.id;
  }

  // Status of one of my messages: sent (in the log), delivered, read; for a group, the
  // lowest over the other members known from the log.
  function myStatus(chat, m) {
    const others = chat.group ? chat.members.filter((x) => x !== S.me) : chat.id === S.me ? [] : [chat.id];
    if (others.length === 0) return 'sent';
    const all = (map) => others.every((who) => cmpId(map.get(who), m.msg) >= 0);
    if (all(chat.read)) return 'read';
    if (all(chat.delivered)) return 'delivered';
    return 'sent';
  }

  const TICKS = { pending: '◷', sent: '✓', delivered: '✓✓', read: '✓✓', failed: '!' };
  const TICK_TITLES = {
    pending: 'sending…',
    sent: 'sent: stored on the server',
    delivered: 'delivered',
    read: 'read',
    failed: 'not sent',
  };

  function renderConversation() {
    const chat = S.openChat ? S.chats.get(S.openChat) : null;
    $('conv-placeholder').hidden = !!chat;
    $('conv').hidden = !chat;
    const conv = $('conversation');
    conv.dataset.chat = chat ? chat.id : '';
    if (!chat) return;
    $('conv-title').textContent = chatTitle(chat);
    if (chat.group) {
      const admin = chat.admin ? ` · admin ${chat.admin}` : '';
      $('conv-sub').textContent = chat.member
        ? `${chat.membersComplete ? '' : 'members seen: '}${chat.members.join(', ')}${admin}`
        : 'You are not a member of this group.';
    } else {
      $('conv-sub').textContent = chat.id === S.me ? 'notes to self' : '';
    }
    $('group-tools').hidden = !(chat.group && chat.member);

    const box = $('messages');
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    const msgs = [...chat.msgs.values()].filter((m) => !m.hidden).sort(logOrder);
    const items = msgs.map((m) => renderMessage(chat, m));
    for (const p of pendingFor(chat.id)) {
      if (p.msg && chat.msgs.has(p.msg)) continue;
      if (p.logMsg && chat.msgs.has(p.logMsg)) continue; // shown as its log copy
      items.push(renderPending(p));
    }
    $('message-list').replaceChildren(...items);
    $('load-older').hidden = chat.olderExhausted;
    $('load-older').disabled = !!chat.loadingOlder;
    if (atBottom || S.justOpened) box.scrollTop = box.scrollHeight;

    const typing = typingNames(chat.id);
    const t = $('typing');
    t.textContent = typing.length === 0 ? '' : chat.group ? `${typing.join(', ')} ${typing.length > 1 ? 'are' : 'is'} typing…` : `${typing[0]} is typing…`;
    t.dataset.active = typing.length ? 'true' : 'false';

    $('editing').hidden = !(S.editing && S.editing.chat === chat.id);
    const input = $('composer-input');
    const canSend = !chat.group || chat.member;
    input.disabled = !canSend;
    input.placeholder = canSend ? (S.editing ? 'Edit message' : `Message ${chatTitle(chat)}`) : 'You are not a member of this group';
    if (S.justOpened) {
      S.justOpened = false;
      if (canSend) input.focus();
    }
  }

  function renderMessage(chat, m) {
    const mine = m.from === S.me;
    // In the log, but `sent` (durable in every copy) has not come yet.
    const waiting = mine && [...S.pending.values()].some((p) => p.logMsg === m.msg && p.state === 'pending');
    const status = mine ? (waiting ? 'pending' : myStatus(chat, m)) : null;
    const unread = !mine && cmpId(m.msg, chat.readUpTo) > 0;
    const actions = [];
    if (!m.deleted) {
      if (mine) {
        actions.push(h('button', { type: 'button', class: 'link', 'data-testid': 'edit-button', onclick: () => startEdit(chat.id, m) }, 'Edit'));
        actions.push(h('button', {
          type: 'button', class: 'link', 'data-testid': 'delete-everyone-button',
          onclick: () => sendOp({ t: 'delete', msg: m.msg, scope: 'everyone' }, 'Delete for everyone'),
        }, 'Delete for everyone'));
      }
      actions.push(h('button', {
        type: 'button', class: 'link', 'data-testid': 'delete-me-button',
        onclick: () => sendOp({ t: 'delete', msg: m.msg, scope: 'me' }, 'Delete for me'),
      }, 'Delete for me'));
    } else {
      actions.push(h('button', {
        type: 'button', class: 'link', 'data-testid': 'delete-me-button',
        onclick: () => sendOp({ t: 'delete', msg: m.msg, scope: 'me' }, 'Remove'),
      }, 'Remove'));
    }
    return h('li', {
      class: `message ${mine ? 'mine' : 'theirs'}${m.deleted ? ' deleted' : ''}${unread ? ' unread' : ''}`,
      'data-testid': 'message',
      'data-msg': m.msg,
      'data-from': m.from,
      'data-status': status || (unread ? 'unread' : 'seen'),
    },
    h('div', { class: 'bubble' },
      chat.group && !mine ? h('div', { class: 'sender' }, m.from) : null,
      h('div', { class: 'body', 'data-testid': 'message-body' }, m.deleted ? 'This message was deleted' : m.body),
      h('div', { class: 'meta' },
        m.edited && !m.deleted ? h('span', { class: 'edited', 'data-testid': 'edited' }, 'edited') : null,
        h('span', { class: 'time', title: `${new Date(m.ts).toLocaleString()} · from device ${m.dev || '?'} · id ${m.msg}` }, fmtTime(m.ts)),
        mine ? h('span', { class: `ticks ${status}`, 'data-testid': 'ticks', 'data-status': status, title: TICK_TITLES[status] }, TICKS[status]) : null)),
    h('div', { class: 'actions' }, actions));
  }

  function renderPending(p) {
    return h('li', {
      class: `message mine pending${p.state === 'failed' ? ' failed' : ''}`,
      'data-testid': 'message',
      'data-client-id': p.id,
      'data-status': p.state,
    },
    h('div', { class: 'bubble' },
      h('div', { class: 'body', 'data-testid': 'message-body' }, p.body),
      h('div', { class: 'meta' },
        p.error ? h('span', { class: 'error-text' }, p.error) : null,
        h('span', { class: 'time' }, fmtTime(p.ts || p.created)),
        h('span', { class: `ticks ${p.state}`, 'data-testid': 'ticks', 'data-status': p.state, title: TICK_TITLES[p.state] }, TICKS[p.state]))),
    p.state === 'failed'
      ? h('div', { class: 'actions' },
        h('button', { type: 'button', class: 'link', onclick: () => retryPending(p.id) }, 'Retry'),
        h('button', { type: 'button', class: 'link', onclick: () => { S.pending.delete(p.id); render(); } }, 'Discard'))
      : null);
  }

  function renderDevices() {
    if ($('devices-panel').hidden) return;
    const list = [...S.devices.values()].sort((a, b) => a.device.localeCompare(b.device));
    $('device-list').replaceChildren(...list.map((d) => {
      const self = d.device === S.device;
      return h('li', { class: 'device-item', 'data-testid': 'device-item', 'data-device': d.device, 'data-online': d.online ? 'true' : 'false' },
        h('span', { class: `dot ${d.online ? 'on' : 'off'}`, title: d.online ? 'online' : 'offline' }),
        h('span', { class: 'device-name' }, d.device, self ? h('em', null, ' (this one)') : null),
        h('span', { class: 'device-cursor', title: 'acknowledged seq' }, d.cursor === null || d.cursor === undefined ? '' : `seq ${d.cursor}`),
        self ? null : h('button', {
          type: 'button', class: 'ghost danger', 'data-testid': 'unlink-button', 'data-device': d.device,
          onclick: () => sendOp({ t: 'unlink', device: d.device }, `Unlink ${d.device}`),
        }, 'Unlink'));
    }));
  }

  // ---------------------------------------------------------------------------------------------
  // Banner, toasts, protocol log

  // action: optional [label, handler] shown as a button.
  function banner(text, action) {
    const b = $('banner');
    if (!text) {
      b.hidden = true;
      b.replaceChildren();
      return;
    }
    b.hidden = false;
    const nodes = [h('span', null, text)];
    if (action) nodes.push(h('button', { type: 'button', class: 'ghost', 'data-testid': 'banner-action', onclick: action[1] }, action[0]));
    nodes.push(h('button', { type: 'button', class: 'ghost close', title: 'dismiss', onclick: () => banner(null) }, '×'));
    b.replaceChildren(...nodes);
  }

  function toast(text, kind) {
    const t = h('div', { class: `toast ${kind || ''}`, 'data-testid': 'toast' }, text);
    $('toasts').append(t);
    setTimeout(() => t.remove(), 6000);
  }

  function logFrame(dir, text) {
    if (text === null) return;
    S.frameLog.push({ dir, text: String(text).slice(0, 500), at: Date.now() });
    if (S.frameLog.length > 300) S.frameLog.shift();
    if (!$('log-panel').hidden && !S.logQueued) {
      S.logQueued = true;
      setTimeout(() => {
        S.logQueued = false;
        renderLog();
      }, 50);
    }
  }

  function renderLog() {
    $('frame-log').replaceChildren(...S.frameLog.slice(-150).map((f) =>
      h('li', { class: f.dir }, h('span', { class: 'arrow' }, f.dir === 'in' ? '←' : '→'), f.text)));
    const ol = $('frame-log');
    ol.scrollTop = ol.scrollHeight;
  }

  function reconnectNow() {
    banner(null);
    S.reconnectAttempt = 0;
    connect();
  }

  function resync() {
    if (!wsOpen() || !S.device) return;
    S.resyncing = true;
    sendFrame({ t: 'unlink', device: S.device });
  }

  // ---------------------------------------------------------------------------------------------
  // Wiring

  function initForms() {
    const form = $('signin');
    const params = new URLSearchParams(location.search);
    form.elements.ws.value = params.get('ws') || defaultWsUrl();
    form.elements.user.value = params.get('user') || session('courier-user') || '';
    form.elements.device.value = params.get('device') || session('courier-device') || '';
    const syncMode = () => {
      const token = form.elements.mode.value === 'token';
      form.querySelector('.dev-fields').hidden = token;
      form.querySelector('.token-fields').hidden = !token;
    };
    form.addEventListener('change', syncMode);
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      const mode = form.elements.mode.value;
      const conf = { mode, ws: form.elements.ws.value.trim() || defaultWsUrl() };
      const err = $('signin-error');
      err.hidden = true;
      if (mode === 'token') {
        conf.token = form.elements.token.value.trim();
        if (!conf.token) {
          err.textContent = 'Paste a token.';
          err.hidden = false;
          return;
        }
      } else {
        conf.user = form.elements.user.value.trim();
        conf.device = form.elements.device.value.trim();
        if (!ID_RE.test(conf.user) || !ID_RE.test(conf.device)) {
          err.textContent = 'User and device: 1–64 characters of A–Z a–z 0–9 _ . -';
          err.hidden = false;
          return;
        }
        session('courier-user', conf.user);
        session('courier-device', conf.device);
        // Keep the identity in the URL so that a reload (or a copied link) signs in again.
        const u = new URL(location.href);
        u.searchParams.set('user', conf.user);
        u.searchParams.set('device', conf.device);
        if (conf.ws !== defaultWsUrl()) u.searchParams.set('ws', conf.ws);
        history.replaceState(null, '', u.toString());
      }
      signIn(conf);
    });

    $('new-chat').addEventListener('submit', (e) => {
      e.preventDefault();
      const peer = e.target.elements.peer.value.trim();
      if (!ID_RE.test(peer.startsWith('g:') ? peer.slice(2) : peer)) {
        return toast('A user id (or g: and a group id) is 1–64 characters of A–Z a–z 0–9 _ . -', 'error');
      }
      e.target.reset();
      openChat(peer);
    });

    $('new-group').addEventListener('submit', (e) => {
      e.preventDefault();
      let id = e.target.elements.group.value.trim();
      if (id.startsWith('g:')) id = id.slice(2);
      if (!ID_RE.test(id)) return toast('A group id is 1–64 characters of A–Z a–z 0–9 _ . -', 'error');
      const members = splitIds(e.target.elements.members.value).filter((m) => m !== S.me);
      const bad = members.find((m) => !ID_RE.test(m));
      if (bad) return toast(`Not a user id: ${bad}`, 'error');
      S.wantOpen = `g:${id}`;
      if (sendOp({ t: 'group', op: 'create', chat: `g:${id}`, members }, `Create g:${id}`)) {
        e.target.reset();
        $('new-group-details').open = false;
      }
      return undefined;
    });

    $('add-members').addEventListener('submit', (e) => {
      e.preventDefault();
      const members = splitIds(e.target.elements.members.value);
      if (!members.length || !S.openChat) return;
      if (sendOp({ t: 'group', op: 'add', chat: S.openChat, members }, `Add to ${S.openChat}`)) e.target.reset();
    });

    $('leave-group').addEventListener('click', () => {
      if (S.openChat) sendOp({ t: 'group', op: 'leave', chat: S.openChat }, `Leave ${S.openChat}`);
    });

    const input = $('composer-input');
    $('composer').addEventListener('submit', (e) => {
      e.preventDefault();
      const chat = S.openChat;
      if (!chat) return;
      const body = input.value;
      if (S.editing) {
        const { msg } = S.editing;
        S.editing = null;
        if (body.trim()) sendOp({ t: 'edit', msg, body }, 'Edit');
      } else {
        if (!body.trim()) return;
        stopTyping();
        sendMessage(chat, body);
      }
      input.value = '';
      getChat(chat).draft = '';
      render();
    });
    input.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        $('composer').requestSubmit();
      } else if (e.key === 'Escape' && S.editing) {
        S.editing = null;
        input.value = '';
        render();
      }
    });
    input.addEventListener('input', () => {
      if (S.openChat) getChat(S.openChat).draft = S.editing ? '' : input.value;
      if (!S.editing) {
        if (input.value) typingInput();
        else stopTyping();
      }
    });
    $('edit-cancel').addEventListener('click', () => {
      S.editing = null;
      input.value = '';
      render();
    });
    $('load-older').addEventListener('click', () => {
      const chat = S.openChat && S.chats.get(S.openChat);
      if (!chat) return;
      // `before` must name a message still in this user's log: the oldest one shown.
      let oldest = null;
      for (const m of chat.msgs.values()) {
        if (!m.hidden && !m.deleted && (!oldest || logOrder(m, oldest) < 0)) oldest = m;
      }
      const frame = { t: 'history', chat: chat.id, limit: 50 };
      if (oldest) frame.before = oldest.msg;
      chat.loadingOlder = true;
      sendOp(frame, `History of ${chat.id}`);
      render();
    });

    $('devices-toggle').addEventListener('click', () => {
      $('devices-panel').hidden = !$('devices-panel').hidden;
      if (!$('devices-panel').hidden) requestDevices();
      render();
    });
    $('devices-refresh').addEventListener('click', requestDevices);
    $('resync').addEventListener('click', resync);
    $('log-toggle').addEventListener('click', () => {
      $('log-panel').hidden = !$('log-panel').hidden;
      renderLog();
    });
    $('log-clear').addEventListener('click', () => {
      S.frameLog = [];
      renderLog();
    });
    $('signout').addEventListener('click', signOut);
    document.addEventListener('visibilitychange', render);
    window.addEventListener('beforeunload', () => {
      if (S.cache) S.cache.flush();
    });
    // Online status is not in the log: refresh the device list now and then while it shows.
    setInterval(() => {
      if (!$('devices-panel').hidden && wsOpen()) requestDevices();
    }, 5000);

    const token = params.get('token');
    if (token) {
      form.elements.mode.value = 'token';
      form.elements.token.value = token;
      syncMode();
      form.requestSubmit();
    } else if (params.get('user') && params.get('device')) {
      form.requestSubmit();
    }
  }

  // A handle for tests and for poking around in the console.
  window.courier = {
    state: S,
    unreadCount: (chat) => (S.chats.get(chat) ? unreadCount(S.chats.get(chat)) : 0),
    send: sendFrame,
  };

  initForms();
  render();
}());
