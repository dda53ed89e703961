package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"
	"github.com/lestrrat-go/jwx/v2/jwt"

	"github.com/tokend/tokend/issuer"
	"github.com/tokend/tokend/session"
	"github.com/tokend/tokend/store/memory"
	"github.com/tokend/tokend/store/ratelimit"
)

// The handler tests run the real router over the real session service, an
// in-memory store and a real issuer, with a fake clock. Every response goes
// through checkResponse, so each one is also checked against openapi.yaml.

var t0 = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

const (
	testHost       = "tokend.test"
	testIssuer     = "https://tokend.test"
	testAudience   = "ws"
	testServiceKey = "svc-key-0123456789abcdef"
	testAdminKey   = "adm-key-0123456789abcdef"
	appOrigin      = "https://app.example.com"
	cookieName     = "tokend_session"
	defaultTTL     = 8 * time.Hour
	tokenTTL       = 10 * time.Minute
)

// fakeClock is the one clock of a test: the session service, the admin
// views and the rate limiter all read it.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// countingMinter counts the tokens minted, so that tests can assert that a
// refused request minted none.
type countingMinter struct {
	session.Minter
	n atomic.Int64
}

func (m *countingMinter) Mint(ctx context.Context, c issuer.Claims) (string, error) {
	m.n.Add(1)
	return m.Minter.Mint(ctx, c)
}

// lockedBuffer collects log output from concurrent requests.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

type env struct {
	h      http.Handler
	clock  *fakeClock
	jitter atomic.Uint64 // math.Float64bits of the draw placing refresh_in
	iss    *issuer.Issuer
	key    issuer.Key
	minter *countingMinter
	ready  atomic.Bool
	logs   *lockedBuffer
}

type envConfig struct {
	jitter   float64
	sessions func(*session.Service) Sessions
	protect  func(now func() time.Time) Protection
	randN    func(int) int
	config   func(*Config)
	keyAdmin func(iss *issuer.Issuer, key issuer.Key, now func() time.Time) KeyAdmin
}

type envOption func(*envConfig)

// withJitter fixes the uniform draw that places refresh_in.
func withJitter(j float64) envOption { return func(c *envConfig) { c.jitter = j } }

// withSessions replaces the session service the API sees.
func withSessions(f func(*session.Service) Sessions) envOption {
	return func(c *envConfig) { c.sessions = f }
}

// withProtection configures load protection; p gets the test's clock, for
// the rate limiter. randN is the Retry-After jitter source.
func withProtection(p func(now func() time.Time) Protection, randN func(int) int) envOption {
	return func(c *envConfig) { c.protect, c.randN = p, randN }
}

func withConfig(f func(*Config)) envOption { return func(c *envConfig) { c.config = f } }

// withKeyAdmin serves /v1/admin/keys with what f builds over the issuer.
func withKeyAdmin(f func(iss *issuer.Issuer, key issuer.Key, now func() time.Time) KeyAdmin) envOption {
	return func(c *envConfig) { c.keyAdmin = f }
}

func newEnv(t *testing.T, opts ...envOption) *env {
	t.Helper()
	cfg := envConfig{jitter: 0.5}
	for _, o := range opts {
		o(&cfg)
	}
	e := &env{clock: &fakeClock{now: t0}, logs: &lockedBuffer{}}
	e.ready.Store(true)
	key, err := issuer.GenerateKey(issuer.ES256, t0)
	if err != nil {
		t.Fatal(err)
	}
	iss, err := issuer.New(testIssuer, []string{testAudience})
	if err != nil {
		t.Fatal(err)
	}
	if err := iss.SetKeys(&key, []issuer.Key{key}); err != nil {
		t.Fatal(err)
	}
	e.iss, e.key = iss, key
	e.minter = &countingMinter{Minter: iss}
	e.setJitter(cfg.jitter)
	svc := session.NewService(memory.New(), e.minter,
		session.Config{TokenTTL: tokenTTL, SessionTTL: defaultTTL, TouchInterval: time.Minute},
		session.WithClock(e.clock.Now), session.WithJitter(func() float64 { return math.Float64frombits(e.jitter.Load()) }))
	var sessions Sessions = svc
	if cfg.sessions != nil {
		sessions = cfg.sessions(svc)
	}
	apiCfg := Config{
		Cookie:         Cookie{Name: cookieName, Path: "/v1", Secure: true, SameSite: http.SameSiteStrictMode},
		AllowedOrigins: []string{appOrigin, "https://other.example.com"},
		ServiceKeys:    []string{testServiceKey, "svc-key-second-0123456789"},
		AdminKeys:      []string{testAdminKey},
	}
	if cfg.protect != nil {
		apiCfg.Protection = cfg.protect(e.clock.Now)
	}
	if cfg.config != nil {
		cfg.config(&apiCfg)
	}
	var keyAdmin KeyAdmin
	if cfg.keyAdmin != nil {
		keyAdmin = cfg.keyAdmin(iss, key, e.clock.Now)
	}
	e.h = NewServer(Options{
		Logger:   slog.New(slog.NewJSONHandler(e.logs, nil)),
		Sessions: sessions,
		Keys:     iss,
		KeyAdmin: keyAdmin,
		Config:   apiCfg,
		Ready:    e.ready.Load,
		Now:      e.clock.Now,
		RandN:    cfg.randN,
	})
	return e
}

func (e *env) setJitter(j float64) { e.jitter.Store(math.Float64bits(j)) }

// newRequest builds a request to tokend.test. headers are name, value pairs.
// The body can be read again through GetBody, for checkResponse.
func newRequest(method, target, body string, headers ...string) *http.Request {
	var r io.Reader
	if body != "" {
		r = strings.NewReader(body)
	}
	req := httptest.NewRequest(method, "http://"+testHost+target, r)
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Add(headers[i], headers[i+1])
	}
	raw := []byte(body)
	req.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(raw)), nil }
	return req
}

// serve runs req through the router and checks the exchange against the
// document.
func (e *env) serve(t *testing.T, req *http.Request) *httptest.ResponseRecorder {
	t.Helper()
	rec := httptest.NewRecorder()
	e.h.ServeHTTP(rec, req)
	checkResponse(t, req, rec)
	return rec
}

func (e *env) do(t *testing.T, method, target, body string, headers ...string) *httptest.ResponseRecorder {
	t.Helper()
	return e.serve(t, newRequest(method, target, body, headers...))
}

func bearer(key string) []string { return []string{"Authorization", "Bearer " + key} }

func jsonBody(extra ...string) []string {
	return append([]string{"Content-Type", "application/json"}, extra...)
}

func withCookie(value string, extra ...string) []string {
	return append([]string{"Cookie", cookieName + "=" + value}, extra...)
}

// createSession creates a session through the API and returns its view.
func (e *env) createSession(t *testing.T, body string) createSessionResponse {
	t.Helper()
	rec := e.do(t, "POST", "/v1/sessions", body, jsonBody(bearer(testServiceKey)...)...)
	if rec.Code != http.StatusCreated {
		t.Fatalf("create session %s: %d %s", body, rec.Code, rec.Body)
	}
	return decodeAs[createSessionResponse](t, rec)
}

func (e *env) token(t *testing.T, cookie string, headers ...string) *httptest.ResponseRecorder {
	t.Helper()
	return e.do(t, "POST", "/v1/token", "", withCookie(cookie, headers...)...)
}

func (e *env) adminGet(t *testing.T, sid string) sessionView {
	t.Helper()
	rec := e.do(t, "GET", "/v1/admin/sessions/"+sid, "", bearer(testAdminKey)...)
	wantStatus(t, rec, http.StatusOK)
	return decodeAs[sessionView](t, rec)
}

func decodeAs[T any](t *testing.T, rec *httptest.ResponseRecorder) T {
	t.Helper()
	var v T
	if err := json.Unmarshal(rec.Body.Bytes(), &v); err != nil {
		t.Fatalf("decode %T from %q: %v", v, rec.Body.String(), err)
	}
	return v
}

func wantStatus(t *testing.T, rec *httptest.ResponseRecorder, status int) {
	t.Helper()
	if rec.Code != status {
		t.Fatalf("status = %d, want %d; body: %s", rec.Code, status, rec.Body)
	}
}

func wantHeader(t *testing.T, rec *httptest.ResponseRecorder, name, want string) {
	t.Helper()
	if got := rec.Header().Get(name); got != want {
		t.Errorf("%s = %q, want %q", name, got, want)
	}
}

func wantNoHeader(t *testing.T, rec *httptest.ResponseRecorder, name string) {
	t.Helper()
	if got, ok := rec.Header()[http.CanonicalHeaderKey(name)]; ok {
		t.Errorf("%s = %q, want none", name, got)
	}
}

type problemBody struct {
	Type      string               `json:"type"`
	Title     string               `json:"title"`
	Status    int                  `json:"status"`
	Detail    string               `json:"detail"`
	Instance  string               `json:"instance"`
	Code      string               `json:"code"`
	RequestID string               `json:"request_id"`
	Errors    []session.FieldError `json:"errors"`
}

func (p problemBody) fields() []string {
	var out []string
	for _, f := range p.Errors {
		out = append(out, f.Field)
	}
	return out
}

// wantProblem checks everything every problem must have and returns it.
func wantProblem(t *testing.T, rec *httptest.ResponseRecorder, status int, code string) problemBody {
	t.Helper()
	wantStatus(t, rec, status)
	wantHeader(t, rec, "Content-Type", "application/problem+json")
	wantHeader(t, rec, "Cache-Control", "no-store")
	p := decodeAs[problemBody](t, rec)
	if p.Code != code {
		t.Errorf("code = %q, want %q (detail %q)", p.Code, code, p.Detail)
	}
	if p.Status != status {
		t.Errorf("status field = %d, want %d", p.Status, status)
	}
	if p.Type != "urn:tokend:problem:"+code {
		t.Errorf("type = %q, want urn:tokend:problem:%s", p.Type, code)
	}
	if p.Title == "" || p.Title != titles[code] {
		t.Errorf("title = %q, want %q", p.Title, titles[code])
	}
	if p.Detail == "" {
		t.Errorf("detail is empty")
	}
	if id := rec.Header().Get("X-Request-Id"); p.RequestID == "" || p.RequestID != id {
		t.Errorf("request_id = %q, want the X-Request-Id header %q", p.RequestID, id)
	}
	return p
}

// wantCookieCleared checks that the response deletes the session cookie,
// with the attributes it was issued with.
func wantCookieCleared(t *testing.T, rec *httptest.ResponseRecorder) {
	t.Helper()
	values := rec.Header().Values("Set-Cookie")
	if len(values) != 1 {
		t.Fatalf("Set-Cookie = %q, want one clearing cookie", values)
	}
	c, err := http.ParseSetCookie(values[0])
	if err != nil {
		t.Fatalf("Set-Cookie %q: %v", values[0], err)
	}
	if c.Name != cookieName || c.Value != "" || c.MaxAge >= 0 || !strings.Contains(values[0], "Max-Age=0") {
		t.Errorf("Set-Cookie = %q, want %s with an empty value and Max-Age=0", values[0], cookieName)
	}
	if c.Path != "/v1" || !c.HttpOnly || !c.Secure || c.SameSite != http.SameSiteStrictMode {
		t.Errorf("Set-Cookie = %q, want Path=/v1; HttpOnly; Secure; SameSite=Strict", values[0])
	}
}

func wantNoCookie(t *testing.T, rec *httptest.ResponseRecorder) {
	t.Helper()
	wantNoHeader(t, rec, "Set-Cookie")
}

// verifyToken checks a token the way a validator does: against the JWKS the
// router serves, at the fake clock's time.
func (e *env) verifyToken(t *testing.T, token string) jwt.Token {
	t.Helper()
	rec := e.do(t, "GET", "/.well-known/jwks.json", "")
	wantStatus(t, rec, http.StatusOK)
	set, err := jwk.Parse(rec.Body.Bytes())
	if err != nil {
		t.Fatalf("parse JWKS: %v", err)
	}
	tok, err := jwt.Parse([]byte(token), jwt.WithKeySet(set), jwt.WithValidate(true),
		jwt.WithClock(jwt.ClockFunc(e.clock.Now)), jwt.WithIssuer(testIssuer), jwt.WithAudience(testAudience),
		jwt.WithRequiredClaim("exp"), jwt.WithRequiredClaim("iat"), jwt.WithRequiredClaim("jti"), jwt.WithRequiredClaim("sid"))
	if err != nil {
		t.Fatalf("token does not verify against the served JWKS: %v", err)
	}
	msg, err := jws.Parse([]byte(token))
	if err != nil {
		t.Fatal(err)
	}
	h := msg.Signatures()[0].ProtectedHeaders()
	if h.KeyID() != e.key.ID || h.Algorithm().String() != "ES256" || h.Type() != "JWT" {
		t.Errorf("header kid=%q alg=%q typ=%q, want %q ES256 JWT", h.KeyID(), h.Algorithm(), h.Type(), e.key.ID)
	}
	return tok
}

// --- Operations ------------------------------------------------------------

func TestHealthz(t *testing.T) {
	e := newEnv(t)
	e.ready.Store(false) // liveness does not depend on readiness
	rec := e.do(t, "GET", "/healthz", "")
	wantStatus(t, rec, http.StatusOK)
	wantHeader(t, rec, "Content-Type", "application/json")
	wantHeader(t, rec, "X-Content-Type-Options", "nosniff")
	if got := strings.TrimSpace(rec.Body.String()); got != `{"status":"ok"}` {
		t.Errorf("body = %s", got)
	}
}

func TestReadyz(t *testing.T) {
	e := newEnv(t)
	rec := e.do(t, "GET", "/readyz", "")
	wantStatus(t, rec, http.StatusOK)
	if got := strings.TrimSpace(rec.Body.String()); got != `{"status":"ready"}` {
		t.Errorf("body = %s", got)
	}

	e.ready.Store(false)
	p := wantProblem(t, e.do(t, "GET", "/readyz", ""), http.StatusServiceUnavailable, "not_ready")
	if p.Instance != "/readyz" {
		t.Errorf("instance = %q, want /readyz", p.Instance)
	}

	e.ready.Store(true)
	wantStatus(t, e.do(t, "GET", "/readyz", ""), http.StatusOK)
}

func TestReadyzWithoutReadyFunc(t *testing.T) {
	h := NewServer(Options{})
	req := newRequest("GET", "/readyz", "")
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	checkResponse(t, req, rec)
	wantStatus(t, rec, http.StatusOK)
}

// --- JWKS ------------------------------------------------------------------

func TestJWKS(t *testing.T) {
	e := newEnv(t)
	rec := e.do(t, "GET", "/.well-known/jwks.json", "")
	wantStatus(t, rec, http.StatusOK)
	wantHeader(t, rec, "Content-Type", "application/jwk-set+json")
	wantHeader(t, rec, "Cache-Control", "public, max-age=300, stale-while-revalidate=300, stale-if-error=86400")
	wantHeader(t, rec, "Access-Control-Allow-Origin", "*")
	wantHeader(t, rec, "ETag", e.iss.JWKS().ETag)
	wantHeader(t, rec, "Content-Length", fmt.Sprint(rec.Body.Len()))
	if !regexp.MustCompile(`^"[A-Za-z0-9_-]+"$`).MatchString(rec.Header().Get("ETag")) {
		t.Errorf("ETag %q is not a strong quoted tag", rec.Header().Get("ETag"))
	}

	var doc struct {
		Keys []map[string]any `json:"keys"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &doc); err != nil {
		t.Fatal(err)
	}
	if len(doc.Keys) != 1 {
		t.Fatalf("keys = %v, want one", doc.Keys)
	}
	k := doc.Keys[0]
	for name, want := range map[string]string{"kid": e.key.ID, "alg": "ES256", "use": "sig", "kty": "EC", "crv": "P-256"} {
		if k[name] != want {
			t.Errorf("key %s = %v, want %s", name, k[name], want)
		}
	}
	for _, private := range []string{"d", "p", "q", "dp", "dq", "qi"} {
		if _, ok := k[private]; ok {
			t.Errorf("the JWKS publishes the private member %q", private)
		}
	}
}

func TestJWKSConditional(t *testing.T) {
	e := newEnv(t)
	etag := e.iss.JWKS().ETag
	bare := strings.Trim(etag, `"`)
	tests := []struct {
		name        string
		ifNoneMatch string
		want        int
	}{
		{"no header", "", http.StatusOK},
		{"exact tag", etag, http.StatusNotModified},
		{"weak form", "W/" + etag, http.StatusNotModified},
		{"in a list", `"other", ` + etag + `, "more"`, http.StatusNotModified},
		{"weak in a list", `"other",W/` + etag, http.StatusNotModified},
		{"star", "*", http.StatusNotModified},
		{"other tag", `"other"`, http.StatusOK},
		{"unquoted tag", bare, http.StatusOK},
		{"prefix of the tag", etag[:len(etag)-2] + `"`, http.StatusOK},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var hdr []string
			if tc.ifNoneMatch != "" {
				hdr = []string{"If-None-Match", tc.ifNoneMatch}
			}
			rec := e.do(t, "GET", "/.well-known/jwks.json", "", hdr...)
			wantStatus(t, rec, tc.want)
			wantHeader(t, rec, "ETag", etag)
			wantHeader(t, rec, "Cache-Control", "public, max-age=300, stale-while-revalidate=300, stale-if-error=86400")
			wantHeader(t, rec, "Access-Control-Allow-Origin", "*")
			if tc.want == http.StatusNotModified {
				if rec.Body.Len() != 0 {
					t.Errorf("304 with a body: %q", rec.Body)
				}
				wantNoHeader(t, rec, "Content-Type")
			} else if !bytes.Equal(rec.Body.Bytes(), e.iss.JWKS().Body) {
				t.Errorf("body is not the key set")
			}
		})
	}
}

func TestJWKSFollowsKeyRotation(t *testing.T) {
	e := newEnv(t)
	oldTag := e.iss.JWKS().ETag
	wantStatus(t, e.do(t, "GET", "/.well-known/jwks.json", "", "If-None-Match", oldTag), http.StatusNotModified)

	next, err := issuer.GenerateKey(issuer.ES256, t0)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.iss.SetKeys(&next, []issuer.Key{next, e.key}); err != nil {
		t.Fatal(err)
	}
	rec := e.do(t, "GET", "/.well-known/jwks.json", "", "If-None-Match", oldTag)
	wantStatus(t, rec, http.StatusOK)
	if tag := rec.Header().Get("ETag"); tag == oldTag || tag != e.iss.JWKS().ETag {
		t.Errorf("ETag after rotation = %q (old %q, current %q)", tag, oldTag, e.iss.JWKS().ETag)
	}
	if !strings.Contains(rec.Body.String(), next.ID) || !strings.Contains(rec.Body.String(), e.key.ID) {
		t.Errorf("key set after rotation lacks a key: %s", rec.Body)
	}
}

func TestJWKSMaxAge(t *testing.T) {
	e := newEnv(t, withConfig(func(c *Config) { c.JWKSMaxAge = 90 * time.Second }))
	rec := e.do(t, "GET", "/.well-known/jwks.json", "")
	wantHeader(t, rec, "Cache-Control", "public, max-age=90, stale-while-revalidate=90, stale-if-error=86400")
}

// --- Creating sessions -----------------------------------------------------

var cookieValueRE = regexp.MustCompile(`^[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43}$`)

func TestCreateSession(t *testing.T) {
	e := newEnv(t)
	e.clock.Advance(500 * time.Millisecond) // created_at is truncated to the second
	body := `{"subject":"alice","ttl_seconds":3600,"idle_timeout_seconds":600,"claims":{"role":"editor","b":1,"a":[true]}}`
	rec := e.do(t, "POST", "/v1/sessions", body, jsonBody(bearer(testServiceKey)...)...)
	wantStatus(t, rec, http.StatusCreated)
	wantHeader(t, rec, "Cache-Control", "no-store")
	wantHeader(t, rec, "Content-Type", "application/json")
	wantNoCookie(t, rec) // the backend forwards the cookie; tokend does not set it here
	got := decodeAs[createSessionResponse](t, rec)

	if !session.ValidSID(got.SID) || got.Subject != "alice" {
		t.Errorf("sid %q, subject %q", got.SID, got.Subject)
	}
	if !got.CreatedAt.Equal(t0) || !got.ExpiresAt.Equal(t0.Add(time.Hour)) {
		t.Errorf("created_at %v, expires_at %v; want %v and an hour later", got.CreatedAt, got.ExpiresAt, t0)
	}
	if got.IdleTimeoutSeconds != 600 {
		t.Errorf("idle_timeout_seconds = %d, want 600", got.IdleTimeoutSeconds)
	}
	if string(got.Claims) != `{"a":[true],"b":1,"role":"editor"}` {
		t.Errorf("claims = %s, want them canonical (sorted keys, compact)", got.Claims)
	}

	c := got.Cookie
	if c.Name != cookieName || c.MaxAge != 3600 || !cookieValueRE.MatchString(c.Value) || !strings.HasPrefix(c.Value, got.SID+".") {
		t.Errorf("cookie = %+v", c)
	}
	sc, err := http.ParseSetCookie(c.SetCookie)
	if err != nil {
		t.Fatalf("set_cookie %q: %v", c.SetCookie, err)
	}
	if sc.Name != cookieName || sc.Value != c.Value || sc.MaxAge != 3600 || sc.Path != "/v1" ||
		!sc.HttpOnly || !sc.Secure || sc.SameSite != http.SameSiteStrictMode || sc.Domain != "" {
		t.Errorf("set_cookie = %q, want %s=<value>; Path=/v1; Max-Age=3600; HttpOnly; Secure; SameSite=Strict", c.SetCookie, cookieName)
	}

	// The cookie works, and the admin view agrees.
	wantStatus(t, e.token(t, c.Value), http.StatusOK)
	v := e.adminGet(t, got.SID)
	if v.Subject != "alice" || !v.CookieExpiresAt.Equal(t0.Add(time.Hour)) || v.IdleTimeoutSeconds != 600 {
		t.Errorf("admin view = %+v", v)
	}
}

func TestCreateSessionDefaults(t *testing.T) {
	e := newEnv(t)
	rec := e.do(t, "POST", "/v1/sessions", `{"subject":"bob","claims":{}}`, jsonBody(bearer(testServiceKey)...)...)
	wantStatus(t, rec, http.StatusCreated)
	for _, absent := range []string{`"idle_timeout_seconds"`, `"claims"`} {
		if strings.Contains(rec.Body.String(), absent) {
			t.Errorf("body has %s, want it omitted: %s", absent, rec.Body)
		}
	}
	got := decodeAs[createSessionResponse](t, rec)
	if !got.ExpiresAt.Equal(t0.Add(defaultTTL)) || got.Cookie.MaxAge != int(defaultTTL.Seconds()) {
		t.Errorf("expires_at %v, max_age %d; want the default session TTL", got.ExpiresAt, got.Cookie.MaxAge)
	}
}

func TestCreateSessionAcceptedVariants(t *testing.T) {
	tests := []struct {
		name    string
		headers []string
		body    string
	}{
		{"lower-case bearer scheme", jsonBody("Authorization", "bearer "+testServiceKey), `{"subject":"a"}`},
		{"second service key", jsonBody(bearer("svc-key-second-0123456789")...), `{"subject":"a"}`},
		{"charset parameter", []string{"Authorization", "Bearer " + testServiceKey, "Content-Type", "application/json; charset=utf-8"}, `{"subject":"a"}`},
		{"minimum ttl and idle timeout", jsonBody(bearer(testServiceKey)...), `{"subject":"a","ttl_seconds":60,"idle_timeout_seconds":60}`},
		{"maximum ttl", jsonBody(bearer(testServiceKey)...), `{"subject":"a","ttl_seconds":28800,"idle_timeout_seconds":28800}`},
		{"256-byte subject", jsonBody(bearer(testServiceKey)...), `{"subject":"` + strings.Repeat("s", 256) + `"}`},
		{"unicode subject", jsonBody(bearer(testServiceKey)...), `{"subject":"zoë@example.com"}`},
		{"leading and trailing whitespace", jsonBody(bearer(testServiceKey)...), "\n  {\"subject\":\"a\"}\n\t "},
		{"body of exactly 16 KiB", jsonBody(bearer(testServiceKey)...), padTo(`{"subject":"a"}`, maxBodyBytes)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			rec := e.do(t, "POST", "/v1/sessions", tc.body, tc.headers...)
			wantStatus(t, rec, http.StatusCreated)
		})
	}
}

// padTo pads a JSON body with trailing spaces to exactly n bytes.
func padTo(body string, n int) string { return body + strings.Repeat(" ", n-len(body)) }

func TestCreateSessionRequiresServiceKey(t *testing.T) {
	tests := []struct {
		name    string
		headers []string
	}{
		{"no Authorization", nil},
		{"empty Authorization", []string{"Authorization", ""}},
		{"basic scheme", []string{"Authorization", "Basic " + testServiceKey}},
		{"bearer without key", []string{"Authorization", "Bearer"}},
		{"bearer with blank key", []string{"Authorization", "Bearer    "}},
		{"key without scheme", []string{"Authorization", testServiceKey}},
		{"wrong key", bearer("svc-key-0123456789abcdeX")},
		{"key prefix", bearer(testServiceKey[:10])},
		{"admin key", bearer(testAdminKey)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			rec := e.do(t, "POST", "/v1/sessions", `{"subject":"mallory"}`, jsonBody(tc.headers...)...)
			wantProblem(t, rec, http.StatusUnauthorized, "unauthorized")
			wantHeader(t, rec, "WWW-Authenticate", `Bearer realm="tokend"`)
			list := e.do(t, "GET", "/v1/admin/sessions?subject=mallory", "", bearer(testAdminKey)...)
			if !strings.Contains(list.Body.String(), `"sessions":[]`) {
				t.Errorf("a session was created: %s", list.Body)
			}
		})
	}
}

func TestCreateSessionRejectsMalformedBodies(t *testing.T) {
	big := `{"subject":"a","claims":{"x":"` + strings.Repeat("x", maxBodyBytes) + `"}}`
	tests := []struct {
		name        string
		contentType string
		body        string
		status      int
		code        string
		fields      []string // nil: no errors member
	}{
		{"empty body", "application/json", "", 400, "invalid_request", nil},
		{"blank body", "application/json", " \n\t", 400, "invalid_request", nil},
		{"empty body, wrong content type", "text/plain", "", 400, "invalid_request", nil},
		{"truncated JSON", "application/json", `{"subject":`, 400, "invalid_request", nil},
		{"syntax error", "application/json", `{"subject":"a",}`, 400, "invalid_request", nil},
		{"not JSON at all", "application/json", `subject=a`, 400, "invalid_request", nil},
		{"array", "application/json", `[{"subject":"a"}]`, 400, "invalid_request", nil},
		{"string", "application/json", `"a"`, 400, "invalid_request", nil},
		{"null", "application/json", `null`, 400, "invalid_request", nil},
		{"number", "application/json", `42`, 400, "invalid_request", nil},
		{"trailing object", "application/json", `{"subject":"a"}{}`, 400, "invalid_request", nil},
		{"trailing garbage", "application/json", `{"subject":"a"} x`, 400, "invalid_request", nil},
		{"unknown field", "application/json", `{"subject":"a","role":"admin"}`, 400, "invalid_request", []string{"role"}},
		{"misspelt field", "application/json", `{"subject":"a","ttl":60}`, 400, "invalid_request", []string{"ttl"}},
		{"subject not a string", "application/json", `{"subject":42}`, 400, "invalid_request", []string{"subject"}},
		{"ttl as string", "application/json", `{"subject":"a","ttl_seconds":"3600"}`, 400, "invalid_request", []string{"ttl_seconds"}},
		{"ttl fractional", "application/json", `{"subject":"a","ttl_seconds":60.5}`, 400, "invalid_request", []string{"ttl_seconds"}},
		{"ttl overflows int64", "application/json", `{"subject":"a","ttl_seconds":9223372036854775808}`, 400, "invalid_request", []string{"ttl_seconds"}},
		{"idle as bool", "application/json", `{"subject":"a","idle_timeout_seconds":true}`, 400, "invalid_request", []string{"idle_timeout_seconds"}},
		{"oversized", "application/json", big, 413, "request_too_large", nil},
		{"one byte over the limit", "application/json", padTo(`{"subject":"a"}`, maxBodyBytes+1), 413, "request_too_large", nil},
		{"oversized and not JSON", "text/plain", strings.Repeat("x", 2*maxBodyBytes), 413, "request_too_large", nil},
		{"text/plain", "text/plain", `{"subject":"a"}`, 415, "unsupported_media_type", nil},
		{"form", "application/x-www-form-urlencoded", `subject=a`, 415, "unsupported_media_type", nil},
		{"no content type", "", `{"subject":"a"}`, 415, "unsupported_media_type", nil},
		{"malformed content type", "application/", `{"subject":"a"}`, 415, "unsupported_media_type", nil},
		{"json as a suffix only", "application/jsonx", `{"subject":"a"}`, 415, "unsupported_media_type", nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			hdr := bearer(testServiceKey)
			if tc.contentType != "" {
				hdr = append(hdr, "Content-Type", tc.contentType)
			}
			p := wantProblem(t, e.do(t, "POST", "/v1/sessions", tc.body, hdr...), tc.status, tc.code)
			if !slices.Equal(p.fields(), tc.fields) {
				t.Errorf("errors = %+v, want fields %v", p.Errors, tc.fields)
			}
			if p.Instance != "/v1/sessions" {
				t.Errorf("instance = %q", p.Instance)
			}
		})
	}
}

func TestCreateSessionValidatesFields(t *testing.T) {
	type fe struct{ field, message string }
	tests := []struct {
		name string
		body string
		want []fe
	}{
		{"subject missing", `{}`, []fe{{"subject", "is required"}}},
		{"subject empty", `{"subject":""}`, []fe{{"subject", "is required"}}},
		{"subject null", `{"subject":null}`, []fe{{"subject", "is required"}}},
		{"subject too long", `{"subject":"` + strings.Repeat("s", 257) + `"}`, []fe{{"subject", "must be at most 256 bytes"}}},
		{"subject too long in bytes", `{"subject":"` + strings.Repeat("é", 129) + `"}`, []fe{{"subject", "must be at most 256 bytes"}}},
		{"subject with control character", `{"subject":"a\u0007b"}`, []fe{{"subject", "must not contain control characters"}}},
		{"subject with newline", `{"subject":"a\nb"}`, []fe{{"subject", "must not contain control characters"}}},
		{"ttl zero", `{"subject":"a","ttl_seconds":0}`, []fe{{"ttl_seconds", "must be a positive integer"}}},
		{"ttl negative", `{"subject":"a","ttl_seconds":-60}`, []fe{{"ttl_seconds", "must be a positive integer"}}},
		{"ttl below minimum", `{"subject":"a","ttl_seconds":59}`, []fe{{"ttl_seconds", "must be at least 60"}}},
		{"ttl above configured maximum", `{"subject":"a","ttl_seconds":28801}`, []fe{{"ttl_seconds", "must be at most 28800 (the configured maximum session life)"}}},
		{"ttl absurdly large", `{"subject":"a","ttl_seconds":3153600001}`, []fe{{"ttl_seconds", "is too large"}}},
		{"idle zero", `{"subject":"a","idle_timeout_seconds":0}`, []fe{{"idle_timeout_seconds", "must be a positive integer"}}},
		{"idle negative", `{"subject":"a","idle_timeout_seconds":-1}`, []fe{{"idle_timeout_seconds", "must be a positive integer"}}},
		{"idle below minimum", `{"subject":"a","idle_timeout_seconds":59}`, []fe{{"idle_timeout_seconds", "must be at least 60"}}},
		{"idle beyond ttl", `{"subject":"a","ttl_seconds":600,"idle_timeout_seconds":601}`, []fe{{"idle_timeout_seconds", "must not exceed the session's ttl"}}},
		{"idle beyond default ttl", `{"subject":"a","idle_timeout_seconds":28801}`, []fe{{"idle_timeout_seconds", "must not exceed the session's ttl"}}},
		{"idle absurdly large", `{"subject":"a","idle_timeout_seconds":9000000000000}`, []fe{{"idle_timeout_seconds", "is too large"}}},
		{"claims array", `{"subject":"a","claims":[1]}`, []fe{{"claims", "must be a JSON object"}}},
		{"claims string", `{"subject":"a","claims":"role=admin"}`, []fe{{"claims", "must be a JSON object"}}},
		{"claims number", `{"subject":"a","claims":1}`, []fe{{"claims", "must be a JSON object"}}},
		{"claims bool", `{"subject":"a","claims":true}`, []fe{{"claims", "must be a JSON object"}}},
		{"claims empty name", `{"subject":"a","claims":{"":1}}`, []fe{{"claims", "claim names must not be empty"}}},
		{"claims too large", `{"subject":"a","claims":{"x":"` + strings.Repeat("x", 4096) + `"}}`, []fe{{"claims", "must be at most 4096 bytes of JSON"}}},
		{
			"every domain rule at once",
			`{"subject":"","ttl_seconds":59,"idle_timeout_seconds":30,"claims":{"sub":"root"}}`,
			[]fe{{"subject", "is required"}, {"ttl_seconds", "must be at least 60"},
				{"idle_timeout_seconds", "must be at least 60"}, {"claims", `"sub" is reserved and set by tokend`}},
		},
		{
			"request rules first, sorted",
			`{"subject":"","ttl_seconds":0,"idle_timeout_seconds":-5}`,
			[]fe{{"idle_timeout_seconds", "must be a positive integer"}, {"ttl_seconds", "must be a positive integer"}},
		},
	}
	for _, name := range []string{"iss", "sub", "aud", "exp", "nbf", "iat", "jti", "sid"} {
		tests = append(tests, struct {
			name string
			body string
			want []fe
		}{"reserved claim " + name, `{"subject":"a","claims":{"ok":1,"` + name + `":"x"}}`,
			[]fe{{"claims", fmt.Sprintf("%q is reserved and set by tokend", name)}}})
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			rec := e.do(t, "POST", "/v1/sessions", tc.body, jsonBody(bearer(testServiceKey)...)...)
			p := wantProblem(t, rec, http.StatusBadRequest, "invalid_request")
			var got []fe
			for _, f := range p.Errors {
				got = append(got, fe{f.Field, f.Message})
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("errors = %+v, want %+v", got, tc.want)
			}
			if e.minter.n.Load() != 0 {
				t.Errorf("a token was minted")
			}
		})
	}
}

// --- Tokens ----------------------------------------------------------------

func TestToken(t *testing.T) {
	e := newEnv(t, withJitter(0.5))
	created := e.createSession(t, `{"subject":"alice","claims":{"role":"editor","room":42}}`)
	e.clock.Advance(10 * time.Second)
	now := e.clock.Now()

	rec := e.token(t, created.Cookie.Value)
	wantStatus(t, rec, http.StatusOK)
	wantHeader(t, rec, "Cache-Control", "no-store")
	wantHeader(t, rec, "Content-Type", "application/json")
	wantHeader(t, rec, "Vary", "Origin")
	wantNoHeader(t, rec, "Access-Control-Allow-Origin") // no Origin, no CORS
	wantNoCookie(t, rec)
	got := decodeAs[tokenResponse](t, rec)

	if got.TokenType != "Bearer" || got.ExpiresIn != 600 {
		t.Errorf("token_type %q, expires_in %d; want Bearer, 600", got.TokenType, got.ExpiresIn)
	}
	if !got.ExpiresAt.Equal(now.Add(tokenTTL)) {
		t.Errorf("expires_at = %v, want %v", got.ExpiresAt, now.Add(tokenTTL))
	}
	// jitter 0.5 places refresh_in at 70 % of the lifetime.
	if got.RefreshIn != 420 || !got.RefreshAt.Equal(now.Add(420*time.Second)) {
		t.Errorf("refresh_in %d, refresh_at %v; want 420 and %v", got.RefreshIn, got.RefreshAt, now.Add(420*time.Second))
	}
	if !got.SessionExpiresAt.Equal(t0.Add(defaultTTL)) {
		t.Errorf("session_expires_at = %v, want %v", got.SessionExpiresAt, t0.Add(defaultTTL))
	}

	tok := e.verifyToken(t, got.AccessToken)
	if tok.Subject() != "alice" || !tok.Expiration().Equal(got.ExpiresAt) || !tok.IssuedAt().Equal(now) {
		t.Errorf("sub %q exp %v iat %v", tok.Subject(), tok.Expiration(), tok.IssuedAt())
	}
	if !slices.Equal(tok.Audience(), []string{testAudience}) || tok.JwtID() == "" || !tok.NotBefore().IsZero() {
		t.Errorf("aud %v jti %q nbf %v", tok.Audience(), tok.JwtID(), tok.NotBefore())
	}
	claims := tok.PrivateClaims()
	if claims["sid"] != created.SID || claims["role"] != "editor" || claims["room"] != float64(42) {
		t.Errorf("private claims = %v", claims)
	}
	if e.minter.n.Load() != 1 {
		t.Errorf("minted %d tokens, want 1", e.minter.n.Load())
	}

	// Each refresh is a new token.
	again := decodeAs[tokenResponse](t, e.token(t, created.Cookie.Value))
	if again.AccessToken == got.AccessToken {
		t.Errorf("two refreshes returned the same token")
	}
}

func TestTokenRefreshInWindow(t *testing.T) {
	tests := []struct {
		jitter        float64
		wantRefreshIn int64
	}{
		{0, 300},        // 50 % of 600 s
		{0.5, 420},      // 70 %
		{0.999999, 539}, // just under 90 %
		{1, 539},        // out of range: clamped below 90 %
		{7, 539},        // out of range: clamped below 90 %
		{-0.5, 300},     // out of range: clamped to 50 %
		{math.NaN(), 300},
	}
	for _, tc := range tests {
		t.Run(fmt.Sprint(tc.jitter), func(t *testing.T) {
			e := newEnv(t, withJitter(tc.jitter))
			created := e.createSession(t, `{"subject":"alice"}`)
			got := decodeAs[tokenResponse](t, e.token(t, created.Cookie.Value))
			if got.RefreshIn != tc.wantRefreshIn || got.ExpiresIn != 600 {
				t.Errorf("refresh_in = %d, expires_in = %d; want %d, 600", got.RefreshIn, got.ExpiresIn, tc.wantRefreshIn)
			}
		})
	}
}

// TestTokenRefreshInSweep draws across the whole range, for a full-length
// token and for ones capped by the session: refresh_in always lies in
// [50 %, 90 %) of the token's actual lifetime (rounded down to the second),
// grows with the draw, and spans the whole window.
func TestTokenRefreshInSweep(t *testing.T) {
	for _, tc := range []struct {
		name    string
		body    string
		advance time.Duration
		life    int64
	}{
		{"full token", `{"subject":"alice"}`, 0, 600},
		{"capped by the session", `{"subject":"alice","ttl_seconds":3600}`, time.Hour - 77*time.Second, 77},
		{"capped by the idle timeout", `{"subject":"alice","idle_timeout_seconds":90}`, 0, 90},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			created := e.createSession(t, tc.body)
			e.clock.Advance(tc.advance)
			var prev int64 = -1
			var seen []int64
			for i := 0; i <= 100; i++ {
				j := float64(i) / 100
				e.setJitter(j)
				got := decodeAs[tokenResponse](t, e.token(t, created.Cookie.Value))
				if got.ExpiresIn != tc.life {
					t.Fatalf("jitter %v: expires_in = %d, want %d", j, got.ExpiresIn, tc.life)
				}
				// refresh_in is a fraction in [0.5, 0.9) of the lifetime, rounded
				// down to whole seconds.
				if got.RefreshIn < tc.life/2 || 10*got.RefreshIn >= 9*tc.life {
					t.Errorf("jitter %v: refresh_in %d is outside [50 %%, 90 %%) of %d", j, got.RefreshIn, tc.life)
				}
				if got.RefreshIn < prev {
					t.Errorf("jitter %v: refresh_in %d < %d for a smaller draw", j, got.RefreshIn, prev)
				}
				if !got.RefreshAt.Equal(e.clock.Now().Add(time.Duration(got.RefreshIn) * time.Second)) {
					t.Errorf("jitter %v: refresh_at %v does not match refresh_in %d", j, got.RefreshAt, got.RefreshIn)
				}
				prev = got.RefreshIn
				seen = append(seen, got.RefreshIn)
			}
			if lo, hi := slices.Min(seen), slices.Max(seen); lo != tc.life/2 || hi != (9*tc.life-1)/10 {
				t.Errorf("refresh_in spans [%d, %d], want [%d, %d]", lo, hi, tc.life/2, (9*tc.life-1)/10)
			}
		})
	}
}

func TestTokenSubSecondClock(t *testing.T) {
	e := newEnv(t, withJitter(0.5))
	created := e.createSession(t, `{"subject":"alice"}`)
	e.clock.Advance(10*time.Second + 500*time.Millisecond)
	got := decodeAs[tokenResponse](t, e.token(t, created.Cookie.Value))
	// exp = now + 10 min, rounded down to t0+610s; 599.5 s of life.
	if !got.ExpiresAt.Equal(t0.Add(610*time.Second)) || got.ExpiresIn != 599 {
		t.Errorf("expires_at %v, expires_in %d; want %v, 599", got.ExpiresAt, got.ExpiresIn, t0.Add(610*time.Second))
	}
	// 70 % of 599.5 s = 419.65 s, rounded down; refresh_at to the second.
	if got.RefreshIn != 419 || !got.RefreshAt.Equal(t0.Add(429*time.Second)) {
		t.Errorf("refresh_in %d, refresh_at %v; want 419, %v", got.RefreshIn, got.RefreshAt, t0.Add(429*time.Second))
	}
}

// TestTokenNeverOutlivesSession: exp is capped by the absolute expiry and
// the idle deadline, and refresh_in follows the shortened lifetime.
func TestTokenNeverOutlivesSession(t *testing.T) {
	tests := []struct {
		name            string
		body            string
		advance         time.Duration
		wantExpiresAt   time.Time
		wantExpiresIn   int64
		wantRefreshIn   int64
		wantSessionEnds time.Time
	}{
		{"far from the end", `{"subject":"a","ttl_seconds":3600}`, time.Minute,
			t0.Add(11 * time.Minute), 600, 420, t0.Add(time.Hour)},
		{"two minutes before the end", `{"subject":"a","ttl_seconds":3600}`, 58 * time.Minute,
			t0.Add(time.Hour), 120, 84, t0.Add(time.Hour)},
		{"exactly one token TTL before the end", `{"subject":"a","ttl_seconds":3600}`, 50 * time.Minute,
			t0.Add(time.Hour), 600, 420, t0.Add(time.Hour)},
		{"one second before the end", `{"subject":"a","ttl_seconds":3600}`, time.Hour - time.Second,
			t0.Add(time.Hour), 1, 0, t0.Add(time.Hour)},
		{"half a second before the end", `{"subject":"a","ttl_seconds":3600}`, time.Hour - 500*time.Millisecond,
			t0.Add(time.Hour), 0, 0, t0.Add(time.Hour)},
		{"idle deadline first", `{"subject":"a","ttl_seconds":3600,"idle_timeout_seconds":300}`, 0,
			t0.Add(5 * time.Minute), 300, 210, t0.Add(time.Hour)},
		{"session shorter than a token", `{"subject":"a","ttl_seconds":120}`, 0,
			t0.Add(2 * time.Minute), 120, 84, t0.Add(2 * time.Minute)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, withJitter(0.5))
			created := e.createSession(t, tc.body)
			e.clock.Advance(tc.advance)
			rec := e.token(t, created.Cookie.Value)
			wantStatus(t, rec, http.StatusOK)
			got := decodeAs[tokenResponse](t, rec)
			if !got.ExpiresAt.Equal(tc.wantExpiresAt) || got.ExpiresIn != tc.wantExpiresIn || got.RefreshIn != tc.wantRefreshIn {
				t.Errorf("expires_at %v expires_in %d refresh_in %d; want %v %d %d",
					got.ExpiresAt, got.ExpiresIn, got.RefreshIn, tc.wantExpiresAt, tc.wantExpiresIn, tc.wantRefreshIn)
			}
			if !got.SessionExpiresAt.Equal(tc.wantSessionEnds) {
				t.Errorf("session_expires_at = %v, want %v", got.SessionExpiresAt, tc.wantSessionEnds)
			}
			if got.ExpiresAt.After(tc.wantSessionEnds) {
				t.Errorf("the token outlives the session")
			}
			if tc.wantExpiresIn > 0 {
				if exp := e.verifyToken(t, got.AccessToken).Expiration(); !exp.Equal(got.ExpiresAt) {
					t.Errorf("exp claim %v, expires_at %v", exp, got.ExpiresAt)
				}
			}
		})
	}
}

func TestTokenIdleTimeoutMovesWithRefreshes(t *testing.T) {
	e := newEnv(t)
	created := e.createSession(t, `{"subject":"a","idle_timeout_seconds":120}`)
	for i := 0; i < 3; i++ { // 100 s apart: each refresh keeps the session alive
		e.clock.Advance(100 * time.Second)
		rec := e.token(t, created.Cookie.Value)
		wantStatus(t, rec, http.StatusOK)
		got := decodeAs[tokenResponse](t, rec)
		if want := e.clock.Now().Add(120 * time.Second); !got.ExpiresAt.Equal(want) {
			t.Errorf("refresh %d: expires_at %v, want the idle deadline %v", i, got.ExpiresAt, want)
		}
	}
	v := e.adminGet(t, created.SID)
	if !v.LastSeenAt.Equal(e.clock.Now()) || v.IdleExpiresAt == nil || !v.IdleExpiresAt.Equal(e.clock.Now().Add(120*time.Second)) {
		t.Errorf("last_seen_at %v idle_expires_at %v, want now and now+120s", v.LastSeenAt, v.IdleExpiresAt)
	}

	e.clock.Advance(120 * time.Second)
	rec := e.token(t, created.Cookie.Value)
	wantProblem(t, rec, http.StatusUnauthorized, "session_expired")
	wantCookieCleared(t, rec)
	if v := e.adminGet(t, created.SID); v.Status != session.StatusExpired {
		t.Errorf("status = %q, want expired", v.Status)
	}
}

func TestTokenRefused(t *testing.T) {
	tests := []struct {
		name string
		// setup returns the cookie header value to send ("" sends none)
		setup       func(t *testing.T, e *env, c createSessionResponse) string
		code        string
		clearCookie bool
	}{
		{"no cookie", func(*testing.T, *env, createSessionResponse) string { return "" }, "session_invalid", false},
		{"other cookies only", func(*testing.T, *env, createSessionResponse) string { return "theme=dark; lang=en" }, "session_invalid", false},
		{"empty cookie value", func(*testing.T, *env, createSessionResponse) string { return cookieName + "=" }, "session_invalid", false},
		{"garbage", func(*testing.T, *env, createSessionResponse) string { return cookieName + "=garbage" }, "session_invalid", true},
		{"no dot", func(_ *testing.T, _ *env, c createSessionResponse) string {
			return cookieName + "=" + strings.Replace(c.Cookie.Value, ".", "A", 1)
		}, "session_invalid", true},
		{"dot misplaced", func(_ *testing.T, _ *env, c createSessionResponse) string {
			v := c.Cookie.Value
			return cookieName + "=" + v[:21] + "." + v[21:22] + v[23:]
		}, "session_invalid", true},
		{"too short", func(_ *testing.T, _ *env, c createSessionResponse) string {
			return cookieName + "=" + c.Cookie.Value[:len(c.Cookie.Value)-1]
		}, "session_invalid", true},
		{"too long", func(_ *testing.T, _ *env, c createSessionResponse) string {
			return cookieName + "=" + c.Cookie.Value + "A"
		}, "session_invalid", true},
		{"non-base64url character", func(_ *testing.T, _ *env, c createSessionResponse) string {
			v := c.Cookie.Value
			return cookieName + "=" + v[:30] + "!" + v[31:]
		}, "session_invalid", true},
		{"padded base64", func(_ *testing.T, _ *env, c createSessionResponse) string {
			v := c.Cookie.Value
			return cookieName + "=" + v[:len(v)-1] + "="
		}, "session_invalid", true},
		{"wrong secret", func(_ *testing.T, _ *env, c createSessionResponse) string {
			return cookieName + "=" + c.SID + "." + strings.Repeat("A", 43)
		}, "session_invalid", true},
		{"unknown session", func(_ *testing.T, _ *env, c createSessionResponse) string {
			return cookieName + "=" + strings.Repeat("B", 22) + c.Cookie.Value[22:]
		}, "session_invalid", true},
		{"revoked by an admin", func(t *testing.T, e *env, c createSessionResponse) string {
			wantStatus(t, e.do(t, "DELETE", "/v1/admin/sessions/"+c.SID, "", bearer(testAdminKey)...), http.StatusOK)
			return cookieName + "=" + c.Cookie.Value
		}, "session_revoked", true},
		{"revoked with its subject", func(t *testing.T, e *env, c createSessionResponse) string {
			wantStatus(t, e.do(t, "POST", "/v1/admin/subjects/alice/revoke", "", bearer(testAdminKey)...), http.StatusOK)
			return cookieName + "=" + c.Cookie.Value
		}, "session_revoked", true},
		{"expired", func(_ *testing.T, e *env, c createSessionResponse) string {
			e.clock.Advance(time.Hour + time.Second)
			return cookieName + "=" + c.Cookie.Value
		}, "session_expired", true},
		{"expired exactly now", func(_ *testing.T, e *env, c createSessionResponse) string {
			e.clock.Advance(time.Hour)
			return cookieName + "=" + c.Cookie.Value
		}, "session_expired", true},
		{"idle for too long", func(t *testing.T, e *env, _ createSessionResponse) string {
			idle := e.createSession(t, `{"subject":"alice","idle_timeout_seconds":600}`)
			e.clock.Advance(10*time.Minute + time.Second)
			return cookieName + "=" + idle.Cookie.Value
		}, "session_expired", true},
		{"idle exactly the timeout", func(t *testing.T, e *env, _ createSessionResponse) string {
			idle := e.createSession(t, `{"subject":"alice","idle_timeout_seconds":600}`)
			e.clock.Advance(10 * time.Minute)
			return cookieName + "=" + idle.Cookie.Value
		}, "session_expired", true},
		{"revoked after it expired", func(t *testing.T, e *env, c createSessionResponse) string {
			e.clock.Advance(2 * time.Hour)
			wantStatus(t, e.do(t, "DELETE", "/v1/admin/sessions/"+c.SID, "", bearer(testAdminKey)...), http.StatusOK)
			return cookieName + "=" + c.Cookie.Value
		}, "session_revoked", true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			created := e.createSession(t, `{"subject":"alice","ttl_seconds":3600}`)
			cookie := tc.setup(t, e, created)
			var hdr []string
			if cookie != "" {
				hdr = []string{"Cookie", cookie}
			}
			rec := e.do(t, "POST", "/v1/token", "", hdr...)
			p := wantProblem(t, rec, http.StatusUnauthorized, tc.code)
			if p.Instance != "/v1/token" {
				t.Errorf("instance = %q", p.Instance)
			}
			if tc.clearCookie {
				wantCookieCleared(t, rec)
			} else {
				wantNoCookie(t, rec)
			}
			if strings.Contains(rec.Body.String(), created.Cookie.Value[23:]) {
				t.Errorf("the problem echoes the secret")
			}
			if n := e.minter.n.Load(); n != 0 {
				t.Errorf("%d tokens minted for a refused refresh", n)
			}
		})
	}
}

// --- Origins and CORS ------------------------------------------------------

func TestTokenOrigins(t *testing.T) {
	tests := []struct {
		name      string
		headers   []string
		allowed   bool
		wantACAO  string
		wantCheck string // detail fragment for refusals
	}{
		{"no Origin", nil, true, "", ""},
		{"allowed origin", []string{"Origin", appOrigin}, true, appOrigin, ""},
		{"second allowed origin", []string{"Origin", "https://other.example.com"}, true, "https://other.example.com", ""},
		{"same origin", []string{"Origin", "http://" + testHost}, true, "http://" + testHost, ""},
		{"same host over https", []string{"Origin", "https://" + testHost}, true, "https://" + testHost, ""},
		{"same host, upper case", []string{"Origin", "https://TOKEND.test"}, true, "https://TOKEND.test", ""},
		{"Sec-Fetch-Site same-origin", []string{"Sec-Fetch-Site", "same-origin"}, true, "", ""},
		{"Sec-Fetch-Site same-site", []string{"Sec-Fetch-Site", "same-site"}, true, "", ""},
		{"Sec-Fetch-Site none", []string{"Sec-Fetch-Site", "none"}, true, "", ""},
		{"cross-site with an allowed Origin", []string{"Origin", appOrigin, "Sec-Fetch-Site", "cross-site"}, true, appOrigin, ""},
		{"disallowed origin", []string{"Origin", "https://evil.example"}, false, "", "not allowed"},
		{"null origin", []string{"Origin", "null"}, false, "", "not allowed"},
		{"allowed origin with a path", []string{"Origin", appOrigin + "/"}, false, "", "not allowed"},
		{"allowed origin over http", []string{"Origin", "http://app.example.com"}, false, "", "not allowed"},
		{"allowed origin on another port", []string{"Origin", appOrigin + ":8443"}, false, "", "not allowed"},
		{"subdomain of an allowed origin", []string{"Origin", "https://evil.app.example.com"}, false, "", "not allowed"},
		{"same host with a path", []string{"Origin", "http://" + testHost + "/x"}, false, "", "not allowed"},
		{"same host on another port", []string{"Origin", "http://" + testHost + ":8080"}, false, "", "not allowed"},
		{"same host, other scheme", []string{"Origin", "ftp://" + testHost}, false, "", "not allowed"},
		{"cross-site without Origin", []string{"Sec-Fetch-Site", "cross-site"}, false, "", "Cross-site"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			created := e.createSession(t, `{"subject":"alice"}`)
			rec := e.token(t, created.Cookie.Value, tc.headers...)
			wantHeader(t, rec, "Vary", "Origin")
			if !tc.allowed {
				p := wantProblem(t, rec, http.StatusForbidden, "origin_not_allowed")
				if !strings.Contains(p.Detail, tc.wantCheck) {
					t.Errorf("detail = %q, want it to mention %q", p.Detail, tc.wantCheck)
				}
				wantNoHeader(t, rec, "Access-Control-Allow-Origin")
				wantNoHeader(t, rec, "Access-Control-Allow-Credentials")
				wantNoCookie(t, rec)
				if n := e.minter.n.Load(); n != 0 {
					t.Errorf("%d tokens minted for a refused origin", n)
				}
				// The session is untouched and still works from a good origin.
				wantStatus(t, e.token(t, created.Cookie.Value, "Origin", appOrigin), http.StatusOK)
				return
			}
			wantStatus(t, rec, http.StatusOK)
			if tc.wantACAO == "" {
				wantNoHeader(t, rec, "Access-Control-Allow-Origin")
				wantNoHeader(t, rec, "Access-Control-Allow-Credentials")
				return
			}
			wantHeader(t, rec, "Access-Control-Allow-Origin", tc.wantACAO)
			wantHeader(t, rec, "Access-Control-Allow-Credentials", "true")
			wantHeader(t, rec, "Access-Control-Expose-Headers", "Retry-After, RateLimit, RateLimit-Policy, X-Request-Id")
		})
	}
}

func TestOriginCheckedBeforeCookie(t *testing.T) {
	e := newEnv(t)
	for _, target := range []string{"/v1/token", "/v1/session"} {
		method := map[string]string{"/v1/token": "POST", "/v1/session": "DELETE"}[target]
		rec := e.do(t, method, target, "", "Origin", "https://evil.example")
		wantProblem(t, rec, http.StatusForbidden, "origin_not_allowed")
	}
	// An allowed origin can read the refusal of a missing cookie.
	rec := e.do(t, "POST", "/v1/token", "", "Origin", appOrigin)
	wantProblem(t, rec, http.StatusUnauthorized, "session_invalid")
	wantHeader(t, rec, "Access-Control-Allow-Origin", appOrigin)
	wantHeader(t, rec, "Access-Control-Allow-Credentials", "true")
}

func TestPreflight(t *testing.T) {
	for _, ep := range []struct{ path, method string }{{"/v1/token", "POST"}, {"/v1/session", "DELETE"}} {
		t.Run(ep.path, func(t *testing.T) {
			e := newEnv(t)
			preflight := []string{"Origin", appOrigin, "Access-Control-Request-Method", ep.method,
				"Access-Control-Request-Headers", "content-type"}

			rec := e.do(t, "OPTIONS", ep.path, "", preflight...)
			wantStatus(t, rec, http.StatusNoContent)
			wantHeader(t, rec, "Access-Control-Allow-Origin", appOrigin)
			wantHeader(t, rec, "Access-Control-Allow-Credentials", "true")
			wantHeader(t, rec, "Access-Control-Allow-Methods", ep.method)
			wantHeader(t, rec, "Access-Control-Allow-Headers", "Content-Type")
			wantHeader(t, rec, "Access-Control-Max-Age", "600")
			wantHeader(t, rec, "Allow", ep.method+", OPTIONS")
			if vary := rec.Header().Values("Vary"); !slices.Equal(vary, []string{"Origin", "Access-Control-Request-Method", "Access-Control-Request-Headers"}) {
				t.Errorf("Vary = %q", vary)
			}
			if rec.Body.Len() != 0 {
				t.Errorf("preflight body: %q", rec.Body)
			}

			// From tokend's own origin.
			rec = e.do(t, "OPTIONS", ep.path, "", "Origin", "https://"+testHost, "Access-Control-Request-Method", ep.method)
			wantStatus(t, rec, http.StatusNoContent)
			wantHeader(t, rec, "Access-Control-Allow-Origin", "https://"+testHost)

			// Without Origin: not a CORS preflight, just the methods.
			rec = e.do(t, "OPTIONS", ep.path, "")
			wantStatus(t, rec, http.StatusNoContent)
			wantHeader(t, rec, "Allow", ep.method+", OPTIONS")
			wantNoHeader(t, rec, "Access-Control-Allow-Methods")
			wantNoHeader(t, rec, "Access-Control-Allow-Origin")

			// Origin without Access-Control-Request-Method: no preflight headers.
			rec = e.do(t, "OPTIONS", ep.path, "", "Origin", appOrigin)
			wantStatus(t, rec, http.StatusNoContent)
			wantNoHeader(t, rec, "Access-Control-Allow-Methods")
			wantNoHeader(t, rec, "Access-Control-Max-Age")

			// A refused origin learns nothing.
			rec = e.do(t, "OPTIONS", ep.path, "", "Origin", "https://evil.example", "Access-Control-Request-Method", ep.method)
			wantProblem(t, rec, http.StatusForbidden, "origin_not_allowed")
			wantNoHeader(t, rec, "Access-Control-Allow-Origin")
			wantNoHeader(t, rec, "Access-Control-Allow-Methods")

			// Sec-Fetch-Site: cross-site without an Origin.
			rec = e.do(t, "OPTIONS", ep.path, "", "Sec-Fetch-Site", "cross-site")
			wantProblem(t, rec, http.StatusForbidden, "origin_not_allowed")
		})
	}
}

func TestPreflightMaxAge(t *testing.T) {
	e := newEnv(t, withConfig(func(c *Config) { c.PreflightMaxAge = 90 * time.Second }))
	rec := e.do(t, "OPTIONS", "/v1/token", "", "Origin", appOrigin, "Access-Control-Request-Method", "POST")
	wantHeader(t, rec, "Access-Control-Max-Age", "90")
}

// --- Logout ----------------------------------------------------------------

func TestLogout(t *testing.T) {
	e := newEnv(t)
	created := e.createSession(t, `{"subject":"alice"}`)
	wantStatus(t, e.token(t, created.Cookie.Value), http.StatusOK)

	e.clock.Advance(time.Minute)
	rec := e.do(t, "DELETE", "/v1/session", "", withCookie(created.Cookie.Value, "Origin", appOrigin)...)
	wantStatus(t, rec, http.StatusNoContent)
	wantHeader(t, rec, "Cache-Control", "no-store")
	wantHeader(t, rec, "Access-Control-Allow-Origin", appOrigin)
	wantCookieCleared(t, rec)
	if rec.Body.Len() != 0 {
		t.Errorf("204 with a body: %q", rec.Body)
	}

	rec = e.token(t, created.Cookie.Value)
	wantProblem(t, rec, http.StatusUnauthorized, "session_revoked")
	wantCookieCleared(t, rec)

	v := e.adminGet(t, created.SID)
	if v.Status != session.StatusRevoked || v.RevokeReason != "logout" || v.RevokedAt == nil || !v.RevokedAt.Equal(t0.Add(time.Minute)) {
		t.Errorf("after logout: status %q reason %q revoked_at %v", v.Status, v.RevokeReason, v.RevokedAt)
	}

	// Logging out again succeeds and changes nothing.
	e.clock.Advance(time.Minute)
	wantStatus(t, e.do(t, "DELETE", "/v1/session", "", withCookie(created.Cookie.Value)...), http.StatusNoContent)
	if again := e.adminGet(t, created.SID); !again.RevokedAt.Equal(*v.RevokedAt) || again.RevokeReason != "logout" {
		t.Errorf("second logout changed the revocation: %+v", again)
	}
}

func TestLogoutOfExpiredSession(t *testing.T) {
	e := newEnv(t)
	created := e.createSession(t, `{"subject":"alice","ttl_seconds":60}`)
	e.clock.Advance(2 * time.Minute)
	rec := e.do(t, "DELETE", "/v1/session", "", withCookie(created.Cookie.Value)...)
	wantStatus(t, rec, http.StatusNoContent)
	wantCookieCleared(t, rec)
	if v := e.adminGet(t, created.SID); v.Status != session.StatusRevoked {
		t.Errorf("status = %q, want revoked", v.Status)
	}
}

func TestLogoutRefused(t *testing.T) {
	tests := []struct {
		name        string
		headers     func(c createSessionResponse) []string
		status      int
		code        string
		clearCookie bool
	}{
		{"no cookie", func(createSessionResponse) []string { return nil }, 401, "session_invalid", false},
		{"empty cookie", func(createSessionResponse) []string { return withCookie("") }, 401, "session_invalid", false},
		{"garbage cookie", func(createSessionResponse) []string { return withCookie("garbage") }, 401, "session_invalid", true},
		{"wrong secret", func(c createSessionResponse) []string { return withCookie(c.SID + "." + strings.Repeat("Z", 43)) }, 401, "session_invalid", true},
		{"disallowed origin", func(c createSessionResponse) []string {
			return withCookie(c.Cookie.Value, "Origin", "https://evil.example")
		}, 403, "origin_not_allowed", false},
		{"cross-site without Origin", func(c createSessionResponse) []string {
			return withCookie(c.Cookie.Value, "Sec-Fetch-Site", "cross-site")
		}, 403, "origin_not_allowed", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			created := e.createSession(t, `{"subject":"alice"}`)
			rec := e.do(t, "DELETE", "/v1/session", "", tc.headers(created)...)
			wantProblem(t, rec, tc.status, tc.code)
			if tc.clearCookie {
				wantCookieCleared(t, rec)
			} else {
				wantNoCookie(t, rec)
			}
			// The real session is still alive.
			if v := e.adminGet(t, created.SID); v.Status != session.StatusActive {
				t.Errorf("status = %q after a refused logout", v.Status)
			}
		})
	}
}

// --- Admin -----------------------------------------------------------------

func TestAdminListSessions(t *testing.T) {
	e := newEnv(t)
	short := e.createSession(t, `{"subject":"alice","ttl_seconds":60}`)
	e.clock.Advance(time.Second)
	idle := e.createSession(t, `{"subject":"alice","idle_timeout_seconds":300,"claims":{"role":"editor"}}`)
	e.clock.Advance(time.Second)
	revoked := e.createSession(t, `{"subject":"alice"}`)
	e.createSession(t, `{"subject":"bob"}`)
	wantStatus(t, e.do(t, "DELETE", "/v1/admin/sessions/"+revoked.SID+"?reason=stolen", "", bearer(testAdminKey)...), http.StatusOK)
	e.clock.Advance(time.Minute) // short has expired by now

	type list struct {
		Subject  string        `json:"subject"`
		Sessions []sessionView `json:"sessions"`
	}
	rec := e.do(t, "GET", "/v1/admin/sessions?subject=alice", "", bearer(testAdminKey)...)
	wantStatus(t, rec, http.StatusOK)
	got := decodeAs[list](t, rec)
	if got.Subject != "alice" || len(got.Sessions) != 3 {
		t.Fatalf("list = %+v, want alice's 3 sessions", got)
	}
	var sids []string
	for _, s := range got.Sessions {
		sids = append(sids, s.SID)
	}
	if want := []string{revoked.SID, idle.SID, short.SID}; !slices.Equal(sids, want) {
		t.Errorf("sids = %v, want newest first %v", sids, want)
	}

	r, i, s := got.Sessions[0], got.Sessions[1], got.Sessions[2]
	if r.Status != session.StatusRevoked || r.RevokeReason != "stolen" || r.RevokedAt == nil || !r.RevokedAt.Equal(t0.Add(2*time.Second)) {
		t.Errorf("revoked session = %+v", r)
	}
	if i.Status != session.StatusActive || i.IdleTimeoutSeconds != 300 || i.IdleExpiresAt == nil ||
		!i.IdleExpiresAt.Equal(t0.Add(time.Second+300*time.Second)) || string(i.Claims) != `{"role":"editor"}` ||
		!i.LastSeenAt.Equal(t0.Add(time.Second)) || i.RevokedAt != nil {
		t.Errorf("idle session = %+v", i)
	}
	if s.Status != session.StatusExpired || !s.ExpiresAt.Equal(t0.Add(time.Minute)) || !s.CookieExpiresAt.Equal(t0.Add(time.Minute)) ||
		!s.CreatedAt.Equal(t0) || s.IdleExpiresAt != nil || s.Claims != nil {
		t.Errorf("expired session = %+v", s)
	}

	// limit keeps the newest.
	got = decodeAs[list](t, e.do(t, "GET", "/v1/admin/sessions?subject=alice&limit=2", "", bearer(testAdminKey)...))
	if len(got.Sessions) != 2 || got.Sessions[0].SID != revoked.SID {
		t.Errorf("limit=2: %+v", got.Sessions)
	}
	// 0 means the default.
	got = decodeAs[list](t, e.do(t, "GET", "/v1/admin/sessions?subject=alice&limit=0", "", bearer(testAdminKey)...))
	if len(got.Sessions) != 3 {
		t.Errorf("limit=0 returned %d sessions, want all 3", len(got.Sessions))
	}
	got = decodeAs[list](t, e.do(t, "GET", "/v1/admin/sessions?subject=alice&limit=1000", "", bearer(testAdminKey)...))
	if len(got.Sessions) != 3 {
		t.Errorf("limit=1000 returned %d sessions, want all 3", len(got.Sessions))
	}

	// Nobody's sessions: an empty array, not null.
	rec = e.do(t, "GET", "/v1/admin/sessions?subject=nobody", "", bearer(testAdminKey)...)
	wantStatus(t, rec, http.StatusOK)
	if strings.TrimSpace(rec.Body.String()) != `{"subject":"nobody","sessions":[]}` {
		t.Errorf("body = %s", rec.Body)
	}

	// Subjects are matched exactly, escaping included.
	e.createSession(t, `{"subject":"org/alice & co"}`)
	got = decodeAs[list](t, e.do(t, "GET", "/v1/admin/sessions?subject="+url.QueryEscape("org/alice & co"), "", bearer(testAdminKey)...))
	if got.Subject != "org/alice & co" || len(got.Sessions) != 1 {
		t.Errorf("escaped subject: %+v", got)
	}
}

func TestAdminListSessionsRejectsBadQueries(t *testing.T) {
	tests := []struct {
		name   string
		query  string
		fields []string
	}{
		{"no subject", "", []string{"subject"}},
		{"empty subject", "?subject=", []string{"subject"}},
		{"subject too long", "?subject=" + strings.Repeat("s", 257), []string{"subject"}},
		{"subject with control character", "?subject=a%00b", []string{"subject"}},
		{"limit not a number", "?subject=alice&limit=ten", []string{"limit"}},
		{"limit fractional", "?subject=alice&limit=1.5", []string{"limit"}},
		{"limit too large", "?subject=alice&limit=1001", []string{"limit"}},
		{"limit negative", "?subject=alice&limit=-1", []string{"limit"}},
		{"limit overflows", "?subject=alice&limit=99999999999999999999", []string{"limit"}},
		{"both", "?limit=x", []string{"subject", "limit"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			e.createSession(t, `{"subject":"alice"}`)
			rec := e.do(t, "GET", "/v1/admin/sessions"+tc.query, "", bearer(testAdminKey)...)
			p := wantProblem(t, rec, http.StatusBadRequest, "invalid_request")
			if !slices.Equal(p.fields(), tc.fields) {
				t.Errorf("fields = %v, want %v", p.fields(), tc.fields)
			}
		})
	}
}

func TestAdminGetSession(t *testing.T) {
	e := newEnv(t)
	created := e.createSession(t, `{"subject":"alice","claims":{"role":"editor"}}`)
	e.clock.Advance(2 * time.Minute)
	wantStatus(t, e.token(t, created.Cookie.Value), http.StatusOK) // recorded: older than the touch interval

	rec := e.do(t, "GET", "/v1/admin/sessions/"+created.SID, "", bearer(testAdminKey)...)
	wantStatus(t, rec, http.StatusOK)
	v := decodeAs[sessionView](t, rec)
	if v.SID != created.SID || v.Subject != "alice" || v.Status != session.StatusActive ||
		!v.CreatedAt.Equal(t0) || !v.ExpiresAt.Equal(t0.Add(defaultTTL)) || !v.LastSeenAt.Equal(t0.Add(2*time.Minute)) ||
		string(v.Claims) != `{"role":"editor"}` || v.RevokedAt != nil || v.RevokeReason != "" {
		t.Errorf("session = %+v", v)
	}
	for _, secret := range []string{created.Cookie.Value[23:], "secret", "hash"} {
		if strings.Contains(rec.Body.String(), secret) {
			t.Errorf("the admin view contains %q: %s", secret, rec.Body)
		}
	}
}

func TestAdminGetSessionRefused(t *testing.T) {
	tests := []struct {
		name   string
		sid    string
		status int
		code   string
	}{
		{"not an id", "abc", 400, "invalid_request"},
		{"one character short", strings.Repeat("A", 21), 400, "invalid_request"},
		{"one character long", strings.Repeat("A", 23), 400, "invalid_request"},
		{"not base64url", strings.Repeat("A", 21) + "~", 400, "invalid_request"},
		{"cookie value instead of sid", "", 400, "invalid_request"},
		{"unknown id", strings.Repeat("A", 22), 404, "not_found"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			created := e.createSession(t, `{"subject":"alice"}`)
			sid := tc.sid
			if sid == "" {
				sid = created.Cookie.Value
			}
			p := wantProblem(t, e.do(t, "GET", "/v1/admin/sessions/"+sid, "", bearer(testAdminKey)...), tc.status, tc.code)
			if tc.status == 400 && !slices.Equal(p.fields(), []string{"sid"}) {
				t.Errorf("fields = %v, want [sid]", p.fields())
			}
			if tc.status == 404 && p.Detail != "No session has this id." {
				t.Errorf("detail = %q", p.Detail)
			}
		})
	}
}

func TestAdminRevokeSession(t *testing.T) {
	e := newEnv(t)
	created := e.createSession(t, `{"subject":"alice"}`)
	e.clock.Advance(time.Minute)

	rec := e.do(t, "DELETE", "/v1/admin/sessions/"+created.SID+"?reason=stolen+laptop", "", bearer(testAdminKey)...)
	wantStatus(t, rec, http.StatusOK)
	v := decodeAs[sessionView](t, rec)
	if v.Status != session.StatusRevoked || v.RevokeReason != "stolen laptop" || v.RevokedAt == nil || !v.RevokedAt.Equal(t0.Add(time.Minute)) {
		t.Errorf("revoked = %+v", v)
	}
	wantProblem(t, e.token(t, created.Cookie.Value), http.StatusUnauthorized, "session_revoked")

	// Idempotent: a second revocation keeps the first time and reason.
	e.clock.Advance(time.Minute)
	again := decodeAs[sessionView](t, e.do(t, "DELETE", "/v1/admin/sessions/"+created.SID+"?reason=other", "", bearer(testAdminKey)...))
	if !again.RevokedAt.Equal(*v.RevokedAt) || again.RevokeReason != "stolen laptop" || again.Status != session.StatusRevoked {
		t.Errorf("second revocation = %+v, want the first unchanged", again)
	}

	// Without a reason: "admin".
	other := e.createSession(t, `{"subject":"alice"}`)
	got := decodeAs[sessionView](t, e.do(t, "DELETE", "/v1/admin/sessions/"+other.SID, "", bearer(testAdminKey)...))
	if got.RevokeReason != "admin" {
		t.Errorf("default reason = %q, want admin", got.RevokeReason)
	}

	// A reason of exactly 256 bytes is fine.
	third := e.createSession(t, `{"subject":"alice"}`)
	wantStatus(t, e.do(t, "DELETE", "/v1/admin/sessions/"+third.SID+"?reason="+strings.Repeat("r", 256), "", bearer(testAdminKey)...), http.StatusOK)
}

func TestAdminRevokeSessionRefused(t *testing.T) {
	tests := []struct {
		name   string
		target func(sid string) string
		status int
		code   string
		fields []string
	}{
		{"reason too long", func(sid string) string { return sid + "?reason=" + strings.Repeat("r", 257) }, 400, "invalid_request", []string{"reason"}},
		{"reason with control character", func(sid string) string { return sid + "?reason=a%07b" }, 400, "invalid_request", []string{"reason"}},
		{"reason invalid UTF-8", func(sid string) string { return sid + "?reason=%ff" }, 400, "invalid_request", []string{"reason"}},
		{"not an id", func(string) string { return "nope" }, 400, "invalid_request", []string{"sid"}},
		{"not an id and bad reason", func(string) string { return "nope?reason=" + strings.Repeat("r", 300) }, 400, "invalid_request", []string{"sid", "reason"}},
		{"unknown id", func(string) string { return strings.Repeat("Z", 22) }, 404, "not_found", nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			created := e.createSession(t, `{"subject":"alice"}`)
			rec := e.do(t, "DELETE", "/v1/admin/sessions/"+tc.target(created.SID), "", bearer(testAdminKey)...)
			p := wantProblem(t, rec, tc.status, tc.code)
			if !slices.Equal(p.fields(), tc.fields) {
				t.Errorf("fields = %v, want %v", p.fields(), tc.fields)
			}
			if v := e.adminGet(t, created.SID); v.Status != session.StatusActive {
				t.Errorf("the session was revoked by a refused request")
			}
		})
	}
}

func TestAdminRevokeSubject(t *testing.T) {
	e := newEnv(t)
	a1 := e.createSession(t, `{"subject":"alice"}`)
	a2 := e.createSession(t, `{"subject":"alice","idle_timeout_seconds":300}`)
	gone := e.createSession(t, `{"subject":"alice"}`)
	expired := e.createSession(t, `{"subject":"alice","ttl_seconds":60}`)
	idle := e.createSession(t, `{"subject":"alice","idle_timeout_seconds":60}`)
	bob := e.createSession(t, `{"subject":"bob"}`)
	wantStatus(t, e.do(t, "DELETE", "/v1/admin/sessions/"+gone.SID+"?reason=earlier", "", bearer(testAdminKey)...), http.StatusOK)
	e.clock.Advance(2 * time.Minute) // expired is past its end, idle past its idle deadline; a2 is alive

	type result struct {
		Subject string   `json:"subject"`
		Revoked int      `json:"revoked"`
		SIDs    []string `json:"sids"`
	}
	rec := e.do(t, "POST", "/v1/admin/subjects/alice/revoke", `{"reason":"offboarded"}`, jsonBody(bearer(testAdminKey)...)...)
	wantStatus(t, rec, http.StatusOK)
	got := decodeAs[result](t, rec)
	want := []string{a1.SID, a2.SID}
	slices.Sort(want)
	if got.Subject != "alice" || got.Revoked != 2 || !slices.Equal(got.SIDs, want) {
		t.Errorf("result = %+v, want alice, 2, %v", got, want)
	}
	for sid, reason := range map[string]string{a1.SID: "offboarded", a2.SID: "offboarded", gone.SID: "earlier"} {
		if v := e.adminGet(t, sid); v.Status != session.StatusRevoked || v.RevokeReason != reason {
			t.Errorf("session %s: status %q reason %q, want revoked %q", sid, v.Status, v.RevokeReason, reason)
		}
	}
	for _, ended := range []string{expired.SID, idle.SID} {
		if v := e.adminGet(t, ended); v.Status != session.StatusExpired || v.RevokedAt != nil {
			t.Errorf("the ended session %s became %q (revoked_at %v)", ended, v.Status, v.RevokedAt)
		}
	}
	wantStatus(t, e.token(t, bob.Cookie.Value), http.StatusOK)
	wantProblem(t, e.token(t, a1.Cookie.Value), http.StatusUnauthorized, "session_revoked")

	// Again: nothing left to revoke; sids is an empty array.
	rec = e.do(t, "POST", "/v1/admin/subjects/alice/revoke", "", bearer(testAdminKey)...)
	wantStatus(t, rec, http.StatusOK)
	if strings.TrimSpace(rec.Body.String()) != `{"subject":"alice","revoked":0,"sids":[]}` {
		t.Errorf("body = %s", rec.Body)
	}
}

func TestAdminRevokeSubjectEscaping(t *testing.T) {
	tests := []struct {
		name    string
		subject string
		path    string
	}{
		{"escaped slash", "org/alice", "org%2Falice"},
		{"escaped slash, lower case hex", "org/alice", "org%2falice"},
		{"space", "alice smith", "alice%20smith"},
		{"percent sign", "100%", "100%25"},
		{"unicode", "zoë", "zo%C3%AB"},
		{"unicode unescaped", "zoë", "zoë"},
		{"plus stays a plus", "a+b", "a+b"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			created := e.createSession(t, fmt.Sprintf(`{"subject":%q}`, tc.subject))
			e.createSession(t, `{"subject":"org"}`)
			rec := e.do(t, "POST", "/v1/admin/subjects/"+tc.path+"/revoke", "", bearer(testAdminKey)...)
			wantStatus(t, rec, http.StatusOK)
			var got struct {
				Subject string   `json:"subject"`
				SIDs    []string `json:"sids"`
			}
			if err := json.Unmarshal(rec.Body.Bytes(), &got); err != nil {
				t.Fatal(err)
			}
			if got.Subject != tc.subject || !slices.Equal(got.SIDs, []string{created.SID}) {
				t.Errorf("revoked %+v, want subject %q and %s", got, tc.subject, created.SID)
			}
			if v := e.adminGet(t, created.SID); v.RevokeReason != "admin" {
				t.Errorf("reason = %q, want the default admin", v.RevokeReason)
			}
		})
	}
}

func TestAdminRevokeSubjectRefused(t *testing.T) {
	tests := []struct {
		name, path, contentType, body string
		status                        int
		code                          string
		fields                        []string
	}{
		{"unknown field", "alice", "application/json", `{"why":"x"}`, 400, "invalid_request", []string{"why"}},
		{"reason not a string", "alice", "application/json", `{"reason":1}`, 400, "invalid_request", []string{"reason"}},
		{"reason too long", "alice", "application/json", `{"reason":"` + strings.Repeat("r", 257) + `"}`, 400, "invalid_request", []string{"reason"}},
		{"reason with control character", "alice", "application/json", `{"reason":"a\u0000"}`, 400, "invalid_request", []string{"reason"}},
		{"array body", "alice", "application/json", `[]`, 400, "invalid_request", nil},
		{"trailing data", "alice", "application/json", `{} {}`, 400, "invalid_request", nil},
		{"truncated", "alice", "application/json", `{"reason":"x`, 400, "invalid_request", nil},
		{"wrong content type", "alice", "text/plain", `{"reason":"x"}`, 415, "unsupported_media_type", nil},
		{"oversized", "alice", "application/json", `{"reason":"` + strings.Repeat("r", maxBodyBytes) + `"}`, 413, "request_too_large", nil},
		{"subject too long", strings.Repeat("s", 257), "", "", 400, "invalid_request", []string{"subject"}},
		{"subject with control character", "a%01b", "", "", 400, "invalid_request", []string{"subject"}},
		{"subject and reason", "a%01b", "application/json", `{"reason":"` + strings.Repeat("r", 257) + `"}`, 400, "invalid_request", []string{"subject", "reason"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			created := e.createSession(t, `{"subject":"alice"}`)
			hdr := bearer(testAdminKey)
			if tc.contentType != "" {
				hdr = append(hdr, "Content-Type", tc.contentType)
			}
			rec := e.do(t, "POST", "/v1/admin/subjects/"+tc.path+"/revoke", tc.body, hdr...)
			p := wantProblem(t, rec, tc.status, tc.code)
			if !slices.Equal(p.fields(), tc.fields) {
				t.Errorf("fields = %v, want %v", p.fields(), tc.fields)
			}
			if v := e.adminGet(t, created.SID); v.Status != session.StatusActive {
				t.Errorf("a refused request revoked the session")
			}
		})
	}
}

func TestAdminRequiresAdminKey(t *testing.T) {
	sid := strings.Repeat("A", 22)
	endpoints := []struct{ method, target, body string }{
		{"GET", "/v1/admin/sessions?subject=alice", ""},
		{"GET", "/v1/admin/sessions/" + sid, ""},
		{"DELETE", "/v1/admin/sessions/" + sid, ""},
		{"POST", "/v1/admin/subjects/alice/revoke", `{"reason":"x"}`},
		{"GET", "/v1/admin/keys", ""},
		{"POST", "/v1/admin/keys/rotate", ""},
	}
	credentials := []struct {
		name    string
		headers []string
	}{
		{"none", nil},
		{"service key", bearer(testServiceKey)},
		{"wrong key", bearer("adm-key-0123456789abcdeX")},
		{"basic scheme", []string{"Authorization", "Basic " + testAdminKey}},
		{"bearer without key", []string{"Authorization", "Bearer "}},
		{"session cookie", withCookie(sid + "." + strings.Repeat("A", 43))},
	}
	for _, ep := range endpoints {
		for _, cred := range credentials {
			t.Run(ep.method+" "+ep.target+"/"+cred.name, func(t *testing.T) {
				e := newEnv(t, withKeyAdmin(func(_ *issuer.Issuer, key issuer.Key, _ func() time.Time) KeyAdmin {
					return issuer.FixedKey{Key: key}
				}))
				created := e.createSession(t, `{"subject":"alice"}`)
				rec := e.do(t, ep.method, ep.target, ep.body, jsonBody(cred.headers...)...)
				wantProblem(t, rec, http.StatusUnauthorized, "unauthorized")
				wantHeader(t, rec, "WWW-Authenticate", `Bearer realm="tokend"`)
				if v := e.adminGet(t, created.SID); v.Status != session.StatusActive {
					t.Errorf("an unauthorized request revoked a session")
				}
			})
		}
	}
}

// --- Routing ---------------------------------------------------------------

func TestNotFound(t *testing.T) {
	e := newEnv(t)
	for _, target := range []string{"/", "/nope", "/v1", "/v1/tokens", "/healthz/", "/v1/admin/sessions/a/b",
		"/v1/admin/subjects/org/alice/revoke", "/.well-known/openid-configuration"} {
		t.Run(target, func(t *testing.T) {
			p := wantProblem(t, e.do(t, "GET", target, "", bearer(testAdminKey)...), http.StatusNotFound, "not_found")
			if p.Instance != target || p.Detail != "No such endpoint." {
				t.Errorf("instance %q detail %q", p.Instance, p.Detail)
			}
		})
	}
}

func TestMethodNotAllowed(t *testing.T) {
	tests := []struct {
		method, target, allow string
	}{
		{"GET", "/v1/token", "POST, OPTIONS"},
		{"PUT", "/v1/token", "POST, OPTIONS"},
		{"GET", "/v1/session", "DELETE, OPTIONS"},
		{"POST", "/v1/session", "DELETE, OPTIONS"},
		{"PUT", "/v1/sessions", "POST"},
		{"GET", "/v1/sessions", "POST"},
		{"POST", "/healthz", "GET"},
		{"DELETE", "/readyz", "GET"},
		{"POST", "/.well-known/jwks.json", "GET"},
		{"PATCH", "/v1/admin/sessions/" + strings.Repeat("A", 22), "GET, DELETE"},
		{"POST", "/v1/admin/sessions", "GET"},
		{"GET", "/v1/admin/subjects/alice/revoke", "POST"},
	}
	for _, tc := range tests {
		t.Run(tc.method+" "+tc.target, func(t *testing.T) {
			e := newEnv(t)
			rec := e.do(t, tc.method, tc.target, "", bearer(testAdminKey)...)
			p := wantProblem(t, rec, http.StatusMethodNotAllowed, "method_not_allowed")
			wantHeader(t, rec, "Allow", tc.allow)
			if want := "Use " + strings.ReplaceAll(tc.allow, ", ", " or ") + " on this endpoint."; p.Detail != want {
				t.Errorf("detail = %q, want %q", p.Detail, want)
			}
		})
	}
}

// --- Request ids -----------------------------------------------------------

var freshRequestID = regexp.MustCompile(`^[0-9a-f]{16}$`)

func TestRequestID(t *testing.T) {
	long := strings.Repeat("a", 64)
	tests := []struct {
		name, inbound string
		kept          bool
	}{
		{"none", "", false},
		{"well-formed", "abc-123_X.y:z", true},
		{"uuid", "7c9e6679-7425-40de-944b-e07fc1f90ae7", true},
		{"64 characters", long, true},
		{"65 characters", long + "a", false},
		{"space", "abc 123", false},
		{"slash", "abc/123", false},
		{"non-ASCII", "abcé", false},
		{"quote", `abc"`, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			var hdr []string
			if tc.inbound != "" {
				hdr = []string{"X-Request-Id", tc.inbound}
			}
			for _, target := range []string{"/healthz", "/nope"} {
				rec := e.do(t, "GET", target, "", hdr...)
				id := rec.Header().Get("X-Request-Id")
				if tc.kept && id != tc.inbound {
					t.Errorf("%s: X-Request-Id = %q, want the inbound %q", target, id, tc.inbound)
				}
				if !tc.kept && !freshRequestID.MatchString(id) {
					t.Errorf("%s: X-Request-Id = %q, want a fresh 16-hex id", target, id)
				}
				if rec.Code == http.StatusNotFound {
					if p := decodeAs[problemBody](t, rec); p.RequestID != id {
						t.Errorf("request_id %q, header %q", p.RequestID, id)
					}
				}
			}
		})
	}

	e := newEnv(t)
	a := e.do(t, "GET", "/healthz", "").Header().Get("X-Request-Id")
	b := e.do(t, "GET", "/healthz", "").Header().Get("X-Request-Id")
	if a == b {
		t.Errorf("two requests got the same id %q", a)
	}
}

// --- Internal errors -------------------------------------------------------

// faultySessions fails every call: with an error, by panicking, or with a
// store outage; whatever the text of the failure, it must never reach the
// client.
type faultySessions struct{ mode string }

const leak = "password=hunter2 at db.internal:5432"

func (f faultySessions) fail() error {
	switch f.mode {
	case "panic":
		panic("store exploded: " + leak)
	case "unavailable":
		return fmt.Errorf("load session: %w: dial %s: connection refused", session.ErrUnavailable, leak)
	}
	return fmt.Errorf("query failed: %s", leak)
}

func (f faultySessions) Create(context.Context, session.CreateRequest) (session.Created, error) {
	return session.Created{}, f.fail()
}

func (f faultySessions) Refresh(context.Context, string) (session.Token, error) {
	return session.Token{}, f.fail()
}

func (f faultySessions) Logout(context.Context, string) (session.Session, error) {
	return session.Session{}, f.fail()
}

func (f faultySessions) Get(context.Context, string) (session.Session, error) {
	return session.Session{}, f.fail()
}

func (f faultySessions) List(context.Context, string, int) ([]session.Session, error) {
	return nil, f.fail()
}

func (f faultySessions) Revoke(context.Context, string, string) (session.Session, error) {
	return session.Session{}, f.fail()
}

func (f faultySessions) RevokeSubject(context.Context, string, string) ([]string, error) {
	return nil, f.fail()
}

func TestInternalErrorsLeakNothing(t *testing.T) {
	sid := strings.Repeat("A", 22)
	cookie := sid + "." + strings.Repeat("A", 43)
	requests := []struct {
		name, method, target, body string
		headers                    []string
	}{
		{"create", "POST", "/v1/sessions", `{"subject":"a"}`, jsonBody(bearer(testServiceKey)...)},
		{"refresh", "POST", "/v1/token", "", withCookie(cookie, "Origin", appOrigin)},
		{"logout", "DELETE", "/v1/session", "", withCookie(cookie)},
		{"get", "GET", "/v1/admin/sessions/" + sid, "", bearer(testAdminKey)},
		{"list", "GET", "/v1/admin/sessions?subject=a", "", bearer(testAdminKey)},
		{"revoke", "DELETE", "/v1/admin/sessions/" + sid, "", bearer(testAdminKey)},
		{"revoke subject", "POST", "/v1/admin/subjects/a/revoke", "", bearer(testAdminKey)},
	}
	for _, mode := range []string{"error", "panic"} {
		for _, r := range requests {
			t.Run(r.name+"/"+mode, func(t *testing.T) {
				e := newEnv(t, withSessions(func(*session.Service) Sessions { return faultySessions{mode: mode} }))
				id := "req-" + strings.ReplaceAll(r.name, " ", "-")
				rec := e.do(t, r.method, r.target, r.body, append([]string{"X-Request-Id", id}, r.headers...)...)
				p := wantProblem(t, rec, http.StatusInternalServerError, "internal")
				if p.RequestID != id {
					t.Errorf("request_id = %q, want the inbound id", p.RequestID)
				}
				if p.Detail != "An internal error occurred; it has been logged." {
					t.Errorf("detail = %q", p.Detail)
				}
				wantNoLeak(t, rec)
				// The details are logged, with the request id.
				logs := e.logs.String()
				if !strings.Contains(logs, "hunter2") || !strings.Contains(logs, `"request_id":"`+id+`"`) || !strings.Contains(logs, `"level":"ERROR"`) {
					t.Errorf("the failure is not logged as an error with its request id:\n%s", logs)
				}
			})
		}
	}
}

func wantNoLeak(t *testing.T, rec *httptest.ResponseRecorder) {
	t.Helper()
	for _, secret := range []string{"hunter2", "db.internal", "exploded", "panic", "goroutine", "connection refused"} {
		if strings.Contains(rec.Body.String(), secret) || strings.Contains(fmt.Sprint(rec.Header()), secret) {
			t.Errorf("the response leaks %q: %s", secret, rec.Body)
		}
	}
}

// TestStoreUnavailable: a store outage is 503 unavailable with a jittered
// Retry-After, on every endpoint that needs the store, never a 500.
func TestStoreUnavailable(t *testing.T) {
	sid := strings.Repeat("A", 22)
	cookie := sid + "." + strings.Repeat("A", 43)
	requests := []struct {
		name, method, target, body string
		headers                    []string
	}{
		{"create", "POST", "/v1/sessions", `{"subject":"a"}`, jsonBody(bearer(testServiceKey)...)},
		{"refresh", "POST", "/v1/token", "", withCookie(cookie, "Origin", appOrigin)},
		{"logout", "DELETE", "/v1/session", "", withCookie(cookie)},
		{"get", "GET", "/v1/admin/sessions/" + sid, "", bearer(testAdminKey)},
		{"list", "GET", "/v1/admin/sessions?subject=a", "", bearer(testAdminKey)},
		{"revoke", "DELETE", "/v1/admin/sessions/" + sid, "", bearer(testAdminKey)},
		{"revoke subject", "POST", "/v1/admin/subjects/a/revoke", "", bearer(testAdminKey)},
	}
	for _, r := range requests {
		for _, draw := range []struct {
			randN func(int) int
			want  string
		}{{func(int) int { return 0 }, "1"}, {func(n int) int { return n - 1 }, "5"}} {
			t.Run(r.name+"/"+draw.want, func(t *testing.T) {
				e := newEnv(t, withSessions(func(*session.Service) Sessions { return faultySessions{mode: "unavailable"} }),
					withProtection(func(func() time.Time) Protection { return Protection{} }, draw.randN))
				rec := e.do(t, r.method, r.target, r.body, append([]string{"X-Request-Id", "outage-1"}, r.headers...)...)
				wantProblem(t, rec, http.StatusServiceUnavailable, "unavailable")
				wantHeader(t, rec, "Retry-After", draw.want)
				wantNoCookie(t, rec) // an outage is no reason to end the session
				wantNoLeak(t, rec)
				logs := e.logs.String()
				if !strings.Contains(logs, `"level":"WARN"`) || !strings.Contains(logs, `"request_id":"outage-1"`) {
					t.Errorf("the outage is not logged as a warning with the request id:\n%s", logs)
				}
			})
		}
	}
}

// abortingSessions asks net/http to drop the connection.
type abortingSessions struct{ faultySessions }

func (abortingSessions) Get(context.Context, string) (session.Session, error) {
	panic(http.ErrAbortHandler)
}

func TestAbortHandlerPanicIsNotRecovered(t *testing.T) {
	e := newEnv(t, withSessions(func(*session.Service) Sessions { return abortingSessions{} }))
	req := newRequest("GET", "/v1/admin/sessions/"+strings.Repeat("A", 22), "", bearer(testAdminKey)...)
	defer func() {
		if v := recover(); v != http.ErrAbortHandler {
			t.Errorf("recovered %v, want http.ErrAbortHandler re-raised", v)
		}
	}()
	e.h.ServeHTTP(httptest.NewRecorder(), req)
	t.Errorf("ServeHTTP returned normally")
}

// --- Signing keys ----------------------------------------------------------

type keyList struct {
	Keys []keyView `json:"keys"`
}

func (e *env) listKeys(t *testing.T) []keyView {
	t.Helper()
	rec := e.do(t, "GET", "/v1/admin/keys", "", bearer(testAdminKey)...)
	wantStatus(t, rec, http.StatusOK)
	return decodeAs[keyList](t, rec).Keys
}

func (e *env) rotate(t *testing.T) keyView {
	t.Helper()
	rec := e.do(t, "POST", "/v1/admin/keys/rotate", "", bearer(testAdminKey)...)
	wantStatus(t, rec, http.StatusOK)
	return decodeAs[struct {
		Key keyView `json:"key"`
	}](t, rec).Key
}

func (e *env) jwksKIDs(t *testing.T) []string {
	t.Helper()
	set, err := jwk.Parse(e.do(t, "GET", "/.well-known/jwks.json", "").Body.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	var kids []string
	for i := 0; i < set.Len(); i++ {
		k, _ := set.Key(i)
		kids = append(kids, k.KeyID())
	}
	slices.Sort(kids)
	return kids
}

func (e *env) tokenKID(t *testing.T, cookie string) string {
	t.Helper()
	rec := e.token(t, cookie)
	wantStatus(t, rec, http.StatusOK)
	tok := decodeAs[tokenResponse](t, rec)
	e.verifyTokenSignature(t, tok.AccessToken)
	msg, err := jws.Parse([]byte(tok.AccessToken))
	if err != nil {
		t.Fatal(err)
	}
	return msg.Signatures()[0].ProtectedHeaders().KeyID()
}

// verifyTokenSignature checks the token against the served JWKS, whatever
// key signed it.
func (e *env) verifyTokenSignature(t *testing.T, token string) {
	t.Helper()
	set, err := jwk.Parse(e.do(t, "GET", "/.well-known/jwks.json", "").Body.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := jwt.Parse([]byte(token), jwt.WithKeySet(set), jwt.WithValidate(true), jwt.WithClock(jwt.ClockFunc(e.clock.Now))); err != nil {
		t.Errorf("token does not verify against the served JWKS: %v", err)
	}
}

func TestAdminKeysRotation(t *testing.T) {
	var ring *issuer.Keyring
	e := newEnv(t, withKeyAdmin(func(iss *issuer.Issuer, _ issuer.Key, now func() time.Time) KeyAdmin {
		ring = issuer.NewKeyring(iss, memory.NewKeyStore(), issuer.KeyringConfig{
			Algorithm: issuer.ES256, PublishDelay: 10 * time.Minute, RetireAfter: 11 * time.Minute,
		}, nil, now)
		if err := ring.Init(context.Background()); err != nil {
			t.Fatal(err)
		}
		return ring
	}))
	created := e.createSession(t, `{"subject":"alice"}`)

	keys := e.listKeys(t)
	if len(keys) != 1 || keys[0].State != issuer.KeyActive || keys[0].Alg != "ES256" ||
		!keys[0].CreatedAt.Equal(t0) || !keys[0].ActivatesAt.Equal(t0) || keys[0].RetiredAt != nil || keys[0].RemoveAt != nil {
		t.Fatalf("keys = %+v, want one active ES256 key", keys)
	}
	first := keys[0].KID
	if kids := e.jwksKIDs(t); !slices.Equal(kids, []string{first}) {
		t.Errorf("JWKS kids = %v, want [%s]", kids, first)
	}

	// Rotate: the new key is published at once but does not sign yet.
	e.clock.Advance(time.Minute)
	next := e.rotate(t)
	if next.KID == first || next.State != issuer.KeyNext || !next.ActivatesAt.Equal(t0.Add(11*time.Minute)) || !next.CreatedAt.Equal(t0.Add(time.Minute)) {
		t.Errorf("rotated key = %+v, want next, activating at %v", next, t0.Add(11*time.Minute))
	}
	want := []string{first, next.KID}
	slices.Sort(want)
	if kids := e.jwksKIDs(t); !slices.Equal(kids, want) {
		t.Errorf("JWKS kids = %v, want both keys %v", kids, want)
	}
	if kid := e.tokenKID(t, created.Cookie.Value); kid != first {
		t.Errorf("token signed by %s before the new key activates, want %s", kid, first)
	}
	// Rotating again returns the waiting key instead of skipping it.
	if again := e.rotate(t); again.KID != next.KID {
		t.Errorf("second rotation = %s, want the waiting %s", again.KID, next.KID)
	}

	// The new key activates; the old one is retired but still published.
	e.clock.Advance(10 * time.Minute)
	if err := ring.Apply(); err != nil {
		t.Fatal(err)
	}
	keys = e.listKeys(t)
	if len(keys) != 2 || keys[0].KID != first || keys[0].State != issuer.KeyRetired || keys[1].State != issuer.KeyActive ||
		keys[0].RetiredAt == nil || !keys[0].RetiredAt.Equal(t0.Add(11*time.Minute)) ||
		keys[0].RemoveAt == nil || !keys[0].RemoveAt.Equal(t0.Add(22*time.Minute)) {
		t.Fatalf("keys after activation = %+v", keys)
	}
	if kid := e.tokenKID(t, created.Cookie.Value); kid != next.KID {
		t.Errorf("token signed by %s after activation, want %s", kid, next.KID)
	}

	// Once its tokens have expired, the old key leaves the JWKS.
	e.clock.Advance(11 * time.Minute)
	if err := ring.Apply(); err != nil {
		t.Fatal(err)
	}
	if keys = e.listKeys(t); len(keys) != 1 || keys[0].KID != next.KID {
		t.Errorf("keys after retirement = %+v, want only %s", keys, next.KID)
	}
	if kids := e.jwksKIDs(t); !slices.Equal(kids, []string{next.KID}) {
		t.Errorf("JWKS kids = %v, want [%s]", kids, next.KID)
	}
}

func TestAdminKeysFixedKey(t *testing.T) {
	e := newEnv(t, withKeyAdmin(func(_ *issuer.Issuer, key issuer.Key, _ func() time.Time) KeyAdmin {
		return issuer.FixedKey{Key: key}
	}))
	keys := e.listKeys(t)
	if len(keys) != 1 || keys[0].KID != e.key.ID || keys[0].State != issuer.KeyActive {
		t.Errorf("keys = %+v, want the fixed key, active", keys)
	}
	rec := e.do(t, "POST", "/v1/admin/keys/rotate", "", bearer(testAdminKey)...)
	p := wantProblem(t, rec, http.StatusConflict, "rotation_unavailable")
	if !strings.Contains(p.Detail, "TOKEND_SIGNING_KEY_FILE") {
		t.Errorf("detail = %q", p.Detail)
	}
	if kids := e.jwksKIDs(t); !slices.Equal(kids, []string{e.key.ID}) {
		t.Errorf("a refused rotation changed the JWKS: %v", kids)
	}
}

func TestAdminKeysNotConfigured(t *testing.T) {
	e := newEnv(t)
	for _, r := range []struct{ method, target string }{{"GET", "/v1/admin/keys"}, {"POST", "/v1/admin/keys/rotate"}} {
		p := wantProblem(t, e.do(t, r.method, r.target, "", bearer(testAdminKey)...), http.StatusNotFound, "not_found")
		if p.Detail != "Key administration is not configured." {
			t.Errorf("%s %s: detail = %q", r.method, r.target, p.Detail)
		}
	}
}

// failingKeyAdmin cannot rotate.
type failingKeyAdmin struct {
	issuer.FixedKey
	err error
}

func (f failingKeyAdmin) Rotate(context.Context) (issuer.KeyStatus, error) {
	return issuer.KeyStatus{}, f.err
}

func TestAdminKeysRotateFailures(t *testing.T) {
	for _, tc := range []struct {
		name   string
		err    error
		status int
		code   string
	}{
		{"store unavailable", fmt.Errorf("rotate signing key: %w: %s", session.ErrUnavailable, leak), http.StatusServiceUnavailable, "unavailable"},
		{"store error", fmt.Errorf("rotate signing key: %s", leak), http.StatusInternalServerError, "internal"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, withKeyAdmin(func(_ *issuer.Issuer, key issuer.Key, _ func() time.Time) KeyAdmin {
				return failingKeyAdmin{FixedKey: issuer.FixedKey{Key: key}, err: tc.err}
			}))
			rec := e.do(t, "POST", "/v1/admin/keys/rotate", "", bearer(testAdminKey)...)
			wantProblem(t, rec, tc.status, tc.code)
			wantNoLeak(t, rec)
		})
	}
}

// --- Load protection -------------------------------------------------------

func TestRateLimitPerSession(t *testing.T) {
	e := newEnv(t, withProtection(func(now func() time.Time) Protection {
		return Protection{
			Limiter:      ratelimit.NewLocal(0, now),
			SessionLimit: ratelimit.Limit{Rate: 2, Period: time.Minute, Burst: 2},
		}
	}, func(int) int { return 0 }))
	created := e.createSession(t, `{"subject":"alice"}`)
	other := e.createSession(t, `{"subject":"bob"}`)

	rec := e.token(t, created.Cookie.Value)
	wantStatus(t, rec, http.StatusOK)
	wantHeader(t, rec, "RateLimit-Policy", `"session";q=2;w=60`)
	wantHeader(t, rec, "RateLimit", `"session";r=1;t=30`)
	rec = e.token(t, created.Cookie.Value)
	wantStatus(t, rec, http.StatusOK)
	wantHeader(t, rec, "RateLimit", `"session";r=0;t=60`)

	minted := e.minter.n.Load()
	rec = e.token(t, created.Cookie.Value, "Origin", appOrigin)
	p := wantProblem(t, rec, http.StatusTooManyRequests, "rate_limited")
	if !strings.Contains(p.Detail, "session") {
		t.Errorf("detail = %q", p.Detail)
	}
	wantHeader(t, rec, "Retry-After", "30") // the exact wait; the jitter source drew 0
	wantHeader(t, rec, "RateLimit-Policy", `"session";q=2;w=60`)
	wantHeader(t, rec, "RateLimit", `"session";r=0;t=30`)
	wantHeader(t, rec, "Access-Control-Allow-Origin", appOrigin)
	wantHeader(t, rec, "Access-Control-Expose-Headers", "Retry-After, RateLimit, RateLimit-Policy, X-Request-Id")
	wantNoCookie(t, rec) // a limited client keeps its session
	if e.minter.n.Load() != minted {
		t.Errorf("a token was minted for a limited request")
	}

	// Logout shares the session's budget.
	wantProblem(t, e.do(t, "DELETE", "/v1/session", "", withCookie(created.Cookie.Value)...), http.StatusTooManyRequests, "rate_limited")
	// Another session, and a forged secret for the same sid, have budgets of their own.
	wantStatus(t, e.token(t, other.Cookie.Value), http.StatusOK)
	forged := e.token(t, created.SID+"."+strings.Repeat("F", 43))
	wantProblem(t, forged, http.StatusUnauthorized, "session_invalid")
	// Preflights are never limited.
	wantStatus(t, e.do(t, "OPTIONS", "/v1/token", "", "Origin", appOrigin, "Access-Control-Request-Method", "POST"), http.StatusNoContent)

	e.clock.Advance(30 * time.Second)
	wantStatus(t, e.token(t, created.Cookie.Value), http.StatusOK)
}

func TestRateLimitRetryAfterJitter(t *testing.T) {
	for _, tc := range []struct {
		name  string
		randN func(int) int
		want  string
	}{
		{"lowest draw", func(int) int { return 0 }, "30"},
		{"highest draw", func(n int) int { return n - 1 }, "60"},
		{"middle draw", func(n int) int { return n / 2 }, "45"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, withProtection(func(now func() time.Time) Protection {
				return Protection{
					Limiter:      ratelimit.NewLocal(0, now),
					SessionLimit: ratelimit.Limit{Rate: 2, Period: time.Minute, Burst: 2},
				}
			}, tc.randN))
			created := e.createSession(t, `{"subject":"alice"}`)
			e.token(t, created.Cookie.Value)
			e.token(t, created.Cookie.Value)
			rec := e.token(t, created.Cookie.Value)
			wantProblem(t, rec, http.StatusTooManyRequests, "rate_limited")
			wantHeader(t, rec, "Retry-After", tc.want)
		})
	}
}

func TestRateLimitPerIP(t *testing.T) {
	e := newEnv(t, withProtection(func(now func() time.Time) Protection {
		return Protection{
			Limiter: ratelimit.NewLocal(0, now),
			IPLimit: ratelimit.Limit{Rate: 1, Period: time.Minute, Burst: 1},
		}
	}, func(int) int { return 0 }))
	created := e.createSession(t, `{"subject":"alice"}`)
	from := func(addr string, method, target string, headers ...string) *httptest.ResponseRecorder {
		req := newRequest(method, target, "", headers...)
		req.RemoteAddr = addr
		return e.serve(t, req)
	}
	rec := from("198.51.100.7:1000", "POST", "/v1/token", withCookie(created.Cookie.Value)...)
	wantStatus(t, rec, http.StatusOK)
	wantHeader(t, rec, "RateLimit-Policy", `"ip";q=1;w=60`)
	rec = from("198.51.100.7:2000", "DELETE", "/v1/session", withCookie(created.Cookie.Value)...)
	wantProblem(t, rec, http.StatusTooManyRequests, "rate_limited")
	wantHeader(t, rec, "Retry-After", "60")
	// Another client; forwarding headers from an untrusted peer are ignored.
	wantStatus(t, from("203.0.113.9:1000", "POST", "/v1/token", withCookie(created.Cookie.Value, "X-Forwarded-For", "198.51.100.7")...), http.StatusOK)
	wantProblem(t, from("198.51.100.7:3000", "POST", "/v1/token", withCookie(created.Cookie.Value, "X-Forwarded-For", "192.0.2.55")...),
		http.StatusTooManyRequests, "rate_limited")
	// The limits do not reach the admin endpoints or the key set.
	wantStatus(t, from("198.51.100.7:4000", "GET", "/v1/admin/sessions/"+created.SID, bearer(testAdminKey)...), http.StatusOK)
	wantStatus(t, from("198.51.100.7:4000", "GET", "/.well-known/jwks.json"), http.StatusOK)
}

func TestRateLimitPerServiceKey(t *testing.T) {
	e := newEnv(t, withProtection(func(now func() time.Time) Protection {
		return Protection{
			Limiter:      ratelimit.NewLocal(0, now),
			ServiceLimit: ratelimit.Limit{Rate: 1, Period: time.Minute, Burst: 1},
		}
	}, func(int) int { return 0 }))
	rec := e.do(t, "POST", "/v1/sessions", `{"subject":"a"}`, jsonBody(bearer(testServiceKey)...)...)
	wantStatus(t, rec, http.StatusCreated)
	wantHeader(t, rec, "RateLimit-Policy", `"service";q=1;w=60`)
	wantHeader(t, rec, "RateLimit", `"service";r=0;t=60`)
	rec = e.do(t, "POST", "/v1/sessions", `{"subject":"a"}`, jsonBody(bearer(testServiceKey)...)...)
	wantProblem(t, rec, http.StatusTooManyRequests, "rate_limited")
	wantHeader(t, rec, "Retry-After", "60")
	// The second key has its own budget; a bad key is refused before any limit.
	wantStatus(t, e.do(t, "POST", "/v1/sessions", `{"subject":"a"}`, jsonBody(bearer("svc-key-second-0123456789")...)...), http.StatusCreated)
	wantProblem(t, e.do(t, "POST", "/v1/sessions", `{"subject":"a"}`, jsonBody(bearer("wrong-key-0123456789")...)...), http.StatusUnauthorized, "unauthorized")
}

// brokenLimiter cannot decide: the request must go through.
type brokenLimiter struct{}

func (brokenLimiter) Allow(context.Context, string, ratelimit.Limit) (ratelimit.Result, error) {
	return ratelimit.Result{}, errors.New("redis: connection refused")
}

func TestRateLimiterFailureLetsRequestsThrough(t *testing.T) {
	e := newEnv(t, withProtection(func(func() time.Time) Protection {
		return Protection{
			Limiter:      brokenLimiter{},
			SessionLimit: ratelimit.Limit{Rate: 1, Period: time.Hour, Burst: 1},
			IPLimit:      ratelimit.Limit{Rate: 1, Period: time.Hour, Burst: 1},
		}
	}, nil))
	created := e.createSession(t, `{"subject":"alice"}`)
	for i := 0; i < 3; i++ {
		rec := e.token(t, created.Cookie.Value)
		wantStatus(t, rec, http.StatusOK)
		wantNoHeader(t, rec, "RateLimit-Policy")
	}
}

// blockingSessions holds Refresh and Create until released, so that a test
// can fill the concurrency bound deterministically.
type blockingSessions struct {
	Sessions
	entered chan struct{}
	release chan struct{}
}

func (b *blockingSessions) Refresh(ctx context.Context, cookie string) (session.Token, error) {
	b.entered <- struct{}{}
	<-b.release
	return b.Sessions.Refresh(ctx, cookie)
}

func TestShedding(t *testing.T) {
	blocking := &blockingSessions{entered: make(chan struct{}), release: make(chan struct{})}
	e := newEnv(t,
		withSessions(func(svc *session.Service) Sessions { blocking.Sessions = svc; return blocking }),
		withProtection(func(func() time.Time) Protection {
			return Protection{MaxInflight: 1, MaxQueue: 0, ShedRetryAfter: 5 * time.Second}
		}, func(n int) int { return n - 1 }))
	created := e.createSession(t, `{"subject":"alice"}`)

	done := make(chan *httptest.ResponseRecorder)
	go func() {
		req := newRequest("POST", "/v1/token", "", withCookie(created.Cookie.Value)...)
		rec := httptest.NewRecorder()
		e.h.ServeHTTP(rec, req)
		checkResponse(t, req, rec)
		done <- rec
	}()
	<-blocking.entered // the only slot is taken

	for _, r := range []struct {
		method, target, body string
		headers              []string
	}{
		{"POST", "/v1/token", "", withCookie(created.Cookie.Value, "Origin", appOrigin)},
		{"DELETE", "/v1/session", "", withCookie(created.Cookie.Value)},
		{"POST", "/v1/sessions", `{"subject":"bob"}`, jsonBody(bearer(testServiceKey)...)},
	} {
		rec := e.do(t, r.method, r.target, r.body, r.headers...)
		wantProblem(t, rec, http.StatusServiceUnavailable, "overloaded")
		wantHeader(t, rec, "Retry-After", "5") // the highest of 1–5
	}
	// Preflights, keys, probes and admins are never shed.
	wantStatus(t, e.do(t, "OPTIONS", "/v1/token", "", "Origin", appOrigin, "Access-Control-Request-Method", "POST"), http.StatusNoContent)
	wantStatus(t, e.do(t, "GET", "/.well-known/jwks.json", ""), http.StatusOK)
	wantStatus(t, e.do(t, "GET", "/readyz", ""), http.StatusOK)
	wantStatus(t, e.do(t, "GET", "/v1/admin/sessions/"+created.SID, "", bearer(testAdminKey)...), http.StatusOK)
	// An unauthenticated creation is refused before it could take a slot.
	wantProblem(t, e.do(t, "POST", "/v1/sessions", `{"subject":"bob"}`, jsonBody()...), http.StatusUnauthorized, "unauthorized")

	close(blocking.release)
	wantStatus(t, <-done, http.StatusOK)

	// With the slot free again, requests go through.
	go func() { <-blocking.entered }()
	wantStatus(t, e.token(t, created.Cookie.Value), http.StatusOK)
}
