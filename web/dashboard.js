// Courier live dashboard: polls GET /api/stats (same origin) every second and draws the last two
// minutes as plain SVG line charts. No library, no build step.
'use strict';
(function () {
  const $ = (id) => document.getElementById(id);
  const SVGNS = 'http://www.w3.org/2000/svg';
  const WINDOW_MS = 120000;
  const POLL_MS = 1000;
  const TOKEN_KEY = 'courier-admin-token';
  const PALETTE = ['#60a5fa', '#f472b6', '#34d399', '#fbbf24', '#a78bfa', '#f87171', '#2dd4bf', '#fb923c'];

  // `?api=http://host:port` points the page at another admin listener (that server must then
  // allow the cross-origin request); by default the API is on this page's own origin.
  const params = new URLSearchParams(location.search);
  const API = (params.get('api') || '').replace(/\/$/, '') + '/api/stats';

  // sessionStorage, where the browser allows it (not in some embedded frames).
  function session(key, value) {
    try {
      if (value === undefined) return sessionStorage.getItem(key);
      if (value === null) sessionStorage.removeItem(key);
      else sessionStorage.setItem(key, value);
    } catch (_) { /* no storage: the token is asked again after a reload */ }
    return null;
  }

  const samples = []; // {t, stats}
  let token = session(TOKEN_KEY) || '';
  let timer = null;
  let inFlight = false;

  function svg(tag, attrs, text) {
    const n = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) n.setAttribute(k, String(v));
    if (text !== undefined) n.textContent = text;
    return n;
  }

  function setStatus(state, text) {
    const s = $('status');
    s.dataset.state = state;
    s.textContent = text;
  }

  function showLogin(message) {
    $('dash').hidden = true;
    $('login').hidden = false;
    const err = $('login-error');
    err.hidden = !message;
    err.textContent = message || '';
    $('login').elements.token.focus();
  }

  async function poll() {
    if (inFlight || $('pause').checked) return;
    inFlight = true;
    try {
      const headers = token ? { Authorization: `Bearer ${token}` } : {};
      const res = await fetch(API, { headers, cache: 'no-store' });
      if (res.status === 401 || res.status === 403) {
        const had = !!token;
        token = '';
        session(TOKEN_KEY, null);
        stop();
        showLogin(had ? 'That token was refused.' : '');
        setStatus('error', 'admin token needed');
        return;
      }
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      const stats = await res.json();
      samples.push({ t: Date.now(), stats });
      while (samples.length > 2 && samples[0].t < Date.now() - WINDOW_MS - 5000) samples.shift();
      $('login').hidden = true;
      $('dash').hidden = false;
      $('forget-token').hidden = !token;
      setStatus('ok', `updated ${new Date().toLocaleTimeString()}`);
      draw();
    } catch (e) {
      setStatus('error', `cannot reach ${API}: ${e.message}`);
    } finally {
      inFlight = false;
    }
  }

  function start() {
    if (timer) return;
    poll();
    timer = setInterval(poll, POLL_MS);
  }

  function stop() {
    clearInterval(timer);
    timer = null;
  }

  // ---------------------------------------------------------------------------------------------
  // Derived series

  const shardsOf = (stats) => (Array.isArray(stats && stats.shards) ? stats.shards : []);
  const sum = (arr, f) => arr.reduce((a, x) => a + (Number(f(x)) || 0), 0);

  function shardIds() {
    const ids = new Set();
    for (const s of samples) for (const sh of shardsOf(s.stats)) ids.add(sh.shard);
    return [...ids].sort((a, b) => a - b);
  }

  function gauge(field, shard) {
    return samples.map((s) => {
      const sh = shardsOf(s.stats).find((x) => x.shard === shard);
      return { t: s.t, v: sh ? Number(sh[field]) : null };
    });
  }

  // Per-second rate of a counter summed over shards; a counter that went back (restart) gives a gap.
  function rate(field, shard) {
    const out = [];
    for (let i = 1; i < samples.length; i++) {
      const a = samples[i - 1];
      const b = samples[i];
      const pick = (s) => {
        const list = shardsOf(s.stats);
        return shard === undefined ? sum(list, (x) => x[field]) : Number((list.find((x) => x.shard === shard) || {})[field]);
      };
      const dv = pick(b) - pick(a);
      const dt = (b.t - a.t) / 1000;
      out.push({ t: b.t, v: dt > 0 && dv >= 0 && Number.isFinite(dv) ? dv / dt : null });
    }
    return out;
  }

  // ---------------------------------------------------------------------------------------------
  // Charts

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = 10 ** Math.floor(Math.log10(v));
    for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
    return 10 * p;
  }

  function fmt(v) {
    if (v === null || v === undefined || !Number.isFinite(v)) return '–';
    if (Math.abs(v) >= 1e6) return (v / 1e6).toFixed(1) + 'M';
    if (Math.abs(v) >= 1e4) return (v / 1e3).toFixed(1) + 'k';
    if (Math.abs(v) >= 100 || Number.isInteger(v)) return String(Math.round(v));
    return v.toFixed(Math.abs(v) >= 10 ? 1 : 2);
  }

  function lastValue(points) {
    for (let i = points.length - 1; i >= 0; i--) if (points[i].v !== null && Number.isFinite(points[i].v)) return points[i].v;
    return null;
  }

  // series: [{name, color, dash, points:[{t,v}]}]
  function chart(svgId, legendId, series) {
    const el = $(svgId);
    const W = Math.max(200, el.clientWidth || 440);
    const H = Math.max(120, el.clientHeight || 190);
    const L = 44, R = 8, T = 8, B = 18;
    el.setAttribute('viewBox', `0 0 ${W} ${H}`);
    const now = Date.now();
    const t0 = now - WINDOW_MS;
    let max = 0;
    for (const s of series) for (const p of s.points) if (p.t >= t0 && p.v !== null && p.v > max) max = p.v;
    const ymax = niceMax(max);
    const x = (t) => L + ((t - t0) / WINDOW_MS) * (W - L - R);
    const y = (v) => T + (1 - v / ymax) * (H - T - B);
    const nodes = [];
    for (let i = 0; i <= 4; i++) {
      const v = (ymax * i) / 4;
      nodes.push(svg('line', { class: 'grid', x1: L, x2: W - R, y1: y(v), y2: y(v) }));
      nodes.push(svg('text', { class: 'axis', x: L - 6, y: y(v) + 3, 'text-anchor': 'end' }, fmt(v)));
    }
    for (const [label, t] of [['-2 min', t0], ['-1 min', now - WINDOW_MS / 2], ['now', now]]) {
      nodes.push(svg('text', { class: 'axis', x: x(t), y: H - 4, 'text-anchor': t === t0 ? 'start' : t === now ? 'end' : 'middle' }, label));
    }
    for (const s of series) {
      let d = '';
      let pen = false;
      for (const p of s.points) {
        if (p.t < t0 || p.v === null || !Number.isFinite(p.v)) {
          pen = false;
          continue;
        }
        d += `${pen ? 'L' : 'M'}${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`;
        pen = true;
      }
      if (d) {
        nodes.push(svg('path', {
          d, fill: 'none', stroke: s.color, 'stroke-width': 2, 'stroke-linejoin': 'round',
          'stroke-dasharray': s.dash ? '5 4' : 'none', 'data-series': s.name,
        }));
      }
    }
    el.replaceChildren(...nodes);
    $(legendId).replaceChildren(...series.map((s) => {
      const span = document.createElement('span');
      const i = document.createElement('i');
      i.style.background = s.color;
      i.style.color = s.color;
      if (s.dash) i.className = 'dash';
      const b = document.createElement('b');
      b.textContent = fmt(lastValue(s.points));
      span.append(i, `${s.name} `, b);
      return span;
    }));
  }

  function color(i) {
    return PALETTE[i % PALETTE.length];
  }

  function draw() {
    const latest = samples[samples.length - 1].stats;
    const shards = shardsOf(latest);
    const ids = shardIds();

    $('total-connections').textContent = String(sum(shards, (s) => s.connections));
    $('total-online').textContent = String(sum(shards, (s) => s.online_devices));
    const mr = lastValue(rate('messages_total'));
    const dr = lastValue(rate('deliveries_total'));
    $('msg-rate').textContent = fmt(mr);
    $('del-rate').textContent = fmt(dr);
    const p99 = shards.length ? Math.max(...shards.map((s) => Number(s.commit_ms_p99) || 0)) : null;
    $('p99').textContent = p99 === null ? '–' : `${fmt(p99)} ms`;
    $('queue').textContent = String(sum(shards, (s) => s.queue_depth));
    $('uptime').textContent = `${shards.length} · ${fmtUptime(latest.uptime_s)}`;

    chart('c-conn', 'l-conn', ids.map((id, i) => ({ name: `shard ${id}`, color: color(i), points: gauge('connections', id) })));
    chart('c-dev', 'l-dev', ids.map((id, i) => ({ name: `shard ${id}`, color: color(i), points: gauge('online_devices', id) })));
    chart('c-rate', 'l-rate', [
      { name: 'messages/s', color: '#60a5fa', points: rate('messages_total') },
      { name: 'deliveries/s', color: '#34d399', points: rate('deliveries_total') },
    ]);
    const commit = [];
    ids.forEach((id, i) => {
      commit.push({ name: `shard ${id} p99`, color: color(i), points: gauge('commit_ms_p99', id) });
      commit.push({ name: `shard ${id} p50`, color: color(i), dash: true, points: gauge('commit_ms_p50', id) });
    });
    chart('c-commit', 'l-commit', commit);
    chart('c-queue', 'l-queue', ids.map((id, i) => ({ name: `shard ${id}`, color: color(i), points: gauge('queue_depth', id) })));
    chart('c-events', 'l-events', [
      { name: 'events/s', color: '#a78bfa', points: rate('events_total') },
      { name: 'commits/s', color: '#fbbf24', points: rate('commits_total') },
    ]);

    $('shard-rows').replaceChildren(...shards.map((s) => {
      const tr = document.createElement('tr');
      tr.dataset.shard = s.shard;
      for (const v of [s.shard, s.connections, s.online_devices, s.messages_total, s.deliveries_total, s.events_total, s.commits_total, s.commit_ms_p50, s.commit_ms_p99, s.queue_depth]) {
        const td = document.createElement('td');
        td.textContent = fmt(Number(v));
        tr.append(td);
      }
      return tr;
    }));
  }

  function fmtUptime(s) {
    s = Math.floor(Number(s) || 0);
    if (s < 120) return `${s}s`;
    if (s < 7200) return `${Math.floor(s / 60)}m`;
    if (s < 172800) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
    return `${Math.floor(s / 86400)}d`;
  }

  $('login').addEventListener('submit', (e) => {
    e.preventDefault();
    token = e.target.elements.token.value.trim();
    if (!token) return;
    session(TOKEN_KEY, token);
    e.target.reset();
    $('login').hidden = true;
    start();
  });
  $('forget-token').addEventListener('click', () => {
    token = '';
    session(TOKEN_KEY, null);
    stop();
    showLogin('');
  });
  window.addEventListener('resize', () => {
    if (samples.length) draw();
  });

  // First try without a token when none is kept: a --dev server without an admin token needs none.
  start();
}());
