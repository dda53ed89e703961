package session_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/iotest"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jwt"

	"github.com/tokend/tokend/issuer"
	"github.com/tokend/tokend/session"
	"github.com/tokend/tokend/store/memory"
)

// start has a fractional second: Create truncates it, Refresh does not.
var start = time.Date(2026, 9, 1, 8, 0, 0, 400_000_000, time.UTC)

// clock is a manual clock safe for concurrent use.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// countingStore wraps a store and counts writes.
type countingStore struct {
	session.Store
	mu       sync.Mutex
	creates  int
	touches  []time.Time
	touchErr error
}

func (s *countingStore) CreateSession(ctx context.Context, sess session.Session) error {
	s.mu.Lock()
	s.creates++
	s.mu.Unlock()
	return s.Store.CreateSession(ctx, sess)
}

func (s *countingStore) TouchSession(ctx context.Context, sid string, at time.Time) error {
	s.mu.Lock()
	s.touches = append(s.touches, at)
	err := s.touchErr
	s.mu.Unlock()
	if err != nil {
		return err
	}
	return s.Store.TouchSession(ctx, sid, at)
}

func (s *countingStore) touchCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.touches)
}

func (s *countingStore) createCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.creates
}

// failingMinter refuses to sign.
type failingMinter struct{ err error }

func (m failingMinter) Mint(context.Context, issuer.Claims) (string, error) { return "", m.err }

type fixture struct {
	svc    *session.Service
	store  *countingStore
	iss    *issuer.Issuer
	clock  *clock
	jitter float64
}

const (
	testIssuer   = "https://auth.example.com"
	testAudience = "app"
)

// newFixture builds a Service on a memory store and a real ES256 issuer.
func newFixture(t *testing.T, cfg session.Config, opts ...session.Option) *fixture {
	t.Helper()
	f := &fixture{store: &countingStore{Store: memory.New()}, clock: &clock{now: start}, jitter: 0.5}
	iss, err := issuer.New(testIssuer, []string{testAudience})
	if err != nil {
		t.Fatal(err)
	}
	key, err := issuer.GenerateKey(issuer.ES256, start)
	if err != nil {
		t.Fatal(err)
	}
	if err := iss.SetKeys(&key, []issuer.Key{key}); err != nil {
		t.Fatal(err)
	}
	f.iss = iss
	opts = append([]session.Option{session.WithClock(f.clock.Now), session.WithJitter(func() float64 { return f.jitter })}, opts...)
	f.svc = session.NewService(f.store, iss, cfg, opts...)
	return f
}

func (f *fixture) create(t *testing.T, req session.CreateRequest) session.Created {
	t.Helper()
	c, err := f.svc.Create(context.Background(), req)
	if err != nil {
		t.Fatalf("Create(%+v): %v", req, err)
	}
	return c
}

func (f *fixture) stored(t *testing.T, sid string) session.Session {
	t.Helper()
	s, err := f.store.Session(context.Background(), sid)
	if err != nil {
		t.Fatalf("stored session %s: %v", sid, err)
	}
	return s
}

func fieldNames(err error) []string {
	var verr *session.ValidationError
	if !errors.As(err, &verr) {
		return nil
	}
	var out []string
	for _, f := range verr.Fields {
		out = append(out, f.Field)
	}
	return out
}

func TestNewServiceDefaults(t *testing.T) {
	svc := session.NewService(memory.New(), failingMinter{}, session.Config{})
	if got, want := svc.Config(), session.DefaultConfig(); got != want {
		t.Errorf("Config() = %+v, want defaults %+v", got, want)
	}
	want := session.Config{TokenTTL: time.Minute, SessionTTL: time.Hour, TouchInterval: 5 * time.Second}
	if got := session.NewService(memory.New(), failingMinter{}, want).Config(); got != want {
		t.Errorf("Config() = %+v, want %+v", got, want)
	}
	neg := session.Config{TokenTTL: -1, SessionTTL: -1, TouchInterval: -1}
	if got := session.NewService(memory.New(), failingMinter{}, neg).Config(); got != session.DefaultConfig() {
		t.Errorf("negative config = %+v, want defaults", got)
	}
}

func TestCreateValidation(t *testing.T) {
	cfg := session.Config{SessionTTL: 8 * time.Hour}
	tests := []struct {
		name    string
		req     session.CreateRequest
		fields  []string
		message string // substring of the first message
	}{
		{"no subject", session.CreateRequest{}, []string{"subject"}, "is required"},
		{"subject too long", session.CreateRequest{Subject: strings.Repeat("s", 257)}, []string{"subject"}, "at most 256"},
		{"subject control char", session.CreateRequest{Subject: "a\nb"}, []string{"subject"}, "control"},
		{"subject invalid utf-8", session.CreateRequest{Subject: "\xff"}, []string{"subject"}, "UTF-8"},
		{"ttl below minimum", session.CreateRequest{Subject: "a", TTL: 59 * time.Second}, []string{"ttl_seconds"}, "at least 60"},
		{"negative ttl", session.CreateRequest{Subject: "a", TTL: -time.Hour}, []string{"ttl_seconds"}, "at least 60"},
		{"ttl above maximum", session.CreateRequest{Subject: "a", TTL: 8*time.Hour + time.Second}, []string{"ttl_seconds"}, "at most 28800"},
		{"idle below minimum", session.CreateRequest{Subject: "a", IdleTimeout: 30 * time.Second}, []string{"idle_timeout_seconds"}, "at least 60"},
		{"negative idle", session.CreateRequest{Subject: "a", IdleTimeout: -time.Minute}, []string{"idle_timeout_seconds"}, "at least 60"},
		{"idle above ttl", session.CreateRequest{Subject: "a", TTL: time.Hour, IdleTimeout: time.Hour + time.Second}, []string{"idle_timeout_seconds"}, "must not exceed"},
		{"idle above default ttl", session.CreateRequest{Subject: "a", IdleTimeout: 9 * time.Hour}, []string{"idle_timeout_seconds"}, "must not exceed"},
		{"claims not an object", session.CreateRequest{Subject: "a", Claims: json.RawMessage(`[1]`)}, []string{"claims"}, "JSON object"},
		{"claims reserved", session.CreateRequest{Subject: "a", Claims: json.RawMessage(`{"sid":"x"}`)}, []string{"claims"}, `"sid" is reserved`},
		{"claims too large", session.CreateRequest{Subject: "a", Claims: json.RawMessage(`{"k":"` + strings.Repeat("x", 4096) + `"}`)}, []string{"claims"}, "at most 4096"},
		{
			name: "every field at once",
			req: session.CreateRequest{Subject: "", TTL: 10 * time.Second, IdleTimeout: 20 * time.Second,
				Claims: json.RawMessage(`{"exp":1}`)},
			fields:  []string{"subject", "ttl_seconds", "idle_timeout_seconds", "claims"},
			message: "is required",
		},
		{
			name:    "ttl and idle both too large",
			req:     session.CreateRequest{Subject: "a", TTL: 9 * time.Hour, IdleTimeout: 10 * time.Hour},
			fields:  []string{"ttl_seconds", "idle_timeout_seconds"},
			message: "at most",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t, cfg)
			_, err := f.svc.Create(context.Background(), tt.req)
			var verr *session.ValidationError
			if !errors.As(err, &verr) {
				t.Fatalf("err = %v, want a *ValidationError", err)
			}
			if got := fieldNames(err); !slices.Equal(got, tt.fields) {
				t.Errorf("fields = %v, want %v", got, tt.fields)
			}
			if !strings.Contains(verr.Fields[0].Message, tt.message) {
				t.Errorf("message = %q, want %q", verr.Fields[0].Message, tt.message)
			}
			if !strings.Contains(err.Error(), tt.fields[0]+": ") {
				t.Errorf("Error() = %q does not name %s", err.Error(), tt.fields[0])
			}
			if n := f.store.createCount(); n != 0 {
				t.Errorf("an invalid request reached the store %d times", n)
			}
		})
	}
}

func TestCreateAccepts(t *testing.T) {
	cfg := session.Config{SessionTTL: 8 * time.Hour}
	created := start.Truncate(time.Second)
	tests := []struct {
		name       string
		req        session.CreateRequest
		wantTTL    time.Duration
		wantClaims string
	}{
		{"defaults", session.CreateRequest{Subject: "alice"}, 8 * time.Hour, ""},
		{"minimum ttl and idle", session.CreateRequest{Subject: "alice", TTL: time.Minute, IdleTimeout: time.Minute}, time.Minute, ""},
		{"maximum ttl", session.CreateRequest{Subject: "alice", TTL: 8 * time.Hour, IdleTimeout: 8 * time.Hour}, 8 * time.Hour, ""},
		{"claims canonicalised", session.CreateRequest{Subject: "José", TTL: time.Hour,
			Claims: json.RawMessage(` { "role" : "editor", "a": [1, 2] } `)}, time.Hour, `{"a":[1,2],"role":"editor"}`},
		{"empty claims", session.CreateRequest{Subject: "alice", Claims: json.RawMessage(`{}`)}, 8 * time.Hour, ""},
		{"null claims", session.CreateRequest{Subject: "alice", Claims: json.RawMessage(`null`)}, 8 * time.Hour, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t, cfg)
			c := f.create(t, tt.req)
			s := c.Session
			if !session.ValidSID(s.ID) || c.Credentials.SID != s.ID {
				t.Errorf("sid %q / credentials %q", s.ID, c.Credentials.SID)
			}
			parsed, err := session.ParseCookie(c.Credentials.String())
			if err != nil || parsed != c.Credentials {
				t.Errorf("cookie %q does not parse back: %v", c.Credentials.String(), err)
			}
			if !bytes.Equal(s.SecretHash, session.HashSecret(c.Credentials.Secret)) {
				t.Error("SecretHash is not the hash of the secret")
			}
			if s.Subject != tt.req.Subject || s.IdleTimeout != tt.req.IdleTimeout || string(s.Claims) != tt.wantClaims {
				t.Errorf("session = %q idle %v claims %s", s.Subject, s.IdleTimeout, s.Claims)
			}
			if !s.CreatedAt.Equal(created) || !s.LastSeenAt.Equal(created) ||
				!s.ExpiresAt.Equal(created.Add(tt.wantTTL)) || !s.CookieExpiresAt.Equal(created.Add(tt.wantTTL)) {
				t.Errorf("times: created %v last seen %v expires %v cookie %v", s.CreatedAt, s.LastSeenAt, s.ExpiresAt, s.CookieExpiresAt)
			}
			if !s.RevokedAt.IsZero() || s.RevokeReason != "" {
				t.Error("new session is revoked")
			}
			got, err := f.svc.Get(context.Background(), s.ID)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, s) {
				t.Errorf("stored %+v\nreturned %+v", got, s)
			}
		})
	}
}

func TestCreateDeterministicRandom(t *testing.T) {
	buf := make([]byte, 48)
	for i := range buf {
		buf[i] = byte(i)
	}
	f := newFixture(t, session.Config{}, session.WithRandom(bytes.NewReader(buf)))
	c := f.create(t, session.CreateRequest{Subject: "alice"})
	if c.Credentials.SID != "AAECAwQFBgcICQoLDA0ODw" {
		t.Errorf("SID = %q, want the base64url of bytes 0..15", c.Credentials.SID)
	}
	if c.Credentials.Secret != "EBESExQVFhcYGRobHB0eHyAhIiMkJSYnKCkqKywtLi8" {
		t.Errorf("Secret = %q, want the base64url of bytes 16..47", c.Credentials.Secret)
	}
}

func TestCreateRetriesCollisions(t *testing.T) {
	same := bytes.Repeat([]byte{7}, 48)
	t.Run("retry succeeds", func(t *testing.T) {
		// The second Create first draws the same bytes, then fresh ones.
		other := bytes.Repeat([]byte{9}, 48)
		f := newFixture(t, session.Config{}, session.WithRandom(io.MultiReader(
			bytes.NewReader(same), bytes.NewReader(same), bytes.NewReader(other))))
		first := f.create(t, session.CreateRequest{Subject: "alice"})
		second := f.create(t, session.CreateRequest{Subject: "bob"})
		if first.Session.ID == second.Session.ID {
			t.Fatal("two sessions share an id")
		}
		if n := f.store.createCount(); n != 3 {
			t.Errorf("CreateSession called %d times, want 3", n)
		}
		if f.stored(t, first.Session.ID).Subject != "alice" {
			t.Error("the collision overwrote the first session")
		}
	})
	t.Run("gives up", func(t *testing.T) {
		f := newFixture(t, session.Config{}, session.WithRandom(repeat(7)))
		f.create(t, session.CreateRequest{Subject: "alice"})
		_, err := f.svc.Create(context.Background(), session.CreateRequest{Subject: "bob"})
		if !errors.Is(err, session.ErrConflict) {
			t.Fatalf("err = %v, want ErrConflict after retries", err)
		}
		if n := f.store.createCount(); n != 1+4 {
			t.Errorf("CreateSession called %d times, want 1 + 4 attempts", n)
		}
	})
	t.Run("random source fails", func(t *testing.T) {
		boom := errors.New("boom")
		f := newFixture(t, session.Config{}, session.WithRandom(iotest.ErrReader(boom)))
		if _, err := f.svc.Create(context.Background(), session.CreateRequest{Subject: "alice"}); !errors.Is(err, boom) {
			t.Errorf("err = %v, want it to wrap %v", err, boom)
		}
		if f.store.createCount() != 0 {
			t.Error("store called without credentials")
		}
	})
}

type repeat byte

func (r repeat) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = byte(r)
	}
	return len(p), nil
}

func TestRefreshToken(t *testing.T) {
	f := newFixture(t, session.Config{TokenTTL: 10 * time.Minute, SessionTTL: 8 * time.Hour})
	c := f.create(t, session.CreateRequest{Subject: "alice", TTL: 2 * time.Hour, IdleTimeout: 30 * time.Minute,
		Claims: json.RawMessage(`{"role":"editor","org":{"id":42,"name":"Ünïcode \"q\""},"tags":["a"]}`)})
	f.clock.Advance(90 * time.Second)
	now := f.clock.Now() // 08:01:30.4

	tok, err := f.svc.Refresh(context.Background(), c.Credentials.String())
	if err != nil {
		t.Fatalf("Refresh: %v", err)
	}
	whole := now.Truncate(time.Second)
	wantExp := whole.Add(10 * time.Minute)
	if tok.SessionID != c.Session.ID || !tok.SessionEndsAt.Equal(c.Session.ExpiresAt) {
		t.Errorf("token sid %q ends %v", tok.SessionID, tok.SessionEndsAt)
	}
	p := tok.Plan
	if !p.Now.Equal(now) || !p.IssuedAt.Equal(whole) || !p.ExpiresAt.Equal(wantExp) {
		t.Errorf("plan now %v iat %v exp %v", p.Now, p.IssuedAt, p.ExpiresAt)
	}
	// life 599.6s, jitter 0.5 → floor(0.7 × 599.6) = 419s.
	if p.RefreshIn != 419*time.Second {
		t.Errorf("RefreshIn = %v, want 419s", p.RefreshIn)
	}

	set, err := jwk.Parse(f.iss.JWKS().Body)
	if err != nil {
		t.Fatal(err)
	}
	parsed, err := jwt.Parse([]byte(tok.AccessToken), jwt.WithKeySet(set),
		jwt.WithClock(jwt.ClockFunc(f.clock.Now)), jwt.WithIssuer(testIssuer), jwt.WithAudience(testAudience))
	if err != nil {
		t.Fatalf("token does not verify against the JWKS: %v", err)
	}
	if parsed.Issuer() != testIssuer || !slices.Equal(parsed.Audience(), []string{testAudience}) ||
		parsed.Subject() != "alice" || !parsed.IssuedAt().Equal(whole) || !parsed.Expiration().Equal(wantExp) ||
		parsed.JwtID() == "" || !parsed.NotBefore().IsZero() {
		t.Errorf("claims: iss %q aud %v sub %q iat %v exp %v jti %q nbf %v", parsed.Issuer(), parsed.Audience(),
			parsed.Subject(), parsed.IssuedAt(), parsed.Expiration(), parsed.JwtID(), parsed.NotBefore())
	}
	private := parsed.PrivateClaims()
	wantPrivate := map[string]any{
		"sid":  c.Session.ID,
		"role": "editor",
		"org":  map[string]any{"id": 42.0, "name": "Ünïcode \"q\""},
		"tags": []any{"a"},
	}
	if !reflect.DeepEqual(private, wantPrivate) {
		t.Errorf("private claims = %v, want %v", private, wantPrivate)
	}

	// Each refresh mints a distinct token id.
	tok2, err := f.svc.Refresh(context.Background(), c.Credentials.String())
	if err != nil {
		t.Fatal(err)
	}
	parsed2, err := jwt.Parse([]byte(tok2.AccessToken), jwt.WithKeySet(set), jwt.WithValidate(false))
	if err != nil {
		t.Fatal(err)
	}
	if parsed2.JwtID() == parsed.JwtID() {
		t.Error("two refreshes share a jti")
	}
}

func TestRefreshCappedBySession(t *testing.T) {
	tests := []struct {
		name    string
		req     session.CreateRequest
		advance time.Duration
		jitter  float64
		wantExp time.Duration // from the session's creation second
		wantIn  time.Duration
	}{
		// Created 08:00:00 (truncated); now 08:00:00.4 + advance.
		{"session end caps", session.CreateRequest{Subject: "a", TTL: 5 * time.Minute}, 0, 0, 5 * time.Minute, 149 * time.Second},      // life 299.6 → 149.8
		{"idle caps", session.CreateRequest{Subject: "a", IdleTimeout: 2 * time.Minute}, 0, 0.999, 2 * time.Minute, 107 * time.Second}, // life 119.6 × 0.8996
		{"session end near", session.CreateRequest{Subject: "a", TTL: time.Minute}, 58 * time.Second, 0.5, time.Minute, time.Second},   // life 1.6s → 1.12
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t, session.Config{TokenTTL: 10 * time.Minute})
			f.jitter = tt.jitter
			c := f.create(t, tt.req)
			f.clock.Advance(tt.advance)
			tok, err := f.svc.Refresh(context.Background(), c.Credentials.String())
			if err != nil {
				t.Fatal(err)
			}
			if want := c.Session.CreatedAt.Add(tt.wantExp); !tok.Plan.ExpiresAt.Equal(want) {
				t.Errorf("exp = %v, want %v", tok.Plan.ExpiresAt, want)
			}
			if tok.Plan.RefreshIn != tt.wantIn {
				t.Errorf("RefreshIn = %v, want %v", tok.Plan.RefreshIn, tt.wantIn)
			}
		})
	}
}

func TestRefreshRefusals(t *testing.T) {
	tests := []struct {
		name string
		// prepare returns the cookie to present.
		prepare func(t *testing.T, f *fixture, c session.Created) string
		want    error
	}{
		{"malformed cookie", func(t *testing.T, f *fixture, c session.Created) string { return "nope" }, session.ErrInvalid},
		{"empty cookie", func(t *testing.T, f *fixture, c session.Created) string { return "" }, session.ErrInvalid},
		{"wrong secret", func(t *testing.T, f *fixture, c session.Created) string {
			return c.Credentials.SID + "." + strings.Repeat("A", 43)
		}, session.ErrInvalid},
		{"unknown sid", func(t *testing.T, f *fixture, c session.Created) string {
			return strings.Repeat("B", 22) + "." + c.Credentials.Secret
		}, session.ErrInvalid},
		{"revoked", func(t *testing.T, f *fixture, c session.Created) string {
			if _, err := f.svc.Revoke(context.Background(), c.Session.ID, "test"); err != nil {
				t.Fatal(err)
			}
			return c.Credentials.String()
		}, session.ErrRevoked},
		{"revoked and expired", func(t *testing.T, f *fixture, c session.Created) string {
			if _, err := f.svc.Revoke(context.Background(), c.Session.ID, "test"); err != nil {
				t.Fatal(err)
			}
			f.clock.Advance(3 * time.Hour)
			return c.Credentials.String()
		}, session.ErrRevoked},
		{"wrong secret on a revoked session", func(t *testing.T, f *fixture, c session.Created) string {
			if _, err := f.svc.Revoke(context.Background(), c.Session.ID, "test"); err != nil {
				t.Fatal(err)
			}
			return c.Credentials.SID + "." + strings.Repeat("A", 43)
		}, session.ErrInvalid},
		{"expired", func(t *testing.T, f *fixture, c session.Created) string {
			f.clock.Advance(2 * time.Hour)
			return c.Credentials.String()
		}, session.ErrExpired},
		{"less than a second left", func(t *testing.T, f *fixture, c session.Created) string {
			// Now is 0.4s past a whole second; 0.7s before the end exp truncates to now's second.
			f.clock.Advance(2*time.Hour - 700*time.Millisecond)
			return c.Credentials.String()
		}, session.ErrExpired},
		{"idle", func(t *testing.T, f *fixture, c session.Created) string {
			f.clock.Advance(30 * time.Minute)
			return c.Credentials.String()
		}, session.ErrExpired},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t, session.Config{})
			c := f.create(t, session.CreateRequest{Subject: "alice", TTL: 2 * time.Hour, IdleTimeout: 30 * time.Minute})
			cookie := tt.prepare(t, f, c)
			tok, err := f.svc.Refresh(context.Background(), cookie)
			if !errors.Is(err, tt.want) {
				t.Fatalf("Refresh err = %v, want %v", err, tt.want)
			}
			if tok != (session.Token{}) {
				t.Errorf("token returned with an error: %+v", tok)
			}
			if n := f.store.touchCount(); n != 0 {
				t.Errorf("a refused refresh touched the session %d times", n)
			}
		})
	}
}

func TestRefreshInternalErrors(t *testing.T) {
	t.Run("minter fails", func(t *testing.T) {
		boom := errors.New("hsm down")
		st := memory.New()
		clk := &clock{now: start}
		svc := session.NewService(st, failingMinter{boom}, session.Config{}, session.WithClock(clk.Now))
		c, err := svc.Create(context.Background(), session.CreateRequest{Subject: "a"})
		if err != nil {
			t.Fatal(err)
		}
		_, err = svc.Refresh(context.Background(), c.Credentials.String())
		if !errors.Is(err, boom) || errors.Is(err, session.ErrInvalid) {
			t.Errorf("err = %v, want it to wrap %v", err, boom)
		}
	})
	t.Run("touch fails", func(t *testing.T) {
		f := newFixture(t, session.Config{})
		c := f.create(t, session.CreateRequest{Subject: "a"})
		boom := errors.New("disk full")
		f.store.touchErr = boom
		f.clock.Advance(time.Hour)
		if _, err := f.svc.Refresh(context.Background(), c.Credentials.String()); !errors.Is(err, boom) {
			t.Errorf("err = %v, want it to wrap %v", err, boom)
		}
	})
	t.Run("no signing key", func(t *testing.T) {
		f := newFixture(t, session.Config{})
		c := f.create(t, session.CreateRequest{Subject: "a"})
		if err := f.iss.SetKeys(nil, nil); err != nil {
			t.Fatal(err)
		}
		if _, err := f.svc.Refresh(context.Background(), c.Credentials.String()); !errors.Is(err, issuer.ErrNoSigningKey) {
			t.Errorf("err = %v, want ErrNoSigningKey", err)
		}
	})
}

func TestRefreshTouchInterval(t *testing.T) {
	tests := []struct {
		name  string
		idle  time.Duration
		steps []struct {
			advance time.Duration
			touched bool
		}
	}{
		{
			name: "no idle timeout: once per configured interval",
			steps: []struct {
				advance time.Duration
				touched bool
			}{
				{10 * time.Second, false}, // 10s since creation
				{49 * time.Second, false}, // 59s
				{time.Second, true},       // 60s: interval reached
				{30 * time.Second, false}, // 30s since touch
				{29 * time.Second, false}, // 59s
				{2 * time.Second, true},   // 61s
				{10 * time.Minute, true},
				{0, false},
			},
		},
		{
			name: "idle timeout 2m: a quarter of it",
			idle: 2 * time.Minute,
			steps: []struct {
				advance time.Duration
				touched bool
			}{
				{29 * time.Second, false},
				{time.Second, true}, // 30s
				{15 * time.Second, false},
				{15 * time.Second, true},
				{100 * time.Second, true},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t, session.Config{TouchInterval: time.Minute})
			c := f.create(t, session.CreateRequest{Subject: "alice", IdleTimeout: tt.idle})
			lastSeen := c.Session.LastSeenAt
			touches := 0
			for i, st := range tt.steps {
				f.clock.Advance(st.advance)
				if _, err := f.svc.Refresh(context.Background(), c.Credentials.String()); err != nil {
					t.Fatalf("step %d: %v", i, err)
				}
				if st.touched {
					touches++
					lastSeen = f.clock.Now()
				}
				if got := f.store.touchCount(); got != touches {
					t.Fatalf("step %d (+%v): %d touches, want %d", i, st.advance, got, touches)
				}
				if got := f.stored(t, c.Session.ID).LastSeenAt; !got.Equal(lastSeen) {
					t.Errorf("step %d: LastSeenAt = %v, want %v", i, got, lastSeen)
				}
			}
		})
	}
}

// TestIdleKeepsSessionAlive refreshes regularly within the idle timeout and
// then stops.
func TestIdleKeepsSessionAlive(t *testing.T) {
	f := newFixture(t, session.Config{TouchInterval: time.Minute})
	c := f.create(t, session.CreateRequest{Subject: "alice", TTL: time.Hour, IdleTimeout: 4 * time.Minute})
	for i := range 19 { // 19 × 170s ≈ 54m: far past 4m, yet the idle deadline stays before the 1h end
		f.clock.Advance(170 * time.Second)
		tok, err := f.svc.Refresh(context.Background(), c.Credentials.String())
		if err != nil {
			t.Fatalf("refresh %d at %v: %v", i, f.clock.Now(), err)
		}
		// Right after a touch the idle deadline caps the token.
		if want := f.clock.Now().Add(4 * time.Minute).Truncate(time.Second); !tok.Plan.ExpiresAt.Equal(want) {
			t.Errorf("refresh %d: exp %v, want idle deadline %v", i, tok.Plan.ExpiresAt, want)
		}
	}
	f.clock.Advance(4 * time.Minute)
	if _, err := f.svc.Refresh(context.Background(), c.Credentials.String()); !errors.Is(err, session.ErrExpired) {
		t.Errorf("after 4m idle: err = %v, want ErrExpired", err)
	}
	got, err := f.svc.Get(context.Background(), c.Session.ID)
	if err != nil {
		t.Fatal(err)
	}
	if st := got.StatusAt(f.clock.Now()); st != session.StatusExpired {
		t.Errorf("status = %q, want expired", st)
	}
}

func TestLogout(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, session.Config{})
	c := f.create(t, session.CreateRequest{Subject: "alice", TTL: time.Hour})
	other := f.create(t, session.CreateRequest{Subject: "alice", TTL: time.Hour})

	if _, err := f.svc.Logout(ctx, c.Credentials.SID+"."+strings.Repeat("x", 43)); !errors.Is(err, session.ErrInvalid) {
		t.Errorf("Logout with a wrong secret: err = %v, want ErrInvalid", err)
	}
	if _, err := f.svc.Logout(ctx, "garbage"); !errors.Is(err, session.ErrInvalid) {
		t.Errorf("Logout with garbage: err = %v, want ErrInvalid", err)
	}
	if !f.stored(t, c.Session.ID).RevokedAt.IsZero() {
		t.Fatal("a failed logout revoked the session")
	}

	f.clock.Advance(time.Minute)
	at := f.clock.Now()
	s, err := f.svc.Logout(ctx, c.Credentials.String())
	if err != nil {
		t.Fatal(err)
	}
	if !s.RevokedAt.Equal(at) || s.RevokeReason != "logout" || s.ID != c.Session.ID {
		t.Errorf("Logout returned revoked %v %q", s.RevokedAt, s.RevokeReason)
	}
	if _, err := f.svc.Refresh(ctx, c.Credentials.String()); !errors.Is(err, session.ErrRevoked) {
		t.Errorf("Refresh after logout: err = %v, want ErrRevoked", err)
	}
	if _, err := f.svc.Refresh(ctx, other.Credentials.String()); err != nil {
		t.Errorf("logout ended another session: %v", err)
	}

	// Logging out again succeeds and keeps the first revocation.
	f.clock.Advance(time.Minute)
	s2, err := f.svc.Logout(ctx, c.Credentials.String())
	if err != nil {
		t.Fatalf("second Logout: %v", err)
	}
	if !s2.RevokedAt.Equal(at) || s2.RevokeReason != "logout" {
		t.Errorf("second Logout changed the revocation: %v %q", s2.RevokedAt, s2.RevokeReason)
	}

	// Logging out of an expired session succeeds.
	f.clock.Advance(2 * time.Hour)
	if _, err := f.svc.Logout(ctx, other.Credentials.String()); err != nil {
		t.Errorf("Logout of an expired session: %v", err)
	}
	if f.stored(t, other.Session.ID).RevokedAt.IsZero() {
		t.Error("expired session not marked revoked by logout")
	}
}

func TestRevoke(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, session.Config{})
	c := f.create(t, session.CreateRequest{Subject: "alice"})

	t.Run("validation", func(t *testing.T) {
		_, err := f.svc.Revoke(ctx, "not-a-sid", "bad\nreason")
		if got := fieldNames(err); !slices.Equal(got, []string{"sid", "reason"}) {
			t.Errorf("fields = %v (err %v), want [sid reason]", got, err)
		}
		if _, err := f.svc.Revoke(ctx, c.Session.ID, strings.Repeat("r", 257)); !slices.Equal(fieldNames(err), []string{"reason"}) {
			t.Errorf("long reason: err = %v", err)
		}
		if !f.stored(t, c.Session.ID).RevokedAt.IsZero() {
			t.Error("an invalid revoke revoked the session")
		}
	})
	t.Run("unknown sid", func(t *testing.T) {
		if _, err := f.svc.Revoke(ctx, strings.Repeat("Z", 22), ""); !errors.Is(err, session.ErrNotFound) {
			t.Errorf("err = %v, want ErrNotFound", err)
		}
	})
	t.Run("default reason and idempotence", func(t *testing.T) {
		f.clock.Advance(time.Minute)
		at := f.clock.Now()
		s, err := f.svc.Revoke(ctx, c.Session.ID, "")
		if err != nil {
			t.Fatal(err)
		}
		if !s.RevokedAt.Equal(at) || s.RevokeReason != "admin" {
			t.Errorf("revoked %v %q, want %v admin", s.RevokedAt, s.RevokeReason, at)
		}
		f.clock.Advance(time.Minute)
		again, err := f.svc.Revoke(ctx, c.Session.ID, "stolen")
		if err != nil {
			t.Fatalf("second Revoke: %v", err)
		}
		if !reflect.DeepEqual(again, s) {
			t.Errorf("second Revoke returned %+v, want unchanged %+v", again, s)
		}
		if got := f.stored(t, c.Session.ID); !got.RevokedAt.Equal(at) || got.RevokeReason != "admin" {
			t.Errorf("stored revocation %v %q", got.RevokedAt, got.RevokeReason)
		}
	})
	t.Run("reason kept", func(t *testing.T) {
		c2 := f.create(t, session.CreateRequest{Subject: "alice"})
		s, err := f.svc.Revoke(ctx, c2.Session.ID, "stolen laptop")
		if err != nil || s.RevokeReason != "stolen laptop" {
			t.Errorf("Revoke = %q, %v", s.RevokeReason, err)
		}
	})
}

func TestRevokeSubject(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, session.Config{})
	short := f.create(t, session.CreateRequest{Subject: "alice", TTL: time.Minute})
	live1 := f.create(t, session.CreateRequest{Subject: "alice"})
	live2 := f.create(t, session.CreateRequest{Subject: "alice", IdleTimeout: time.Hour})
	revoked := f.create(t, session.CreateRequest{Subject: "alice"})
	bob := f.create(t, session.CreateRequest{Subject: "bob"})
	if _, err := f.svc.Revoke(ctx, revoked.Session.ID, "earlier"); err != nil {
		t.Fatal(err)
	}
	f.clock.Advance(2 * time.Minute) // `short` has expired

	t.Run("validation", func(t *testing.T) {
		_, err := f.svc.RevokeSubject(ctx, "", "a\x00")
		if got := fieldNames(err); !slices.Equal(got, []string{"subject", "reason"}) {
			t.Errorf("fields = %v (err %v), want [subject reason]", got, err)
		}
	})

	at := f.clock.Now()
	got, err := f.svc.RevokeSubject(ctx, "alice", "")
	if err != nil {
		t.Fatal(err)
	}
	want := []string{live1.Session.ID, live2.Session.ID}
	slices.Sort(want)
	slices.Sort(got)
	if !slices.Equal(got, want) {
		t.Errorf("RevokeSubject = %v, want %v", got, want)
	}
	for _, c := range []session.Created{live1, live2} {
		s := f.stored(t, c.Session.ID)
		if !s.RevokedAt.Equal(at) || s.RevokeReason != "admin" {
			t.Errorf("%s: revoked %v %q", c.Session.ID, s.RevokedAt, s.RevokeReason)
		}
		if _, err := f.svc.Refresh(ctx, c.Credentials.String()); !errors.Is(err, session.ErrRevoked) {
			t.Errorf("Refresh after RevokeSubject: %v", err)
		}
	}
	if s := f.stored(t, revoked.Session.ID); s.RevokeReason != "earlier" {
		t.Errorf("already revoked session now has reason %q", s.RevokeReason)
	}
	if s := f.stored(t, short.Session.ID); !s.RevokedAt.IsZero() {
		t.Error("expired session was revoked")
	}
	if _, err := f.svc.Refresh(ctx, bob.Credentials.String()); err != nil {
		t.Errorf("bob's session was affected: %v", err)
	}

	again, err := f.svc.RevokeSubject(ctx, "alice", "again")
	if err != nil || len(again) != 0 {
		t.Errorf("second RevokeSubject = %v, %v; want none", again, err)
	}
	none, err := f.svc.RevokeSubject(ctx, "nobody", "x")
	if err != nil || len(none) != 0 {
		t.Errorf("RevokeSubject(nobody) = %v, %v", none, err)
	}
}

func TestList(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, session.Config{})
	var ids []string // oldest first
	for range session.DefaultListLimit + 1 {
		ids = append(ids, f.create(t, session.CreateRequest{Subject: "alice"}).Session.ID)
		f.clock.Advance(time.Second)
	}
	f.create(t, session.CreateRequest{Subject: "bob"})
	newest := slices.Clone(ids)
	slices.Reverse(newest)

	tests := []struct {
		name    string
		subject string
		limit   int
		want    []string
		fields  []string
	}{
		{"default limit", "alice", 0, newest[:session.DefaultListLimit], nil},
		{"limit 1", "alice", 1, newest[:1], nil},
		{"limit 3", "alice", 3, newest[:3], nil},
		{"maximum limit", "alice", session.MaxListLimit, newest, nil},
		{"other subject", "bob", 10, nil, nil},
		{"unknown subject", "carol", 10, nil, nil},
		{"negative limit", "alice", -1, nil, []string{"limit"}},
		{"limit over maximum", "alice", session.MaxListLimit + 1, nil, []string{"limit"}},
		{"bad subject and limit", "", -5, nil, []string{"subject", "limit"}},
		{"control char subject", "a\tb", 1, nil, []string{"subject"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			list, err := f.svc.List(ctx, tt.subject, tt.limit)
			if tt.fields != nil {
				if got := fieldNames(err); !slices.Equal(got, tt.fields) {
					t.Errorf("fields = %v (err %v), want %v", got, err, tt.fields)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, s := range list {
				if s.Subject != tt.subject {
					t.Errorf("listed a session of %q", s.Subject)
				}
				if tt.subject == "alice" {
					got = append(got, s.ID)
				}
			}
			if tt.subject == "bob" {
				if len(list) != 1 {
					t.Errorf("bob has %d sessions, want 1", len(list))
				}
				return
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("List = %d ids, want %d (newest first)", len(got), len(tt.want))
			}
		})
	}
}

func TestGet(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, session.Config{})
	c := f.create(t, session.CreateRequest{Subject: "alice"})
	for _, sid := range []string{"", "short", strings.Repeat("a", 23), strings.Repeat("a", 21) + ".", strings.Repeat("a", 21) + "/", c.Credentials.String()} {
		_, err := f.svc.Get(ctx, sid)
		var verr *session.ValidationError
		if !errors.As(err, &verr) || !slices.Equal(fieldNames(err), []string{"sid"}) {
			t.Errorf("Get(%q) err = %v, want a *ValidationError on sid", sid, err)
		}
	}
	if _, err := f.svc.Get(ctx, strings.Repeat("Q", 22)); !errors.Is(err, session.ErrNotFound) {
		t.Errorf("Get(unknown) err = %v, want ErrNotFound", err)
	}
	s, err := f.svc.Get(ctx, c.Session.ID)
	if err != nil || s.ID != c.Session.ID || s.Subject != "alice" {
		t.Errorf("Get = %+v, %v", s, err)
	}
}

// TestConcurrentRefresh runs refreshes, revocations and listings at once.
// Run with -race.
func TestConcurrentRefresh(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, session.Config{TouchInterval: time.Second})
	var creds []session.Created
	for range 8 {
		creds = append(creds, f.create(t, session.CreateRequest{Subject: "alice", IdleTimeout: time.Hour}))
	}
	var wg sync.WaitGroup
	errs := make(chan error, 1000)
	for i, c := range creds {
		wg.Go(func() {
			for range 20 {
				f.clock.Advance(100 * time.Millisecond)
				if _, err := f.svc.Refresh(ctx, c.Credentials.String()); err != nil && !(i == 0 && errors.Is(err, session.ErrRevoked)) {
					errs <- fmt.Errorf("session %d: %w", i, err)
				}
			}
		})
	}
	wg.Go(func() {
		if _, err := f.svc.Revoke(ctx, creds[0].Session.ID, "race"); err != nil {
			errs <- err
		}
		if _, err := f.svc.List(ctx, "alice", 0); err != nil {
			errs <- err
		}
	})
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}
