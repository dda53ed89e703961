// Type declarations for @tokend/client (tokend.js).

/** Defaults of the tunable options of createTokenClient. */
export declare const DEFAULTS: Readonly<{
  backoffBaseMs: number;
  backoffCapMs: number;
  fetchTimeoutMs: number;
  leaderTimeoutMs: number;
  minRefreshMs: number;
  expiryMarginMs: number;
  clockCheckMs: number;
}>;

/** Problem codes of a refused refresh: the session is over. */
export declare const SESSION_END_CODES: readonly ["session_expired", "session_revoked", "session_invalid"];

/** What getToken() rejects with, and what onError and onSessionEnd receive. */
export declare class TokenError extends Error {
  /** tokend's problem code, or "network", "timeout", "bad_response", "logged_out", "stopped". */
  code: string;
  /** The HTTP status; 0 when there was no readable answer. */
  status: number;
  detail: string;
  /** Milliseconds until the next attempt, when one is scheduled. */
  retryInMs?: number;
  /** The session is over: sign the user in again. */
  sessionEnded: boolean;
  /** Retrying cannot help (a wrong baseUrl, say); the client has stopped. */
  fatal: boolean;
  /** tokend's X-Request-Id. */
  requestId: string;
}

export interface TokenInfo {
  /** When the token expires, in ms since the epoch on this machine's clock. */
  expiresAt: number;
  /** When it will be refreshed (the server's refresh_in). */
  refreshAt: number;
  /** The session's absolute end as tokend reported it, or null. */
  sessionExpiresAt: number | null;
  /** "fetch": this tab asked tokend; "tab": another tab did and shared it. */
  source: "fetch" | "tab";
}

export interface TokenClientOptions extends Partial<typeof DEFAULTS> {
  /** tokend's origin (and path prefix, if any), e.g. "https://auth.example.com"; "" for same-origin. */
  baseUrl?: string;
  /** Called with every new token, whichever tab fetched it. */
  onToken?: (token: string, info: TokenInfo) => void;
  /** Called once when the session is over (401, logout in any tab). */
  onSessionEnd?: (err: TokenError) => void;
  /** Called at every failed attempt; err.retryInMs says when the next one is. */
  onError?: (err: TokenError) => void;
}

export interface TokenClient {
  /** A token valid for a while yet; waits for a fresh one when the current one has expired or is about to. */
  getToken(): Promise<string>;
  /** DELETE /v1/session, then the session ends in every tab (code "logged_out"). */
  logout(): Promise<void>;
  /** Stops this tab's part; another tab takes over the refreshing. */
  stop(): void;
  /** "leader" when this tab refreshes for all tabs, "follower" when another does. */
  readonly role: "pending" | "leader" | "follower";
}

export declare function createTokenClient(options?: TokenClientOptions): TokenClient;

/** A JWT's header and claims, decoded but not verified. */
export declare function decodeToken(jwt: string): { header: Record<string, unknown>; claims: Record<string, unknown> };

// The pure logic, exported for tests.
export declare function backoffDelay(attempt: number, opts?: { backoffBaseMs?: number; backoffCapMs?: number; random?: () => number }): number;
export declare function retryDelay(attempt: number, retryAfterMs: number | null | undefined, opts?: { backoffBaseMs?: number; backoffCapMs?: number; random?: () => number }): number;
export declare function parseRetryAfter(value: string | null | undefined, now: number): number | null;
export declare function classify(status: number, problem: unknown): { action: "token" | "end" | "retry" | "fatal"; code: string };
export interface TokenRecord {
  accessToken: string;
  receivedAt: number;
  expiresAt: number;
  refreshAt: number;
  sessionExpiresAt: number | null;
}
export declare function parseToken(body: unknown, now: number): TokenRecord | null;
export declare function isTokenRecord(t: unknown): t is TokenRecord;
export declare function tokenState(token: TokenRecord | null, now: number, opts?: { expiryMarginMs?: number }): "missing" | "expiring" | "due" | "fresh";
export declare function isUsable(token: TokenRecord | null, now: number, opts?: { expiryMarginMs?: number }): boolean;
export declare function nextRefreshAt(token: TokenRecord, now: number, opts?: { minRefreshMs?: number }): number;
export declare function isNewer(candidate: TokenRecord, current: TokenRecord | null): boolean;
