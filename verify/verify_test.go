package verify

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jws"

	"github.com/tokend/tokend/issuer"
)

const (
	testIssuer   = "https://tokend.test"
	testAudience = "ws"
)

// jwksServer is a tokend stand-in serving an issuer's JWKS, counting the
// requests it gets.
type jwksServer struct {
	srv      *httptest.Server
	iss      *issuer.Issuer
	requests atomic.Int64
	status   atomic.Int32 // when non-zero, every request gets it
	maxAge   atomic.Int32
}

func newJWKSServer(t testing.TB, keys ...issuer.Key) *jwksServer {
	t.Helper()
	iss, err := issuer.New(testIssuer, []string{testAudience, "other"})
	if err != nil {
		t.Fatal(err)
	}
	s := &jwksServer{iss: iss}
	s.maxAge.Store(300)
	s.setKeys(t, keys[0], keys...)
	s.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.requests.Add(1)
		if st := s.status.Load(); st != 0 {
			http.Error(w, "unavailable", int(st))
			return
		}
		w.Header().Set("Content-Type", "application/jwk-set+json")
		w.Header().Set("Cache-Control", fmt.Sprintf("public, max-age=%d", s.maxAge.Load()))
		_, _ = w.Write(s.iss.JWKS().Body)
	}))
	t.Cleanup(s.srv.Close)
	return s
}

func (s *jwksServer) url() string { return s.srv.URL + "/.well-known/jwks.json" }

// setKeys makes active sign and publishes published.
func (s *jwksServer) setKeys(t testing.TB, active issuer.Key, published ...issuer.Key) {
	t.Helper()
	if err := s.iss.SetKeys(&active, published); err != nil {
		t.Fatal(err)
	}
}

func (s *jwksServer) mint(t testing.TB, sid string, now time.Time, extra string) string {
	t.Helper()
	tok, err := s.iss.Mint(context.Background(), issuer.Claims{
		Subject: "alice", SessionID: sid, IssuedAt: now, ExpiresAt: now.Add(10 * time.Minute),
		Extra: json.RawMessage(extra),
	})
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func newKey(t testing.TB, alg issuer.Algorithm) issuer.Key {
	t.Helper()
	k, err := issuer.GenerateKey(alg, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// clock is a settable clock for claims checks.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) Set(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = t
}

var t0 = time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)

func newVerifier(t *testing.T, s *jwksServer, c *clock, tweak ...func(*Config)) *Verifier {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	cfg := Config{JWKSURL: s.url(), Issuer: testIssuer, Audience: testAudience, Now: c.Now}
	for _, f := range tweak {
		f(&cfg)
	}
	v, err := New(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// sign builds a compact JWS from header and claims, signed by key (with
// its own algorithm unless header says otherwise).
func sign(t *testing.T, key issuer.Key, header, claims map[string]any) string {
	t.Helper()
	h := map[string]any{"alg": string(key.Algorithm), "kid": key.ID, "typ": "JWT"}
	for k, v := range header {
		if v == nil {
			delete(h, k)
		} else {
			h[k] = v
		}
	}
	input := b64json(t, h) + "." + b64json(t, claims)
	signer, err := jws.NewSigner(jwa.SignatureAlgorithm(key.Algorithm))
	if err != nil {
		t.Fatal(err)
	}
	sig, err := signer.Sign([]byte(input), key.Private)
	if err != nil {
		t.Fatal(err)
	}
	return input + "." + base64.RawURLEncoding.EncodeToString(sig)
}

func b64json(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return base64.RawURLEncoding.EncodeToString(b)
}

// claimsAt are a valid token's claims at now.
func claimsAt(now time.Time) map[string]any {
	return map[string]any{
		"iss": testIssuer, "aud": testAudience, "sub": "alice", "sid": "SID-1",
		"iat": now.Unix(), "exp": now.Add(10 * time.Minute).Unix(), "jti": "j1",
	}
}

func with(m map[string]any, kv ...any) map[string]any {
	out := make(map[string]any, len(m))
	for k, v := range m {
		out[k] = v
	}
	for i := 0; i+1 < len(kv); i += 2 {
		if kv[i+1] == nil {
			delete(out, kv[i].(string))
		} else {
			out[kv[i].(string)] = kv[i+1]
		}
	}
	return out
}

var sentinels = map[Kind]error{
	KindMalformed: ErrMalformed, KindBadSignature: ErrBadSignature, KindUnknownKey: ErrUnknownKey,
	KindExpired: ErrExpired, KindNotYetValid: ErrNotYetValid, KindWrongIssuer: ErrWrongIssuer,
	KindWrongAudience: ErrWrongAudience, KindRevoked: ErrRevoked, KindUnavailable: ErrUnavailable,
}

// wantKind checks that err is a refusal of kind k, matched by errors.Is
// against its sentinel and no other, and by errors.As.
func wantKind(t *testing.T, err error, k Kind) {
	t.Helper()
	if err == nil {
		t.Fatalf("Verify accepted the token, want %s", k)
	}
	var e *Error
	if !errors.As(err, &e) || e.Kind != k {
		t.Fatalf("err = %v, want kind %s", err, k)
	}
	for kind, s := range sentinels {
		if got := errors.Is(err, s); got != (kind == k) {
			t.Errorf("errors.Is(%v, %s sentinel) = %v", err, kind, got)
		}
	}
}

func TestVerifyTokendTokens(t *testing.T) {
	for _, alg := range []issuer.Algorithm{issuer.ES256, issuer.EdDSA, issuer.RS256} {
		t.Run(string(alg), func(t *testing.T) {
			key := newKey(t, alg)
			s := newJWKSServer(t, key)
			c := &clock{now: t0}
			v := newVerifier(t, s, c)
			tok := s.mint(t, "SID-alice", t0, `{"role":"editor","room":42}`)
			got, err := v.Verify(context.Background(), tok)
			if err != nil {
				t.Fatalf("Verify: %v", err)
			}
			if got.Subject != "alice" || got.SessionID != "SID-alice" || !got.IssuedAt.Equal(t0) ||
				!got.ExpiresAt.Equal(t0.Add(10*time.Minute)) || got.ID == "" {
				t.Errorf("claims = %+v", got)
			}
			if len(got.Extra) != 2 || got.Extra["role"] != "editor" || got.Extra["room"] != float64(42) {
				t.Errorf("Extra = %v, want exactly role and room", got.Extra)
			}
		})
	}
}

func TestVerifyRefusals(t *testing.T) {
	key := newKey(t, issuer.ES256)
	ed := newKey(t, issuer.EdDSA)
	stranger := newKey(t, issuer.ES256)
	s := newJWKSServer(t, key, key, ed)
	c := &clock{now: t0}
	v := newVerifier(t, s, c)
	good := claimsAt(t0)
	if _, err := v.Verify(context.Background(), sign(t, key, nil, good)); err != nil {
		t.Fatalf("the reference token is refused: %v", err)
	}
	valid := sign(t, key, nil, good)
	parts := strings.Split(valid, ".")

	// A token that says HS256, signed with the public key's bytes as an
	// HMAC secret: the classic algorithm confusion.
	hsInput := b64json(t, map[string]any{"alg": "HS256", "kid": key.ID, "typ": "JWT"}) + "." + b64json(t, good)
	hs, _ := jws.NewSigner(jwa.HS256)
	hsSig, _ := hs.Sign([]byte(hsInput), []byte(key.ID))
	noneToken := b64json(t, map[string]any{"alg": "none", "kid": key.ID}) + "." + b64json(t, good) + "."

	for _, tc := range []struct {
		name  string
		token string
		kind  Kind
	}{
		{"empty", "", KindMalformed},
		{"two parts", parts[0] + "." + parts[1], KindMalformed},
		{"four parts", valid + ".x", KindMalformed},
		{"JSON serialization", `{"payload":"` + parts[1] + `","signatures":[]}`, KindMalformed},
		{"header not base64", "%%%." + parts[1] + "." + parts[2], KindMalformed},
		{"header not JSON", base64.RawURLEncoding.EncodeToString([]byte("nope")) + "." + parts[1] + "." + parts[2], KindMalformed},
		{"signature not base64", parts[0] + "." + parts[1] + ".!!", KindMalformed},
		{"padded signature", valid + "==", KindMalformed},
		{"no kid", sign(t, key, map[string]any{"kid": nil}, good), KindMalformed},
		{"crit header", sign(t, key, map[string]any{"crit": []string{"exp"}}, good), KindMalformed},
		{"typ not JWT", sign(t, key, map[string]any{"typ": "at+jwt"}, good), KindMalformed},
		{"payload not an object", sign(t, key, nil, nil), KindMalformed},
		{"no sub", sign(t, key, nil, with(good, "sub", nil)), KindMalformed},
		{"no sid", sign(t, key, nil, with(good, "sid", nil)), KindMalformed},
		{"empty sid", sign(t, key, nil, with(good, "sid", "")), KindMalformed},
		{"sid not a string", sign(t, key, nil, with(good, "sid", 7)), KindMalformed},
		{"no exp", sign(t, key, nil, with(good, "exp", nil)), KindMalformed},
		{"exp a string", sign(t, key, nil, with(good, "exp", "tomorrow")), KindMalformed},
		{"no iat", sign(t, key, nil, with(good, "iat", nil)), KindMalformed},
		{"no iss", sign(t, key, nil, with(good, "iss", nil)), KindMalformed},
		{"aud a number", sign(t, key, nil, with(good, "aud", 1)), KindMalformed},
		{"jti a number", sign(t, key, nil, with(good, "jti", 1)), KindMalformed},

		{"tampered payload", parts[0] + "." + b64json(t, with(good, "sub", "mallory")) + "." + parts[2], KindBadSignature},
		{"signed by another key under a published kid", sign(t, stranger, map[string]any{"kid": key.ID}, good), KindBadSignature},
		{"alg none", noneToken, KindBadSignature},
		{"alg none with a signature", b64json(t, map[string]any{"alg": "none", "kid": key.ID}) + "." + b64json(t, good) + "." + parts[2], KindBadSignature},
		{"HS256 with the key id as secret", hsInput + "." + base64.RawURLEncoding.EncodeToString(hsSig), KindBadSignature},
		{"alg other than the key's", sign(t, ed, map[string]any{"kid": key.ID}, good), KindBadSignature},
		{"RS256 naming an EC key", sign(t, key, map[string]any{"alg": "RS256"}, good), KindBadSignature},
		{"PS256", sign(t, key, map[string]any{"alg": "PS256"}, good), KindBadSignature},

		{"unknown kid", sign(t, stranger, nil, good), KindUnknownKey},

		{"expired", sign(t, key, nil, with(good, "iat", t0.Add(-time.Hour).Unix(), "exp", t0.Add(-time.Minute).Unix())), KindExpired},
		{"issued in the future", sign(t, key, nil, with(good, "iat", t0.Add(time.Minute).Unix())), KindNotYetValid},
		{"nbf in the future", sign(t, key, nil, with(good, "nbf", t0.Add(time.Minute).Unix())), KindNotYetValid},

		{"wrong issuer", sign(t, key, nil, with(good, "iss", "https://evil.test")), KindWrongIssuer},
		{"issuer with a trailing slash", sign(t, key, nil, with(good, "iss", testIssuer+"/")), KindWrongIssuer},
		{"wrong audience", sign(t, key, nil, with(good, "aud", "chat")), KindWrongAudience},
		{"audiences without ours", sign(t, key, nil, with(good, "aud", []string{"chat", "api"})), KindWrongAudience},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := v.Verify(context.Background(), tc.token)
			wantKind(t, err, tc.kind)
		})
	}

	t.Run("audiences with ours", func(t *testing.T) {
		if _, err := v.Verify(context.Background(), sign(t, key, nil, with(good, "aud", []string{"chat", testAudience}))); err != nil {
			t.Errorf("Verify: %v", err)
		}
	})
	t.Run("revoked", func(t *testing.T) {
		tok := sign(t, key, nil, with(good, "sid", "SID-revoked"))
		if _, err := v.Verify(context.Background(), tok); err != nil {
			t.Fatal(err)
		}
		v.AddRevocation(Revocation{SID: "SID-revoked", RevokedAt: t0, TokensExpireAt: t0.Add(10 * time.Minute)})
		_, err := v.Verify(context.Background(), tok)
		wantKind(t, err, KindRevoked)
		if !v.Revoked("SID-revoked") || v.Revoked("SID-1") {
			t.Errorf("Revoked reports the wrong sessions")
		}
		// Other sessions are unaffected.
		if _, err := v.Verify(context.Background(), valid); err != nil {
			t.Errorf("another session's token: %v", err)
		}
	})
	if n := s.requests.Load(); n > 2 {
		t.Errorf("%d JWKS requests for one key set and one unknown kid, want at most 2", n)
	}
}

func TestVerifyLeeway(t *testing.T) {
	key := newKey(t, issuer.ES256)
	s := newJWKSServer(t, key)
	c := &clock{}
	exp := t0.Add(10 * time.Minute)
	tok := sign(t, key, nil, with(claimsAt(t0), "nbf", t0.Unix()))
	for _, tc := range []struct {
		name   string
		leeway time.Duration
		now    time.Time
		kind   Kind // 0: accepted
	}{
		{"default: just expired", 0, exp.Add(29 * time.Second), 0},
		{"default: expired beyond 30s", 0, exp.Add(30 * time.Second), KindExpired},
		{"default: issued 29s ahead of us", 0, t0.Add(-29 * time.Second), 0},
		{"default: issued 31s ahead of us", 0, t0.Add(-31 * time.Second), KindNotYetValid},
		{"2m: expired a minute ago", 2 * time.Minute, exp.Add(time.Minute), 0},
		{"2m: expired 2m ago", 2 * time.Minute, exp.Add(2 * time.Minute), KindExpired},
		{"none: the last second", -1, exp.Add(-time.Second), 0},
		{"none: at exp", -1, exp, KindExpired},
		{"none: a second before iat", -1, t0.Add(-time.Second), KindNotYetValid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := newVerifier(t, s, c, func(cfg *Config) { cfg.Leeway = tc.leeway })
			c.Set(tc.now)
			_, err := v.Verify(context.Background(), tok)
			if tc.kind == 0 {
				if err != nil {
					t.Errorf("Verify: %v", err)
				}
				return
			}
			wantKind(t, err, tc.kind)
		})
	}
	if v := newVerifier(t, s, c); v.Leeway() != DefaultLeeway {
		t.Errorf("default leeway = %v, want %v", v.Leeway(), DefaultLeeway)
	}
}

func TestNewRefusesBadConfig(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  Config
		want []string
	}{
		{"empty", Config{}, []string{"JWKSURL", "Issuer", "Audience"}},
		{"relative URL", Config{JWKSURL: "/jwks.json", Issuer: testIssuer, Audience: "ws"}, []string{"JWKSURL"}},
		{"leeway too long", Config{Issuer: testIssuer, Audience: "ws", Leeway: time.Hour}, []string{"Leeway"}},
		{"negative refresh", Config{Issuer: testIssuer, Audience: "ws", MinRefreshInterval: -1}, []string{"MinRefreshInterval"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(context.Background(), tc.cfg)
			if err == nil {
				t.Fatal("New accepted the config")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %s", err, w)
				}
			}
		})
	}
}

func TestJWKSURLDefaultsFromIssuer(t *testing.T) {
	key := newKey(t, issuer.ES256)
	s := newJWKSServer(t, key)
	v, err := New(t.Context(), Config{Issuer: s.srv.URL + "/", Audience: testAudience})
	if err != nil {
		t.Fatal(err)
	}
	if v.url != s.srv.URL+"/.well-known/jwks.json" {
		t.Errorf("JWKS URL = %q", v.url)
	}
}

// TestVerifyKeyRotation rotates the key set under a verifier: a token of the
// new key costs one refetch, the old key's tokens still verify, and nothing
// else is fetched.
func TestVerifyKeyRotation(t *testing.T) {
	a, b := newKey(t, issuer.ES256), newKey(t, issuer.ES256)
	s := newJWKSServer(t, a)
	c := &clock{now: t0}
	v := newVerifier(t, s, c, func(cfg *Config) { cfg.MinRefreshInterval = 50 * time.Millisecond })
	oldTok := s.mint(t, "S1", t0, "")
	if _, err := v.Verify(context.Background(), oldTok); err != nil {
		t.Fatal(err)
	}
	if n := s.requests.Load(); n != 1 {
		t.Fatalf("%d JWKS requests after start, want 1", n)
	}
	time.Sleep(60 * time.Millisecond) // past the minimum interval since the first fetch

	s.setKeys(t, b, a, b)
	newTok := s.mint(t, "S2", t0, "")
	var wg sync.WaitGroup
	errs := make(chan error, 50)
	for range 50 {
		wg.Go(func() {
			_, err := v.Verify(context.Background(), newTok)
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("a token of the new key: %v", err)
		}
	}
	if n := s.requests.Load(); n != 2 {
		t.Errorf("%d JWKS requests, want 2: the new kid is fetched once for all 50 verifications", n)
	}
	for _, tok := range []string{oldTok, newTok, s.mint(t, "S3", t0, "")} {
		if _, err := v.Verify(context.Background(), tok); err != nil {
			t.Errorf("after rotation: %v", err)
		}
	}
	if n := s.requests.Load(); n != 2 {
		t.Errorf("%d JWKS requests after verifying known keys, want still 2", n)
	}
}

// TestVerifyForgedKidFlood sends floods of tokens with random kids: they
// are all refused, and the JWKS is fetched at most once per minimum
// interval however many arrive.
func TestVerifyForgedKidFlood(t *testing.T) {
	key := newKey(t, issuer.ES256)
	forger := newKey(t, issuer.ES256)
	s := newJWKSServer(t, key)
	c := &clock{now: t0}
	const interval = 200 * time.Millisecond
	v := newVerifier(t, s, c, func(cfg *Config) { cfg.MinRefreshInterval = interval })
	good := claimsAt(t0)
	forged := make([]string, 1000)
	for i := range forged {
		var kid [12]byte
		_, _ = rand.Read(kid[:])
		forged[i] = sign(t, forger, map[string]any{"kid": base64.RawURLEncoding.EncodeToString(kid[:])}, good)
	}

	// One burst: 1000 at once.
	time.Sleep(interval) // the start-up fetch no longer counts against the flood
	var wg sync.WaitGroup
	var accepted atomic.Int64
	burst := time.Now()
	for _, tok := range forged {
		wg.Go(func() {
			if _, err := v.Verify(context.Background(), tok); !errors.Is(err, ErrUnknownKey) {
				accepted.Add(1)
			}
		})
	}
	wg.Wait()
	if n := accepted.Load(); n != 0 {
		t.Fatalf("%d forged tokens were not refused as unknown keys", n)
	}
	// Start-up, then one refetch per interval the burst lasted (one, unless
	// the machine is slow).
	if n, limit := s.requests.Load(), 2+int64(time.Since(burst)/interval); n > limit {
		t.Errorf("%d JWKS requests for a burst of 1000 forged kids in %v, want at most %d (start-up and one refetch per %v)",
			n, time.Since(burst), limit, interval)
	}

	// A sustained flood for five intervals.
	before := s.requests.Load()
	start := time.Now()
	end := start.Add(5 * interval)
	for w := range 8 {
		wg.Go(func() {
			for i := w; time.Now().Before(end); i = (i + 8) % len(forged) {
				_, _ = v.Verify(context.Background(), forged[i])
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	limit := int64(elapsed/interval) + 1
	if n := s.requests.Load() - before; n > limit {
		t.Errorf("%d JWKS requests in %v of flood, want at most %d (one per %v)", n, elapsed, limit, interval)
	}
	// The real key is still served from memory.
	if _, err := v.Verify(context.Background(), s.mint(t, "S", t0, "")); err != nil {
		t.Errorf("a real token during the flood: %v", err)
	}
}

// TestVerifyTokendUnreachable keeps verifying with the cached keys once
// tokend has gone, through failed background refreshes, and answers
// unknown kids at once.
func TestVerifyTokendUnreachable(t *testing.T) {
	key := newKey(t, issuer.ES256)
	s := newJWKSServer(t, key)
	s.maxAge.Store(1) // refresh every second...
	c := &clock{now: t0}
	v := newVerifier(t, s, c, func(cfg *Config) { cfg.MinRefreshInterval = time.Second })
	tok := s.mint(t, "S", t0, "")
	if _, err := v.Verify(context.Background(), tok); err != nil {
		t.Fatal(err)
	}
	s.srv.Close() // ...but tokend is gone
	deadline := time.Now().Add(2500 * time.Millisecond)
	for time.Now().Before(deadline) {
		start := time.Now()
		if _, err := v.Verify(context.Background(), tok); err != nil {
			t.Fatalf("with tokend unreachable: %v", err)
		}
		if d := time.Since(start); d > 100*time.Millisecond {
			t.Errorf("Verify took %v with tokend unreachable", d)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if b := v.fetchErr.Load(); b == nil {
		t.Error("no background refresh failed: the test did not test anything")
	}
	_, err := v.Verify(context.Background(), sign(t, newKey(t, issuer.ES256), nil, claimsAt(t0)))
	wantKind(t, err, KindUnknownKey)
}

// TestVerifyUnavailableAtStart starts a verifier while tokend fails: it
// answers ErrUnavailable, and verifies once tokend is back.
func TestVerifyUnavailableAtStart(t *testing.T) {
	key := newKey(t, issuer.ES256)
	s := newJWKSServer(t, key)
	s.status.Store(http.StatusServiceUnavailable)
	c := &clock{now: t0}
	v := newVerifier(t, s, c, func(cfg *Config) { cfg.MinRefreshInterval = 100 * time.Millisecond })
	tok := s.mint(t, "S", t0, "")
	_, err := v.Verify(context.Background(), tok)
	wantKind(t, err, KindUnavailable)
	if !strings.Contains(err.Error(), "503") {
		t.Errorf("the error does not say why: %v", err)
	}
	s.status.Store(0)
	time.Sleep(120 * time.Millisecond)
	if _, err := v.Verify(context.Background(), tok); err != nil {
		t.Errorf("once tokend is back: %v", err)
	}
}

// TestVerifyIgnoresUnusableKeys publishes keys tokend would never sign
// with; tokens naming them are refused.
func TestVerifyIgnoresUnusableKeys(t *testing.T) {
	key := newKey(t, issuer.ES256)
	var requests atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		requests.Add(1)
		iss, _ := issuer.New(testIssuer, []string{testAudience})
		_ = iss.SetKeys(&key, []issuer.Key{key})
		var doc struct {
			Keys []map[string]any `json:"keys"`
		}
		_ = json.Unmarshal(iss.JWKS().Body, &doc)
		noAlg := map[string]any{}
		for k, v := range doc.Keys[0] {
			noAlg[k] = v
		}
		delete(noAlg, "alg")
		noAlg["kid"] = "no-alg"
		encryption := map[string]any{}
		for k, v := range doc.Keys[0] {
			encryption[k] = v
		}
		encryption["use"] = "enc"
		encryption["kid"] = "enc"
		doc.Keys = append(doc.Keys, noAlg, encryption,
			map[string]any{"kty": "oct", "kid": "hmac", "alg": "HS256", "k": base64.RawURLEncoding.EncodeToString([]byte("secret"))})
		_ = json.NewEncoder(w).Encode(doc)
	}))
	t.Cleanup(srv.Close)
	v, err := New(t.Context(), Config{JWKSURL: srv.URL, Issuer: testIssuer, Audience: testAudience, Now: (&clock{now: t0}).Now})
	if err != nil {
		t.Fatal(err)
	}
	good := claimsAt(t0)
	if _, err := v.Verify(context.Background(), sign(t, key, nil, good)); err != nil {
		t.Fatalf("the usable key: %v", err)
	}
	for _, kid := range []string{"no-alg", "enc"} {
		_, err := v.Verify(context.Background(), sign(t, key, map[string]any{"kid": kid}, good))
		wantKind(t, err, KindUnknownKey)
	}
	hsInput := b64json(t, map[string]any{"alg": "HS256", "kid": "hmac"}) + "." + b64json(t, good)
	hs, _ := jws.NewSigner(jwa.HS256)
	sig, _ := hs.Sign([]byte(hsInput), []byte("secret"))
	_, err = v.Verify(context.Background(), hsInput+"."+base64.RawURLEncoding.EncodeToString(sig))
	wantKind(t, err, KindBadSignature)
}

func TestRevocationsAreForgottenWhenTheirTokensHaveExpired(t *testing.T) {
	key := newKey(t, issuer.ES256)
	s := newJWKSServer(t, key)
	c := &clock{now: t0}
	v := newVerifier(t, s, c) // leeway 30s
	v.AddRevocation(Revocation{SID: "A", RevokedAt: t0, TokensExpireAt: t0.Add(10 * time.Minute)})
	v.AddRevocation(Revocation{SID: "B", RevokedAt: t0}) // no expiry given: tokend's longest TTL
	v.AddRevocation(Revocation{SID: "old", RevokedAt: t0.Add(-time.Hour), TokensExpireAt: t0.Add(-50 * time.Minute)})
	if !v.Revoked("A") || !v.Revoked("B") || v.Revoked("old") {
		t.Fatalf("revoked A=%v B=%v old=%v, want true true false", v.Revoked("A"), v.Revoked("B"), v.Revoked("old"))
	}
	c.Set(t0.Add(10*time.Minute + 29*time.Second))
	if !v.Revoked("A") {
		t.Error("A forgotten within the leeway after its tokens expired")
	}
	c.Set(t0.Add(10*time.Minute + 30*time.Second))
	if v.Revoked("A") || !v.Revoked("B") {
		t.Errorf("A=%v B=%v, want A forgotten, B kept", v.Revoked("A"), v.Revoked("B"))
	}
	// Memory: expired entries are swept when new ones arrive.
	c.Set(t0.Add(25 * time.Hour))
	v.AddRevocation(Revocation{SID: "C", RevokedAt: c.Now(), TokensExpireAt: c.Now().Add(time.Minute)})
	if n := v.revoked.len(); n != 1 {
		t.Errorf("%d revocations kept, want only C", n)
	}
}
