// Tests of createTokenClient's behaviour, with a fake clock, a fake tokend
// (fetch), and fake Web Locks and BroadcastChannel shared by fake tabs.
// The browser tests in cmd/tokend/browser_test.go prove the same against
// Chromium and the real service.
import { test } from "node:test";
import assert from "node:assert/strict";

import { createTokenClient } from "../tokend.js";

// --- Fakes -----------------------------------------------------------------------

// settle lets promise chains and queued messages run.
async function settle() {
  for (let i = 0; i < 30; i++) await new Promise((r) => setImmediate(r));
}

// Clock is a wall clock with timers that fire only when the test advances it.
class Clock {
  t = 1_767_225_600_000; // 2026-01-01T00:00:00Z
  timers = new Map();
  seq = 0;
  now = () => this.t;
  setTimeout = (fn, ms = 0) => {
    const id = ++this.seq;
    this.timers.set(id, { at: this.t + Math.max(0, ms), fn, id });
    return id;
  };
  clearTimeout = (id) => {
    this.timers.delete(id);
  };
  // advance moves time forward by ms, firing due timers in order.
  async advance(ms) {
    const end = this.t + ms;
    for (;;) {
      await settle();
      let next = null;
      for (const tm of this.timers.values()) {
        if (tm.at <= end && (!next || tm.at < next.at || (tm.at === next.at && tm.id < next.id))) next = tm;
      }
      if (!next) break;
      this.t = Math.max(this.t, next.at);
      this.timers.delete(next.id);
      next.fn();
    }
    this.t = end;
    await settle();
  }
  // sleep moves the wall clock without firing anything, as when a laptop
  // sleeps: the page's timers were not running.
  sleep(ms) {
    this.t += ms;
    for (const tm of this.timers.values()) tm.at += ms;
  }
}

// Tokend answers POST /v1/token and DELETE /v1/session. Each answer can be
// scripted; by default it mints a token.
class Tokend {
  constructor(clock, { expiresIn = 600, refreshIn = 420 } = {}) {
    this.clock = clock;
    this.expiresIn = expiresIn;
    this.refreshIn = refreshIn;
    this.calls = [];
    this.script = [];
    this.minted = 0;
  }
  get tokenCalls() {
    return this.calls.filter((c) => c.method === "POST");
  }
  // next queues the answer to the next request.
  next(answer) {
    this.script.push(answer);
  }
  token() {
    this.minted++;
    const part = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
    const jwt = `${part({ alg: "ES256" })}.${part({ sub: "alice", n: this.minted })}.sig`;
    return json(200, {
      access_token: jwt,
      token_type: "Bearer",
      expires_in: this.expiresIn,
      refresh_in: this.refreshIn,
      session_expires_at: new Date(this.clock.now() + 8 * 3600_000).toISOString(),
    });
  }
  fetch = async (url, init) => {
    this.calls.push({ url, method: init.method, credentials: init.credentials, at: this.clock.now() });
    const answer = this.script.shift();
    if (answer) return answer(init);
    if (init.method === "DELETE") return new Response(null, { status: 204 });
    return this.token();
  };
}

function json(status, body, headers = {}) {
  const type = status >= 400 ? "application/problem+json" : "application/json";
  return new Response(JSON.stringify(body), { status, headers: { "Content-Type": type, ...headers } });
}
const problem = (status, code, headers) => () => json(status, { status, code, detail: code }, headers);
const networkError = () => () => Promise.reject(new TypeError("Failed to fetch"));
const hang = () => (init) => new Promise((_, reject) => init.signal?.addEventListener("abort", () => reject(new DOMException("aborted", "AbortError"))));

// Locks is a Web Locks manager shared by the tabs of one browser: exclusive
// locks, ifAvailable, AbortSignal, and release when a tab closes.
class Locks {
  held = new Map();
  queues = new Map();
  forTab(tab) {
    return { request: (name, opts, cb) => this.request(tab, name, opts, cb) };
  }
  request(tab, name, opts, cb) {
    if (typeof opts === "function") [cb, opts] = [opts, {}];
    return new Promise((resolve, reject) => {
      const entry = { tab, cb, resolve, reject };
      if (opts.signal?.aborted) return reject(new DOMException("aborted", "AbortError"));
      if (!this.held.has(name)) return this.grant(name, entry);
      if (opts.ifAvailable) return Promise.resolve().then(() => cb(null)).then(resolve, reject);
      const q = this.queues.get(name) ?? [];
      q.push(entry);
      this.queues.set(name, q);
      opts.signal?.addEventListener("abort", () => {
        const i = q.indexOf(entry);
        if (i >= 0) q.splice(i, 1);
        reject(new DOMException("aborted", "AbortError"));
      });
    });
  }
  grant(name, entry) {
    this.held.set(name, entry);
    Promise.resolve()
      .then(() => entry.cb({ name }))
      .then(
        (v) => (this.release(name, entry), entry.resolve(v)),
        (e) => (this.release(name, entry), entry.reject(e)),
      );
  }
  release(name, entry) {
    if (this.held.get(name) !== entry) return;
    this.held.delete(name);
    const next = this.queues.get(name)?.shift();
    if (next) this.grant(name, next);
  }
  // closeTab is what the browser does when a tab goes away: its locks are
  // released and its queued requests dropped, whatever its code was doing.
  closeTab(tab) {
    for (const q of this.queues.values()) for (let i = q.length - 1; i >= 0; i--) if (q[i].tab === tab) q.splice(i, 1);
    for (const [name, entry] of [...this.held]) if (entry.tab === tab) this.release(name, entry);
  }
}

// Hub carries BroadcastChannel messages between the tabs of one browser.
class Hub {
  channels = new Set();
  deaf = new Set(); // tabs that receive nothing (frozen)
  forTab(tab) {
    const hub = this;
    return class {
      constructor(name) {
        Object.assign(this, { name, tab, onmessage: null, closed: false });
        hub.channels.add(this);
      }
      postMessage(data) {
        if (this.closed) throw new DOMException("closed", "InvalidStateError");
        const copy = structuredClone(data);
        for (const c of hub.channels) {
          if (c === this || c.name !== this.name || hub.deaf.has(c.tab)) continue;
          queueMicrotask(() => !c.closed && c.onmessage?.({ data: copy }));
        }
      }
      close() {
        this.closed = true;
        hub.channels.delete(this);
      }
    };
  }
  closeTab(tab) {
    for (const c of [...this.channels]) if (c.tab === tab) c.close();
  }
}

// Browser holds the shared pieces; tab() opens a page running the client.
class Browser {
  constructor({ expiresIn, refreshIn, locks = true } = {}) {
    this.clock = new Clock();
    this.tokend = new Tokend(this.clock, { expiresIn, refreshIn });
    this.locks = locks ? new Locks() : null;
    this.hub = new Hub();
    this.tabs = [];
  }
  tab(options = {}) {
    const id = this.tabs.length;
    const events = { tokens: [], ended: [], errors: [] };
    const window = new EventTarget();
    const document = Object.assign(new EventTarget(), { visibilityState: "visible" });
    // A closed or frozen tab runs nothing: its timers do not fire and its
    // requests never come back.
    const tab = { id, events, window, document, dead: false };
    const client = createTokenClient({
      baseUrl: "https://tokend.test/",
      fetch: (url, init) => (tab.dead ? new Promise(() => {}) : this.tokend.fetch(url, init)),
      now: this.clock.now,
      random: () => 0.5,
      setTimeout: (fn, ms) => this.clock.setTimeout(() => tab.dead || fn(), ms),
      clearTimeout: this.clock.clearTimeout,
      locks: this.locks ? this.locks.forTab(id) : null,
      BroadcastChannel: this.hub.forTab(id),
      window,
      document,
      onToken: (token, info) => events.tokens.push({ token, ...info, at: this.clock.now() }),
      onSessionEnd: (err) => events.ended.push(err),
      onError: (err) => events.errors.push(err),
      ...options,
    });
    tab.client = client;
    this.tabs.push(tab);
    return tab;
  }
  // close is what the browser does when a tab goes away: its code stops, and
  // its locks and channels are released, whatever it was doing.
  close(tab) {
    tab.dead = true;
    this.locks?.closeTab(tab.id);
    this.hub.closeTab(tab.id);
  }
  // freeze stops a tab without releasing anything: it keeps the lock and
  // hears no messages.
  freeze(tab) {
    tab.dead = true;
    this.hub.deaf.add(tab.id);
  }
}

// --- One tab ----------------------------------------------------------------------

test("fetches at once with credentials, then at each refresh_in", async () => {
  const b = new Browser({ expiresIn: 600, refreshIn: 420 });
  const tab = b.tab();
  await b.clock.advance(0);
  assert.equal(b.tokend.tokenCalls.length, 1);
  assert.deepEqual(b.tokend.calls[0], { url: "https://tokend.test/v1/token", method: "POST", credentials: "include", at: b.clock.t });
  assert.equal(tab.events.tokens.length, 1);
  assert.equal(tab.events.tokens[0].source, "fetch");
  assert.equal(await tab.client.getToken(), tab.events.tokens[0].token);

  // The server's refresh_in, not a fixed interval: change it and the schedule follows.
  const start = b.clock.t;
  b.tokend.refreshIn = 300;
  await b.clock.advance(419_999);
  assert.equal(b.tokend.tokenCalls.length, 1, "refreshed before refresh_in");
  await b.clock.advance(1);
  assert.equal(b.tokend.tokenCalls.length, 2);
  assert.equal(b.tokend.tokenCalls[1].at - start, 420_000);
  await b.clock.advance(299_999);
  assert.equal(b.tokend.tokenCalls.length, 2);
  await b.clock.advance(1);
  assert.equal(b.tokend.tokenCalls.length, 3);
  assert.equal(tab.events.tokens.length, 3);
  assert.equal(tab.client.role, "leader");
  tab.client.stop();
});

test("refresh_in 0 near the session's end does not spin", async () => {
  const b = new Browser({ expiresIn: 1, refreshIn: 0 });
  const tab = b.tab();
  await b.clock.advance(0);
  await b.clock.advance(999);
  assert.equal(b.tokend.tokenCalls.length, 1);
  await b.clock.advance(1);
  assert.equal(b.tokend.tokenCalls.length, 2);
  tab.client.stop();
});

test("a 401 ends the session for good: onSessionEnd once, no retry", async () => {
  const b = new Browser({ expiresIn: 600, refreshIn: 420 });
  const tab = b.tab();
  await b.clock.advance(0);
  b.tokend.next(problem(401, "session_revoked"));
  await b.clock.advance(420_000);
  assert.equal(b.tokend.tokenCalls.length, 2);
  assert.equal(tab.events.ended.length, 1);
  assert.equal(tab.events.ended[0].code, "session_revoked");
  assert.equal(tab.events.ended[0].status, 401);
  assert.ok(tab.events.ended[0].sessionEnded);
  assert.equal(tab.events.errors.length, 0);
  await assert.rejects(tab.client.getToken(), { code: "session_revoked", sessionEnded: true });

  // Nothing more, whatever happens: time, wake events, getToken.
  tab.window.dispatchEvent(new Event("focus"));
  tab.window.dispatchEvent(new Event("online"));
  await assert.rejects(tab.client.getToken());
  await b.clock.advance(24 * 3600_000);
  assert.equal(b.tokend.tokenCalls.length, 2);
  assert.equal(tab.events.ended.length, 1);
});

test("a 401 at the first request ends the session too", async () => {
  const b = new Browser();
  b.tokend.next(problem(401, "session_invalid"));
  const tab = b.tab();
  await assert.rejects(tab.client.getToken(), { code: "session_invalid" });
  await b.clock.advance(3600_000);
  assert.equal(b.tokend.tokenCalls.length, 1);
  assert.equal(tab.events.ended.length, 1);
});

test("503 with Retry-After: the retry waits at least that long", async () => {
  const b = new Browser();
  b.tokend.next(problem(503, "overloaded", { "Retry-After": "2" }));
  const tab = b.tab({ random: () => 0.99 });
  const pending = assert.rejects(tab.client.getToken(), { code: "overloaded" });
  await b.clock.advance(0);
  assert.equal(b.tokend.tokenCalls.length, 1);
  assert.equal(tab.events.errors.length, 1);
  assert.equal(tab.events.errors[0].code, "overloaded");
  assert.equal(tab.events.errors[0].status, 503);
  assert.equal(tab.events.errors[0].retryInMs, 2000);
  await pending; // the attempt failed; the client retries on its own

  // Neither getToken nor a wake event cuts a Retry-After short.
  const waiting = tab.client.getToken();
  tab.window.dispatchEvent(new Event("online"));
  tab.window.dispatchEvent(new Event("focus"));
  await b.clock.advance(1999);
  assert.equal(b.tokend.tokenCalls.length, 1);
  await b.clock.advance(1);
  assert.equal(b.tokend.tokenCalls.length, 2);
  assert.match(await waiting, /\./);
  tab.client.stop();
});

test("429 and network errors back off exponentially with full jitter, capped", async () => {
  const b = new Browser();
  const draws = [0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9];
  b.tokend.next(problem(429, "rate_limited", { "Retry-After": "1" }));
  for (let i = 0; i < 7; i++) b.tokend.next(networkError());
  const tab = b.tab({ random: () => draws.shift() ?? 0.5 });
  await b.clock.advance(0);
  const gaps = [];
  for (let i = 1; i < 9; i++) {
    const before = b.tokend.tokenCalls.length;
    while (b.tokend.tokenCalls.length === before) await b.clock.advance(50);
    const calls = b.tokend.tokenCalls;
    gaps.push(calls[calls.length - 1].at - calls[calls.length - 2].at);
  }
  // ceilings 500·2^n capped at 30 s, times 0.9; the first is floored by Retry-After: 1.
  const want = [1000, 900, 1800, 3600, 7200, 14400, 27000, 27000];
  gaps.forEach((g, i) => assert.ok(g >= want[i] && g < want[i] + 50, `gap ${i}: ${g} ms, want ${want[i]}`));
  assert.equal(tab.events.errors.length, 8);
  assert.deepEqual(tab.events.errors.map((e) => e.code), ["rate_limited", ...Array(7).fill("network")]);
  assert.equal(tab.events.tokens.length, 1); // the ninth attempt succeeded
  // Success resets the backoff: the next failure starts again at 500 ms.
  tab.client.stop();
});

test("coming back online retries a network failure at once", async () => {
  const b = new Browser();
  b.tokend.next(networkError());
  const tab = b.tab({ random: () => 0.99 });
  await b.clock.advance(0);
  assert.equal(b.tokend.tokenCalls.length, 1);
  tab.window.dispatchEvent(new Event("online"));
  await b.clock.advance(0);
  assert.equal(b.tokend.tokenCalls.length, 2);
  assert.equal(tab.events.tokens.length, 1);
  tab.client.stop();
});

test("a hung request times out and is retried", async () => {
  const b = new Browser();
  b.tokend.next(hang());
  const tab = b.tab({ fetchTimeoutMs: 5000, random: () => 0 });
  await b.clock.advance(4999);
  assert.equal(tab.events.errors.length, 0);
  await b.clock.advance(1);
  assert.equal(tab.events.errors[0]?.code, "timeout");
  await b.clock.advance(0);
  assert.equal(tab.events.tokens.length, 1);
  tab.client.stop();
});

test("other 4xx are fatal: reported once, not retried", async () => {
  const b = new Browser();
  b.tokend.next(problem(404, "not_found"));
  const tab = b.tab();
  await b.clock.advance(0);
  await b.clock.advance(3600_000);
  assert.equal(b.tokend.tokenCalls.length, 1);
  assert.equal(tab.events.errors.length, 1);
  assert.ok(tab.events.errors[0].fatal);
  await assert.rejects(tab.client.getToken(), { code: "not_found", fatal: true });
});

test("after a sleep, getToken refreshes an expired token before returning", async () => {
  const b = new Browser({ expiresIn: 600, refreshIn: 420 });
  const tab = b.tab();
  await b.clock.advance(0);
  const first = await tab.client.getToken();
  b.clock.sleep(3600_000); // timers did not run
  const got = tab.client.getToken();
  await b.clock.advance(0);
  const second = await got;
  assert.notEqual(second, first);
  assert.equal(b.tokend.tokenCalls.length, 2);
  assert.equal(b.tokend.tokenCalls[1].at, b.clock.t);
  tab.client.stop();
});

test("a token about to expire is not handed out", async () => {
  const b = new Browser({ expiresIn: 600, refreshIn: 590 });
  const tab = b.tab();
  await b.clock.advance(0);
  b.clock.sleep(575_000); // 25 s left: inside the 30 s margin, before refresh_in
  const got = tab.client.getToken();
  await b.clock.advance(0);
  await got;
  assert.equal(b.tokend.tokenCalls.length, 2);
  tab.client.stop();
});

test("waking (visible, focus) refreshes an overdue token without waiting for a timer", async () => {
  for (const [target, type] of [["document", "visibilitychange"], ["window", "focus"], ["window", "pageshow"], ["document", "resume"]]) {
    const b = new Browser({ expiresIn: 600, refreshIn: 420 });
    const tab = b.tab({ clockCheckMs: 1e9 });
    await b.clock.advance(0);
    b.clock.sleep(500_000);
    tab[target].dispatchEvent(new Event(type));
    await settle();
    assert.equal(b.tokend.tokenCalls.length, 2, type);
    // A fresh token is left alone.
    tab[target].dispatchEvent(new Event(type));
    await settle();
    assert.equal(b.tokend.tokenCalls.length, 2, type);
    tab.client.stop();
  }
});

test("a hidden page does not refresh on visibilitychange", async () => {
  const b = new Browser({ expiresIn: 600, refreshIn: 420 });
  const tab = b.tab({ clockCheckMs: 1e9 });
  await b.clock.advance(0);
  b.clock.sleep(500_000);
  tab.document.visibilityState = "hidden";
  tab.document.dispatchEvent(new Event("visibilitychange"));
  await settle();
  assert.equal(b.tokend.tokenCalls.length, 1);
  tab.client.stop();
});

test("stop ends requests and rejects pending getToken calls", async () => {
  const b = new Browser();
  b.tokend.next(hang());
  const tab = b.tab();
  const pending = assert.rejects(tab.client.getToken(), { code: "stopped" });
  await b.clock.advance(0);
  tab.client.stop();
  await pending;
  await b.clock.advance(3600_000);
  assert.equal(b.tokend.tokenCalls.length, 1);
});

// --- Several tabs --------------------------------------------------------------------

test("two tabs: one request per refresh, the other tab receives the token", async () => {
  const b = new Browser({ expiresIn: 600, refreshIn: 420 });
  const a = b.tab();
  await b.clock.advance(0);
  const c = b.tab();
  await b.clock.advance(0);
  assert.equal(a.client.role, "leader");
  assert.equal(c.client.role, "follower");
  assert.equal(b.tokend.tokenCalls.length, 1, "the second tab fetched on its own");
  assert.equal(await c.client.getToken(), await a.client.getToken());
  assert.equal(c.events.tokens[0].source, "tab");

  for (let i = 2; i <= 4; i++) {
    await b.clock.advance(420_000);
    assert.equal(b.tokend.tokenCalls.length, i);
    assert.equal(await c.client.getToken(), await a.client.getToken());
  }
  assert.equal(a.events.tokens.length, 4);
  assert.equal(c.events.tokens.length, 4);
  a.client.stop();
  c.client.stop();
});

test("tabs opened together still share one request", async () => {
  const b = new Browser();
  const tabs = [b.tab(), b.tab(), b.tab(), b.tab()];
  await b.clock.advance(0);
  assert.equal(b.tokend.tokenCalls.length, 1);
  const tokens = await Promise.all(tabs.map((t) => t.client.getToken()));
  assert.equal(new Set(tokens).size, 1);
  assert.equal(tabs.filter((t) => t.client.role === "leader").length, 1);
  tabs.forEach((t) => t.client.stop());
});

test("a follower's getToken after a sleep asks the leader instead of fetching", async () => {
  const b = new Browser({ expiresIn: 600, refreshIn: 420 });
  const a = b.tab({ clockCheckMs: 1e9 });
  const c = b.tab({ clockCheckMs: 1e9 });
  await b.clock.advance(0);
  b.clock.sleep(3600_000);
  const got = c.client.getToken();
  await settle();
  assert.equal(b.tokend.tokenCalls.length, 2);
  assert.equal(await got, await a.client.getToken());
  a.client.stop();
  c.client.stop();
});

test("a leader tab closed in the middle of a refresh does not wedge the others", async () => {
  const b = new Browser({ expiresIn: 600, refreshIn: 420 });
  const a = b.tab();
  const c = b.tab();
  await b.clock.advance(0);
  assert.equal(a.client.role, "leader");
  b.tokend.next(hang()); // the leader's next request never comes back
  await b.clock.advance(420_000);
  assert.equal(b.tokend.tokenCalls.length, 2);
  b.close(a); // the tab goes away: the browser releases its lock
  await b.clock.advance(0);
  assert.equal(c.client.role, "leader");
  assert.equal(b.tokend.tokenCalls.length, 3);
  assert.equal(c.events.tokens.length, 2);
  assert.equal(c.events.tokens[1].source, "fetch");
  // And it carries on at refresh_in.
  await b.clock.advance(420_000);
  assert.equal(b.tokend.tokenCalls.length, 4);
  c.client.stop();
});

test("a stopped leader hands over to a follower, which refreshes when due", async () => {
  const b = new Browser({ expiresIn: 600, refreshIn: 420 });
  const a = b.tab();
  const c = b.tab();
  await b.clock.advance(100_000);
  a.client.stop();
  await b.clock.advance(0);
  assert.equal(c.client.role, "leader");
  assert.equal(b.tokend.tokenCalls.length, 1, "took over with a fresh token and fetched anyway");
  await b.clock.advance(320_000);
  assert.equal(b.tokend.tokenCalls.length, 2);
  c.client.stop();
});

test("a follower whose leader is frozen fetches on its own after a while", async () => {
  const b = new Browser({ expiresIn: 600, refreshIn: 420 });
  const a = b.tab();
  const c = b.tab({ leaderTimeoutMs: 3000 });
  await b.clock.advance(0);
  b.freeze(a);
  b.clock.sleep(3600_000);
  const got = c.client.getToken();
  await b.clock.advance(2999);
  const calls = b.tokend.tokenCalls.length;
  await b.clock.advance(1);
  assert.equal(b.tokend.tokenCalls.length, calls + 1);
  assert.match(await got, /\./);
  a.client.stop();
  c.client.stop();
});

test("session end reaches every tab, and none of them asks again", async () => {
  const b = new Browser({ expiresIn: 600, refreshIn: 420 });
  const tabs = [b.tab(), b.tab(), b.tab()];
  await b.clock.advance(0);
  b.tokend.next(problem(401, "session_expired"));
  await b.clock.advance(420_000);
  for (const t of tabs) {
    assert.equal(t.events.ended.length, 1);
    assert.equal(t.events.ended[0].code, "session_expired");
    await assert.rejects(t.client.getToken(), { sessionEnded: true });
  }
  await b.clock.advance(24 * 3600_000);
  assert.equal(b.tokend.tokenCalls.length, 2);
});

test("errors reach followers too, and the leader alone retries", async () => {
  const b = new Browser();
  const a = b.tab();
  const c = b.tab();
  await b.clock.advance(0);
  b.tokend.next(problem(503, "overloaded", { "Retry-After": "3" }));
  await b.clock.advance(420_000);
  assert.equal(a.events.errors.length, 1);
  assert.equal(c.events.errors.length, 1);
  assert.equal(c.events.errors[0].code, "overloaded");
  assert.equal(c.events.errors[0].retryInMs, 3000);
  await b.clock.advance(3000);
  assert.equal(b.tokend.tokenCalls.length, 3);
  assert.equal(c.events.tokens.length, 2);
  a.client.stop();
  c.client.stop();
});

test("logout revokes the session and ends it in every tab", async () => {
  const b = new Browser();
  const a = b.tab();
  const c = b.tab();
  await b.clock.advance(0);
  await c.client.logout();
  await settle();
  assert.deepEqual(b.tokend.calls.map((x) => x.method), ["POST", "DELETE"]);
  assert.equal(b.tokend.calls[1].url, "https://tokend.test/v1/session");
  assert.equal(b.tokend.calls[1].credentials, "include");
  for (const t of [a, c]) {
    assert.equal(t.events.ended.length, 1);
    assert.equal(t.events.ended[0].code, "logged_out");
  }
  await b.clock.advance(24 * 3600_000);
  assert.equal(b.tokend.calls.length, 2);
});

test("logout that tokend refuses throws and keeps the session", async () => {
  const b = new Browser();
  const a = b.tab();
  await b.clock.advance(0);
  b.tokend.next(problem(429, "rate_limited", { "Retry-After": "5" }));
  await assert.rejects(a.client.logout(), { code: "rate_limited", status: 429 });
  assert.equal(a.events.ended.length, 0);
  assert.match(await a.client.getToken(), /\./);
  a.client.stop();
});

test("without Web Locks every tab refreshes for itself, and still works", async () => {
  const b = new Browser({ locks: false });
  const a = b.tab();
  const c = b.tab();
  await b.clock.advance(0);
  assert.equal(a.client.role, "leader");
  assert.equal(c.client.role, "leader");
  assert.match(await a.client.getToken(), /\./);
  assert.match(await c.client.getToken(), /\./);
  a.client.stop();
  c.client.stop();
});

test("a throwing callback does not break the loop", async () => {
  const b = new Browser();
  const errors = [];
  const saved = globalThis.reportError;
  globalThis.reportError = (e) => errors.push(e);
  try {
    const tab = b.tab({ onToken: () => { throw new Error("app bug"); } });
    await b.clock.advance(0);
    await b.clock.advance(420_000);
    assert.equal(b.tokend.tokenCalls.length, 2);
    assert.equal(errors.length, 2);
    tab.client.stop();
  } finally {
    globalThis.reportError = saved;
  }
});

test("stopped before the election: no request, no lock held", async () => {
  const b = new Browser();
  const a = b.tab();
  const c = b.tab();
  a.client.stop();
  c.client.stop();
  await b.clock.advance(3600_000);
  assert.equal(b.tokend.calls.length, 0);
  assert.equal(b.locks.held.size, 0);
  assert.equal(b.clock.timers.size, 0);
});
