// Takes the screenshots in docs/: the demo client as two devices of one user side by side
// (docs/demo.png) and the dashboard under a little traffic (docs/dashboard.png).
//
//   node screenshots.mjs OUTDIR      (with the environment of run.sh; `run.sh --screenshots` does it)
import { mkdirSync } from 'node:fs';
import { join, resolve } from 'node:path';
import {
  ADMIN, ADMIN_TOKEN, WEB, chatItem, clientUrl, front, launchBrowser, message, openChat, openClient,
  send,
} from './helpers.mjs';

const out = resolve(process.argv[2] || '.');
mkdirSync(out, { recursive: true });
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const browser = await launchBrowser();
const ctx = browser.context;
try {
  // --- the demo: alice on two devices, bob and carol elsewhere
  const bob = await openClient(ctx, 'bob', 'phone');
  const carol = await openClient(ctx, 'carol', 'laptop');
  const alicePhone = await openClient(ctx, 'alice', 'phone');

  await openChat(bob, 'alice');
  await send(bob, 'Are we still on for lunch?');
  await message(alicePhone, 'lunch').waitFor().catch(() => {});
  await openChat(alicePhone, 'bob');
  await send(alicePhone, 'Yes! 12:30 at the usual place');
  await message(bob, '12:30').waitFor();
  await send(bob, 'Great, see you there!');
  await message(alicePhone, 'see you there').waitFor();

  await front(alicePhone);
  await alicePhone.click('[data-testid="new-group-toggle"]');
  await alicePhone.fill('[data-testid="new-group-id"]', 'weekend-trip');
  await alicePhone.fill('[data-testid="new-group-members"]', 'bob, carol');
  await alicePhone.click('[data-testid="new-group-submit"]');
  await chatItem(carol, 'g:weekend-trip').waitFor();
  await openChat(carol, 'g:weekend-trip');
  await send(carol, 'I can drive on Saturday');
  await chatItem(alicePhone, 'g:weekend-trip').locator('[data-testid="chat-preview"]', { hasText: 'drive' }).waitFor();
  await openChat(alicePhone, 'bob');

  // The two devices side by side in one page (two frames of the real client).
  const side = await ctx.newPage();
  await side.setViewportSize({ width: 1640, height: 620 });
  const frameUrl = (device) => clientUrl({ user: 'alice', device });
  await side.setContent(`<!doctype html><html><head><style>
      body { margin: 0; background: #cbd5e1; display: flex; gap: 16px; padding: 16px; font-family: system-ui, sans-serif; }
      figure { margin: 0; display: flex; flex-direction: column; gap: 6px; }
      figcaption { font-size: 13px; color: #1f2937; font-weight: 600; }
      iframe { width: 796px; height: 560px; border: 1px solid #94a3b8; border-radius: 8px; background: #fff; }
    </style></head><body>
    <figure><figcaption>alice · laptop</figcaption><iframe id="laptop" src="${frameUrl('laptop')}"></iframe></figure>
    <figure><figcaption>alice · tablet</figcaption><iframe id="tablet" src="${frameUrl('tablet')}"></iframe></figure>
    </body></html>`);
  // The frames are cross-origin to this page; reach them through Playwright's frames.
  await sleep(300);
  const frames = side.frames().filter((f) => f.url().startsWith(WEB));
  for (const f of frames) await f.locator('[data-testid="conn-status"][data-state="open"]').waitFor();
  const [laptop, tablet] = frames;
  await laptop.locator('[data-testid="chat-item"][data-chat="bob"]').click();
  await laptop.locator('[data-testid="message"]', { hasText: 'see you there' }).waitFor();
  // bob sends a new message and starts typing: the tablet shows it unread, the laptop reads it.
  await send(bob, 'Shall I book a table?');
  await laptop.locator('[data-testid="message"]', { hasText: 'book a table' }).waitFor();
  await front(side);
  await tablet.locator('[data-testid="devices-toggle"]').click();
  await tablet.locator('[data-testid="device-item"][data-device="laptop"]').waitFor();
  await laptop.locator('[data-testid="composer-input"]').fill('Yes please, for 4');
  await laptop.locator('[data-testid="send-button"]').click();
  await tablet.locator('[data-testid="chat-item"][data-chat="bob"] [data-testid="chat-preview"]', { hasText: 'for 4' }).waitFor();
  await front(bob);
  await bob.locator('[data-testid="composer-input"]').pressSequentially('Booked', { delay: 30 });
  await laptop.locator('[data-testid="typing"][data-active="true"]').waitFor();
  await front(side);
  await sleep(300);
  await side.screenshot({ path: join(out, 'demo.png') });
  console.log(`wrote ${join(out, 'demo.png')}`);
  await side.close();

  // --- the dashboard, with a few clients sending for a while
  const dash = await ctx.newPage();
  await dash.setViewportSize({ width: 1400, height: 800 });
  await dash.goto(`${ADMIN}/dashboard`);
  if (ADMIN_TOKEN) {
    await dash.fill('[data-testid="dash-token"]', ADMIN_TOKEN);
    await dash.click('[data-testid="dash-token-submit"]');
  }
  await dash.locator('[data-testid="dash-status"][data-state="ok"]').waitFor();
  const traffic = await ctx.newPage();
  await traffic.goto(clientUrl({}));
  const wsBase = (await traffic.evaluate(() => document.querySelector('[data-testid="signin-ws"]').value));
  // 12 connections that send in waves for ~40 s, acking what they receive.
  await traffic.evaluate(async ({ wsBase }) => {
    const users = Array.from({ length: 12 }, (_, i) => `load${i}`);
    const socks = users.map((u) => {
      const ws = new WebSocket(`${wsBase}?user=${u}&device=bench`);
      ws.onmessage = (e) => {
        const f = JSON.parse(e.data);
        if (f.t === 'ev') ws.send(JSON.stringify({ t: 'ack', seq: f.seq }));
      };
      return ws;
    });
    await new Promise((r) => setTimeout(r, 1000));
    let n = 0;
    const start = Date.now();
    window.trafficDone = new Promise((resolveDone) => {
      const tick = () => {
        const t = (Date.now() - start) / 1000;
        if (t > 40) {
          resolveDone();
          return;
        }
        const burst = Math.round(8 + 7 * Math.sin(t / 4));
        for (let i = 0; i < burst; i++) {
          const from = socks[(n + i) % socks.length];
          const to = users[(n + i * 5 + 1) % users.length];
          if (from.readyState === 1) from.send(JSON.stringify({ t: 'send', id: `s${Date.now()}-${n}-${i}`, to, body: `message ${n}` }));
        }
        n += 1;
        setTimeout(tick, 100);
      };
      tick();
    });
  }, { wsBase });
  // Taken while the traffic still runs, so that the rates are not zero.
  await sleep(34000);
  await front(dash);
  await sleep(1000);
  await dash.screenshot({ path: join(out, 'dashboard.png'), fullPage: true });
  console.log(`wrote ${join(out, 'dashboard.png')}`);
} finally {
  await browser.close();
}
