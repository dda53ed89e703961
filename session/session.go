// Package session holds the rules of tokend's server-side sessions: how they
// are created, when a refresh may mint a token, and how they are revoked.
//
// The package imports no adapter and no HTTP code. It declares the small
// interfaces it needs (Store, Minter); cmd/tokend wires implementations in.
package session

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"time"
)

// Errors returned by the Service and by Store implementations. Callers compare
// them with errors.Is.
var (
	// ErrNotFound means no session has the given id.
	ErrNotFound = errors.New("session not found")
	// ErrInvalid means the presented credentials do not identify a session:
	// a malformed cookie, an unknown sid or a wrong secret. It deliberately
	// does not say which.
	ErrInvalid = errors.New("session credentials invalid")
	// ErrExpired means the session passed its absolute expiry, its idle
	// deadline or its cookie's max-age end.
	ErrExpired = errors.New("session expired")
	// ErrRevoked means the session was revoked by an admin or by logout.
	ErrRevoked = errors.New("session revoked")
	// ErrConflict is returned by Store.CreateSession when the sid is taken.
	ErrConflict = errors.New("session id already exists")
	// ErrUnavailable wraps store failures that are expected to pass: the
	// database is unreachable, restarting or too slow. Callers answer
	// "try again later" rather than reporting an internal error.
	ErrUnavailable = errors.New("session store unavailable")
)

// FieldError describes one request field that breaks a rule.
type FieldError struct {
	Field   string `json:"field"`
	Message string `json:"message"`
}

// ValidationError lists every field of a request that breaks a rule, so that
// a caller can fix them all at once.
type ValidationError struct {
	Fields []FieldError
}

func (e *ValidationError) Error() string {
	var b strings.Builder
	b.WriteString("invalid request: ")
	for i, f := range e.Fields {
		if i > 0 {
			b.WriteString("; ")
		}
		b.WriteString(f.Field)
		b.WriteString(": ")
		b.WriteString(f.Message)
	}
	return b.String()
}

// Add records a field problem.
func (e *ValidationError) Add(field, message string) {
	e.Fields = append(e.Fields, FieldError{Field: field, Message: message})
}

// Err returns e if it holds any problem, and nil otherwise.
func (e *ValidationError) Err() error {
	if len(e.Fields) == 0 {
		return nil
	}
	return e
}

// Session is the server-side record behind a cookie.
type Session struct {
	// ID is the public session id (sid): it appears in tokens, in the admin
	// API and in revocations.
	ID string
	// SecretHash is the SHA-256 of the cookie's secret part. The secret
	// itself is never stored.
	SecretHash []byte
	Subject    string
	// Claims is a canonical JSON object of extra token claims, or nil.
	Claims json.RawMessage

	CreatedAt time.Time
	// ExpiresAt is the absolute end of the session.
	ExpiresAt time.Time
	// CookieExpiresAt is the end of the cookie's max-age as issued. It is
	// enforced on the server, whatever the browser keeps.
	CookieExpiresAt time.Time
	// IdleTimeout ends the session when no refresh came for that long; zero
	// disables it.
	IdleTimeout time.Duration
	// LastSeenAt is the time of the last recorded refresh (or creation). It is
	// written at most once per touch interval.
	LastSeenAt time.Time

	// RevokedAt is zero while the session is not revoked.
	RevokedAt    time.Time
	RevokeReason string
}

// Status is the state of a session at a given time.
type Status string

// The statuses a session can be in.
const (
	StatusActive  Status = "active"
	StatusExpired Status = "expired"
	StatusRevoked Status = "revoked"
)

// IdleDeadline returns when the session ends for lack of refreshes, or the
// zero time if it has no idle timeout.
func (s Session) IdleDeadline() time.Time {
	if s.IdleTimeout <= 0 {
		return time.Time{}
	}
	return s.LastSeenAt.Add(s.IdleTimeout)
}

// EndsAt returns the earliest of the absolute expiry and the cookie end: the
// time after which no refresh can succeed even if the session stays in use.
func (s Session) EndsAt() time.Time {
	if !s.CookieExpiresAt.IsZero() && s.CookieExpiresAt.Before(s.ExpiresAt) {
		return s.CookieExpiresAt
	}
	return s.ExpiresAt
}

// Deadline returns the earliest time at which the session stops being usable
// as things stand: EndsAt, or the idle deadline if that comes first.
func (s Session) Deadline() time.Time {
	d := s.EndsAt()
	if idle := s.IdleDeadline(); !idle.IsZero() && idle.Before(d) {
		d = idle
	}
	return d
}

// StatusAt reports the session's status at now.
func (s Session) StatusAt(now time.Time) Status {
	switch {
	case !s.RevokedAt.IsZero():
		return StatusRevoked
	case !now.Before(s.Deadline()):
		return StatusExpired
	default:
		return StatusActive
	}
}

// Store persists sessions. Implementations live under store/ and must pass
// the contract tests in store/storetest.
type Store interface {
	// CreateSession stores a new session; ErrConflict if the id is taken.
	CreateSession(ctx context.Context, s Session) error
	// Session returns the session with the given id, or ErrNotFound.
	Session(ctx context.Context, sid string) (Session, error)
	// TouchSession moves LastSeenAt forward to at (never backward).
	// ErrNotFound if there is no such session.
	TouchSession(ctx context.Context, sid string, at time.Time) error
	// RevokeSession marks the session revoked at the given time unless it
	// already is, and returns it as stored afterwards. ErrNotFound if absent.
	// The call that revokes the session also appends one Revocation to the
	// revocation log, atomically with the change; a call that finds the
	// session already revoked appends nothing.
	RevokeSession(ctx context.Context, sid string, at time.Time, reason string) (Session, error)
	// RevokeSubject revokes every session of subject that is neither revoked
	// nor past its Deadline at the given time, and returns the ids it
	// revoked. It appends one Revocation per revoked session to the
	// revocation log, atomically with the change.
	RevokeSubject(ctx context.Context, subject string, at time.Time, reason string) ([]string, error)
	// SessionsBySubject returns up to limit sessions of subject, newest
	// first; a limit below 1 returns none.
	SessionsBySubject(ctx context.Context, subject string, limit int) ([]Session, error)
	// Revocations returns up to limit entries of the revocation log whose
	// Cursor is greater than after, in increasing Cursor order; a limit
	// below 1 returns none. Cursors are positive and strictly increasing in
	// the order the revocations became visible, so a reader that resumes
	// after the last cursor it saw misses nothing and sees nothing twice.
	// Entries whose RevokedAt is older than the token TTL plus a leeway may
	// have been purged: every token of such a session has expired anyway.
	Revocations(ctx context.Context, after int64, limit int) ([]Revocation, error)
}

// Revocation is one entry of the revocation log: a session that was revoked
// (by an admin, a subject-wide revocation or a logout). Validators follow the
// log to drop the sockets of revoked sessions and refuse their tokens before
// those expire.
type Revocation struct {
	// Cursor is the entry's position in the log: positive, strictly
	// increasing.
	Cursor    int64
	SID       string
	Subject   string
	RevokedAt time.Time
	Reason    string
	// TokensExpireAt is when every token the session was issued before its
	// revocation has expired: RevokedAt plus the token TTL. Validators may
	// forget the revocation after it (plus their clock leeway). Stores leave
	// it zero; the Service fills it in.
	TokensExpireAt time.Time
}
