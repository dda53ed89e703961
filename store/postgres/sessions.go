package postgres

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/hashicorp/golang-lru/v2/simplelru"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/tokend/tokend/session"
)

var _ session.Store = (*Store)(nil)

const sessionColumns = `sid, secret_hash, subject, claims, created_at, expires_at, cookie_expires_at,
	idle_timeout_seconds, last_seen_at, revoked_at, revoke_reason`

func scanSession(row pgx.Row) (session.Session, error) {
	var (
		s       session.Session
		claims  *string
		idle    int32
		revoked *time.Time
		reason  *string
	)
	err := row.Scan(&s.ID, &s.SecretHash, &s.Subject, &claims, &s.CreatedAt, &s.ExpiresAt,
		&s.CookieExpiresAt, &idle, &s.LastSeenAt, &revoked, &reason)
	if err != nil {
		return session.Session{}, err
	}
	if claims != nil {
		s.Claims = json.RawMessage(*claims)
	}
	s.IdleTimeout = time.Duration(idle) * time.Second
	if revoked != nil {
		s.RevokedAt = *revoked
	}
	if reason != nil {
		s.RevokeReason = *reason
	}
	return s, nil
}

// CreateSession implements session.Store.
func (s *Store) CreateSession(ctx context.Context, sess session.Session) error {
	ctx, cancel := s.op(ctx)
	defer cancel()
	var claims *string
	if len(sess.Claims) > 0 {
		c := string(sess.Claims)
		claims = &c
	}
	_, err := s.pool.Exec(ctx, `INSERT INTO sessions (sid, secret_hash, subject, claims, created_at, expires_at,
		cookie_expires_at, idle_timeout_seconds, last_seen_at, ends_at)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)`,
		sess.ID, sess.SecretHash, sess.Subject, claims, sess.CreatedAt, sess.ExpiresAt,
		sess.CookieExpiresAt, int32(sess.IdleTimeout/time.Second), sess.LastSeenAt, sess.Deadline())
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "23505" {
		return session.ErrConflict
	}
	if err != nil {
		return fmt.Errorf("postgres: insert: %w", classify(err))
	}
	return nil
}

// Session implements session.Store. While the notification connection is
// up, sessions are served from the in-process cache: a revocation anywhere
// reaches every instance's cache through NOTIFY, and the cache is emptied
// and bypassed whenever notifications may have been missed.
func (s *Store) Session(ctx context.Context, sid string) (session.Session, error) {
	useCache := s.cacheUsable()
	var gen uint64
	if useCache {
		if sess, ok := s.cache.get(sid); ok {
			return sess, nil
		}
		gen = s.cache.generation()
	}
	sess, err := s.loadSession(ctx, sid)
	if err != nil {
		return session.Session{}, err
	}
	if useCache {
		s.cache.put(sid, sess, gen)
	}
	return sess, nil
}

// SessionUncached reads the session from the database, bypassing the cache.
func (s *Store) SessionUncached(ctx context.Context, sid string) (session.Session, error) {
	useCache := s.cacheUsable()
	var gen uint64
	if useCache {
		gen = s.cache.generation() // before the read, as in Session
	}
	sess, err := s.loadSession(ctx, sid)
	if err == nil && useCache {
		s.cache.put(sid, sess, gen)
	}
	return sess, err
}

func (s *Store) loadSession(ctx context.Context, sid string) (session.Session, error) {
	ctx, cancel := s.op(ctx)
	defer cancel()
	sess, err := scanSession(s.pool.QueryRow(ctx, `SELECT `+sessionColumns+` FROM sessions WHERE sid = $1`, sid))
	if errors.Is(err, pgx.ErrNoRows) {
		return session.Session{}, session.ErrNotFound
	}
	if err != nil {
		return session.Session{}, fmt.Errorf("postgres: select: %w", classify(err))
	}
	return sess, nil
}

// TouchSession implements session.Store.
func (s *Store) TouchSession(ctx context.Context, sid string, at time.Time) error {
	ctx, cancel := s.op(ctx)
	defer cancel()
	tag, err := s.pool.Exec(ctx, `UPDATE sessions SET last_seen_at = greatest(last_seen_at, $2),
		ends_at = CASE WHEN idle_timeout_seconds > 0
			THEN least(expires_at, cookie_expires_at, greatest(last_seen_at, $2) + make_interval(secs => idle_timeout_seconds))
			ELSE ends_at END
		WHERE sid = $1`, sid, at)
	if err != nil {
		return fmt.Errorf("postgres: update last seen: %w", classify(err))
	}
	if tag.RowsAffected() == 0 {
		return session.ErrNotFound
	}
	if s.cache != nil {
		s.cache.touch(sid, at)
	}
	return nil
}

// RevokeSession implements session.Store. The revocation and its
// notification commit together.
func (s *Store) RevokeSession(ctx context.Context, sid string, at time.Time, reason string) (session.Session, error) {
	ctx, cancel := s.op(ctx)
	defer cancel()
	acks := s.expectAcks([]string{sid})
	defer acks.cancel()
	var sess session.Session
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var err error
		// A concurrent revocation holds the row; once it commits, the
		// condition no longer matches and this one reads what it stored.
		sess, err = scanSession(tx.QueryRow(ctx, `UPDATE sessions SET revoked_at = $2, revoke_reason = $3
			WHERE sid = $1 AND revoked_at IS NULL RETURNING `+sessionColumns, sid, at, reason))
		switch {
		case errors.Is(err, pgx.ErrNoRows): // absent, or revoked already: nothing to log
			sess, err = scanSession(tx.QueryRow(ctx, `SELECT `+sessionColumns+` FROM sessions WHERE sid = $1`, sid))
			if err != nil {
				return err
			}
		case err != nil:
			return err
		default:
			if err := logRevocations(ctx, tx, []string{sid}, sess.Subject, at, reason); err != nil {
				return err
			}
		}
		_, err = tx.Exec(ctx, `SELECT pg_notify($1, $2)`, sessionsChannel, sid)
		return err
	})
	if s.cache != nil {
		s.cache.invalidate(sid)
	}
	if errors.Is(err, pgx.ErrNoRows) {
		return session.Session{}, session.ErrNotFound
	}
	if err != nil {
		return session.Session{}, fmt.Errorf("postgres: revoke: %w", classify(err))
	}
	s.awaitAcks(ctx, acks)
	return sess, nil
}

// RevokeSubject implements session.Store. The sessions to revoke are locked
// and listed first, so that the wait for every instance's acknowledgement
// can be set up before the notifications go out.
func (s *Store) RevokeSubject(ctx context.Context, subject string, at time.Time, reason string) ([]string, error) {
	ctx, cancel := s.op(ctx)
	defer cancel()
	var (
		ids  []string
		acks *ackWait
	)
	defer func() { acks.cancel() }()
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		rows, err := tx.Query(ctx, `SELECT sid FROM sessions
			WHERE subject = $1 AND revoked_at IS NULL AND ends_at > $2
			ORDER BY sid FOR UPDATE`, subject, at)
		if err != nil {
			return err
		}
		ids, err = pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil || len(ids) == 0 {
			return err
		}
		acks.cancel()
		acks = s.expectAcks(ids)
		if _, err := tx.Exec(ctx, `UPDATE sessions SET revoked_at = $2, revoke_reason = $3 WHERE sid = ANY($1)`,
			ids, at, reason); err != nil {
			return err
		}
		if err := logRevocations(ctx, tx, ids, subject, at, reason); err != nil {
			return err
		}
		_, err = tx.Exec(ctx, `SELECT pg_notify($1, sid) FROM unnest($2::text[]) AS sid`, sessionsChannel, ids)
		return err
	})
	if s.cache != nil {
		for _, id := range ids {
			s.cache.invalidate(id)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("postgres: revoke subject: %w", classify(err))
	}
	if ids == nil {
		ids = []string{}
	}
	s.awaitAcks(ctx, acks)
	return ids, nil
}

// logRevocations appends the revocation of sids to the log, in the
// transaction that revokes them. The advisory lock, held until commit,
// serialises appends: a cursor taken later commits later, so a reader that
// has seen cursor n can never meet a smaller one afterwards.
func logRevocations(ctx context.Context, tx pgx.Tx, sids []string, subject string, at time.Time, reason string) error {
	if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, revocationsLockID); err != nil {
		return err
	}
	_, err := tx.Exec(ctx, `INSERT INTO revocations (sid, subject, revoked_at, reason)
		SELECT sid, $2, $3, $4 FROM unnest($1::text[]) WITH ORDINALITY AS t(sid, n) ORDER BY n`,
		sids, subject, at, reason)
	return err
}

// Revocations implements session.Store.
func (s *Store) Revocations(ctx context.Context, after int64, limit int) ([]session.Revocation, error) {
	ctx, cancel := s.op(ctx)
	defer cancel()
	rows, err := s.pool.Query(ctx, `SELECT cursor, sid, subject, revoked_at, reason FROM revocations
		WHERE cursor > $1 ORDER BY cursor LIMIT $2`, after, max(limit, 0))
	if err != nil {
		return nil, fmt.Errorf("read revocations: %w", classify(err))
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (session.Revocation, error) {
		var rev session.Revocation
		err := r.Scan(&rev.Cursor, &rev.SID, &rev.Subject, &rev.RevokedAt, &rev.Reason)
		return rev, err
	})
	if err != nil {
		return nil, fmt.Errorf("read revocations: %w", classify(err))
	}
	return out, nil
}

// PurgeRevocations deletes the entries of the revocation log revoked
// before cutoff and returns how many it deleted. Callers pass now minus the
// token TTL and a leeway: every token of those sessions has expired.
func (s *Store) PurgeRevocations(ctx context.Context, cutoff time.Time) (int, error) {
	ctx, cancel := s.op(ctx)
	defer cancel()
	tag, err := s.pool.Exec(ctx, `DELETE FROM revocations WHERE revoked_at < $1`, cutoff)
	if err != nil {
		return 0, fmt.Errorf("purge revocations: %w", classify(err))
	}
	return int(tag.RowsAffected()), nil
}

// SessionsBySubject implements session.Store.
func (s *Store) SessionsBySubject(ctx context.Context, subject string, limit int) ([]session.Session, error) {
	ctx, cancel := s.op(ctx)
	defer cancel()
	rows, err := s.pool.Query(ctx, `SELECT `+sessionColumns+` FROM sessions WHERE subject = $1
		ORDER BY created_at DESC, sid LIMIT $2`, subject, max(limit, 0))
	if err != nil {
		return nil, fmt.Errorf("list sessions: %w", classify(err))
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (session.Session, error) { return scanSession(r) })
	if err != nil {
		return nil, fmt.Errorf("list sessions: %w", classify(err))
	}
	return out, nil
}

// Purge deletes sessions that ended or were revoked before cutoff, in
// batches, and returns how many it deleted. Only one instance purges at a
// time: the others find the advisory lock taken and return 0.
func (s *Store) Purge(ctx context.Context, cutoff time.Time) (int, error) {
	total := 0
	for {
		var n int64
		locked := true
		err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
			if err := tx.QueryRow(ctx, `SELECT pg_try_advisory_xact_lock($1)`, purgeLockID).Scan(&locked); err != nil || !locked {
				return err
			}
			tag, err := tx.Exec(ctx, `DELETE FROM sessions WHERE sid IN (
				SELECT sid FROM sessions WHERE ends_at < $1
				UNION
				SELECT sid FROM sessions WHERE revoked_at < $1
				LIMIT 1000)`, cutoff)
			n = tag.RowsAffected()
			return err
		})
		if err != nil {
			return total, fmt.Errorf("purge sessions: %w", classify(err))
		}
		total += int(n)
		if !locked || n < 1000 {
			return total, nil
		}
	}
}

// sessionCache holds recently read sessions. Every entry expires after ttl
// whatever happens; revocations remove entries at once. generation guards
// against a read that raced with an invalidation: a result loaded before
// the invalidation is not cached after it.
type sessionCache struct {
	mu  sync.Mutex
	lru *simplelru.LRU[string, cachedSession]
	gen uint64
	ttl time.Duration
}

type cachedSession struct {
	sess   session.Session
	loaded time.Time
}

func newSessionCache(size int, ttl time.Duration) *sessionCache {
	if size == 0 {
		size = 100_000
	}
	lru, err := simplelru.NewLRU[string, cachedSession](size, nil)
	if err != nil {
		panic(err) // size is positive
	}
	return &sessionCache{lru: lru, ttl: ttl}
}

func (c *sessionCache) get(sid string) (session.Session, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.lru.Get(sid)
	if !ok {
		return session.Session{}, false
	}
	if time.Since(e.loaded) >= c.ttl {
		c.lru.Remove(sid)
		return session.Session{}, false
	}
	return e.sess, true
}

func (c *sessionCache) generation() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.gen
}

func (c *sessionCache) put(sid string, sess session.Session, gen uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if gen != c.gen {
		return
	}
	c.lru.Add(sid, cachedSession{sess: sess, loaded: time.Now()})
}

func (c *sessionCache) touch(sid string, at time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.lru.Peek(sid); ok && at.After(e.sess.LastSeenAt) {
		e.sess.LastSeenAt = at
		c.lru.Add(sid, e)
	}
}

func (c *sessionCache) invalidate(sid string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen++
	c.lru.Remove(sid)
}

func (c *sessionCache) flush() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen++
	c.lru.Purge()
}

// cacheUsable reports whether sessions may be served from the cache now.
func (s *Store) cacheUsable() bool {
	return s.cache != nil && s.listening.Load() && time.Now().UnixNano() >= s.cacheFrom.Load()
}

// listenLoop holds a dedicated connection listening for revocations and key
// changes, reconnecting with backoff. While it is down the cache is not
// used; after every (re)connection the cache is emptied, since
// notifications sent in between are lost.
func (s *Store) listenLoop(ctx context.Context) {
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		err := s.listen(ctx)
		s.listening.Store(false)
		if ctx.Err() != nil {
			return
		}
		s.log.Warn("lost the PostgreSQL notification connection; sessions are read from the database until it is back",
			slog.Any("error", scrub(err)))
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 5*time.Second)
	}
}

func (s *Store) listen(ctx context.Context) error {
	conn, err := s.pool.Acquire(ctx)
	if err != nil {
		return err
	}
	// The connection is dedicated to LISTEN; it never goes back to the pool.
	pc := conn.Hijack()
	defer pc.Close(context.WithoutCancel(ctx))
	for _, ch := range []string{sessionsChannel, keysChannel, acksChannel, instancesChannel} {
		if _, err := pc.Exec(ctx, "LISTEN "+ch); err != nil {
			return err
		}
	}
	if s.cache != nil {
		s.cache.flush()
	}
	// For a warm-up after (re)connecting, sessions are read from the
	// database only: long enough for every other instance to have heard
	// this one's announcement, so that their revocations wait for its
	// acknowledgement before they return.
	s.cacheFrom.Store(time.Now().Add(s.warmUp).UnixNano())
	s.listening.Store(true)
	s.announceSoon()
	// Keys may have changed while we were not listening.
	s.signalKeys()
	for {
		n, err := pc.WaitForNotification(ctx)
		if err != nil {
			return err
		}
		switch n.Channel {
		case sessionsChannel:
			if s.cache != nil {
				s.cache.invalidate(n.Payload)
			}
			select {
			case s.revoked <- struct{}{}:
			default:
			}
			s.peers.acked(s.peers.self, n.Payload)
			s.queueAck(n.Payload)
		case acksChannel:
			s.peers.ackPayload(n.Payload)
		case instancesChannel:
			if s.peers.announce(n.Payload, time.Now()) {
				s.announceSoon()
			}
		case keysChannel:
			s.signalKeys()
		}
	}
}

func (s *Store) signalKeys() {
	select {
	case s.keysChanged <- struct{}{}:
	default:
	}
}
