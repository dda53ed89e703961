package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/MicahParks/keyfunc/v3"
	"github.com/golang-jwt/jwt/v5"

	"github.com/tokend/tokend/internal/testenv"
)

// The production configuration of the in-process instances below.
const (
	pgServiceKey = "pg-service-key-0123456789"
	pgAdminKey   = "pg-admin-key-0123456789ab"
	pgIssuer     = "https://tokend.test"
	pgAudience   = "ws"
)

// pgKEK is the key-encryption key every instance of a test shares.
var pgKEK = base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{0x5a}, 32))

// pgEnv is the production environment of an instance on databaseURL.
func pgEnv(databaseURL string) map[string]string {
	return map[string]string{
		"TOKEND_ISSUER":             pgIssuer,
		"TOKEND_AUDIENCE":           pgAudience,
		"TOKEND_SERVICE_KEYS":       pgServiceKey,
		"TOKEND_ADMIN_KEYS":         pgAdminKey,
		"TOKEND_DATABASE_URL":       databaseURL,
		"TOKEND_KEY_ENCRYPTION_KEY": pgKEK,
		"TOKEND_TOKEN_TTL":          "10s",
		"TOKEND_KEY_PUBLISH_DELAY":  "2s",
		"TOKEND_RATE_SESSION":       "off",
		"TOKEND_RATE_IP":            "off",
		"TOKEND_DRAIN_DELAY":        "0s",
	}
}

// lockedBuffer collects an instance's log while the test reads it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// inProcess is a tokend started with run in this test process.
type inProcess struct {
	t      *testing.T
	base   string
	env    map[string]string
	log    *lockedBuffer
	cancel context.CancelFunc
	done   chan error
	client *http.Client
}

// startInProcess runs tokend with env (on a free loopback address unless
// env names one) and waits until it is ready. It is stopped when t ends.
func startInProcess(t *testing.T, env map[string]string) *inProcess {
	t.Helper()
	env = cloneEnv(env)
	if env["TOKEND_ADDR"] == "" {
		env["TOKEND_ADDR"] = freeAddr(t)
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &inProcess{
		t: t, base: "http://" + env["TOKEND_ADDR"], env: env, log: new(lockedBuffer),
		cancel: cancel, done: make(chan error, 1), client: &http.Client{Timeout: 10 * time.Second},
	}
	go func() { p.done <- run(ctx, nil, func(k string) string { return env[k] }, io.Discard, p.log) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-p.done:
		case <-time.After(20 * time.Second):
			t.Errorf("tokend at %s did not stop within 20s", p.base)
		}
		if t.Failed() {
			t.Logf("log of tokend at %s:\n%s", p.base, p.log.String())
		}
	})
	p.waitReady()
	return p
}

func cloneEnv(env map[string]string) map[string]string {
	out := make(map[string]string, len(env))
	for k, v := range env {
		out[k] = v
	}
	return out
}

func (p *inProcess) waitReady() {
	p.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case err := <-p.done:
			p.done <- err // for the cleanup
			p.t.Fatalf("tokend at %s exited while starting: %v\n%s", p.base, err, p.log.String())
		default:
		}
		if resp, err := http.Get(p.base + "/readyz"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("tokend at %s was not ready within 30s\n%s", p.base, p.log.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stop shuts the instance down as SIGTERM would and checks that run
// returned nil.
func (p *inProcess) stop() {
	p.t.Helper()
	p.cancel()
	select {
	case err := <-p.done:
		p.done <- err // for the cleanup
		if err != nil {
			p.t.Fatalf("run returned %v after its context ended, want nil", err)
		}
	case <-time.After(20 * time.Second):
		p.t.Fatalf("tokend at %s did not stop within 20s", p.base)
	}
}

// restart stops the instance and starts a new one with the same
// configuration and address.
func (p *inProcess) restart() *inProcess {
	p.t.Helper()
	p.stop()
	return startInProcess(p.t, p.env)
}

// call sends a request and returns the status, the decoded JSON body and
// the headers.
func (p *inProcess) call(method, path, bearer string, cookie *http.Cookie, body string) (int, map[string]any, http.Header) {
	p.t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, p.base+path, rd)
	if err != nil {
		p.t.Fatal(err)
	}
	if bearer != "" {
		req.Header.Set("Authorization", "Bearer "+bearer)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	if cookie != nil {
		req.AddCookie(cookie)
	}
	resp, err := p.client.Do(req)
	if err != nil {
		p.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		p.t.Fatalf("%s %s: %v", method, path, err)
	}
	var out map[string]any
	if len(raw) > 0 {
		if err := json.Unmarshal(raw, &out); err != nil {
			p.t.Fatalf("%s %s: status %d, body is not JSON: %q", method, path, resp.StatusCode, raw)
		}
	}
	return resp.StatusCode, out, resp.Header
}

// createSession creates a session of subject and returns its sid and cookie.
func (p *inProcess) createSession(subject string) (string, *http.Cookie) {
	p.t.Helper()
	status, body, _ := p.call("POST", "/v1/sessions", pgServiceKey, nil, fmt.Sprintf(`{"subject":%q}`, subject))
	if status != http.StatusCreated {
		p.t.Fatalf("POST /v1/sessions on %s: status %d: %v", p.base, status, body)
	}
	c, _ := body["cookie"].(map[string]any)
	name, _ := c["name"].(string)
	value, _ := c["value"].(string)
	sid, _ := body["sid"].(string)
	if sid == "" || name == "" || value == "" {
		p.t.Fatalf("POST /v1/sessions: no sid or cookie in %v", body)
	}
	return sid, &http.Cookie{Name: name, Value: value}
}

// token asks for a token with cookie and returns it, failing unless the
// answer is 200.
func (p *inProcess) token(cookie *http.Cookie) string {
	p.t.Helper()
	status, body, _ := p.call("POST", "/v1/token", "", cookie, "")
	tok, _ := body["access_token"].(string)
	if status != http.StatusOK || tok == "" {
		p.t.Fatalf("POST /v1/token on %s: status %d: %v", p.base, status, body)
	}
	return tok
}

// freshToken mints a token for a new session, so that no token cached for
// the reuse window is returned.
func (p *inProcess) freshToken() string {
	p.t.Helper()
	_, cookie := p.createSession("fresh")
	return p.token(cookie)
}

// jwksKids lists the kids this instance publishes.
func (p *inProcess) jwksKids() []string {
	p.t.Helper()
	status, body, _ := p.call("GET", "/.well-known/jwks.json", "", nil, "")
	if status != http.StatusOK {
		p.t.Fatalf("GET /.well-known/jwks.json on %s: status %d", p.base, status)
	}
	keys, _ := body["keys"].([]any)
	var kids []string
	for _, k := range keys {
		m, _ := k.(map[string]any)
		kid, _ := m["kid"].(string)
		kids = append(kids, kid)
	}
	slices.Sort(kids)
	return kids
}

// adminKeys returns GET /v1/admin/keys by kid.
func (p *inProcess) adminKeys() map[string]map[string]any {
	p.t.Helper()
	status, body, _ := p.call("GET", "/v1/admin/keys", pgAdminKey, nil, "")
	if status != http.StatusOK {
		p.t.Fatalf("GET /v1/admin/keys on %s: status %d: %v", p.base, status, body)
	}
	out := map[string]map[string]any{}
	keys, _ := body["keys"].([]any)
	for _, k := range keys {
		m, _ := k.(map[string]any)
		kid, _ := m["kid"].(string)
		out[kid] = m
	}
	return out
}

// kidOf returns the kid in a token's header (unverified).
func kidOf(t *testing.T, token string) string {
	t.Helper()
	tok, _, err := jwt.NewParser().ParseUnverified(token, jwt.MapClaims{})
	if err != nil {
		t.Fatalf("parse token: %v", err)
	}
	kid, _ := tok.Header["kid"].(string)
	return kid
}

// verifyAt checks token against p's live JWKS as an independent validator
// would (keyfunc and golang-jwt).
func verifyAt(t *testing.T, p *inProcess, token string) jwt.MapClaims {
	t.Helper()
	return verifyWithKeyfuncIssuer(t, p.base, token, pgIssuer, pgAudience)
}

// verifySignatureAt checks token's signature against p's live JWKS,
// ignoring its claims.
func verifySignatureAt(t *testing.T, p *inProcess, token string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	kf, err := keyfunc.NewDefaultCtx(ctx, []string{p.base + "/.well-known/jwks.json"})
	if err != nil {
		t.Fatalf("keyfunc: %v", err)
	}
	if _, err := jwt.Parse(token, kf.Keyfunc, jwt.WithoutClaimsValidation(), jwt.WithValidMethods([]string{"ES256"})); err != nil {
		t.Errorf("token signed by %s does not verify against the JWKS of %s: %v", kidOf(t, token), p.base, err)
	}
}

// pollUntil polls cond until it holds, failing t after timeout.
func pollUntil(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waited %s for %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func parseTime(t *testing.T, v any) time.Time {
	t.Helper()
	s, _ := v.(string)
	at, err := time.Parse(time.RFC3339, s)
	if err != nil {
		t.Fatalf("time %v: %v", v, err)
	}
	return at
}

func TestPostgresTwoInstances(t *testing.T) {
	env := pgEnv(testenv.DatabaseURL(t))
	a := startInProcess(t, env)
	b := startInProcess(t, env)

	// A session created on A refreshes on B; tokens from either verify
	// against the other's JWKS: they share sessions and keys.
	sid, cookie := a.createSession("alice")
	onB := b.token(cookie)
	if claims := verifyAt(t, a, onB); claims["sid"] != sid || claims["sub"] != "alice" {
		t.Errorf("token from B: claims %v, want sid %s and sub alice", claims, sid)
	}
	onA := a.token(cookie)
	verifyAt(t, b, onA)
	if kidOf(t, onA) != kidOf(t, onB) {
		t.Errorf("A signs with %s, B with %s: the instances do not share the key", kidOf(t, onA), kidOf(t, onB))
	}

	// A revocation on B is refused by A on the very next request, although
	// A has the session cached.
	const rounds = 20
	var (
		stale  []string
		maxLag time.Duration
	)
	for i := range rounds {
		victim, vcookie := a.createSession(fmt.Sprintf("user-%d", i))
		a.token(vcookie) // A now holds the session in its cache
		if status, body, _ := b.call("DELETE", "/v1/admin/sessions/"+victim, pgAdminKey, nil, ""); status != http.StatusOK {
			t.Fatalf("round %d: DELETE on B: status %d: %v", i, status, body)
		}
		revoked := time.Now()
		status, body, _ := a.call("POST", "/v1/token", "", vcookie, "")
		if status == http.StatusUnauthorized && body["code"] == "session_revoked" {
			continue
		}
		stale = append(stale, fmt.Sprintf("round %d: %d %v", i, status, body["code"]))
		// Measure how long A takes to catch up.
		for status != http.StatusUnauthorized || body["code"] != "session_revoked" {
			if time.Since(revoked) > 5*time.Second {
				t.Fatalf("round %d: A still does not refuse the session 5s after B revoked it: %d %v", i, status, body)
			}
			time.Sleep(time.Millisecond)
			status, body, _ = a.call("POST", "/v1/token", "", vcookie, "")
		}
		maxLag = max(maxLag, time.Since(revoked))
	}
	if len(stale) > 0 {
		t.Errorf("in %d of %d rounds A did not refuse a session B had just revoked (want 401 session_revoked; "+
			"A refused it %v later at most):\n%s", len(stale), rounds, maxLag, strings.Join(stale, "\n"))
	}

	// A restart of A keeps sessions and keys.
	kid := kidOf(t, onA)
	a = a.restart()
	if got := a.token(cookie); kidOf(t, got) != kid {
		t.Errorf("after the restart A signs with %s, want the stored key %s", kidOf(t, got), kid)
	}
	// The token from before the restart still verifies against the JWKS.
	// Only its signature is checked: on a slow machine it may have expired
	// meanwhile, which is not what this is about.
	verifySignatureAt(t, a, onA)
}

func TestPostgresKeyRotation(t *testing.T) {
	t.Parallel()
	env := pgEnv(testenv.DatabaseURL(t))
	a := startInProcess(t, env)
	b := startInProcess(t, env)
	const publishDelay = 2 * time.Second

	old := kidOf(t, a.freshToken())
	if got := kidOf(t, b.freshToken()); got != old {
		t.Fatalf("A signs with %s, B with %s", old, got)
	}

	// Each keyring reloads the stored keys on its first tick, a second
	// after start, and then only every 30s. Rotating after that first
	// reload, B can learn of the new key only through NOTIFY.
	time.Sleep(1500 * time.Millisecond)

	// Rotate on A: the new key is published by both at once (B through
	// NOTIFY) but signs only after the publish delay.
	sent := time.Now()
	status, body, _ := a.call("POST", "/v1/admin/keys/rotate", pgAdminKey, nil, "")
	if status != http.StatusOK {
		t.Fatalf("POST /v1/admin/keys/rotate: status %d: %v", status, body)
	}
	key, _ := body["key"].(map[string]any)
	next, _ := key["kid"].(string)
	if next == "" || next == old || key["state"] != "next" {
		t.Fatalf("rotate answered %v, want a new key in state next", body)
	}
	oldTokA, oldTokB := a.freshToken(), b.freshToken()
	if time.Since(sent) >= publishDelay {
		t.Fatalf("minting two tokens took longer than the publish delay (%s): cannot check that the old key still signs", publishDelay)
	}
	for name, tok := range map[string]string{"A": oldTokA, "B": oldTokB} {
		if got := kidOf(t, tok); got != old {
			t.Errorf("%s signed with %s within the publish delay, want the old key %s", name, got, old)
		}
	}
	for name, p := range map[string]*inProcess{"A": a, "B": b} {
		pollUntil(t, 10*time.Second, name+"'s JWKS to publish the new key", func() bool {
			return slices.Contains(p.jwksKids(), next)
		})
	}

	// After the publish delay both sign with the new key.
	for name, p := range map[string]*inProcess{"A": a, "B": b} {
		pollUntil(t, 15*time.Second, name+" to sign with the new key", func() bool {
			return kidOf(t, p.freshToken()) == next
		})
	}
	// The old key stays published for the tokens it signed.
	for name, p := range map[string]*inProcess{"A": a, "B": b} {
		if kids := p.jwksKids(); !slices.Contains(kids, old) || !slices.Contains(kids, next) {
			t.Errorf("right after the switch %s publishes %v, want both %s and %s", name, kids, old, next)
		}
	}
	verifySignatureAt(t, b, oldTokA)
	verifySignatureAt(t, a, oldTokB)

	keys := a.adminKeys()
	if keys[next]["state"] != "active" || keys[old]["state"] != "retired" {
		t.Fatalf("GET /v1/admin/keys = %v, want %s active and %s retired", keys, next, old)
	}
	// Token TTL 10s plus a leeway of the TTL (at most a minute).
	switchAt := parseTime(t, keys[next]["activates_at"])
	removeAt := parseTime(t, keys[old]["remove_at"])
	if want := switchAt.Add(20 * time.Second); !removeAt.Equal(want) || !parseTime(t, keys[old]["retired_at"]).Equal(switchAt) {
		t.Errorf("old key retired at %v, removed at %v; want retired at the switch %v, removed at %v",
			keys[old]["retired_at"], removeAt, switchAt, want)
	}

	// Then it leaves the JWKS of both instances, not before remove_at.
	for name, p := range map[string]*inProcess{"A": a, "B": b} {
		pollUntil(t, time.Until(removeAt)+10*time.Second, name+"'s JWKS to drop the retired key", func() bool {
			return !slices.Contains(p.jwksKids(), old)
		})
		if now := time.Now(); now.Before(removeAt) {
			t.Errorf("%s dropped the retired key at %v, before its remove_at %v", name, now, removeAt)
		}
		if kids := p.jwksKids(); !slices.Equal(kids, []string{next}) {
			t.Errorf("%s publishes %v after the removal, want only %s", name, kids, next)
		}
	}
}

func TestPostgresOutage(t *testing.T) {
	t.Parallel()
	pg := testenv.StartPostgres(t)
	p := startInProcess(t, pgEnv(pg.URL()))
	sid, cookie := p.createSession("alice")
	p.token(cookie)

	pg.Stop()

	// Until the instance notices, a request may still succeed from its
	// cache; none may fail with anything but 503 unavailable.
	checkUnavailable := func(what string, status int, body map[string]any, h http.Header) {
		t.Helper()
		if status == http.StatusInternalServerError {
			t.Fatalf("%s with the database down: 500 %v", what, body)
		}
		if status != http.StatusServiceUnavailable || body["code"] != "unavailable" {
			t.Errorf("%s with the database down: %d %v, want 503 unavailable", what, status, body)
			return
		}
		if n, err := strconv.Atoi(h.Get("Retry-After")); err != nil || n < 1 {
			t.Errorf("%s with the database down: Retry-After %q, want whole seconds ≥ 1", what, h.Get("Retry-After"))
		}
	}
	pollUntil(t, 15*time.Second, "/readyz to turn 503", func() bool {
		status, body, h := p.call("POST", "/v1/token", "", cookie, "")
		if status != http.StatusOK {
			checkUnavailable("POST /v1/token", status, body, h)
		}
		status, body, _ = p.call("GET", "/readyz", "", nil, "")
		if status != http.StatusOK && status != http.StatusServiceUnavailable {
			t.Fatalf("GET /readyz: %d %v", status, body)
		}
		return status == http.StatusServiceUnavailable
	})
	for range 3 {
		status, body, h := p.call("POST", "/v1/token", "", cookie, "")
		checkUnavailable("POST /v1/token", status, body, h)
	}
	status, body, h := p.call("POST", "/v1/sessions", pgServiceKey, nil, `{"subject":"bob"}`)
	checkUnavailable("POST /v1/sessions", status, body, h)
	status, body, h = p.call("GET", "/v1/admin/sessions/"+sid, pgAdminKey, nil, "")
	checkUnavailable("GET /v1/admin/sessions/{sid}", status, body, h)

	pg.Start()
	pollUntil(t, 20*time.Second, "POST /v1/token to succeed again", func() bool {
		status, body, h := p.call("POST", "/v1/token", "", cookie, "")
		if status != http.StatusOK {
			checkUnavailable("POST /v1/token during the recovery", status, body, h)
		}
		return status == http.StatusOK
	})
	pollUntil(t, 10*time.Second, "/readyz to turn 200", func() bool {
		status, _, _ := p.call("GET", "/readyz", "", nil, "")
		return status == http.StatusOK
	})
	p.freshToken()
}

func TestPostgresRequiresKEK(t *testing.T) {
	t.Parallel()
	env := pgEnv(testenv.DatabaseURL(t))
	delete(env, "TOKEND_KEY_ENCRYPTION_KEY")
	env["TOKEND_ADDR"] = freeAddr(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- run(ctx, nil, func(k string) string { return env[k] }, io.Discard, io.Discard) }()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "TOKEND_KEY_ENCRYPTION_KEY") {
			t.Errorf("run = %v, want an error naming TOKEND_KEY_ENCRYPTION_KEY", err)
		}
	case <-time.After(20 * time.Second):
		cancel()
		err := <-done
		t.Fatalf("tokend started without TOKEND_KEY_ENCRYPTION_KEY in production mode (run returned %v after cancel)", err)
	}
}

func TestPostgresDevModeInsecureKEK(t *testing.T) {
	t.Parallel()
	// Nothing but a loopback address and a database: dev mode.
	p := startInProcess(t, map[string]string{"TOKEND_DATABASE_URL": testenv.DatabaseURL(t)})
	if log := p.log.String(); !strings.Contains(log, "INSECURE") {
		t.Errorf("the log does not warn that the key-encryption key is INSECURE:\n%s", log)
	}
	p.stop()
}
