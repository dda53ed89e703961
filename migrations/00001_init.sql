-- +goose Up

-- One row per session. The cookie's secret is never stored, only its
-- SHA-256. Times are microsecond timestamps; claims are the canonical JSON
-- text the tokens carry (text, not jsonb, so the bytes are kept as given).
CREATE TABLE sessions (
    sid                  text        PRIMARY KEY,
    secret_hash          bytea       NOT NULL,
    subject              text        NOT NULL,
    claims               text,
    created_at           timestamptz NOT NULL,
    expires_at           timestamptz NOT NULL,
    cookie_expires_at    timestamptz NOT NULL,
    idle_timeout_seconds integer     NOT NULL DEFAULT 0 CHECK (idle_timeout_seconds >= 0),
    last_seen_at         timestamptz NOT NULL,
    revoked_at           timestamptz,
    revoke_reason        text,
    -- ends_at is when the session ends unless refreshed: the earliest of
    -- the absolute expiry, the cookie's end and the idle deadline (moved by
    -- each touch). The purge job deletes by it.
    ends_at              timestamptz NOT NULL
);

-- Admin listing: a subject's sessions, newest first.
CREATE INDEX sessions_subject_created_idx ON sessions (subject, created_at DESC);
-- Purge: sessions that ended (absolute or cookie end) or were revoked long ago.
CREATE INDEX sessions_ends_at_idx ON sessions (ends_at);
CREATE INDEX sessions_revoked_at_idx ON sessions (revoked_at) WHERE revoked_at IS NOT NULL;

-- Signing keys. The private key is PKCS#8 DER sealed with AES-256-GCM under
-- the key-encryption key (nonce || ciphertext, the kid as associated data).
-- A key is published from created_at and signs from activates_at; it is
-- retired when a later key activates and deleted once its last tokens
-- have expired.
CREATE TABLE signing_keys (
    kid          text        PRIMARY KEY,
    alg          text        NOT NULL,
    private_key  bytea       NOT NULL,
    created_at   timestamptz NOT NULL,
    activates_at timestamptz NOT NULL
);

CREATE INDEX signing_keys_activates_idx ON signing_keys (activates_at);

-- +goose Down
DROP TABLE signing_keys;
DROP TABLE sessions;
