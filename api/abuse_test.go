package api

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/tokend/tokend/issuer"
	"github.com/tokend/tokend/session"
	"github.com/tokend/tokend/store/memory"
)

// countingStore counts every call that reaches the session store.
type countingStore struct {
	session.Store
	lookups atomic.Int64 // Session
	calls   atomic.Int64 // every method
}

func (c *countingStore) Session(ctx context.Context, sid string) (session.Session, error) {
	c.lookups.Add(1)
	c.calls.Add(1)
	return c.Store.Session(ctx, sid)
}

func (c *countingStore) CreateSession(ctx context.Context, s session.Session) error {
	c.calls.Add(1)
	return c.Store.CreateSession(ctx, s)
}

func (c *countingStore) TouchSession(ctx context.Context, sid string, at time.Time) error {
	c.calls.Add(1)
	return c.Store.TouchSession(ctx, sid, at)
}

func (c *countingStore) RevokeSession(ctx context.Context, sid string, at time.Time, reason string) (session.Session, error) {
	c.calls.Add(1)
	return c.Store.RevokeSession(ctx, sid, at, reason)
}

func (c *countingStore) RevokeSubject(ctx context.Context, subject string, at time.Time, reason string) ([]string, error) {
	c.calls.Add(1)
	return c.Store.RevokeSubject(ctx, subject, at, reason)
}

func (c *countingStore) SessionsBySubject(ctx context.Context, subject string, limit int) ([]session.Session, error) {
	c.calls.Add(1)
	return c.Store.SessionsBySubject(ctx, subject, limit)
}

func (c *countingStore) Revocations(ctx context.Context, after int64, limit int) ([]session.Revocation, error) {
	c.calls.Add(1)
	return c.Store.Revocations(ctx, after, limit)
}

// newCountingServer is the real router over the real session service, whose
// store counts what reaches it.
func newCountingServer(t *testing.T) (http.Handler, *countingStore) {
	t.Helper()
	key, err := issuer.GenerateKey(issuer.ES256, time.Now())
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
	store := &countingStore{Store: memory.New()}
	svc := session.NewService(store, iss, session.Config{TokenTTL: tokenTTL, SessionTTL: defaultTTL})
	h := NewServer(Options{
		Logger:   slog.New(slog.DiscardHandler),
		Sessions: svc,
		Keys:     iss,
		Config: Config{
			Cookie:      Cookie{Name: cookieName, Path: "/v1", Secure: true, SameSite: http.SameSiteStrictMode},
			ServiceKeys: []string{testServiceKey},
			AdminKeys:   []string{testAdminKey},
		},
	})
	return h, store
}

// garbageCookie returns the i-th malformed session cookie value of a
// deterministic sequence covering every way a value can miss the
// "<22 base64url>.<43 base64url>" shape. None of them is well-formed, so
// none may cost a store lookup.
func garbageCookie(rng *rand.Rand, i int) (kind, value string) {
	const b64url = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
	const notB64url = "+/=!~*.%$&'()@:[]{}<>?\"\\ \t,;é\x00\x7f\xff"
	word := func(n int) string {
		b := make([]byte, n)
		for i := range b {
			b[i] = b64url[rng.IntN(len(b64url))]
		}
		return string(b)
	}
	good := func() string {
		return word(session.SIDLength) + "." + word(session.CookieValueLength-session.SIDLength-1)
	}
	switch i % 12 {
	case 0:
		b := make([]byte, rng.IntN(200))
		for i := range b {
			b[i] = byte(rng.UintN(256))
		}
		return "random bytes", string(b)
	case 1:
		n := rng.IntN(200)
		for n == session.CookieValueLength {
			n = rng.IntN(200)
		}
		return "base64url of a wrong length", word(n)
	case 2:
		v := []byte(good())
		v[session.SIDLength] = b64url[rng.IntN(len(b64url))]
		return "no dot", string(v)
	case 3:
		v := []byte(word(session.CookieValueLength))
		at := rng.IntN(session.CookieValueLength)
		for at == session.SIDLength {
			at = rng.IntN(session.CookieValueLength)
		}
		v[at] = '.'
		return "dot misplaced", string(v)
	case 4:
		v := []byte(good())
		at := rng.IntN(session.CookieValueLength)
		if at == session.SIDLength {
			at++
		}
		v[at] = notB64url[rng.IntN(len(notB64url))]
		return "right shape, not base64url", string(v)
	case 5:
		// Standard base64 with padding: 16 and 32 bytes encode to 24 and
		// 44 characters, '+', '/' and '='.
		sid := make([]byte, 16)
		sec := make([]byte, 32)
		for i := range sid {
			sid[i] = byte(rng.UintN(256))
		}
		for i := range sec {
			sec[i] = byte(rng.UintN(256))
		}
		return "padded standard base64", base64.StdEncoding.EncodeToString(sid) + "." + base64.StdEncoding.EncodeToString(sec)
	case 6:
		v := good()
		cut := 1 + rng.IntN(len(v)-1)
		if rng.IntN(2) == 0 {
			return "truncated", v[:len(v)-cut]
		}
		return "extended", v + word(cut)
	case 7:
		return "two dots", word(session.SIDLength) + "." + word(20) + "." + word(22)
	case 8:
		return "sid only", word(session.SIDLength)
	case 9:
		return "empty parts", strings.Repeat(".", 1+rng.IntN(session.CookieValueLength))
	case 10:
		return "quoted garbage", `"` + word(rng.IntN(80)) + `"`
	default:
		return "url-escaped", strings.ReplaceAll(good(), "-", "%2D") + "%00"
	}
}

// TestGarbageCookiesCostNoLookups sends 10,000 malformed session cookies:
// each is refused with 401 session_invalid before the store is asked.
// Garbage must cost no more than parsing, so that a flood of it cannot
// reach the database.
func TestGarbageCookiesCostNoLookups(t *testing.T) {
	h, store := newCountingServer(t)
	rng := rand.New(rand.NewPCG(7, 11))
	const n = 10_000
	kinds := map[string]int{}
	for i := range n {
		kind, value := garbageCookie(rng, i)
		if _, err := session.ParseCookie(value); err == nil {
			t.Fatalf("generator bug: %s cookie %q is well-formed", kind, value)
		}
		kinds[kind]++
		for _, target := range []struct{ method, path string }{{"POST", "/v1/token"}, {"DELETE", "/v1/session"}} {
			if target.method == "DELETE" && i%10 != 0 {
				continue // logout takes the same path; a sample is enough
			}
			req := httptest.NewRequest(target.method, "http://"+testHost+target.path, nil)
			req.Header.Set("Cookie", cookieName+"="+value)
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, req)
			var p problemBody
			_ = json.Unmarshal(rec.Body.Bytes(), &p)
			if rec.Code != http.StatusUnauthorized || p.Code != "session_invalid" {
				t.Fatalf("%s %s with %s cookie %q: %d %s, want 401 session_invalid",
					target.method, target.path, kind, value, rec.Code, rec.Body)
			}
		}
	}
	if got := store.calls.Load(); got != 0 {
		t.Errorf("%d malformed cookies cost %d store calls (%d session lookups), want none", n, got, store.lookups.Load())
	}
	t.Logf("%d malformed cookies by kind: %v", n, kinds)

	// The counter does count: a well-formed cookie of an unknown session
	// costs exactly one lookup, and is refused just the same.
	const unknown = 100
	for i := range unknown {
		sid := base64.RawURLEncoding.EncodeToString(fmt.Appendf(nil, "unknown-sid-%04d", i))
		value := sid + "." + base64.RawURLEncoding.EncodeToString([]byte(strings.Repeat("s", 32)))
		if _, err := session.ParseCookie(value); err != nil {
			t.Fatalf("generator bug: %q is not well-formed: %v", value, err)
		}
		req := httptest.NewRequest("POST", "http://"+testHost+"/v1/token", nil)
		req.Header.Set("Cookie", cookieName+"="+value)
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		var p problemBody
		_ = json.Unmarshal(rec.Body.Bytes(), &p)
		if rec.Code != http.StatusUnauthorized || p.Code != "session_invalid" {
			t.Fatalf("unknown session %q: %d %s, want 401 session_invalid", value, rec.Code, rec.Body)
		}
	}
	if got := store.lookups.Load(); got != unknown {
		t.Errorf("%d well-formed cookies of unknown sessions cost %d lookups, want exactly %d", unknown, got, unknown)
	}
}

// routeAccess says which credential a route requires.
type routeAccess int

const (
	accessPublic  routeAccess = iota // no credential
	accessCookie                     // the session cookie
	accessService                    // a service key
	accessAdmin                      // an admin key
	accessDevOnly                    // dev mode only; 404 otherwise
)

// routeAccessTable classifies every route the router serves. A route added
// without an entry here fails TestKeysAreNotInterchangeable, so that nobody
// adds an endpoint without deciding who may call it.
var routeAccessTable = map[string]routeAccess{
	"GET /healthz":                             accessPublic,
	"GET /readyz":                              accessPublic,
	"GET /.well-known/jwks.json":               accessPublic,
	"GET /metrics":                             accessPublic,
	"GET /js/tokend.js":                        accessPublic,
	"GET /":                                    accessDevOnly,
	"POST /dev/session":                        accessDevOnly,
	"OPTIONS /v1/token":                        accessPublic, // CORS preflight
	"OPTIONS /v1/session":                      accessPublic, // CORS preflight
	"POST /v1/token":                           accessCookie,
	"DELETE /v1/session":                       accessCookie,
	"POST /v1/sessions":                        accessService,
	"GET /v1/revocations":                      accessService,
	"GET /v1/revocations/stream":               accessService,
	"GET /v1/admin/sessions":                   accessAdmin,
	"GET /v1/admin/sessions/{sid}":             accessAdmin,
	"DELETE /v1/admin/sessions/{sid}":          accessAdmin,
	"POST /v1/admin/subjects/{subject}/revoke": accessAdmin,
	"GET /v1/admin/keys":                       accessAdmin,
	"POST /v1/admin/keys/rotate":               accessAdmin,
}

// TestKeysAreNotInterchangeable sends every service and admin route each
// kind of credential: an admin key never opens a service route, a service
// key never opens an admin route, neither key nor a valid session cookie
// stands in for the other, and the right key does get through (so that the
// refusals are the key check's and not some other failure's).
func TestKeysAreNotInterchangeable(t *testing.T) {
	keyAdmin := withKeyAdmin(func(_ *issuer.Issuer, key issuer.Key, _ func() time.Time) KeyAdmin {
		return issuer.FixedKey{Key: key}
	})

	// Every route the router serves must be classified.
	probe := newEnv(t, keyAdmin)
	var routes []string
	walk := newServer(Options{Sessions: session.NewService(memory.New(), probe.iss, session.DefaultConfig()),
		Keys: probe.iss, KeyAdmin: issuer.FixedKey{Key: probe.key}})
	err := chi.Walk(walk.router, func(method, route string, _ http.Handler, _ ...func(http.Handler) http.Handler) error {
		routes = append(routes, method+" "+route)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range routes {
		if _, ok := routeAccessTable[r]; !ok {
			t.Errorf("route %q is not in routeAccessTable: decide which credential it requires and add it", r)
		}
	}
	for r := range routeAccessTable {
		if !slices.Contains(routes, r) {
			t.Errorf("routeAccessTable lists %q, which the router does not serve", r)
		}
	}

	// Concrete requests for the keyed routes.
	keyed := func(e *env, t *testing.T, route string) (method, target, body string) {
		created := e.createSession(t, `{"subject":"alice"}`)
		method, path, _ := strings.Cut(route, " ")
		path = strings.ReplaceAll(path, "{sid}", created.SID)
		path = strings.ReplaceAll(path, "{subject}", "alice")
		switch route {
		case "GET /v1/admin/sessions":
			path += "?subject=alice"
		case "POST /v1/sessions":
			body = `{"subject":"mallory"}`
		case "POST /v1/admin/subjects/{subject}/revoke":
			body = `{"reason":"test"}`
		}
		return method, path, body
	}
	realCookie := func(e *env, t *testing.T) string {
		return e.createSession(t, `{"subject":"carol"}`).Cookie.Value
	}
	for _, route := range slices.Sorted(func(yield func(string) bool) {
		for r := range routeAccessTable {
			if !yield(r) {
				return
			}
		}
	}) {
		access := routeAccessTable[route]
		if access != accessService && access != accessAdmin {
			continue
		}
		right, wrong := testServiceKey, testAdminKey
		if access == accessAdmin {
			right, wrong = testAdminKey, testServiceKey
		}
		refusals := []struct {
			name    string
			headers func(e *env, t *testing.T) []string
		}{
			{"the other kind of key", func(*env, *testing.T) []string { return bearer(wrong) }},
			{"the second service key", func(*env, *testing.T) []string { return bearer("svc-key-second-0123456789") }},
			{"a valid session cookie", func(e *env, t *testing.T) []string { return withCookie(realCookie(e, t)) }},
			{"a valid session cookie as the key", func(e *env, t *testing.T) []string { return bearer(realCookie(e, t)) }},
			{"the right key as a cookie", func(*env, *testing.T) []string { return withCookie(right) }},
		}
		for _, ref := range refusals {
			if access == accessService && ref.name == "the second service key" {
				continue // a valid service key
			}
			t.Run(route+"/refuses "+ref.name, func(t *testing.T) {
				e := newEnv(t, keyAdmin)
				method, target, body := keyed(e, t, route)
				before := e.adminGet(t, mustSID(t, target, e))
				rec := e.do(t, method, target, body, jsonBody(ref.headers(e, t)...)...)
				wantProblem(t, rec, http.StatusUnauthorized, "unauthorized")
				wantHeader(t, rec, "WWW-Authenticate", `Bearer realm="tokend"`)
				if after := e.adminGet(t, before.SID); after.Status != before.Status {
					t.Errorf("a refused request changed the session from %s to %s", before.Status, after.Status)
				}
				list := e.do(t, "GET", "/v1/admin/sessions?subject=mallory", "", bearer(testAdminKey)...)
				if !strings.Contains(list.Body.String(), `"sessions":[]`) {
					t.Errorf("a refused request created a session: %s", list.Body)
				}
			})
		}
		t.Run(route+"/admits the right key", func(t *testing.T) {
			e := newEnv(t, keyAdmin)
			method, target, body := keyed(e, t, route)
			req := newRequest(method, target, body, jsonBody(bearer(right)...)...)
			if route == "GET /v1/revocations/stream" {
				// The stream lasts as long as the request: end it at once.
				ctx, cancel := context.WithCancel(req.Context())
				cancel()
				req = req.WithContext(ctx)
			}
			rec := httptest.NewRecorder()
			e.h.ServeHTTP(rec, req)
			if rec.Code == http.StatusUnauthorized || rec.Code >= 500 {
				t.Errorf("%s %s with the right key: %d %s", method, target, rec.Code, rec.Body)
			}
		})
	}

	// Outside dev mode the dev routes do not exist, whatever the key.
	for route, access := range routeAccessTable {
		if access != accessDevOnly {
			continue
		}
		method, path, _ := strings.Cut(route, " ")
		for _, key := range []string{testServiceKey, testAdminKey} {
			t.Run(route+"/absent outside dev mode", func(t *testing.T) {
				e := newEnv(t)
				wantProblem(t, e.do(t, method, path, `{"subject":"x"}`, jsonBody(bearer(key)...)...), http.StatusNotFound, "not_found")
			})
		}
	}

	// The cookie endpoints take neither key in place of a cookie.
	for _, target := range []struct{ method, path string }{{"POST", "/v1/token"}, {"DELETE", "/v1/session"}} {
		for _, key := range []string{testServiceKey, testAdminKey} {
			t.Run(target.method+" "+target.path+"/refuses a key", func(t *testing.T) {
				e := newEnv(t)
				wantProblem(t, e.do(t, target.method, target.path, "", bearer(key)...), http.StatusUnauthorized, "session_invalid")
				wantProblem(t, e.do(t, target.method, target.path, "", withCookie(key)...), http.StatusUnauthorized, "session_invalid")
			})
		}
	}
}

// mustSID returns a sid whose status the refusal tests watch: the one in
// target when it names one, or a fresh session's.
func mustSID(t *testing.T, target string, e *env) string {
	t.Helper()
	if rest, ok := strings.CutPrefix(target, "/v1/admin/sessions/"); ok {
		return rest
	}
	return e.createSession(t, `{"subject":"alice"}`).SID
}
