package api_test

// Tests of load protection (rate limits and shedding) through real HTTP:
// httptest servers running the real router, session service and limiters,
// with the shared limits on a real Redis. Helpers are prefixed with "pt" so
// as not to collide with other test files of the package.

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tokend/tokend/api"
	"github.com/tokend/tokend/internal/testenv"
	"github.com/tokend/tokend/issuer"
	"github.com/tokend/tokend/session"
	"github.com/tokend/tokend/store/memory"
	"github.com/tokend/tokend/store/ratelimit"
	redisstore "github.com/tokend/tokend/store/redis"
)

const (
	ptServiceKey  = "svc-key-0123456789"
	ptServiceKey2 = "svc-key-9876543210"
	ptAdminKey    = "adm-key-0123456789"
	ptCookieName  = "tokend_session"
	ptOrigin      = "https://app.example"
)

// ptEnv is what the instances of one test share, as the replicas of one
// deployment do: the session store and the signing keys.
type ptEnv struct {
	t      *testing.T
	store  *memory.Store
	iss    *issuer.Issuer
	svc    *session.Service
	client *http.Client
}

func ptNewEnv(t *testing.T) *ptEnv {
	t.Helper()
	iss, err := issuer.New("https://tokend.test", []string{"app"})
	if err != nil {
		t.Fatal(err)
	}
	key, err := issuer.GenerateKey(issuer.ES256, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if err := iss.SetKeys(&key, []issuer.Key{key}); err != nil {
		t.Fatal(err)
	}
	store := memory.New()
	tr := &http.Transport{MaxIdleConns: 512, MaxIdleConnsPerHost: 256}
	t.Cleanup(tr.CloseIdleConnections)
	return &ptEnv{
		t: t, store: store, iss: iss,
		svc:    session.NewService(store, iss, session.Config{}),
		client: &http.Client{Transport: tr, Timeout: 30 * time.Second},
	}
}

type ptOpts struct {
	protection api.Protection
	// sessions wraps the instance's session service.
	sessions func(*session.Service) api.Sessions
	randN    func(n int) int
	trusted  []netip.Prefix
	// onClose runs before the server closes (to release held handlers).
	onClose func()
}

// instance starts one tokend API (one replica) over the env's store.
func (e *ptEnv) instance(o ptOpts) *httptest.Server {
	e.t.Helper()
	svc := session.NewService(e.store, e.iss, session.Config{})
	var sessions api.Sessions = svc
	if o.sessions != nil {
		sessions = o.sessions(svc)
	}
	h := api.NewServer(api.Options{
		Sessions: sessions,
		Keys:     e.iss,
		RandN:    o.randN,
		Config: api.Config{
			Cookie:         api.Cookie{Name: ptCookieName, Path: "/"},
			AllowedOrigins: []string{ptOrigin},
			ServiceKeys:    []string{ptServiceKey, ptServiceKey2},
			AdminKeys:      []string{ptAdminKey},
			TrustedProxies: o.trusted,
			Protection:     o.protection,
		},
	})
	ts := httptest.NewServer(h)
	e.t.Cleanup(ts.Close)
	if o.onClose != nil {
		e.t.Cleanup(o.onClose) // runs first
	}
	return ts
}

// session creates a session through the service (so that no API limit is
// spent) and returns its cookie value.
func (e *ptEnv) session(subject string) string {
	e.t.Helper()
	c, err := e.svc.Create(context.Background(), session.CreateRequest{Subject: subject})
	if err != nil {
		e.t.Fatal(err)
	}
	return c.Credentials.String()
}

// ptSyncBuffer is a log sink safe for concurrent writers.
type ptSyncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *ptSyncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *ptSyncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// ptRedisLimiter is what cmd/tokend wires for one instance: its own Redis
// client, the Redis limiter under prefix, and the per-instance fallback.
func ptRedisLimiter(t *testing.T, url, prefix string, retry time.Duration, logs io.Writer) *ratelimit.Fallback {
	t.Helper()
	client, err := redisstore.NewClient(url)
	if err != nil {
		t.Fatalf("redis client: %v", err)
	}
	t.Cleanup(func() { _ = client.Close() })
	var logger *slog.Logger
	if logs != nil {
		logger = slog.New(slog.NewTextHandler(logs, nil))
	}
	return ratelimit.NewFallback(redisstore.NewLimiter(client, prefix),
		ratelimit.FallbackOptions{Logger: logger, RetryShared: retry})
}

// ptSharedLimiter returns a Fallback over the shared test Redis, failing
// the test when it does not answer.
func ptSharedLimiter(t *testing.T, prefix string) *ratelimit.Fallback {
	t.Helper()
	return ptRedisLimiter(t, testenv.RedisURL(t), prefix, time.Second, nil)
}

type ptResp struct {
	status int
	header http.Header
	body   []byte
}

func (r ptResp) String() string {
	return fmt.Sprintf("%d %s", r.status, strings.TrimSpace(string(r.body)))
}

func (r ptResp) problemCode() string {
	var p struct {
		Code string `json:"code"`
	}
	_ = json.Unmarshal(r.body, &p)
	return p.Code
}

// do sends one request; it is safe to call from any goroutine.
func (e *ptEnv) do(method, url string, header http.Header, body string) (ptResp, error) {
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		return ptResp{}, err
	}
	for k, vs := range header {
		req.Header[k] = vs
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	res, err := e.client.Do(req)
	if err != nil {
		return ptResp{}, err
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		return ptResp{}, err
	}
	return ptResp{status: res.StatusCode, header: res.Header, body: b}, nil
}

func (e *ptEnv) must(method, url string, header http.Header, body string) ptResp {
	e.t.Helper()
	r, err := e.do(method, url, header, body)
	if err != nil {
		e.t.Fatalf("%s %s: %v", method, url, err)
	}
	return r
}

func ptCookie(cookie string, kv ...string) http.Header {
	h := http.Header{}
	if cookie != "" {
		h.Set("Cookie", ptCookieName+"="+cookie)
	}
	for i := 0; i+1 < len(kv); i += 2 {
		h.Add(kv[i], kv[i+1])
	}
	return h
}

func (e *ptEnv) token(srv *httptest.Server, cookie string, kv ...string) ptResp {
	e.t.Helper()
	return e.must("POST", srv.URL+"/v1/token", ptCookie(cookie, kv...), "")
}

func (e *ptEnv) createSession(srv *httptest.Server, key string) ptResp {
	e.t.Helper()
	return e.must("POST", srv.URL+"/v1/sessions", http.Header{"Authorization": {"Bearer " + key}}, `{"subject":"alice"}`)
}

// ptCheckRefusal checks a 429 rate_limited or 503 overloaded answer:
// problem+json with the code, and Retry-After a whole number of seconds in
// [lo, hi]. It returns Retry-After. It is safe to call from any goroutine.
func ptCheckRefusal(r ptResp, status int, code string, lo, hi int) (int, error) {
	if r.status != status || r.problemCode() != code {
		return 0, fmt.Errorf("got %s, want %d %s", r, status, code)
	}
	if ct := r.header.Get("Content-Type"); !strings.HasPrefix(ct, "application/problem+json") {
		return 0, fmt.Errorf("%d with Content-Type %q", status, ct)
	}
	if cc := r.header.Get("Cache-Control"); cc != "no-store" {
		return 0, fmt.Errorf("%d with Cache-Control %q", status, cc)
	}
	raw := r.header.Values("Retry-After")
	if len(raw) != 1 {
		return 0, fmt.Errorf("%d with Retry-After %q, want exactly one", status, raw)
	}
	ra, err := strconv.Atoi(raw[0])
	if err != nil || ra < lo || ra > hi {
		return 0, fmt.Errorf("%d with Retry-After %q, want an integer in [%d, %d]", status, raw[0], lo, hi)
	}
	if status == http.StatusTooManyRequests {
		if r.header.Get("RateLimit") == "" || r.header.Get("RateLimit-Policy") == "" {
			return 0, fmt.Errorf("429 without RateLimit / RateLimit-Policy: %v", r.header)
		}
	}
	return ra, nil
}

func ptCheck429(t *testing.T, r ptResp, policy string, lo, hi int) int {
	t.Helper()
	ra, err := ptCheckRefusal(r, http.StatusTooManyRequests, "rate_limited", lo, hi)
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf(`"%s";r=0;t=%d`, policy, ra); r.header.Get("RateLimit") != want {
		t.Fatalf("RateLimit %q, want %q", r.header.Get("RateLimit"), want)
	}
	if !strings.Contains(r.header.Get("RateLimit-Policy"), `"`+policy+`";`) {
		t.Fatalf("RateLimit-Policy %q does not name %q", r.header.Get("RateLimit-Policy"), policy)
	}
	return ra
}

// ptLowerBound is the least whole-second Retry-After for a limiter wait of
// full minus the time since start (wait only shrinks as time passes).
func ptLowerBound(full time.Duration, start time.Time) int {
	return max(int(math.Ceil((full - time.Since(start)).Seconds())), 1)
}

func ptStatus(t *testing.T, r ptResp, want int) {
	t.Helper()
	if r.status != want {
		t.Fatalf("got %s, want %d", r, want)
	}
}

func ptNoSharedFailures(t *testing.T, fbs ...*ratelimit.Fallback) {
	t.Helper()
	for i, fb := range fbs {
		if st := fb.Stats(); st.Degraded || st.LocalDecisions != 0 || st.SharedErrors != 0 {
			t.Fatalf("instance %d decided without Redis: %+v", i, st)
		}
	}
}

var ptSessionLimit3 = ratelimit.Limit{Rate: 3, Period: time.Minute, Burst: 3}

func TestProtectSessionLimitSharedByTwoInstances(t *testing.T) {
	e := ptNewEnv(t)
	prefix := testenv.RedisPrefix(t)
	fbA, fbB := ptSharedLimiter(t, prefix), ptSharedLimiter(t, prefix)
	a := e.instance(ptOpts{protection: api.Protection{Limiter: fbA, SessionLimit: ptSessionLimit3}})
	b := e.instance(ptOpts{protection: api.Protection{Limiter: fbB, SessionLimit: ptSessionLimit3}})
	cookie := e.session("alice")

	start := time.Now()
	for i, srv := range []*httptest.Server{a, b, a} {
		r := e.token(srv, cookie)
		ptStatus(t, r, http.StatusOK)
		if got, want := r.header.Get("RateLimit-Policy"), `"session";q=3;w=60`; got != want {
			t.Fatalf("request %d: RateLimit-Policy %q, want %q", i+1, got, want)
		}
		if got, want := r.header.Get("RateLimit"), fmt.Sprintf(`"session";r=%d;t=`, 2-i); !strings.HasPrefix(got, want) {
			t.Fatalf("request %d: RateLimit %q, want prefix %q", i+1, got, want)
		}
	}
	// Per instance, b has seen one request: only a shared budget refuses.
	r := e.token(b, cookie)
	ptCheck429(t, r, "session", ptLowerBound(20*time.Second, start), 40)
	ptCheck429(t, e.token(a, cookie), "session", ptLowerBound(20*time.Second, start), 40)
	// Logout is limited by the same budget.
	ptCheck429(t, e.must("DELETE", b.URL+"/v1/session", ptCookie(cookie), ""), "session", ptLowerBound(20*time.Second, start), 40)

	// Another session has a budget of its own.
	ptStatus(t, e.token(b, e.session("bob")), http.StatusOK)
	ptNoSharedFailures(t, fbA, fbB)
}

func TestProtectIPLimitSharedByTwoInstances(t *testing.T) {
	e := ptNewEnv(t)
	prefix := testenv.RedisPrefix(t)
	prot := func(fb *ratelimit.Fallback) api.Protection {
		return api.Protection{Limiter: fb, IPLimit: ptSessionLimit3}
	}
	fbA, fbB := ptSharedLimiter(t, prefix), ptSharedLimiter(t, prefix)
	a, b := e.instance(ptOpts{protection: prot(fbA)}), e.instance(ptOpts{protection: prot(fbB)})

	start := time.Now()
	for _, srv := range []*httptest.Server{a, b, a} {
		ptStatus(t, e.token(srv, e.session("alice")), http.StatusOK)
	}
	// A fourth session from the same address, on the other instance.
	r := e.token(b, e.session("alice"))
	ptCheck429(t, r, "ip", ptLowerBound(20*time.Second, start), 40)
	if !strings.Contains(string(r.body), "ip") {
		t.Errorf("the 429 does not say which limit: %s", r)
	}
	// Without trusted proxies, X-Forwarded-For is the client's word: ignored.
	ptCheck429(t, e.token(a, e.session("alice"), "X-Forwarded-For", "198.51.100.9"), "ip", 1, 40)
	// Requests without a session are limited by IP too.
	ptCheck429(t, e.token(a, ""), "ip", 1, 40)

	// Behind a trusted proxy, the forwarded address is the key, and a
	// client cannot pick a fresh one by prepending to the chain.
	prefix2 := testenv.RedisPrefix(t)
	trusted, err := api.ParseTrustedProxies([]string{"127.0.0.0/8", "::1"})
	if err != nil {
		t.Fatal(err)
	}
	c := e.instance(ptOpts{protection: prot(ptSharedLimiter(t, prefix2)), trusted: trusted})
	d := e.instance(ptOpts{protection: prot(ptSharedLimiter(t, prefix2)), trusted: trusted})
	for _, srv := range []*httptest.Server{c, d, c} {
		ptStatus(t, e.token(srv, e.session("alice"), "X-Forwarded-For", "203.0.113.1"), http.StatusOK)
	}
	ptCheck429(t, e.token(d, e.session("alice"), "X-Forwarded-For", "203.0.113.1"), "ip", 1, 40)
	ptCheck429(t, e.token(c, e.session("alice"), "X-Forwarded-For", "203.0.113.2, 203.0.113.1"), "ip", 1, 40)
	ptStatus(t, e.token(d, e.session("alice"), "X-Forwarded-For", "203.0.113.2"), http.StatusOK)
	ptNoSharedFailures(t, fbA, fbB)
}

func TestProtectServiceLimitSharedByTwoInstances(t *testing.T) {
	e := ptNewEnv(t)
	prefix := testenv.RedisPrefix(t)
	limit := ratelimit.Limit{Rate: 2, Period: time.Minute, Burst: 2}
	fbA, fbB := ptSharedLimiter(t, prefix), ptSharedLimiter(t, prefix)
	a := e.instance(ptOpts{protection: api.Protection{Limiter: fbA, ServiceLimit: limit}})
	b := e.instance(ptOpts{protection: api.Protection{Limiter: fbB, ServiceLimit: limit}})

	// Requests with a wrong key are refused before the limiter: they spend
	// nothing.
	for _, srv := range []*httptest.Server{a, b, a, b, a} {
		r := e.createSession(srv, "svc-key-wrong-000000")
		ptStatus(t, r, http.StatusUnauthorized)
		if r.header.Get("Retry-After") != "" {
			t.Fatalf("401 with Retry-After: %v", r.header)
		}
	}
	start := time.Now()
	ptStatus(t, e.createSession(a, ptServiceKey), http.StatusCreated)
	r := e.createSession(b, ptServiceKey)
	ptStatus(t, r, http.StatusCreated)
	if got := r.header.Get("RateLimit-Policy"); got != `"service";q=2;w=60` {
		t.Fatalf("RateLimit-Policy %q", got)
	}
	ptCheck429(t, e.createSession(a, ptServiceKey), "service", ptLowerBound(30*time.Second, start), 60)
	ptCheck429(t, e.createSession(b, ptServiceKey), "service", ptLowerBound(30*time.Second, start), 60)
	// Each service key has its own budget.
	ptStatus(t, e.createSession(b, ptServiceKey2), http.StatusCreated)
	// The token endpoint is not limited by the service limit.
	ptStatus(t, e.token(a, e.session("alice")), http.StatusOK)
	ptNoSharedFailures(t, fbA, fbB)
}

func ptRandomSecret(t *testing.T) string {
	var b [32]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	return base64.RawURLEncoding.EncodeToString(b[:])
}

func TestProtectWrongSecretDoesNotSpendVictimBudget(t *testing.T) {
	e := ptNewEnv(t)
	prefix := testenv.RedisPrefix(t)
	fbA, fbB := ptSharedLimiter(t, prefix), ptSharedLimiter(t, prefix)
	a := e.instance(ptOpts{protection: api.Protection{Limiter: fbA, SessionLimit: ptSessionLimit3}})
	b := e.instance(ptOpts{protection: api.Protection{Limiter: fbB, SessionLimit: ptSessionLimit3}})
	victim := e.session("victim")
	sid, _, _ := strings.Cut(victim, ".")

	// The sid is public (it is in every token). An attacker repeating one
	// made-up secret exhausts that secret's budget only...
	forged := sid + "." + ptRandomSecret(t)
	var unauthorized, limited int
	for i := range 6 {
		r := e.token([]*httptest.Server{a, b}[i%2], forged)
		switch {
		case r.status == http.StatusUnauthorized && r.problemCode() == "session_invalid":
			unauthorized++
		case r.status == http.StatusTooManyRequests:
			ptCheck429(t, r, "session", 1, 40)
			limited++
		default:
			t.Fatalf("forged cookie: %s", r)
		}
	}
	if unauthorized != 3 || limited != 3 {
		t.Fatalf("forged cookie: %d 401 and %d 429, want 3 and 3", unauthorized, limited)
	}
	// ...and rotating secrets gives each its own budget: all 401.
	for i := range 10 {
		r := e.token([]*httptest.Server{a, b}[i%2], sid+"."+ptRandomSecret(t))
		if r.status != http.StatusUnauthorized {
			t.Fatalf("rotating forged secrets: %s", r)
		}
	}
	// The victim still has the whole budget.
	for _, srv := range []*httptest.Server{b, a, b} {
		ptStatus(t, e.token(srv, victim), http.StatusOK)
	}
	ptCheck429(t, e.token(a, victim), "session", 1, 40)
	ptNoSharedFailures(t, fbA, fbB)
}

// ptClock is a settable clock for the local limiter.
type ptClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *ptClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *ptClock) Set(t time.Time) {
	c.mu.Lock()
	c.t = t
	c.mu.Unlock()
}

// ptRand is an injected jitter source: it records the n it was asked for
// and returns a chosen value.
type ptRand struct {
	mu   sync.Mutex
	ns   []int
	next int
}

func (r *ptRand) IntN(n int) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.ns = append(r.ns, n)
	if r.next < 0 || r.next >= n {
		panic(fmt.Sprintf("ptRand: %d is not in [0, %d)", r.next, n))
	}
	return r.next
}

func (r *ptRand) take(next int) (ns []int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	ns, r.ns, r.next = r.ns, nil, next
	return ns
}

// With a fake clock the limiter's wait is exact, and with an injected
// random source the mapping wait -> Retry-After can be checked exactly:
// uniform over [ceil(wait), 2*ceil(wait)].
func TestProtectRetryAfterRangeIsExact(t *testing.T) {
	e := ptNewEnv(t)
	t0 := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	clock := &ptClock{t: t0}
	rnd := &ptRand{}
	srv := e.instance(ptOpts{
		randN: rnd.IntN,
		protection: api.Protection{
			Limiter:      ratelimit.NewFallback(nil, ratelimit.FallbackOptions{Now: clock.Now}),
			SessionLimit: ptSessionLimit3,
			IPLimit:      ratelimit.Limit{Rate: 100, Period: time.Minute, Burst: 100},
		},
	})
	cookie := e.session("alice")

	r := e.token(srv, cookie)
	ptStatus(t, r, http.StatusOK)
	if got, want := r.header.Get("RateLimit-Policy"), `"ip";q=100;w=60, "session";q=3;w=60`; got != want {
		t.Errorf("RateLimit-Policy %q, want %q", got, want)
	}
	if got, want := r.header.Get("RateLimit"), `"ip";r=99;t=1, "session";r=2;t=20`; got != want {
		t.Errorf("RateLimit %q, want %q", got, want)
	}
	e.token(srv, cookie)
	e.token(srv, cookie)

	for _, tc := range []struct {
		at       time.Duration // since t0, when the budget ran out
		draw, ra int
		n        int // the n RandN must be asked for: ceil(wait)+1 values
	}{
		{at: 0, draw: 0, ra: 20, n: 21}, // wait 20s: [20, 40]
		{at: 0, draw: 20, ra: 40, n: 21},
		{at: 0, draw: 7, ra: 27, n: 21},
		{at: 17800 * time.Millisecond, draw: 0, ra: 3, n: 4}, // wait 2.2s: [3, 6]
		{at: 17800 * time.Millisecond, draw: 3, ra: 6, n: 4},
		{at: 19500 * time.Millisecond, draw: 0, ra: 1, n: 2}, // wait 0.5s: [1, 2]
		{at: 19500 * time.Millisecond, draw: 1, ra: 2, n: 2},
		{at: 19999 * time.Millisecond, draw: 1, ra: 2, n: 2}, // wait 1ms: still at least 1s
	} {
		clock.Set(t0.Add(tc.at))
		rnd.take(tc.draw)
		r := e.token(srv, cookie)
		if got := ptCheck429(t, r, "session", tc.ra, tc.ra); got != tc.ra {
			t.Fatalf("at %v, draw %d: Retry-After %d, want %d", tc.at, tc.draw, got, tc.ra)
		}
		if ns := rnd.take(0); len(ns) != 1 || ns[0] != tc.n {
			t.Fatalf("at %v: RandN asked for %v, want [%d]", tc.at, ns, tc.n)
		}
		if got, want := r.header.Get("RateLimit-Policy"), `"ip";q=100;w=60, "session";q=3;w=60`; got != want {
			t.Errorf("429 RateLimit-Policy %q, want %q", got, want)
		}
		var p struct {
			Type   string `json:"type"`
			Status int    `json:"status"`
			Title  string `json:"title"`
			Detail string `json:"detail"`
		}
		if err := json.Unmarshal(r.body, &p); err != nil || p.Type != "urn:tokend:problem:rate_limited" ||
			p.Status != 429 || p.Title == "" || !strings.Contains(p.Detail, "session") {
			t.Fatalf("429 body %s (%v)", r.body, err)
		}
	}
	// Exactly one interval after the budget ran out, one request passes.
	clock.Set(t0.Add(20 * time.Second))
	ptStatus(t, e.token(srv, cookie), http.StatusOK)
}

// With the real random source, clients refused at the same moment are told
// different Retry-After values, within [ceil(wait), 2*ceil(wait)].
func TestProtectRetryAfterJitter(t *testing.T) {
	e := ptNewEnv(t)
	limit := ratelimit.Limit{Rate: 1, Period: time.Minute, Burst: 1}
	srv := e.instance(ptOpts{protection: api.Protection{
		Limiter:      ratelimit.NewFallback(nil, ratelimit.FallbackOptions{}),
		SessionLimit: limit,
	}})
	const clients, refusals = 40, 5
	cookies := make([]string, clients)
	for i := range cookies {
		cookies[i] = e.session(fmt.Sprintf("user%d", i))
	}
	start := time.Now()
	for _, c := range cookies {
		ptStatus(t, e.token(srv, c), http.StatusOK)
	}
	seen := map[int]int{}
	for range refusals {
		for _, c := range cookies {
			ra := ptCheck429(t, e.token(srv, c), "session", ptLowerBound(time.Minute, start), 120)
			seen[ra]++
		}
	}
	// 200 draws from 61 values: fewer than 10 distinct ones has a
	// probability far below 1e-100.
	if len(seen) < 10 {
		t.Fatalf("Retry-After values of %d refusals: %v; want them spread by jitter", clients*refusals, seen)
	}
}

// ptBlocking is a session service whose Refresh, for one cookie, holds its
// request until released, so a test can occupy the shedding slots.
type ptBlocking struct {
	*session.Service
	cookie     string
	entered    chan struct{}
	release    chan struct{}
	releaseAll func()
}

func (b *ptBlocking) Refresh(ctx context.Context, cookie string) (session.Token, error) {
	if cookie == b.cookie {
		b.entered <- struct{}{}
		select {
		case <-b.release:
		case <-ctx.Done():
			return session.Token{}, ctx.Err()
		}
	}
	return b.Service.Refresh(ctx, cookie)
}

// ptHeld starts n token requests with the blocking cookie and returns once
// each holds a slot; their answers arrive on the returned channel.
func (e *ptEnv) ptHeld(srv *httptest.Server, b *ptBlocking, n int) <-chan ptResp {
	e.t.Helper()
	out := make(chan ptResp, n)
	for range n {
		go func() {
			r, err := e.do("POST", srv.URL+"/v1/token", ptCookie(b.cookie), "")
			if err != nil {
				r = ptResp{status: -1, body: []byte(err.Error())}
			}
			out <- r
		}()
	}
	for i := range n {
		select {
		case <-b.entered:
		case <-time.After(10 * time.Second): // a hang guard, not a timing assertion
			e.t.Fatalf("only %d of %d blocking requests reached the handler", i, n)
		}
	}
	return out
}

func ptNewBlocking(blockCookie string) *ptBlocking {
	b := &ptBlocking{cookie: blockCookie, entered: make(chan struct{}, 64), release: make(chan struct{})}
	b.releaseAll = sync.OnceFunc(func() { close(b.release) })
	return b
}

// opts returns instance options that serve sessions through b and release
// its held requests before the server closes.
func (b *ptBlocking) opts(p api.Protection) ptOpts {
	return ptOpts{
		protection: p,
		sessions:   func(s *session.Service) api.Sessions { b.Service = s; return b },
		onClose:    b.releaseAll,
	}
}

// ptCheckUnprotected checks that the routes outside the protection answer
// normally: the JWKS, health checks, admin API and CORS preflights.
func (e *ptEnv) ptCheckUnprotected(srv *httptest.Server, times int) error {
	admin := http.Header{"Authorization": {"Bearer " + ptAdminKey}}
	preflight := http.Header{"Origin": {ptOrigin}, "Access-Control-Request-Method": {"POST"}}
	for range times {
		for _, c := range []struct {
			method, path string
			header       http.Header
			want         int
		}{
			{"GET", "/.well-known/jwks.json", nil, 200},
			{"GET", "/healthz", nil, 200},
			{"GET", "/readyz", nil, 200},
			{"GET", "/v1/admin/sessions?subject=alice", admin, 200},
			{"OPTIONS", "/v1/token", preflight, 204},
		} {
			r, err := e.do(c.method, srv.URL+c.path, c.header, "")
			if err != nil {
				return err
			}
			if r.status != c.want || r.header.Get("Retry-After") != "" || r.header.Get("RateLimit") != "" {
				return fmt.Errorf("%s %s: %s %v, want %d without limit headers", c.method, c.path, r, r.header, c.want)
			}
		}
	}
	return nil
}

func TestProtectShedding(t *testing.T) {
	e := ptNewEnv(t)
	b := ptNewBlocking(e.session("held"))
	srv := e.instance(b.opts(api.Protection{
		MaxInflight: 2, MaxQueue: 1, QueueWait: 20 * time.Millisecond, ShedRetryAfter: 3 * time.Second,
	}))
	cookie := e.session("alice")

	held := e.ptHeld(srv, b, 2)
	// Every slot is held and stays held until release below: whatever
	// answers now was refused without being served.
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for i := range 20 {
		wg.Go(func() {
			h := ptCookie(cookie)
			if i%2 == 0 {
				h.Set("Origin", ptOrigin)
			}
			r, err := e.do("POST", srv.URL+"/v1/token", h, "")
			if err == nil {
				_, err = ptCheckRefusal(r, http.StatusServiceUnavailable, "overloaded", 1, 3)
			}
			if err == nil && i%2 == 0 && (r.header.Get("Access-Control-Allow-Origin") != ptOrigin ||
				!strings.Contains(r.header.Get("Access-Control-Expose-Headers"), "Retry-After")) {
				err = fmt.Errorf("503 to an allowed origin without CORS headers: %v", r.header)
			}
			if err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		t.FailNow()
	}
	// The other protected routes share the bound.
	svcHdr := http.Header{"Authorization": {"Bearer " + ptServiceKey}}
	if _, err := ptCheckRefusal(e.must("POST", srv.URL+"/v1/sessions", svcHdr, `{"subject":"bob"}`),
		http.StatusServiceUnavailable, "overloaded", 1, 3); err != nil {
		t.Fatalf("POST /v1/sessions while saturated: %v", err)
	}
	if _, err := ptCheckRefusal(e.must("DELETE", srv.URL+"/v1/session", ptCookie(cookie), ""),
		http.StatusServiceUnavailable, "overloaded", 1, 3); err != nil {
		t.Fatalf("DELETE /v1/session while saturated: %v", err)
	}
	// Everything else is never shed.
	if err := e.ptCheckUnprotected(srv, 5); err != nil {
		t.Fatalf("while saturated: %v", err)
	}
	select {
	case r := <-held:
		t.Fatalf("a held request finished before release: %s", r)
	default:
	}

	b.releaseAll()
	for range 2 {
		ptStatus(t, <-held, http.StatusOK)
	}
	for range 5 {
		ptStatus(t, e.token(srv, cookie), http.StatusOK)
	}
	ptStatus(t, e.createSession(srv, ptServiceKey), http.StatusCreated)
}

// A request finding the queue full is refused at once; one in the queue is
// served when a slot frees. QueueWait is far longer than the test, so the
// only way for a 503 to arrive while the slots are held is the
// refused-at-once path.
func TestProtectQueueFullIsShedAtOnce(t *testing.T) {
	e := ptNewEnv(t)
	b := ptNewBlocking(e.session("held"))
	rnd := &ptRand{next: 0}
	o := b.opts(api.Protection{MaxInflight: 2, MaxQueue: 1, QueueWait: time.Hour, ShedRetryAfter: 7 * time.Second})
	o.randN = rnd.IntN
	srv := e.instance(o)
	cookie := e.session("alice")
	held := e.ptHeld(srv, b, 2)

	// Two requests compete for the one queue place.
	answers := make(chan ptResp, 2)
	for range 2 {
		go func() {
			r, err := e.do("POST", srv.URL+"/v1/token", ptCookie(cookie), "")
			if err != nil {
				r = ptResp{status: -1, body: []byte(err.Error())}
			}
			answers <- r
		}()
	}
	var first ptResp
	select {
	case first = <-answers:
	case <-time.After(10 * time.Second): // a hang guard, not a timing assertion
		t.Fatal("no request was shed while both slots and the queue were taken")
	}
	if _, err := ptCheckRefusal(first, http.StatusServiceUnavailable, "overloaded", 1, 1); err != nil {
		t.Fatalf("the request finding the queue full: %v", err)
	}
	// Retry-After for 503 draws from [1, ShedRetryAfter]: 7 values.
	if ns := rnd.take(6); len(ns) != 1 || ns[0] != 7 {
		t.Fatalf("RandN asked for %v, want [7]", ns)
	}
	if _, err := ptCheckRefusal(e.token(srv, cookie), http.StatusServiceUnavailable, "overloaded", 7, 7); err != nil {
		t.Fatalf("with the top draw: %v", err)
	}
	select {
	case r := <-answers:
		t.Fatalf("the queued request finished while no slot was free: %s", r)
	default:
	}

	b.release <- struct{}{} // one held request finishes and frees its slot
	ptStatus(t, <-held, http.StatusOK)
	ptStatus(t, <-answers, http.StatusOK) // the queued one got it
	b.release <- struct{}{}
	ptStatus(t, <-held, http.StatusOK)
}

// An overload run: many clients hammer the token endpoint of an instance
// with a small concurrency bound. Only 200, 429 and 503 may appear, every
// refusal says when to retry, no session gets more than its budget, and the
// unprotected routes keep answering.
func TestProtectOverloadRun(t *testing.T) {
	e := ptNewEnv(t)
	b := ptNewBlocking(e.session("held"))
	limit := ratelimit.Limit{Rate: 1, Period: time.Minute, Burst: 5}
	const maxInflight, workers, perWorker = 2, 64, 32
	srv := e.instance(b.opts(api.Protection{
		Limiter:      ratelimit.NewFallback(nil, ratelimit.FallbackOptions{}),
		SessionLimit: limit,
		MaxInflight:  maxInflight, MaxQueue: 1, QueueWait: time.Millisecond, ShedRetryAfter: 2 * time.Second,
	}))
	cookies := make([]string, workers)
	for i := range cookies {
		cookies[i] = e.session(fmt.Sprintf("user%d", i))
	}

	type tally struct {
		mu     sync.Mutex
		counts map[int]int
		ok     []int // 200s per worker
		errs   []string
	}
	run := func(n int) *tally {
		tl := &tally{counts: map[int]int{}, ok: make([]int, workers)}
		var wg sync.WaitGroup
		for w := range workers {
			wg.Go(func() {
				for range n {
					r, err := e.do("POST", srv.URL+"/v1/token", ptCookie(cookies[w]), "")
					switch {
					case err != nil:
					case r.status == http.StatusOK:
					case r.status == http.StatusTooManyRequests:
						_, err = ptCheckRefusal(r, r.status, "rate_limited", 1, 2*60)
					case r.status == http.StatusServiceUnavailable:
						_, err = ptCheckRefusal(r, r.status, "overloaded", 1, 2)
					default:
						err = fmt.Errorf("unexpected answer %s", r)
					}
					tl.mu.Lock()
					tl.counts[r.status]++
					if r.status == http.StatusOK {
						tl.ok[w]++
					}
					if err != nil && len(tl.errs) < 10 {
						tl.errs = append(tl.errs, err.Error())
					}
					tl.mu.Unlock()
				}
			})
		}
		wg.Wait()
		return tl
	}

	// Phase 1: every slot is held, so the whole herd is shed, while the
	// unprotected routes answer.
	held := e.ptHeld(srv, b, maxInflight)
	unprotected := make(chan error, 1)
	go func() { unprotected <- e.ptCheckUnprotected(srv, 10) }()
	p1 := run(4)
	if err := <-unprotected; err != nil {
		t.Fatalf("while saturated: %v", err)
	}
	if len(p1.errs) > 0 || p1.counts[http.StatusServiceUnavailable] != workers*4 {
		t.Fatalf("with every slot held: %v, errors %q; want only 503", p1.counts, p1.errs)
	}

	// Phase 2: slots free; the herd competes for them and its budgets.
	b.releaseAll()
	for range maxInflight {
		ptStatus(t, <-held, http.StatusOK)
	}
	start := time.Now()
	stop := make(chan struct{})
	go func() {
		var err error
		for err == nil {
			select {
			case <-stop:
				unprotected <- nil
				return
			default:
			}
			err = e.ptCheckUnprotected(srv, 1)
		}
		unprotected <- err
	}()
	p2 := run(perWorker)
	close(stop)
	if err := <-unprotected; err != nil {
		t.Fatalf("during the overload run: %v", err)
	}
	elapsed := time.Since(start)
	t.Logf("overload run: %v", p2.counts)
	if len(p2.errs) > 0 {
		t.Fatalf("overload run: %v, errors %q", p2.counts, p2.errs)
	}
	total := 0
	for status, n := range p2.counts {
		if status != 200 && status != 429 && status != 503 {
			t.Errorf("status %d appeared %d times", status, n)
		}
		total += n
	}
	if total != workers*perWorker || p2.counts[http.StatusOK] == 0 {
		t.Fatalf("overload run: %v; want %d answers, some 200", p2.counts, workers*perWorker)
	}
	budget := limit.Burst + int(elapsed/limit.Interval()) + 1
	for w, n := range p2.ok {
		if n > budget {
			t.Fatalf("session %d got %d tokens, more than its budget of %d", w, n, budget)
		}
	}
}

func TestProtectCORSOnRateLimited(t *testing.T) {
	e := ptNewEnv(t)
	srv := e.instance(ptOpts{protection: api.Protection{
		Limiter:      ratelimit.NewFallback(nil, ratelimit.FallbackOptions{}),
		SessionLimit: ratelimit.Limit{Rate: 1, Period: time.Minute, Burst: 1},
	}})
	cookie := e.session("alice")
	r := e.token(srv, cookie, "Origin", ptOrigin)
	ptStatus(t, r, http.StatusOK)
	r = e.token(srv, cookie, "Origin", ptOrigin)
	ptCheck429(t, r, "session", 1, 120)
	if r.header.Get("Access-Control-Allow-Origin") != ptOrigin || r.header.Get("Access-Control-Allow-Credentials") != "true" {
		t.Fatalf("429 to an allowed origin: %v", r.header)
	}
	exposed := map[string]bool{}
	for _, h := range strings.Split(r.header.Get("Access-Control-Expose-Headers"), ",") {
		exposed[strings.ToLower(strings.TrimSpace(h))] = true
	}
	for _, h := range []string{"retry-after", "ratelimit", "ratelimit-policy"} {
		if !exposed[h] {
			t.Errorf("Access-Control-Expose-Headers %q lacks %s", r.header.Get("Access-Control-Expose-Headers"), h)
		}
	}
	if !strings.Contains(strings.Join(r.header.Values("Vary"), ","), "Origin") {
		t.Errorf("429 without Vary: Origin: %v", r.header)
	}
	// A foreign origin is refused before any limit, and learns nothing
	// about the budget.
	r = e.token(srv, cookie, "Origin", "https://evil.example")
	if r.status != http.StatusForbidden || r.problemCode() != "origin_not_allowed" ||
		r.header.Get("Retry-After") != "" || r.header.Get("Access-Control-Allow-Origin") != "" {
		t.Fatalf("foreign origin: %s %v", r, r.header)
	}
}

// Neither the JWKS nor the health checks nor the admin API are limited,
// even when the client's IP is out of budget.
func TestProtectUnprotectedRoutesIgnoreLimits(t *testing.T) {
	e := ptNewEnv(t)
	srv := e.instance(ptOpts{protection: api.Protection{
		Limiter: ratelimit.NewFallback(nil, ratelimit.FallbackOptions{}),
		IPLimit: ratelimit.Limit{Rate: 1, Period: time.Hour, Burst: 1},
	}})
	ptStatus(t, e.token(srv, e.session("alice")), http.StatusOK)
	ptCheck429(t, e.token(srv, e.session("alice")), "ip", 1, 7200)
	if err := e.ptCheckUnprotected(srv, 20); err != nil {
		t.Fatal(err)
	}
}

// The session limit keys on a well-formed cookie; requests without one are
// left to the IP limit (here off) and the handler's 401.
func TestProtectSessionLimitSkipsRequestsWithoutSession(t *testing.T) {
	e := ptNewEnv(t)
	srv := e.instance(ptOpts{protection: api.Protection{
		Limiter:      ratelimit.NewFallback(nil, ratelimit.FallbackOptions{}),
		SessionLimit: ratelimit.Limit{Rate: 1, Period: time.Hour, Burst: 1},
	}})
	for _, cookie := range []string{"", "garbage", strings.Repeat("a", 66)} {
		for range 3 {
			r := e.token(srv, cookie)
			if r.status != http.StatusUnauthorized || r.header.Get("RateLimit") != "" {
				t.Fatalf("cookie %q: %s %v, want 401 without limit headers", cookie, r, r.header)
			}
		}
	}
}

// Redis dies under load: no request fails, limits go per instance; Redis
// comes back: after the pause, limits are shared again by themselves.
func TestProtectRedisKilledMidLoad(t *testing.T) {
	e := ptNewEnv(t)
	rs := testenv.StartRedis(t, 0)
	logs := &ptSyncBuffer{}
	const prefix = "tokend:rl:"
	limit := ratelimit.Limit{Rate: 5, Period: time.Minute, Burst: 5}
	fbA := ptRedisLimiter(t, rs.URL(), prefix, 100*time.Millisecond, logs)
	fbB := ptRedisLimiter(t, rs.URL(), prefix, 100*time.Millisecond, logs)
	a := e.instance(ptOpts{protection: api.Protection{Limiter: fbA, SessionLimit: limit}})
	b := e.instance(ptOpts{protection: api.Protection{Limiter: fbB, SessionLimit: limit}})
	servers := []*httptest.Server{a, b}
	cookies := make([]string, 32)
	for i := range cookies {
		cookies[i] = e.session(fmt.Sprintf("user%d", i))
	}

	var (
		answered atomic.Int64
		mu       sync.Mutex
		counts   = map[int]int{}
		bad      []string
		stop     = make(chan struct{})
		wg       sync.WaitGroup
	)
	for w := range 16 {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				r, err := e.do("POST", servers[(w+i)%2].URL+"/v1/token", ptCookie(cookies[(w*7+i)%len(cookies)]), "")
				if err == nil && r.status == http.StatusTooManyRequests {
					_, err = ptCheckRefusal(r, r.status, "rate_limited", 1, 2*60)
				}
				mu.Lock()
				counts[r.status]++
				if err == nil && r.status != http.StatusOK && r.status != http.StatusTooManyRequests {
					err = fmt.Errorf("unexpected answer %s", r)
				}
				if err != nil && len(bad) < 10 {
					bad = append(bad, err.Error())
				}
				mu.Unlock()
				answered.Add(1)
			}
		})
	}
	stopLoad := sync.OnceFunc(func() { close(stop); wg.Wait() })
	t.Cleanup(stopLoad)

	// waitFor polls cond while the load runs; the deadline only guards
	// against a hang.
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("%s did not happen; stats A %+v B %+v", what, fbA.Stats(), fbB.Stats())
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	both := func(f func(ratelimit.FallbackStats) bool) func() bool {
		return func() bool { return f(fbA.Stats()) && f(fbB.Stats()) }
	}

	waitFor("200 answers with Redis up", func() bool { return answered.Load() >= 200 })
	ptNoSharedFailures(t, fbA, fbB)

	rs.Kill()
	waitFor("both instances degrading to local limits", both(func(s ratelimit.FallbackStats) bool { return s.Degraded }))
	localAtKill := fbA.Stats().LocalDecisions + fbB.Stats().LocalDecisions
	waitFor("local decisions", func() bool {
		return fbA.Stats().LocalDecisions+fbB.Stats().LocalDecisions >= localAtKill+100
	})

	rs.Start()
	waitFor("both instances back on Redis", both(func(s ratelimit.FallbackStats) bool { return !s.Degraded }))
	stopLoad()

	mu.Lock()
	t.Logf("answers: %v", counts)
	if len(bad) > 0 {
		t.Fatalf("answers %v; failures: %q", counts, bad)
	}
	if counts[http.StatusOK] == 0 || counts[http.StatusTooManyRequests] == 0 {
		t.Fatalf("answers %v: want both 200 and 429", counts)
	}
	mu.Unlock()
	for i, fb := range []*ratelimit.Fallback{fbA, fbB} {
		if st := fb.Stats(); st.Outages < 1 || st.SharedErrors < 1 || st.LocalDecisions == 0 {
			t.Errorf("instance %d stats after the outage: %+v", i, st)
		}
	}

	// Shared again: a fresh session's budget of 5 is spent across both
	// instances, and its state is in the restarted Redis.
	localBefore := fbA.Stats().LocalDecisions + fbB.Stats().LocalDecisions
	fresh := e.session("fresh")
	for i := range 5 {
		ptStatus(t, e.token(servers[i%2], fresh), http.StatusOK)
	}
	ptCheck429(t, e.token(b, fresh), "session", 1, 2*12)
	if localAfter := fbA.Stats().LocalDecisions + fbB.Stats().LocalDecisions; localAfter != localBefore {
		t.Fatalf("%d decisions were still local after recovery", localAfter-localBefore)
	}
	sid, _, _ := strings.Cut(fresh, ".")
	keys, err := rs.Client().Keys(context.Background(), "*"+prefix+"s:"+sid+"*").Result()
	if err != nil || len(keys) != 1 {
		t.Fatalf("the fresh session's key in the restarted Redis: %q, %v", keys, err)
	}

	out := logs.String()
	if strings.Count(out, "shared rate limiter unavailable") < 2 || !strings.Contains(out, "level=WARN") {
		t.Errorf("each instance should warn once when Redis goes away:\n%s", out)
	}
	if strings.Count(out, "shared limiting resumed") < 2 {
		t.Errorf("each instance should log the recovery:\n%s", out)
	}
	for _, c := range append(cookies, fresh) {
		_, secret, _ := strings.Cut(c, ".")
		if strings.Contains(out, secret) {
			t.Fatalf("the log contains a session secret:\n%s", out)
		}
	}
}
