// The live dashboard on the admin listener, in headless Chromium.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import {
  ADMIN, ADMIN_TOKEN, adminStats, eventually, launchBrowser, openChat, openClient, send,
  totalConnections, uid,
} from './helpers.mjs';

let browser;

before(async () => {
  browser = await launchBrowser();
});

after(async () => {
  if (browser) {
    assert.deepEqual(browser.errors, [], 'no script errors in any page');
    await browser.close();
  }
});

async function openDashboard() {
  const page = await browser.context.newPage();
  await page.goto(`${ADMIN}/dashboard`);
  if (ADMIN_TOKEN) {
    await page.locator('[data-testid="dash-login"]').waitFor();
    await page.fill('[data-testid="dash-token"]', ADMIN_TOKEN);
    await page.click('[data-testid="dash-token-submit"]');
  }
  await page.locator('[data-testid="dash-status"][data-state="ok"]').waitFor();
  return page;
}

const shown = async (page) => Number(await page.locator('#total-connections').textContent());

test('the dashboard shows a connection count that matches the open connections', async () => {
  // Connections of earlier tests (other browsers) are gone once their sockets closed.
  await eventually(async () => totalConnections(await adminStats()) === 0, 15000, 'no connections left from earlier tests');
  const dash = await openDashboard();
  await eventually(async () => (await shown(dash)) === 0, 5000, 'dashboard shows 0');

  const [ivy, jon] = [uid('ivy'), uid('jon')];
  const pages = [
    await openClient(browser.context, ivy, 'phone'),
    await openClient(browser.context, ivy, 'laptop'),
    await openClient(browser.context, jon, 'phone'),
  ];
  // The dashboard polls every second; its number must match both the pages and the API.
  await eventually(async () => (await shown(dash)) === 3, 5000, 'dashboard shows 3 connections');
  assert.equal(totalConnections(await adminStats()), 3);
  assert.equal(await dash.locator('#total-online').textContent(), '3');

  await pages[1].close();
  await eventually(async () => (await shown(dash)) === 2, 5000, 'dashboard shows 2 after a tab closed');

  // Traffic moves the message counters and draws the rate chart.
  await openChat(pages[0], jon);
  for (let i = 0; i < 5; i++) await send(pages[0], `ping ${i}`);
  await pages[2].locator(`[data-testid="chat-item"][data-chat="${ivy}"] [data-testid="chat-preview"]`, { hasText: 'ping 4' }).waitFor();
  await eventually(async () => {
    const stats = await adminStats();
    return stats.shards.reduce((n, s) => n + s.messages_total, 0) >= 5;
  }, 5000, 'messages counted');
  // (attached, not visible: a flat line has no height, which Playwright counts as hidden)
  await dash.locator('#c-rate path[data-series="messages/s"]').waitFor({ state: 'attached' });
  assert.equal(await dash.locator('#c-conn path').count(), (await adminStats()).shards.length);
  const rows = await dash.locator('[data-testid="shard-table"] tbody tr').count();
  assert.equal(rows, (await adminStats()).shards.length);

  for (const p of [pages[0], pages[2]]) await p.close();
  await eventually(async () => (await shown(dash)) === 0, 5000, 'dashboard shows 0 at the end');
  await dash.close();
});

test('the stats API refuses a wrong token when one is configured', { skip: !ADMIN_TOKEN && 'no admin token configured' }, async () => {
  const res = await fetch(`${ADMIN}/api/stats`, { headers: { Authorization: 'Bearer wrong' } });
  assert.equal(res.status, 401);
});
