// Tests of the client's pure logic: backoff, Retry-After, classification,
// token timing. Run with: node --test client/test/
import { test } from "node:test";
import assert from "node:assert/strict";

import {
  DEFAULTS,
  SESSION_END_CODES,
  backoffDelay,
  classify,
  decodeToken,
  isNewer,
  isTokenRecord,
  isUsable,
  nextRefreshAt,
  parseRetryAfter,
  parseToken,
  retryDelay,
  tokenState,
} from "../tokend.js";

// lcg is a seeded random source, so that the distribution checks are
// deterministic.
function lcg(seed) {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

test("backoffDelay: full jitter under a doubling ceiling, capped", () => {
  const almostOne = () => 0.999999;
  assert.equal(backoffDelay(0, { random: () => 0 }), 0);
  const ceilings = [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000];
  ceilings.forEach((ceiling, attempt) => {
    const d = backoffDelay(attempt, { random: almostOne });
    assert.ok(d < ceiling && d >= ceiling - 1, `attempt ${attempt}: ${d}, want just under ${ceiling}`);
  });
  // Enormous attempt counts neither overflow nor exceed the cap.
  assert.ok(backoffDelay(1e9, { random: almostOne }) < DEFAULTS.backoffCapMs);
  assert.ok(Number.isFinite(backoffDelay(-3, { random: almostOne })));
  // Options are honoured.
  assert.ok(backoffDelay(3, { backoffBaseMs: 100, backoffCapMs: 250, random: almostOne }) < 250);
});

test("backoffDelay: draws spread over the whole [0, ceiling) range", () => {
  const random = lcg(42);
  const draws = Array.from({ length: 4000 }, () => backoffDelay(2, { random }));
  assert.ok(draws.every((d) => d >= 0 && d < 2000));
  const mean = draws.reduce((a, b) => a + b, 0) / draws.length;
  assert.ok(Math.abs(mean - 1000) < 60, `mean ${mean}, want about 1000`);
  // Full jitter, not "equal jitter": a quarter of the draws fall in the lowest quarter.
  const low = draws.filter((d) => d < 500).length / draws.length;
  assert.ok(low > 0.2 && low < 0.3, `share below 500 ms: ${low}`);
});

test("retryDelay: Retry-After is a floor, never shortened or capped", () => {
  assert.equal(retryDelay(0, 2000, { random: () => 0 }), 2000);
  assert.equal(retryDelay(0, 2000, { random: () => 0.99 }), 2000); // backoff 495 < 2000
  assert.equal(retryDelay(5, 2000, { random: () => 0.5 }), 8000); // backoff wins above the floor
  assert.equal(retryDelay(9, 120_000, { random: () => 0.99 }), 120_000); // beyond the cap
  assert.equal(retryDelay(0, null, { random: () => 0.5 }), 250);
});

test("parseRetryAfter: seconds or an HTTP date, else null", () => {
  const now = Date.UTC(2026, 2, 1, 12, 0, 0);
  assert.equal(parseRetryAfter("2", now), 2000);
  assert.equal(parseRetryAfter(" 10 ", now), 10_000);
  assert.equal(parseRetryAfter("0", now), 0);
  assert.equal(parseRetryAfter(new Date(now + 5000).toUTCString(), now), 5000);
  assert.equal(parseRetryAfter(new Date(now - 5000).toUTCString(), now), 0);
  for (const bad of [null, undefined, "", "soon", "-1", "1.5", "2s"]) {
    assert.equal(parseRetryAfter(bad, now), null, `Retry-After ${JSON.stringify(bad)}`);
  }
});

test("classify: what each answer means", () => {
  const cases = [
    [200, null, "token", ""],
    [401, { code: "session_revoked" }, "end", "session_revoked"],
    [401, { code: "session_expired" }, "end", "session_expired"],
    [401, { code: "session_invalid" }, "end", "session_invalid"],
    [401, null, "end", "session_invalid"], // a 401 is never retried, whatever its body
    [429, { code: "rate_limited" }, "retry", "rate_limited"],
    [429, null, "retry", "rate_limited"],
    [503, { code: "overloaded" }, "retry", "overloaded"],
    [503, { code: "unavailable" }, "retry", "unavailable"],
    [500, { code: "internal" }, "retry", "internal"],
    [502, null, "retry", "http_502"],
    [408, null, "retry", "http_408"],
    [403, { code: "origin_not_allowed" }, "fatal", "origin_not_allowed"],
    [404, null, "fatal", "http_404"],
    [405, { code: "method_not_allowed" }, "fatal", "method_not_allowed"],
  ];
  for (const [status, body, action, code] of cases) {
    assert.deepEqual(classify(status, body), { action, code }, `${status} ${JSON.stringify(body)}`);
  }
  for (const code of SESSION_END_CODES) assert.equal(classify(401, { code }).action, "end");
});

test("parseToken: times on this machine's clock, relative to receipt", () => {
  const now = 1_000_000;
  const t = parseToken(
    { access_token: "a.b.c", token_type: "Bearer", expires_in: 600, refresh_in: 420, session_expires_at: "2026-03-01T20:00:00Z" },
    now,
  );
  assert.deepEqual(t, {
    accessToken: "a.b.c",
    receivedAt: now,
    expiresAt: now + 600_000,
    refreshAt: now + 420_000,
    sessionExpiresAt: Date.UTC(2026, 2, 1, 20),
  });
  assert.ok(isTokenRecord(t));
  // refresh_in never beyond the expiry; a missing session end is null.
  assert.equal(parseToken({ access_token: "x", expires_in: 5, refresh_in: 9 }, 0).refreshAt, 5000);
  assert.equal(parseToken({ access_token: "x", expires_in: 5, refresh_in: 3 }, 0).sessionExpiresAt, null);
  for (const bad of [null, {}, { access_token: "" , expires_in: 1, refresh_in: 1 }, { access_token: "x", expires_in: -1, refresh_in: 0 },
    { access_token: "x", expires_in: "600", refresh_in: 1 }, { access_token: "x", expires_in: 600 }]) {
    assert.equal(parseToken(bad, now), null, JSON.stringify(bad));
  }
  assert.ok(!isTokenRecord({ accessToken: "x", receivedAt: 1, expiresAt: "2", refreshAt: 1, sessionExpiresAt: null }));
});

test("tokenState: fresh, then due at refresh_in, then expiring within the margin", () => {
  const t = parseToken({ access_token: "x", expires_in: 600, refresh_in: 420 }, 0);
  const at = (s) => tokenState(t, s * 1000);
  assert.equal(at(0), "fresh");
  assert.equal(at(419.999), "fresh");
  assert.equal(at(420), "due");
  assert.equal(at(569.999), "due");
  assert.equal(at(570), "expiring"); // 30 s margin
  assert.equal(at(600), "expiring");
  assert.equal(at(1e6), "expiring");
  assert.equal(tokenState(null, 0), "missing");
  assert.ok(isUsable(t, 569_000) && !isUsable(t, 570_000) && !isUsable(null, 0));

  // A short token's margin is a tenth of its life, not 30 s.
  const short = parseToken({ access_token: "x", expires_in: 10, refresh_in: 7 }, 0);
  assert.equal(tokenState(short, 6_999), "fresh");
  assert.equal(tokenState(short, 7_000), "due");
  assert.equal(tokenState(short, 8_999), "due");
  assert.equal(tokenState(short, 9_000), "expiring");
  // A token received already expired is expiring at once.
  assert.equal(tokenState(parseToken({ access_token: "x", expires_in: 0, refresh_in: 0 }, 5), 5), "expiring");
});

test("nextRefreshAt: at refresh_in, but never sooner than the minimum", () => {
  const now = 50_000;
  assert.equal(nextRefreshAt(parseToken({ access_token: "x", expires_in: 600, refresh_in: 300 }, now), now), now + 300_000);
  assert.equal(nextRefreshAt(parseToken({ access_token: "x", expires_in: 1, refresh_in: 0 }, now), now), now + DEFAULTS.minRefreshMs);
});

test("isNewer: by time of receipt", () => {
  const a = { receivedAt: 1 }, b = { receivedAt: 2 };
  assert.ok(isNewer(a, null));
  assert.ok(isNewer(b, a));
  assert.ok(!isNewer(a, b));
  assert.ok(!isNewer(a, a));
});

test("decodeToken: header and claims, UTF-8 included", () => {
  const part = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  for (const name of ["Zoë", "Z", "Zo", "Zoé!", "東京"]) { // every padding length
    const jwt = `${part({ alg: "ES256", typ: "JWT", kid: "k1" })}.${part({ sub: "alice", name })}.c2ln`;
    assert.deepEqual(decodeToken(jwt), { header: { alg: "ES256", typ: "JWT", kid: "k1" }, claims: { sub: "alice", name } });
  }
  assert.throws(() => decodeToken("not-a-jwt"), TypeError);
});
