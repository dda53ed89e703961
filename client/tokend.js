// @tokend/client — the browser side of tokend's refresh protocol.
//
//   import { createTokenClient } from "https://tokend.example.com/js/tokend.js";
//   const tokens = createTokenClient({
//     baseUrl: "https://tokend.example.com",
//     onSessionEnd: () => location.assign("/login"),
//   });
//   const ws = new WebSocket("wss://rt.example.com/");
//   ws.onopen = async () => ws.send(JSON.stringify({ type: "auth", token: await tokens.getToken() }));
//   // (never put the token in the URL: URLs end up in logs)
//
// The rules it follows, and why:
//   * It refreshes when the server says (`refresh_in`, drawn by tokend from
//     50–90 % of the token's life), never on a fixed interval of its own, so
//     clients that arrived together leave at different times.
//   * Network errors, 429 and 5xx are retried with capped exponential backoff
//     with full jitter; `Retry-After` is a floor, never shortened.
//   * A 401 (session_expired, session_revoked, session_invalid) ends the
//     session for good: no retry, `onSessionEnd` is called once.
//   * Tabs of one app share one refresh: a Web Lock elects one leader tab,
//     which fetches and hands each token to the others over a
//     BroadcastChannel. Locks die with their tab, so a tab that closes in the
//     middle of a refresh hands leadership on instead of wedging the others.
//   * After sleep, a frozen or hidden tab, or a lost network, the token is
//     checked on wake, and getToken() never returns a token that has expired
//     or is about to.
//
// The module has no dependencies and touches no browser global at import
// time, so its pure parts (backoff, classification, scheduling) run under
// node's test runner (client/test/).

/** Defaults of the tunable options of createTokenClient. */
export const DEFAULTS = Object.freeze({
  /** First backoff ceiling; each failed attempt doubles it. */
  backoffBaseMs: 500,
  /** Largest backoff ceiling. A longer Retry-After still wins. */
  backoffCapMs: 30_000,
  /** A token request that takes longer is aborted and retried. */
  fetchTimeoutMs: 10_000,
  /** A follower tab waits this long for the leader before fetching itself. */
  leaderTimeoutMs: 3_000,
  /** No refresh is scheduled sooner than this after the previous one. */
  minRefreshMs: 1_000,
  /** A token is "about to expire" within this much of its end (at most a tenth of its life). */
  expiryMarginMs: 30_000,
  /** Timers are re-armed at least this often, so that a sleep that stopped
   * the clock timers run on is noticed soon after wake even without events. */
  clockCheckMs: 10_000,
});

/** Problem codes of a refused refresh: the session is over. */
export const SESSION_END_CODES = Object.freeze(["session_expired", "session_revoked", "session_invalid"]);

/**
 * TokenError is what getToken() rejects with and what onError and
 * onSessionEnd receive.
 *
 * code is the problem code tokend sent (e.g. "session_revoked",
 * "rate_limited", "overloaded"), or one of the client's own: "network" (no
 * answer, or the browser hid it: a CORS refusal looks the same), "timeout",
 * "bad_response", "logged_out", "stopped".
 */
export class TokenError extends Error {
  constructor(code, { status = 0, detail = "", retryInMs, sessionEnded = false, fatal = false, requestId = "" } = {}) {
    super(detail ? `${code}: ${detail}` : code);
    this.name = "TokenError";
    /** The problem code. */
    this.code = code;
    /** The HTTP status, 0 when there was no readable answer. */
    this.status = status;
    /** tokend's human-readable explanation, if any. */
    this.detail = detail;
    /** Milliseconds until the next attempt, when one is scheduled. */
    this.retryInMs = retryInMs;
    /** True when the session is over: sign the user in again. */
    this.sessionEnded = sessionEnded;
    /** True when retrying cannot help (e.g. a 404: a wrong baseUrl). */
    this.fatal = fatal;
    /** tokend's X-Request-Id, to quote when reporting a problem. */
    this.requestId = requestId;
  }

  /** toJSON keeps the fields when the error crosses a BroadcastChannel or a log. */
  toJSON() {
    const { code, status, detail, retryInMs, sessionEnded, fatal, requestId } = this;
    return { code, status, detail, retryInMs, sessionEnded, fatal, requestId };
  }

  /** fromJSON rebuilds an error sent by another tab. */
  static fromJSON(o) {
    return new TokenError(String(o?.code ?? "unknown"), o ?? {});
  }
}

// --- Pure logic, exported for tests ------------------------------------------

/**
 * backoffDelay is the wait before retry number attempt+1: "full jitter", a
 * uniform draw from [0, min(cap, base·2^attempt)), so that clients refused
 * together spread out instead of returning in a wave.
 */
export function backoffDelay(attempt, { backoffBaseMs = DEFAULTS.backoffBaseMs, backoffCapMs = DEFAULTS.backoffCapMs, random = Math.random } = {}) {
  const n = Math.max(0, Math.min(Math.floor(attempt) || 0, 30));
  const ceiling = Math.min(backoffCapMs, backoffBaseMs * 2 ** n);
  return Math.floor(random() * ceiling);
}

/**
 * retryDelay is the wait before the next attempt: the jittered backoff, but
 * never less than the server's Retry-After (which tokend jitters itself).
 */
export function retryDelay(attempt, retryAfterMs, opts) {
  return Math.max(retryAfterMs ?? 0, backoffDelay(attempt, opts));
}

/**
 * parseRetryAfter reads a Retry-After header (seconds, or an HTTP date) as
 * milliseconds from now; null when absent or unreadable.
 */
export function parseRetryAfter(value, now) {
  if (value == null) return null;
  const v = String(value).trim();
  if (/^\d+$/.test(v)) return Number(v) * 1000;
  const at = Date.parse(v);
  if (!/[a-z]/i.test(v) || Number.isNaN(at)) return null;
  return Math.max(0, at - now);
}

/**
 * classify decides what an answer to POST /v1/token means:
 *   "token" — a token; "end" — the session is over (every 401, never
 *   retried); "retry" — try again later (408, 425, 429, 5xx); "fatal" —
 *   retrying cannot help (other 4xx: a wrong URL, a misconfigured origin).
 */
export function classify(status, problem) {
  const code = typeof problem?.code === "string" && problem.code ? problem.code : "";
  if (status >= 200 && status < 300) return { action: "token", code: "" };
  if (status === 401) return { action: "end", code: code || "session_invalid" };
  if (status === 408 || status === 425 || status === 429 || status >= 500) {
    return { action: "retry", code: code || (status === 429 ? "rate_limited" : `http_${status}`) };
  }
  return { action: "fatal", code: code || `http_${status}` };
}

/**
 * parseToken turns a token response into the client's record, with times on
 * this machine's clock: received at now, expiring expires_in seconds later,
 * due for refresh refresh_in seconds later. Relative times make the client
 * immune to a skewed clock. Returns null when the body is not a token.
 */
export function parseToken(body, now) {
  if (!body || typeof body.access_token !== "string" || body.access_token === "") return null;
  const expiresIn = body.expires_in, refreshIn = body.refresh_in;
  if (!Number.isFinite(expiresIn) || expiresIn < 0 || !Number.isFinite(refreshIn) || refreshIn < 0) return null;
  const sessionEnd = typeof body.session_expires_at === "string" ? Date.parse(body.session_expires_at) : NaN;
  return {
    accessToken: body.access_token,
    receivedAt: now,
    expiresAt: now + expiresIn * 1000,
    refreshAt: now + Math.min(refreshIn, expiresIn) * 1000,
    sessionExpiresAt: Number.isNaN(sessionEnd) ? null : sessionEnd,
  };
}

/** isTokenRecord checks the shape of a record another tab sent. */
export function isTokenRecord(t) {
  return !!t && typeof t.accessToken === "string" && t.accessToken !== "" &&
    [t.receivedAt, t.expiresAt, t.refreshAt].every(Number.isFinite) &&
    (t.sessionExpiresAt === null || Number.isFinite(t.sessionExpiresAt));
}

/**
 * tokenState says where a token stands at now:
 *   "missing"  — there is none;
 *   "expiring" — expired, or within the margin of expiry (min(expiryMarginMs,
 *                a tenth of its life)): not to be handed out;
 *   "due"      — still good, but its refresh time has come;
 *   "fresh"    — good, and not yet due.
 */
export function tokenState(token, now, { expiryMarginMs = DEFAULTS.expiryMarginMs } = {}) {
  if (!token) return "missing";
  const margin = Math.min(expiryMarginMs, (token.expiresAt - token.receivedAt) / 10);
  if (now >= token.expiresAt - margin) return "expiring";
  if (now >= token.refreshAt) return "due";
  return "fresh";
}

/** isUsable reports whether getToken() may hand the token out. */
export function isUsable(token, now, opts) {
  const s = tokenState(token, now, opts);
  return s === "fresh" || s === "due";
}

/**
 * nextRefreshAt is when the leader refreshes after receiving token: at its
 * refresh time, as the server said, but no sooner than minRefreshMs from now
 * (refresh_in can be 0 in a session's last seconds).
 */
export function nextRefreshAt(token, now, { minRefreshMs = DEFAULTS.minRefreshMs } = {}) {
  return Math.max(token.refreshAt, now + minRefreshMs);
}

/** isNewer reports whether candidate was issued after current. */
export function isNewer(candidate, current) {
  return !current || candidate.receivedAt > current.receivedAt;
}

/**
 * decodeToken returns a JWT's header and claims, for display. It does not
 * verify anything: validators do that with tokend's JWKS.
 */
export function decodeToken(jwt) {
  const parts = String(jwt).split(".");
  if (parts.length !== 3) throw new TypeError("not a JWT: want three dot-separated parts");
  return { header: decodePart(parts[0]), claims: decodePart(parts[1]) };
}

function decodePart(s) {
  const b64 = s.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((s.length + 3) % 4);
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return JSON.parse(new TextDecoder().decode(bytes));
}

// --- The client ----------------------------------------------------------------

/**
 * createTokenClient starts keeping a token fresh for this page and returns
 * { getToken, logout, stop, role }.
 *
 * options:
 *   baseUrl       tokend's origin (and path prefix, if any); "" for same-origin.
 *   onToken(token, info)   every new token; info = { expiresAt, refreshAt,
 *                 sessionExpiresAt (ms since the epoch, this machine's clock),
 *                 source: "fetch" (this tab asked) or "tab" (another tab did) }.
 *   onSessionEnd(err)      once, when the session is over (err.code says why).
 *   onError(err)  every failed attempt; err.retryInMs says when the next one is.
 * The DEFAULTS may be overridden by name; fetch, now, random, setTimeout,
 * clearTimeout, locks, BroadcastChannel, window and document replace the
 * browser's, for tests (null turns locks or BroadcastChannel off).
 */
export function createTokenClient(options = {}) {
  const cfg = { ...DEFAULTS };
  for (const k of Object.keys(DEFAULTS)) if (options[k] !== undefined) cfg[k] = options[k];
  const env = environment(options);
  const base = String(options.baseUrl ?? "").replace(/\/+$/, "");
  const onToken = options.onToken ?? (() => {});
  const onSessionEnd = options.onSessionEnd ?? (() => {});
  const onError = options.onError ?? (() => {});
  // Every tab of this origin that talks to this tokend shares the session
  // cookie, so they share one lock and one channel.
  const name = `tokend:${base || "same-origin"}`;

  let token = null; // the newest token this tab knows (see parseToken)
  let role = "pending"; // "pending" until the election, then "leader" or "follower"
  let status = "running"; // "running", then "ended", "failed" or "stopped"
  let finalError = null; // what getToken() rejects with once not running
  let attempt = 0; // consecutive failed attempts (leader)
  let retryAt = 0; // no attempt before this (backoff, Retry-After)
  let networkFailure = false; // the last failure was a network error
  let inflight = null; // this tab's token request, if one is under way
  let timer = null; // the leader's next refresh or retry
  let leaderTimer = null; // a follower's wait for the leader
  let waiters = []; // getToken() calls waiting for the next outcome
  let releaseLock = null; // ends the leader's hold on the lock
  const lockAbort = new AbortController();
  // The events after which the page may have slept (see onWake).
  const listeners = [
    [env.document, "visibilitychange"],
    [env.document, "resume"],
    [env.window, "focus"],
    [env.window, "online"],
    [env.window, "pageshow"],
  ];

  const channel = env.BroadcastChannel ? new env.BroadcastChannel(name) : null;
  const post = (msg) => {
    try {
      channel?.postMessage({ v: 1, ...msg });
    } catch {
      // A closed channel: this tab is shutting down.
    }
  };
  const call = (fn, ...args) => {
    try {
      fn(...args);
    } catch (e) {
      // A throwing callback must not break the refresh loop; report it the
      // way an uncaught error would be.
      if (typeof globalThis.reportError === "function") globalThis.reportError(e);
      else console.error(e);
    }
  };
  const settle = (err, value) => {
    const ws = waiters;
    waiters = [];
    for (const w of ws) err ? w.reject(err) : w.resolve(value);
  };

  // adopt makes next the current token if it is newer, and tells the page.
  function adopt(next, source) {
    if (!isNewer(next, token)) return false;
    const changed = !token || token.accessToken !== next.accessToken;
    token = next;
    attempt = 0;
    retryAt = 0;
    networkFailure = false;
    settle(null, token.accessToken);
    if (changed) {
      const { expiresAt, refreshAt, sessionExpiresAt } = token;
      call(onToken, token.accessToken, { expiresAt, refreshAt, sessionExpiresAt, source });
    }
    return true;
  }

  // schedule runs tick at time at. The timer is re-armed at least every
  // clockCheckMs: during a machine's sleep the timers' clock may stand still
  // while Date.now() does not.
  function schedule(at) {
    clearTimer();
    const step = () => {
      timer = null;
      const wait = at - env.now();
      if (wait <= 0) return tick();
      timer = env.setTimeout(step, Math.min(wait, cfg.clockCheckMs));
    };
    timer = env.setTimeout(step, Math.max(0, Math.min(at - env.now(), cfg.clockCheckMs)));
  }
  function clearTimer() {
    if (timer !== null) env.clearTimeout(timer);
    timer = null;
  }
  function tick() {
    if (status === "running" && role === "leader") refreshNow();
  }

  // refreshNow asks tokend for a token, unless this tab already is.
  function refreshNow() {
    if (status !== "running" || inflight) return;
    clearTimer();
    post({ type: "refreshing" });
    inflight = fetchToken()
      .then(handleOutcome)
      .finally(() => {
        inflight = null;
      });
  }

  async function fetchToken() {
    const abort = new AbortController();
    const timeout = env.setTimeout(() => abort.abort(), cfg.fetchTimeoutMs);
    try {
      let resp, body;
      try {
        resp = await env.fetch(`${base}/v1/token`, {
          method: "POST",
          credentials: "include",
          cache: "no-store",
          signal: abort.signal,
        });
        body = await resp.json().catch(() => null);
      } catch {
        const code = abort.signal.aborted ? "timeout" : "network";
        const detail = abort.signal.aborted
          ? `tokend did not answer within ${cfg.fetchTimeoutMs} ms`
          : "tokend could not be reached, or the browser hid its answer (if tokend is up, is this page's origin in TOKEND_ALLOWED_ORIGINS?)";
        return { action: "retry", network: true, error: new TokenError(code, { detail }) };
      }
      const now = env.now();
      const c = classify(resp.status, body);
      const fields = {
        status: resp.status,
        detail: typeof body?.detail === "string" ? body.detail : "",
        requestId: resp.headers.get("X-Request-Id") ?? "",
      };
      switch (c.action) {
        case "token": {
          const t = parseToken(body, now);
          if (t) return { action: "token", token: t };
          return { action: "retry", error: new TokenError("bad_response", { ...fields, detail: "the answer is not a token" }) };
        }
        case "end":
          return { action: "end", error: new TokenError(c.code, { ...fields, sessionEnded: true }) };
        case "retry":
          return {
            action: "retry",
            error: new TokenError(c.code, fields),
            retryAfterMs: parseRetryAfter(resp.headers.get("Retry-After"), now),
          };
        default:
          return { action: "fatal", error: new TokenError(c.code, { ...fields, fatal: true }) };
      }
    } finally {
      env.clearTimeout(timeout);
    }
  }

  function handleOutcome(o) {
    if (status !== "running") return;
    switch (o.action) {
      case "token":
        if (adopt(o.token, "fetch")) post({ type: "token", token: o.token });
        if (role === "leader") schedule(nextRefreshAt(token, env.now(), cfg));
        return;
      case "end":
        return end(o.error, true);
      case "fatal":
        post({ type: "failed", error: o.error.toJSON() });
        return shutdown("failed", o.error, () => call(onError, o.error));
      case "retry": {
        if (role === "leader") {
          const delay = retryDelay(attempt, o.retryAfterMs, { ...cfg, random: env.random });
          attempt++;
          retryAt = env.now() + delay;
          networkFailure = !!o.network;
          o.error.retryInMs = delay;
          schedule(retryAt);
        }
        // A follower's own fetch (see onLeaderSilent) is not retried here:
        // its next getToken() asks the leader again.
        post({ type: "failed", error: o.error.toJSON() });
        call(onError, o.error);
        settle(o.error);
      }
    }
  }

  // end stops for good because the session is over.
  function end(err, tellOthers) {
    if (status !== "running") return;
    if (tellOthers) post({ type: "ended", error: err.toJSON() });
    shutdown("ended", err, () => call(onSessionEnd, err));
  }

  function shutdown(newStatus, err, notify) {
    status = newStatus;
    finalError = err;
    token = null;
    clearTimer();
    if (leaderTimer !== null) env.clearTimeout(leaderTimer);
    leaderTimer = null;
    lockAbort.abort();
    releaseLock?.();
    channel?.close();
    for (const [target, type] of listeners) target?.removeEventListener(type, onWake);
    settle(err);
    notify?.();
  }

  // --- Leadership ------------------------------------------------------------

  // lead runs while this tab holds the lock: it refreshes for every tab.
  function lead() {
    if (status !== "running") return undefined; // granted after stop: let go at once
    role = "leader";
    if (leaderTimer !== null) env.clearTimeout(leaderTimer);
    leaderTimer = null;
    const now = env.now();
    if (tokenState(token, now, cfg) === "fresh") schedule(nextRefreshAt(token, now, cfg));
    else if (now >= retryAt) refreshNow();
    else schedule(retryAt);
    return new Promise((resolve) => {
      releaseLock = resolve;
    });
  }

  function elect() {
    if (!env.locks) {
      // No Web Locks (an old browser, an insecure context): every tab
      // refreshes for itself. Still correct, only not shared.
      lead();
      return;
    }
    env.locks
      .request(name, { ifAvailable: true }, (lock) => {
        if (status !== "running") return undefined;
        if (lock) return lead();
        role = "follower";
        askLeader();
        // Queue for leadership: granted when the leader stops or its tab
        // closes, mid-refresh or not.
        env.locks.request(name, { signal: lockAbort.signal }, lead).catch(() => {});
        return undefined;
      })
      .catch(() => {});
  }

  // askLeader asks the leader for its token. A leader that stays silent
  // (frozen by the browser, say) does not block this tab for long.
  function askLeader() {
    post({ type: "need" });
    if (leaderTimer === null) leaderTimer = env.setTimeout(onLeaderSilent, cfg.leaderTimeoutMs);
  }
  function leaderHeard() {
    if (leaderTimer !== null) env.clearTimeout(leaderTimer);
    leaderTimer = null;
  }
  function onLeaderSilent() {
    leaderTimer = null;
    if (status !== "running" || role !== "follower" || inflight) return;
    if (isUsable(token, env.now(), cfg) && waiters.length === 0) return;
    inflight = fetchToken()
      .then(handleOutcome)
      .finally(() => {
        inflight = null;
      });
  }

  // answerNeed is the leader's reply to a tab that asked for the token.
  function answerNeed() {
    const now = env.now();
    if (isUsable(token, now, cfg)) post({ type: "token", token });
    if (tokenState(token, now, cfg) === "fresh") return;
    if (!inflight && now >= retryAt) refreshNow(); // says "refreshing"
    else post({ type: "refreshing" }); // a request or a retry is under way
  }

  function onMessage(ev) {
    const m = ev.data;
    if (status !== "running" || !m || m.v !== 1) return;
    switch (m.type) {
      case "need":
        if (role === "leader") answerNeed();
        return;
      case "refreshing":
        return leaderHeard();
      case "token":
        leaderHeard();
        if (!isTokenRecord(m.token)) return;
        if (adopt(m.token, "tab") && role === "leader") schedule(nextRefreshAt(token, env.now(), cfg));
        return;
      case "failed": {
        leaderHeard();
        if (role === "leader") return; // the leader runs its own retries
        const err = TokenError.fromJSON(m.error);
        if (err.fatal) return shutdown("failed", err, () => call(onError, err));
        call(onError, err);
        settle(err);
        return;
      }
      case "ended":
        return end(TokenError.fromJSON({ ...m.error, sessionEnded: true }), false);
    }
  }
  if (channel) channel.onmessage = onMessage;

  // --- Wake ------------------------------------------------------------------

  // onWake runs when the page may have slept: shown again, focused, back
  // online, resumed from frozen or restored from the back/forward cache.
  function onWake(ev) {
    if (status !== "running") return;
    if (env.document?.visibilityState === "hidden") return;
    const now = env.now();
    if (tokenState(token, now, cfg) === "fresh") return;
    if (role === "leader") {
      // Coming back online cuts short a wait caused by a network error; a
      // Retry-After is never cut short.
      if (ev?.type === "online" && networkFailure) retryAt = 0;
      if (now >= retryAt) refreshNow();
    } else if (role === "follower") {
      askLeader();
    }
  }
  for (const [target, type] of listeners) target?.addEventListener(type, onWake);

  elect();

  return {
    /**
     * getToken resolves with a token valid for a while yet. If the current
     * one has expired or is about to (after a sleep, say), it waits for a
     * fresh one. It rejects with a TokenError when that attempt fails (the
     * client keeps retrying in the background), and for good once the
     * session has ended or the client was stopped.
     */
    getToken() {
      if (status !== "running") return Promise.reject(finalError);
      const now = env.now();
      if (isUsable(token, now, cfg)) return Promise.resolve(token.accessToken);
      return new Promise((resolve, reject) => {
        waiters.push({ resolve, reject });
        if (role === "leader") {
          if (!inflight && now >= retryAt) refreshNow();
        } else if (role === "follower") {
          askLeader();
        }
        // "pending": the election is under way and will fetch or ask.
      });
    },

    /**
     * logout revokes the session (DELETE /v1/session, which clears the
     * cookie) and ends it in every tab: each calls onSessionEnd with code
     * "logged_out".
     */
    async logout() {
      let resp;
      try {
        resp = await env.fetch(`${base}/v1/session`, { method: "DELETE", credentials: "include", cache: "no-store" });
      } catch {
        throw new TokenError("network", { detail: "tokend could not be reached; the session was not revoked" });
      }
      if (!resp.ok && resp.status !== 401) {
        const body = await resp.json().catch(() => null);
        throw new TokenError(body?.code || `http_${resp.status}`, {
          status: resp.status,
          detail: body?.detail ?? "",
          requestId: resp.headers.get("X-Request-Id") ?? "",
        });
      }
      end(new TokenError("logged_out", { detail: "the session was revoked by logout", sessionEnded: true }), true);
    },

    /**
     * stop ends this tab's part: no more requests, listeners removed, and
     * another tab takes over the refreshing. Pending getToken() calls reject
     * with code "stopped".
     */
    stop() {
      if (status === "running") shutdown("stopped", new TokenError("stopped", { detail: "the token client was stopped" }));
    },

    /** role is "leader" when this tab refreshes for all, "follower" when another tab does. */
    get role() {
      return role;
    },
  };
}

function environment(o) {
  const g = globalThis;
  const pick = (key, fallback) => (o[key] !== undefined ? o[key] : fallback);
  return {
    fetch: pick("fetch", g.fetch?.bind(g)),
    now: pick("now", Date.now),
    random: pick("random", Math.random),
    setTimeout: pick("setTimeout", g.setTimeout?.bind(g)),
    clearTimeout: pick("clearTimeout", g.clearTimeout?.bind(g)),
    locks: pick("locks", g.navigator?.locks ?? null),
    BroadcastChannel: pick("BroadcastChannel", g.BroadcastChannel ?? null),
    window: pick("window", typeof g.addEventListener === "function" ? g : null),
    document: pick("document", g.document ?? null),
  };
}
