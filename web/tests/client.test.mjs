// End-to-end tests of the demo client in headless Chromium against a running server.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import {
  AUTH_SECRET, adminPost, chatItem, clientUrl, eventually, front, jwt, launchBrowser, message,
  openChat, openClient, send, uid, waitConnected,
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

describe('two devices of one user plus another user', () => {
  const alice = uid('alice');
  const bob = uid('bob');
  let a; // alice's phone
  let b1; // bob's phone
  let b2; // bob's laptop

  before(async () => {
    a = await openClient(browser.context, alice, 'phone');
    b1 = await openClient(browser.context, bob, 'phone');
    b2 = await openClient(browser.context, bob, 'laptop');
  });

  test('the page serves itself and takes the WebSocket URL from its own location', async () => {
    const res = await fetch(clientUrl({}));
    assert.equal(res.status, 200);
    assert.match(await res.text(), /<script src="app.js"><\/script>/);
    const who = a.locator('[data-testid="who"]');
    assert.equal(await who.getAttribute('data-user'), alice);
    assert.equal(await who.getAttribute('data-device'), 'phone');
  });

  test('a message from one user appears on both devices of the other', async () => {
    await openChat(a, bob);
    await send(a, 'hello bob');
    // Shown at once (pending), then confirmed by `sent` and the sender's own log copy.
    await message(a, 'hello bob').waitFor();
    await eventually(async () => ['sent', 'delivered', 'read'].includes(
      await message(a, 'hello bob').locator('[data-testid="ticks"]').getAttribute('data-status')), 5000, 'sent tick');
    for (const page of [b1, b2]) {
      const item = chatItem(page, alice);
      await item.locator('[data-testid="unread-badge"]').waitFor();
      assert.equal(await item.locator('[data-testid="unread-badge"]').textContent(), '1');
      assert.match(await item.locator('[data-testid="chat-preview"]').textContent(), /hello bob/);
    }
    // A device acked it: alice sees "delivered" (or already "read").
    await eventually(async () => ['delivered', 'read'].includes(
      await message(a, 'hello bob').locator('[data-testid="ticks"]').getAttribute('data-status')), 10000, 'delivered tick');
  });

  test('read on one device clears unread on the other, and the sender sees read', async () => {
    await openChat(b2, alice);
    await message(b2, 'hello bob').waitFor();
    // bob's phone never opened the chat: its unread mark goes away through the `read` event.
    await chatItem(b1, alice).locator('[data-testid="unread-badge"]').waitFor({ state: 'detached' });
    assert.equal(await chatItem(b1, alice).getAttribute('data-unread'), '0');
    await a.locator('[data-testid="message"][data-status="read"]', { hasText: 'hello bob' }).waitFor();
  });

  test("the sender's other device shows what was sent", async () => {
    await send(b2, 'hi alice, from the laptop');
    await chatItem(b1, alice).locator('[data-testid="chat-preview"]', { hasText: 'You: hi alice, from the laptop' }).waitFor();
    await message(a, 'hi alice, from the laptop').waitFor();
    // alice has the chat open: it is read at once, and bob's devices see it as read.
    await b2.locator('[data-testid="message"][data-status="read"]', { hasText: 'hi alice, from the laptop' }).waitFor();
    await openChat(b1, alice);
    await b1.locator('[data-testid="message"][data-status="read"]', { hasText: 'hi alice, from the laptop' }).waitFor();
  });

  test('typing shows on the other side and stops', async () => {
    await (await front(b1)).locator('[data-testid="composer-input"]').pressSequentially('typing a long answer', { delay: 10 });
    const typing = a.locator('[data-testid="typing"]');
    await a.locator('[data-testid="typing"][data-active="true"]').waitFor();
    assert.equal(await typing.textContent(), `${bob} is typing…`);
    await b1.click('[data-testid="send-button"]');
    await message(a, 'typing a long answer').waitFor();
    await a.locator('[data-testid="typing"][data-active="false"]').waitFor();
  });

  test('edit and delete (for everyone, for me)', async () => {
    await send(a, 'a typo here');
    await message(b1, 'a typo here').waitFor();
    const mine = message(await front(a), 'a typo here');
    await mine.hover();
    await mine.locator('[data-testid="edit-button"]').click();
    await a.locator('[data-testid="editing"]').waitFor();
    await a.fill('[data-testid="composer-input"]', 'no typo here');
    await a.click('[data-testid="send-button"]');
    for (const page of [a, b1, b2]) {
      await message(page, 'no typo here').locator('[data-testid="edited"]').waitFor();
    }

    await send(a, 'regrettable');
    await message(b2, 'regrettable').waitFor();
    const regret = message(await front(a), 'regrettable');
    await regret.hover();
    await regret.locator('[data-testid="delete-everyone-button"]').click();
    for (const page of [a, b1, b2]) {
      await message(page, 'regrettable').waitFor({ state: 'detached' });
      await page.locator('[data-testid="message"].deleted').first().waitFor();
    }

    // "For me" hides it on bob's devices only.
    const other = message(await front(b1), 'no typo here');
    await other.hover();
    await other.locator('[data-testid="delete-me-button"]').click();
    await message(b1, 'no typo here').waitFor({ state: 'detached' });
    await message(b2, 'no typo here').waitFor({ state: 'detached' });
    await message(a, 'no typo here').waitFor();
  });

  test('a reload rebuilds the same state from the log', async () => {
    const before = await b2.locator('[data-testid="message"]').count();
    await b2.reload();
    await waitConnected(b2);
    await openChat(b2, alice);
    await eventually(async () => (await b2.locator('[data-testid="message"]').count()) === before, 5000, 'same messages after reload');
    await message(b2, 'hello bob').waitFor();
    assert.equal(await b2.locator('[data-testid="banner"]').isHidden(), true, 'no warning after a reload');
    await send(a, 'after the reload');
    await message(b2, 'after the reload').waitFor();
  });

  test('unlink closes the other tab\'s connection and it stays closed', async () => {
    await (await front(b2)).click('[data-testid="devices-toggle"]');
    const phone = b2.locator('[data-testid="device-item"][data-device="phone"]');
    await phone.waitFor();
    await b2.locator('[data-testid="device-item"][data-device="phone"][data-online="true"]').waitFor();
    await phone.locator('[data-testid="unlink-button"]').click();
    await b1.locator('[data-testid="conn-status"][data-state="closed"]').waitFor();
    assert.match(await b1.locator('[data-testid="conn-status"]').textContent(), /4003/);
    await phone.waitFor({ state: 'detached' });
    // No reconnect after 4003.
    await b1.waitForTimeout(1500);
    assert.equal(await b1.locator('[data-testid="conn-status"]').getAttribute('data-state'), 'closed');
    // The laptop still works.
    await send(a, 'still there?');
    await message(b2, 'still there?').waitFor();
  });

  after(async () => {
    for (const p of [a, b1, b2]) await p?.close();
  });
});

test('groups: create with members, add a member, send to everyone', async () => {
  const [ann, ben, cat] = [uid('ann'), uid('ben'), uid('cat')];
  const group = `g:${uid('team')}`;
  const pa = await openClient(browser.context, ann, 'phone');
  const pb = await openClient(browser.context, ben, 'phone');
  const pc = await openClient(browser.context, cat, 'phone');

  await (await front(pa)).click('[data-testid="new-group-toggle"]');
  await pa.fill('[data-testid="new-group-id"]', group.slice(2));
  await pa.fill('[data-testid="new-group-members"]', ben);
  await pa.click('[data-testid="new-group-submit"]');
  await pa.locator(`[data-testid="conversation"][data-chat="${group}"]`).waitFor();
  await chatItem(pb, group).waitFor();
  assert.match(await pa.locator('[data-testid="conv-members"]').textContent(), new RegExp(`${ann}, ${ben}`));

  await (await front(pa)).fill('[data-testid="add-members-input"]', cat);
  await pa.click('[data-testid="add-members-submit"]');
  await chatItem(pc, group).waitFor();
  await pa.locator('[data-testid="conv-members"]', { hasText: cat }).waitFor();

  await openChat(pc, group);
  await send(pc, 'hello team');
  await message(pa, 'hello team').waitFor();
  await chatItem(pb, group).locator('[data-testid="unread-badge"]').waitFor();
  await openChat(pb, group);
  await message(pb, 'hello team').waitFor();
  // Both others have read it: cat sees the message as read.
  await pc.locator('[data-testid="message"][data-status="read"]', { hasText: 'hello team' }).waitFor();

  // A non-member cannot send: the error comes back on the pending message.
  const dan = uid('dan');
  const pd = await openClient(browser.context, dan, 'phone');
  await openChat(pd, group);
  await send(pd, 'let me in');
  await pd.locator('[data-testid="message"][data-status="failed"]', { hasText: 'let me in' }).waitFor();
  assert.match(await message(pd, 'let me in').textContent(), /not_member/);
  for (const p of [pa, pb, pc, pd]) await p.close();
});

test('a dropped connection reconnects, resumes and sends what was pending', async () => {
  const [eve, fay] = [uid('eve'), uid('fay')];
  const pe = await openClient(browser.context, eve, 'phone');
  const pf = await openClient(browser.context, fay, 'phone');
  await openChat(pe, fay);
  await send(pe, 'before the drop');
  await openChat(pf, eve);
  await message(pf, 'before the drop').waitFor();

  const dropped = await adminPost(`/api/users/${fay}/disconnect`);
  assert.equal(dropped.disconnected, 1);
  await pf.locator('[data-testid="conn-status"][data-state="connecting"]').waitFor();
  await send(pe, 'during the drop');
  await waitConnected(pf);
  await message(pf, 'during the drop').waitFor();
  assert.equal(await message(pf, 'before the drop').count(), 1, 'no duplicate after the replay');

  // A send while offline stays pending, then goes out with the same client id on reconnect.
  await adminPost(`/api/users/${eve}/disconnect`);
  await pe.locator('[data-testid="conn-status"][data-state="connecting"]').waitFor();
  await send(pe, 'queued while offline');
  await waitConnected(pe);
  await message(pf, 'queued while offline').waitFor();
  await eventually(async () => (await message(pe, 'queued while offline').getAttribute('data-status')) !== 'pending', 5000, 'sent after reconnect');
  assert.equal(await message(pf, 'queued while offline').count(), 1);
  await pe.close();
  await pf.close();
});

test('without its local copy a device pages back through history, or resyncs from the whole log', async () => {
  const [kim, lou] = [uid('kim'), uid('lou')];
  const pk = await openClient(browser.context, kim, 'phone');
  const pl = await openClient(browser.context, lou, 'phone');
  await openChat(pk, lou);
  for (let i = 1; i <= 3; i++) await send(pk, `old ${i}`);
  await chatItem(pl, kim).locator('[data-testid="chat-preview"]', { hasText: 'old 3' }).waitFor();
  await pl.waitForTimeout(300); // the acks go out

  // Lose the browser's copy of lou's log: the page says so, and the chat is not there.
  await pl.evaluate(() => localStorage.clear());
  await pl.reload();
  await waitConnected(pl);
  await pl.locator('[data-testid="banner"]', { hasText: 'no copy' }).waitFor();
  assert.equal(await chatItem(pl, kim).count(), 0);

  // A new message brings the chat back; "Load older messages" fetches the rest.
  await send(pk, 'new 4');
  await openChat(pl, kim);
  await message(pl, 'new 4').waitFor();
  assert.equal(await message(pl, 'old 1').count(), 0);
  await pl.click('[data-testid="load-older"]');
  await message(pl, 'old 1').waitFor();
  const bodies = await pl.locator('[data-testid="message-body"]').allTextContents();
  assert.deepEqual(bodies, ['old 1', 'old 2', 'old 3', 'new 4'], 'log order');
  await pl.click('[data-testid="load-older"]');
  await pl.locator('[data-testid="load-older"]').waitFor({ state: 'hidden' });

  // Resync: unlink this device and link it again; the server replays the whole log.
  await pl.evaluate(() => localStorage.clear());
  await pl.reload();
  await waitConnected(pl);
  await (await front(pl)).click('[data-testid="banner-action"]');
  await chatItem(pl, kim).locator('[data-testid="chat-preview"]', { hasText: 'new 4' }).waitFor();
  await waitConnected(pl);
  await openChat(pl, kim);
  assert.deepEqual(await pl.locator('[data-testid="message-body"]').allTextContents(), ['old 1', 'old 2', 'old 3', 'new 4']);
  assert.equal(await pl.locator('[data-testid="banner"]').isHidden(), true);
  await pk.close();
  await pl.close();
});

test('a second tab of the same device replaces the first (4001), which does not fight back', async () => {
  const gil = uid('gil');
  const first = await openClient(browser.context, gil, 'phone');
  const second = await openClient(browser.context, gil, 'phone');
  await first.locator('[data-testid="conn-status"][data-state="closed"]').waitFor();
  assert.match(await first.locator('[data-testid="conn-status"]').textContent(), /4001/);
  await second.waitForTimeout(1500);
  assert.equal(await second.locator('[data-testid="conn-status"]').getAttribute('data-state'), 'open');
  await first.close();
  await second.close();
});

test('sign in with a token', { skip: !AUTH_SECRET && 'COURIER_AUTH_SECRET not set' }, async () => {
  const hal = uid('hal');
  const page = await browser.context.newPage();
  await page.goto(clientUrl({}));
  await (await front(page)).check('[data-testid="mode-token"]');
  await page.fill('[data-testid="signin-token"]', jwt(AUTH_SECRET, hal, 'desk'));
  await page.click('[data-testid="signin-submit"]');
  await waitConnected(page);
  assert.equal(await page.locator('[data-testid="who"]').getAttribute('data-user'), hal);
  assert.equal(await page.locator('[data-testid="who"]').getAttribute('data-device'), 'desk');
  await openChat(page, hal);
  await send(page, 'note to self');
  await page.locator('[data-testid="message"][data-status="sent"]', { hasText: 'note to self' }).waitFor();
  await page.close();
});
