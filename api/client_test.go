package api

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/getkin/kin-openapi/openapi3filter"

	"github.com/tokend/tokend/client"
	"github.com/tokend/tokend/store/ratelimit"
)

func init() {
	// The script and the demo page are text; let the contract check read them.
	openapi3filter.RegisterBodyDecoder("text/javascript", openapi3filter.PlainBodyDecoder)
	openapi3filter.RegisterBodyDecoder("text/html", openapi3filter.PlainBodyDecoder)
}

func withDev() envOption { return withConfig(func(c *Config) { c.Dev = true }) }

func TestClientScript(t *testing.T) {
	for _, dev := range []bool{false, true} {
		var opts []envOption
		if dev {
			opts = append(opts, withDev())
		}
		e := newEnv(t, opts...)
		rec := e.do(t, "GET", "/js/tokend.js", "", "Origin", "https://anywhere.example")
		wantStatus(t, rec, http.StatusOK)
		wantHeader(t, rec, "Content-Type", "text/javascript; charset=utf-8")
		wantHeader(t, rec, "Cache-Control", "public, max-age=300")
		wantHeader(t, rec, "Access-Control-Allow-Origin", "*")
		wantHeader(t, rec, "X-Content-Type-Options", "nosniff")
		if !bytes.Equal(rec.Body.Bytes(), client.JS) || !bytes.Contains(client.JS, []byte("export function createTokenClient")) {
			t.Fatalf("body is not client/tokend.js (%d bytes)", rec.Body.Len())
		}
		etag := rec.Header().Get("ETag")
		if !regexp.MustCompile(`^"[A-Za-z0-9_-]{24}"$`).MatchString(etag) {
			t.Errorf("ETag = %q", etag)
		}

		for _, inm := range []string{etag, "W/" + etag, `"other", ` + etag, "*"} {
			rec = e.do(t, "GET", "/js/tokend.js", "", "If-None-Match", inm)
			wantStatus(t, rec, http.StatusNotModified)
			wantHeader(t, rec, "ETag", etag)
			if rec.Body.Len() != 0 {
				t.Errorf("304 with a body")
			}
		}
		rec = e.do(t, "GET", "/js/tokend.js", "", "If-None-Match", `"stale"`)
		wantStatus(t, rec, http.StatusOK)
	}
}

// The script is served however tight the limits are: it is neither rate
// limited nor shed.
func TestClientScriptIsNotLimited(t *testing.T) {
	e := newEnv(t, withProtection(func(now func() time.Time) Protection {
		return Protection{
			Limiter:     ratelimit.NewLocal(0, now),
			IPLimit:     ratelimit.Limit{Rate: 1, Period: time.Hour, Burst: 1},
			MaxInflight: 1,
		}
	}, func(int) int { return 0 }))
	for range 5 {
		rec := e.do(t, "GET", "/js/tokend.js", "")
		wantStatus(t, rec, http.StatusOK)
		wantNoHeader(t, rec, "RateLimit")
	}
}

func TestDevRoutesOutsideDevMode(t *testing.T) {
	e := newEnv(t)
	p := wantProblem(t, e.do(t, "GET", "/", ""), http.StatusNotFound, "not_found")
	if p.Detail != "No such endpoint." {
		t.Errorf("detail = %q, want the unknown-path answer", p.Detail)
	}
	for _, body := range []string{"", `{"subject":"mallory"}`} {
		rec := e.do(t, "POST", "/dev/session", body, jsonBody()...)
		wantProblem(t, rec, http.StatusNotFound, "not_found")
		wantNoCookie(t, rec)
	}
	// Not even from the service's own origin.
	rec := e.do(t, "POST", "/dev/session", "", "Origin", "http://"+testHost)
	wantProblem(t, rec, http.StatusNotFound, "not_found")
	if n := e.minter.n.Load(); n != 0 {
		t.Errorf("minted %d tokens", n)
	}
}

func TestDemoPage(t *testing.T) {
	e := newEnv(t, withDev())
	rec := e.do(t, "GET", "/", "")
	wantStatus(t, rec, http.StatusOK)
	wantHeader(t, rec, "Content-Type", "text/html; charset=utf-8")
	wantHeader(t, rec, "Cache-Control", "no-store")
	if !bytes.Equal(rec.Body.Bytes(), client.DemoPage) {
		t.Fatal("body is not client/demo.html")
	}
	csp := rec.Header().Get("Content-Security-Policy")
	for _, want := range []string{"default-src 'none'", "connect-src 'self'", "script-src 'self' 'sha256-"} {
		if !strings.Contains(csp, want) {
			t.Errorf("CSP %q lacks %q", csp, want)
		}
	}
	if strings.Contains(csp, "unsafe-inline' ;") || strings.Contains(csp, "script-src 'self' 'unsafe-inline'") {
		t.Errorf("CSP %q allows any inline script", csp)
	}
}

// TestInlineScriptHash checks the hash against the script's text as the
// browser sees it: everything between the tags.
func TestInlineScriptHash(t *testing.T) {
	page := []byte("<p>x</p><script type=\"module\">\nconsole.log(1);\n</script>")
	sum := sha256.Sum256([]byte("\nconsole.log(1);\n"))
	if got, want := inlineScriptHash(page), "'sha256-"+base64.StdEncoding.EncodeToString(sum[:])+"'"; got != want {
		t.Errorf("hash = %s, want %s", got, want)
	}
	if got := inlineScriptHash([]byte("<p>no script</p>")); got != "'unsafe-inline'" {
		t.Errorf("no script: %s", got)
	}
	if got := inlineScriptHash(client.DemoPage); got == "'unsafe-inline'" {
		t.Error("the demo page's script was not found")
	}
}

func TestDevSession(t *testing.T) {
	e := newEnv(t, withDev())
	rec := e.do(t, "POST", "/dev/session", "", "Origin", "http://"+testHost)
	wantStatus(t, rec, http.StatusCreated)
	wantHeader(t, rec, "Cache-Control", "no-store")
	got := decodeAs[struct {
		SID       string    `json:"sid"`
		Subject   string    `json:"subject"`
		ExpiresAt time.Time `json:"expires_at"`
	}](t, rec)
	if got.Subject != devSubject || !got.ExpiresAt.Equal(t0.Add(defaultTTL)) {
		t.Errorf("session = %+v, want subject demo for the default TTL", got)
	}
	cookies := rec.Result().Cookies()
	if len(cookies) != 1 || cookies[0].Name != cookieName || !cookies[0].HttpOnly || cookies[0].Path != "/v1" ||
		cookies[0].MaxAge != int(defaultTTL.Seconds()) || !strings.HasPrefix(cookies[0].Value, got.SID+".") {
		t.Fatalf("Set-Cookie = %q", rec.Header().Values("Set-Cookie"))
	}
	if strings.Contains(rec.Body.String(), cookies[0].Value) {
		t.Error("the body carries the cookie's value")
	}

	// The cookie works: the demo page trades it for a token.
	tok := e.tokenFor(t, cookies[0].Value)
	claims := e.verifyToken(t, tok.AccessToken)
	if claims.Subject() != devSubject {
		t.Errorf("sub = %q", claims.Subject())
	}

	// A subject, a length and claims may be chosen.
	rec = e.do(t, "POST", "/dev/session", `{"subject":"zoë","ttl_seconds":300,"claims":{"demo":true}}`, jsonBody()...)
	wantStatus(t, rec, http.StatusCreated)
	if c := rec.Result().Cookies(); len(c) != 1 || c[0].MaxAge != 300 {
		t.Errorf("Set-Cookie = %q, want Max-Age=300", rec.Header().Values("Set-Cookie"))
	}
	tok = e.tokenFor(t, rec.Result().Cookies()[0].Value)
	claims = e.verifyToken(t, tok.AccessToken)
	if demo, _ := claims.Get("demo"); claims.Subject() != "zoë" || demo != true {
		t.Errorf("claims sub=%q demo=%v", claims.Subject(), demo)
	}
}

func TestDevSessionRefused(t *testing.T) {
	e := newEnv(t, withDev())
	tests := []struct {
		name, body string
		headers    []string
		status     int
		code       string
	}{
		{"other origin", "", []string{"Origin", "https://evil.example"}, http.StatusForbidden, "origin_not_allowed"},
		{"cross-site without origin", "", []string{"Sec-Fetch-Site", "cross-site"}, http.StatusForbidden, "origin_not_allowed"},
		{"unknown field", `{"subject":"a","role":"admin"}`, jsonBody(), http.StatusBadRequest, "invalid_request"},
		{"ttl too short", `{"ttl_seconds":5}`, jsonBody(), http.StatusBadRequest, "invalid_request"},
		{"ttl not positive", `{"ttl_seconds":0}`, jsonBody(), http.StatusBadRequest, "invalid_request"},
		{"reserved claim", `{"claims":{"sub":"root"}}`, jsonBody(), http.StatusBadRequest, "invalid_request"},
		{"not JSON", `subject=a`, []string{"Content-Type", "application/x-www-form-urlencoded"}, http.StatusUnsupportedMediaType, "unsupported_media_type"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rec := e.do(t, "POST", "/dev/session", tc.body, tc.headers...)
			wantProblem(t, rec, tc.status, tc.code)
			wantNoCookie(t, rec)
		})
	}
}

// tokenFor trades a cookie for a token through the router.
func (e *env) tokenFor(t *testing.T, cookie string) tokenResponse {
	t.Helper()
	rec := e.token(t, cookie)
	wantStatus(t, rec, http.StatusOK)
	return decodeAs[tokenResponse](t, rec)
}
