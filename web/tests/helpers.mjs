// Shared helpers of the browser tests: where the server is, launching Debian's Chromium through
// playwright-core, and opening the demo client as one (user, device).
//
// The server is started by run.sh, which passes its addresses in the environment:
//   COURIER_WEB_URL    the client port over HTTP (serves / and the WebSocket), default http://127.0.0.1:7070
//   COURIER_ADMIN_URL  the admin listener (serves /dashboard and /api/stats), default http://127.0.0.1:7071
//   COURIER_WS_URL     optional: a WebSocket URL for the page (only when the page is served elsewhere)
//   COURIER_AUTH_SECRET optional: the server's HS256 secret, to test sign-in with a token
//   CHROMIUM           optional: the browser binary, default /usr/bin/chromium
import { createHmac, randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

export const WEB = (process.env.COURIER_WEB_URL || 'http://127.0.0.1:7070').replace(/\/$/, '');
export const ADMIN = (process.env.COURIER_ADMIN_URL || 'http://127.0.0.1:7071').replace(/\/$/, '');
export const WS = process.env.COURIER_WS_URL || '';
export const AUTH_SECRET = process.env.COURIER_AUTH_SECRET || '';
export const ADMIN_TOKEN = process.env.COURIER_ADMIN_TOKEN || '';

const FLAGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

// A fresh browser with a fresh profile directory; `close()` removes the profile.
export async function launchBrowser() {
  const profile = mkdtempSync(join(tmpdir(), 'courier-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: FLAGS,
    viewport: { width: 900, height: 640 },
  });
  context.setDefaultTimeout(15000);
  // launchPersistentContext opens one blank page: close it, tests open their own.
  for (const page of context.pages()) await page.close();
  const errors = [];
  context.on('page', (page) => {
    page.on('pageerror', (e) => errors.push(`${page.url()}: ${e.message}`));
  });
  return {
    context,
    errors,
    async close() {
      await context.close().catch(() => {});
      rmSync(profile, { recursive: true, force: true });
    },
  };
}

// Ids unique to one test run, so that tests never see each other's users.
const RUN = randomBytes(3).toString('hex');
export function uid(name) {
  return `${name}-${RUN}`;
}

export function clientUrl(params) {
  const u = new URL(WEB + '/');
  for (const [k, v] of Object.entries(params)) u.searchParams.set(k, v);
  if (WS) u.searchParams.set('ws', WS);
  return u.toString();
}

// Opens the demo client signed in as (user, device) and waits until it is connected.
export async function openClient(context, user, device) {
  const page = await context.newPage();
  await page.goto(clientUrl({ user, device }));
  await waitConnected(page);
  return page;
}

export async function waitConnected(page) {
  await page.locator('[data-testid="conn-status"][data-state="open"]').waitFor();
}

export function chatItem(page, chat) {
  return page.locator(`[data-testid="chat-item"][data-chat="${chat}"]`);
}

// Brings a page's window to the front before interacting with it: Chromium runs animation
// frames in background windows only about once a second, and Playwright's actionability checks
// wait for frames (a click in a background window takes about 2 s).
export async function front(page) {
  await page.bringToFront();
  return page;
}

export async function openChat(page, chat) {
  await front(page);
  const item = chatItem(page, chat);
  if (await item.count()) {
    await item.click();
  } else {
    await page.fill('[data-testid="new-chat-input"]', chat);
    await page.click('[data-testid="new-chat-submit"]');
  }
  await page.locator(`[data-testid="conversation"][data-chat="${chat}"]`).waitFor();
}

export async function send(page, text) {
  await front(page);
  await page.fill('[data-testid="composer-input"]', text);
  await page.click('[data-testid="send-button"]');
}

export function message(page, text) {
  return page.locator('[data-testid="message"]', {
    has: page.locator('[data-testid="message-body"]', { hasText: text }),
  });
}

// A HS256 JWT as the server expects it (sub, dev, exp).
export function jwt(secret, sub, dev, ttlSeconds = 600) {
  const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString('base64url');
  const head = b64({ alg: 'HS256', typ: 'JWT' });
  const body = b64({ sub, dev, exp: Math.floor(Date.now() / 1000) + ttlSeconds });
  const sig = createHmac('sha256', secret).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

export async function adminStats() {
  const headers = ADMIN_TOKEN ? { Authorization: `Bearer ${ADMIN_TOKEN}` } : {};
  const res = await fetch(`${ADMIN}/api/stats`, { headers });
  if (!res.ok) throw new Error(`GET /api/stats: HTTP ${res.status}`);
  return res.json();
}

export async function adminPost(path) {
  const headers = ADMIN_TOKEN ? { Authorization: `Bearer ${ADMIN_TOKEN}` } : {};
  const res = await fetch(`${ADMIN}${path}`, { method: 'POST', headers });
  if (!res.ok) throw new Error(`POST ${path}: HTTP ${res.status}`);
  return res.json();
}

export const totalConnections = (stats) => stats.shards.reduce((n, s) => n + s.connections, 0);

// Polls `fn` until it returns a truthy value (or throws the last failure after `ms`).
export async function eventually(fn, ms = 10000, what = 'condition') {
  const end = Date.now() + ms;
  let last;
  for (;;) {
    try {
      const v = await fn();
      if (v) return v;
      last = new Error(`${what}: not yet`);
    } catch (e) {
      last = e;
    }
    if (Date.now() > end) throw last;
    await new Promise((r) => setTimeout(r, 100));
  }
}
