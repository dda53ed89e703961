package session

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"sync"
	"time"

	"golang.org/x/sync/singleflight"

	"github.com/tokend/tokend/issuer"
)

// Minter signs access tokens; *issuer.Issuer implements it.
type Minter interface {
	Mint(ctx context.Context, c issuer.Claims) (string, error)
}

// Config holds the session rules that operators set.
type Config struct {
	// TokenTTL is the lifetime of an access token (before the session caps it).
	TokenTTL time.Duration
	// SessionTTL is both the default and the maximum session life.
	SessionTTL time.Duration
	// TouchInterval bounds how often a refresh writes LastSeenAt.
	TouchInterval time.Duration
	// ReuseWindow, when positive, lets refreshes of one session that arrive
	// within this window of each other share one token instead of signing
	// a new one each (several tabs, or a reload storm). Every refresh still
	// passes every rule first. Zero disables reuse.
	ReuseWindow time.Duration
}

// DefaultConfig returns the documented defaults.
func DefaultConfig() Config {
	return Config{TokenTTL: 10 * time.Minute, SessionTTL: 8 * time.Hour, TouchInterval: time.Minute}
}

// Service applies the session rules on top of a Store and a Minter.
type Service struct {
	store  Store
	minter Minter
	cfg    Config
	now    func() time.Time
	random io.Reader
	jitter func() float64

	flight singleflight.Group
	recent recentTokens

	publisher RevocationPublisher
	changed   signal
}

// RevocationPublisher announces revocations outside tokend's own feed, such
// as on a Redis channel. It is best effort: it is called in its own
// goroutine after the revocation has committed, must bound its own time,
// and logs its own failures; a failure never undoes or fails a revocation.
type RevocationPublisher interface {
	PublishRevocations(ctx context.Context, revs []Revocation)
}

// Option configures a Service.
type Option func(*Service)

// WithClock replaces time.Now, for tests.
func WithClock(now func() time.Time) Option { return func(s *Service) { s.now = now } }

// WithRandom replaces crypto/rand as the source of session ids and secrets.
func WithRandom(r io.Reader) Option { return func(s *Service) { s.random = r } }

// WithJitter replaces the uniform draw in [0, 1) that places refresh_in.
func WithJitter(f func() float64) Option { return func(s *Service) { s.jitter = f } }

// WithRevocationPublisher announces every revocation this service makes
// through p as well.
func WithRevocationPublisher(p RevocationPublisher) Option {
	return func(s *Service) { s.publisher = p }
}

// NewService returns a Service. Zero fields of cfg take their defaults.
func NewService(store Store, minter Minter, cfg Config, opts ...Option) *Service {
	def := DefaultConfig()
	if cfg.TokenTTL <= 0 {
		cfg.TokenTTL = def.TokenTTL
	}
	if cfg.SessionTTL <= 0 {
		cfg.SessionTTL = def.SessionTTL
	}
	if cfg.TouchInterval <= 0 {
		cfg.TouchInterval = def.TouchInterval
	}
	s := &Service{
		store:  store,
		minter: minter,
		cfg:    cfg,
		now:    time.Now,
		random: rand.Reader,
		jitter: mrand.Float64,
	}
	for _, o := range opts {
		o(s)
	}
	s.recent.m = make(map[string]recentToken)
	s.changed.ch = make(chan struct{})
	return s
}

// Config returns the rules in force.
func (s *Service) Config() Config { return s.cfg }

// CreateRequest asks for a new session.
type CreateRequest struct {
	Subject string
	// TTL is the session's life; zero means the configured default.
	TTL time.Duration
	// IdleTimeout ends the session after that long without a refresh; zero
	// means none.
	IdleTimeout time.Duration
	// Claims is a JSON object of extra token claims, or nil.
	Claims json.RawMessage
}

// Created is a new session and the credentials to put in its cookie. The
// secret exists only here; the store keeps its hash.
type Created struct {
	Session     Session
	Credentials Credentials
}

// Create validates req and stores a new session.
func (s *Service) Create(ctx context.Context, req CreateRequest) (Created, error) {
	var verr ValidationError
	if msg := validSubject(req.Subject); msg != "" {
		verr.Add("subject", msg)
	}
	ttl := req.TTL
	switch {
	case ttl == 0:
		ttl = s.cfg.SessionTTL
	case ttl < MinSessionTTL:
		verr.Add("ttl_seconds", fmt.Sprintf("must be at least %d", int(MinSessionTTL.Seconds())))
	case ttl > s.cfg.SessionTTL:
		verr.Add("ttl_seconds", fmt.Sprintf("must be at most %d (the configured maximum session life)", int(s.cfg.SessionTTL.Seconds())))
	}
	switch {
	case req.IdleTimeout == 0:
	case req.IdleTimeout < MinIdleTimeout:
		verr.Add("idle_timeout_seconds", fmt.Sprintf("must be at least %d", int(MinIdleTimeout.Seconds())))
	case req.IdleTimeout > ttl:
		verr.Add("idle_timeout_seconds", "must not exceed the session's ttl")
	}
	claims, msg := canonicalClaims(req.Claims)
	if msg != "" {
		verr.Add("claims", msg)
	}
	if err := verr.Err(); err != nil {
		return Created{}, err
	}

	now := s.now().Truncate(time.Second)
	for attempt := 0; ; attempt++ {
		creds, err := newCredentials(s.random)
		if err != nil {
			return Created{}, err
		}
		sess := Session{
			ID:              creds.SID,
			SecretHash:      HashSecret(creds.Secret),
			Subject:         req.Subject,
			Claims:          claims,
			CreatedAt:       now,
			ExpiresAt:       now.Add(ttl),
			CookieExpiresAt: now.Add(ttl),
			IdleTimeout:     req.IdleTimeout,
			LastSeenAt:      now,
		}
		err = s.store.CreateSession(ctx, sess)
		if errors.Is(err, ErrConflict) && attempt < 3 {
			continue // 128 random bits collided: draw again
		}
		if err != nil {
			return Created{}, fmt.Errorf("create session: %w", err)
		}
		return Created{Session: sess, Credentials: creds}, nil
	}
}

// authenticate resolves a cookie value to its session, checking the secret.
// Every failure to identify a session is ErrInvalid.
func (s *Service) authenticate(ctx context.Context, cookie string) (Session, error) {
	creds, err := ParseCookie(cookie)
	if err != nil {
		return Session{}, err
	}
	sess, err := s.store.Session(ctx, creds.SID)
	if errors.Is(err, ErrNotFound) {
		return Session{}, ErrInvalid
	}
	if err != nil {
		return Session{}, fmt.Errorf("load session: %w", err)
	}
	if !secretMatches(creds.Secret, sess.SecretHash) {
		return Session{}, ErrInvalid
	}
	return sess, nil
}

// uncachedReader is implemented by stores that cache sessions.
type uncachedReader interface {
	SessionUncached(ctx context.Context, sid string) (Session, error)
}

// Token is a freshly minted access token and its timing.
type Token struct {
	AccessToken string
	Plan        Plan
	SessionID   string
	// SessionEndsAt is when the session ends at the latest (absolute expiry
	// or cookie end; the idle deadline moves with each refresh).
	SessionEndsAt time.Time
}

// Refresh mints a token for the session behind cookie, after checking every
// rule: credentials, revocation, absolute expiry, cookie end, idle timeout.
func (s *Service) Refresh(ctx context.Context, cookie string) (Token, error) {
	sess, err := s.authenticate(ctx, cookie)
	if err != nil {
		return Token{}, err
	}
	now := s.now()
	if sess.StatusAt(now) == StatusExpired && now.Before(sess.EndsAt()) {
		// Only the idle deadline has passed, judged by a LastSeenAt that a
		// caching store may hold stale (another instance may have seen the
		// session since): refuse only on the database's word.
		if fresh, ok := s.store.(uncachedReader); ok {
			if sess, err = fresh.SessionUncached(ctx, sess.ID); err != nil {
				return Token{}, fmt.Errorf("load session: %w", err)
			}
		}
	}
	switch sess.StatusAt(now) {
	case StatusRevoked:
		return Token{}, ErrRevoked
	case StatusExpired:
		return Token{}, ErrExpired
	}
	if now.Sub(sess.LastSeenAt) >= touchInterval(sess, s.cfg.TouchInterval) {
		if err := s.store.TouchSession(ctx, sess.ID, now); err != nil {
			return Token{}, fmt.Errorf("touch session: %w", err)
		}
		sess.LastSeenAt = now
	}
	if s.cfg.ReuseWindow <= 0 {
		return s.mint(ctx, sess, now)
	}
	if tok, ok := s.recent.get(sess.ID, now, s.cfg.ReuseWindow); ok {
		return tok.at(now), nil
	}
	// Concurrent refreshes of one session wait for a single signature.
	v, err, _ := s.flight.Do(sess.ID, func() (any, error) {
		tok, err := s.mint(context.WithoutCancel(ctx), sess, now)
		if err == nil {
			s.recent.put(sess.ID, tok, now, s.cfg.ReuseWindow)
		}
		return tok, err
	})
	if err != nil {
		return Token{}, err
	}
	return v.(Token).at(now), nil
}

func (s *Service) mint(ctx context.Context, sess Session, now time.Time) (Token, error) {
	plan, err := PlanToken(sess, now, s.cfg.TokenTTL, s.jitter())
	if err != nil {
		return Token{}, err
	}
	jwt, err := s.minter.Mint(ctx, issuer.Claims{
		Subject:   sess.Subject,
		SessionID: sess.ID,
		IssuedAt:  plan.IssuedAt,
		ExpiresAt: plan.ExpiresAt,
		Extra:     sess.Claims,
	})
	if err != nil {
		return Token{}, fmt.Errorf("mint token: %w", err)
	}
	return Token{AccessToken: jwt, Plan: plan, SessionID: sess.ID, SessionEndsAt: sess.EndsAt()}, nil
}

// at returns the token as seen by a refresh at now: the same token and
// absolute times, with refresh_in counted from now.
func (t Token) at(now time.Time) Token {
	if !now.After(t.Plan.Now) {
		return t
	}
	refreshAt := t.Plan.RefreshAt()
	t.Plan.Now = now
	t.Plan.RefreshIn = max(refreshAt.Sub(now).Truncate(time.Second), 0)
	return t
}

// recentTokens remembers the last token of each session for the reuse
// window. Expired entries are swept every ten windows and whenever it is
// full (maxRecent entries); if nothing can be swept, new tokens are simply
// not remembered, so memory stays bounded.
type recentTokens struct {
	mu        sync.Mutex
	m         map[string]recentToken
	lastSweep time.Time
}

type recentToken struct {
	tok    Token
	minted time.Time
}

const maxRecent = 100_000

func (r *recentTokens) get(sid string, now time.Time, window time.Duration) (Token, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e, ok := r.m[sid]
	if !ok || now.Sub(e.minted) >= window || now.Before(e.minted) {
		return Token{}, false
	}
	return e.tok, true
}

func (r *recentTokens) put(sid string, tok Token, now time.Time, window time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.m) >= maxRecent || now.Sub(r.lastSweep) >= 10*window {
		r.lastSweep = now
		for k, e := range r.m {
			if now.Sub(e.minted) >= window {
				delete(r.m, k)
			}
		}
		if len(r.m) >= maxRecent {
			return
		}
	}
	r.m[sid] = recentToken{tok: tok, minted: now}
}

// Logout revokes the session behind cookie. Logging out of a session that has
// already ended succeeds; a cookie that identifies no session is ErrInvalid.
func (s *Service) Logout(ctx context.Context, cookie string) (Session, error) {
	sess, err := s.authenticate(ctx, cookie)
	if err != nil {
		return Session{}, err
	}
	return s.revoke(ctx, sess.ID, "logout")
}

// Get returns the session with the given id.
func (s *Service) Get(ctx context.Context, sid string) (Session, error) {
	if !ValidSID(sid) {
		return Session{}, &ValidationError{Fields: []FieldError{{Field: "sid", Message: "is not a session id"}}}
	}
	return s.store.Session(ctx, sid)
}

// List returns up to limit sessions of subject, newest first; limit 0 means
// DefaultListLimit.
func (s *Service) List(ctx context.Context, subject string, limit int) ([]Session, error) {
	var verr ValidationError
	if msg := validSubject(subject); msg != "" {
		verr.Add("subject", msg)
	}
	switch {
	case limit == 0:
		limit = DefaultListLimit
	case limit < 0 || limit > MaxListLimit:
		verr.Add("limit", fmt.Sprintf("must be between 1 and %d", MaxListLimit))
	}
	if err := verr.Err(); err != nil {
		return nil, err
	}
	return s.store.SessionsBySubject(ctx, subject, limit)
}

// Revoke revokes one session; from then on no refresh of it succeeds.
// Revoking a revoked session returns it unchanged.
func (s *Service) Revoke(ctx context.Context, sid, reason string) (Session, error) {
	var verr ValidationError
	if !ValidSID(sid) {
		verr.Add("sid", "is not a session id")
	}
	if msg := validReason(reason); msg != "" {
		verr.Add("reason", msg)
	}
	if err := verr.Err(); err != nil {
		return Session{}, err
	}
	if reason == "" {
		reason = "admin"
	}
	return s.revoke(ctx, sid, reason)
}

func (s *Service) revoke(ctx context.Context, sid, reason string) (Session, error) {
	// Microseconds are what every store keeps, so the stored time can be
	// compared with at to tell whether this call is the one that revoked.
	at := s.now().Truncate(time.Microsecond)
	sess, err := s.store.RevokeSession(ctx, sid, at, reason)
	if err != nil && !errors.Is(err, ErrNotFound) {
		return Session{}, fmt.Errorf("revoke session: %w", err)
	}
	if err == nil && sess.RevokedAt.Equal(at) && sess.RevokeReason == reason {
		s.revoked(ctx, []Revocation{{SID: sess.ID, Subject: sess.Subject, RevokedAt: at, Reason: reason}})
	}
	return sess, err
}

// revoked wakes the readers of the revocation log and hands the new
// revocations to the publisher.
func (s *Service) revoked(ctx context.Context, revs []Revocation) {
	s.NotifyRevocations()
	if s.publisher == nil || len(revs) == 0 {
		return
	}
	for i := range revs {
		revs[i].TokensExpireAt = revs[i].RevokedAt.Add(s.cfg.TokenTTL)
	}
	go s.publisher.PublishRevocations(context.WithoutCancel(ctx), revs)
}

// RevokeSubject revokes every live session of subject and returns the ids it
// revoked.
func (s *Service) RevokeSubject(ctx context.Context, subject, reason string) ([]string, error) {
	var verr ValidationError
	if msg := validSubject(subject); msg != "" {
		verr.Add("subject", msg)
	}
	if msg := validReason(reason); msg != "" {
		verr.Add("reason", msg)
	}
	if err := verr.Err(); err != nil {
		return nil, err
	}
	if reason == "" {
		reason = "admin"
	}
	at := s.now().Truncate(time.Microsecond)
	ids, err := s.store.RevokeSubject(ctx, subject, at, reason)
	if err != nil {
		return nil, fmt.Errorf("revoke subject: %w", err)
	}
	if len(ids) > 0 {
		revs := make([]Revocation, len(ids))
		for i, id := range ids {
			revs[i] = Revocation{SID: id, Subject: subject, RevokedAt: at, Reason: reason}
		}
		s.revoked(ctx, revs)
	}
	return ids, nil
}

// Limits of Revocations.
const (
	DefaultRevocationLimit = 100
	MaxRevocationLimit     = 1000
)

// Revocations returns up to limit entries of the revocation log after the
// cursor after, oldest first, with TokensExpireAt filled in; limit 0 means
// DefaultRevocationLimit.
func (s *Service) Revocations(ctx context.Context, after int64, limit int) ([]Revocation, error) {
	var verr ValidationError
	if after < 0 {
		verr.Add("after", "must be a cursor (a non-negative integer)")
	}
	switch {
	case limit == 0:
		limit = DefaultRevocationLimit
	case limit < 0 || limit > MaxRevocationLimit:
		verr.Add("limit", fmt.Sprintf("must be between 1 and %d", MaxRevocationLimit))
	}
	if err := verr.Err(); err != nil {
		return nil, err
	}
	revs, err := s.store.Revocations(ctx, after, limit)
	if err != nil {
		return nil, fmt.Errorf("read revocations: %w", err)
	}
	for i := range revs {
		revs[i].TokensExpireAt = revs[i].RevokedAt.Add(s.cfg.TokenTTL)
	}
	return revs, nil
}

// RevocationsChanged returns a channel that is closed at the next
// revocation made through this service or announced by NotifyRevocations.
// Readers of the log take the channel before they read, so that no
// revocation falls between their read and their wait.
func (s *Service) RevocationsChanged() <-chan struct{} { return s.changed.wait() }

// NotifyRevocations wakes the readers of the revocation log; cmd/tokend
// calls it when another instance announces a revocation.
func (s *Service) NotifyRevocations() { s.changed.notify() }

// signal is a broadcast: the channel from wait is closed by the next
// notify.
type signal struct {
	mu sync.Mutex
	ch chan struct{}
}

func (g *signal) wait() <-chan struct{} {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.ch
}

func (g *signal) notify() {
	g.mu.Lock()
	defer g.mu.Unlock()
	close(g.ch)
	g.ch = make(chan struct{})
}
