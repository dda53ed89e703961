-- +goose Up

-- The revocation log: one row per session revocation (admin, subject-wide,
-- logout), appended in the transaction that revokes. Validators follow it
-- through GET /v1/revocations and its stream, resuming after the last
-- cursor they saw. Cursors become visible in increasing order: the writers
-- serialise on an advisory lock, so a reader never skips a cursor that
-- commits late. Rows older than the token TTL plus a leeway are purged:
-- every token of those sessions has expired. No foreign key: sessions are
-- purged on their own schedule.
CREATE TABLE revocations (
    cursor     bigserial   PRIMARY KEY,
    sid        text        NOT NULL,
    subject    text        NOT NULL,
    revoked_at timestamptz NOT NULL,
    reason     text        NOT NULL DEFAULT ''
);

-- Purge: entries revoked long ago.
CREATE INDEX revocations_revoked_at_idx ON revocations (revoked_at);

-- +goose Down
DROP TABLE revocations;
