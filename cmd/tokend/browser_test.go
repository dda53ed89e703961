package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/cdp"
	"github.com/chromedp/cdproto/page"
	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"

	"github.com/tokend/tokend/client"
)

// The browser tests run the real tokend (run, in this process) behind a
// small recording proxy, and drive Debian's Chromium, headless, through
// pages served by an "app" on another origin: http://localhost:APP calls
// http://localhost:FRONT (the proxy), so the pages are cross-origin but
// same-site, as an SPA and its auth service on sibling subdomains are.
// Chromium really sends the CORS preflights and enforces the answers, and
// the SameSite=Strict, Secure, HttpOnly cookie set by the app's login
// really flows to tokend, whose Path=/v1 it matches.
//
// tokend runs in production mode (Secure cookies, which Chromium accepts on
// http://localhost) with 10-second tokens, so refresh_in is 5–9 s.

const (
	browserServiceKey = "browser-service-key-0123"
	browserAdminKey   = "browser-admin-key-012345"
	browserIssuer     = "https://tokend.test"
	browserAudience   = "ws"
)

// chromiumPath finds the browser. Without it the browser tests fail: they
// are the proof that the client works, and a skip would hide their absence.
func chromiumPath(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("TOKEND_TEST_CHROMIUM"); p != "" {
		return p
	}
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome", "google-chrome-stable"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	t.Fatal("Chromium is needed for the browser tests and was not found on PATH (chromium, chromium-browser, google-chrome); " +
		"install it with: sudo apt-get install chromium (scripts/ensure-services.sh does so when run as root), " +
		"or set TOKEND_TEST_CHROMIUM to its path")
	return ""
}

// seen is one request that reached the proxy in front of tokend.
type seen struct {
	Method, Path, Origin string
	Subject              string // whose session cookie it carried, "" for none
	Status               int    // what the browser got; 0 for a request held unanswered
	At, Done             time.Time
	RefreshIn, ExpiresIn int // of a token answer
}

// fault changes the proxy's answer to the next token request of a subject.
type fault struct {
	status     int    // answer this instead, keeping tokend's headers (CORS included)
	retryAfter string // with this Retry-After
	hang       bool   // never answer: hold the request until the browser drops it
}

type browserFixture struct {
	tokend *inProcess
	front  string // tokend as browsers see it: the proxy
	app    string // the allowed app origin
	evil   string // an origin tokend does not allow
	alloc  context.Context
	brow   context.Context

	mu       sync.Mutex
	requests []*seen
	subjects map[string]string  // sid → subject
	sids     map[string]string  // subject → sid
	faults   map[string][]fault // subject → faults for its next token requests
	closing  chan struct{}
}

// exchangeKey carries a request's record and fault from the proxy's
// handler to its ModifyResponse.
type exchangeKey struct{}

type exchange struct {
	seen  *seen
	fault fault
}

func newBrowserFixture(t *testing.T) *browserFixture {
	t.Helper()
	chrome := chromiumPath(t)
	listen := func() (net.Listener, string) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		return ln, "http://localhost:" + strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
	}
	frontLn, front := listen()
	appLn, app := listen()
	evilLn, evil := listen()
	fx := &browserFixture{
		front: front, app: app, evil: evil,
		subjects: map[string]string{}, sids: map[string]string{}, faults: map[string][]fault{},
		closing: make(chan struct{}),
	}
	fx.tokend = startInProcess(t, map[string]string{
		"TOKEND_ISSUER":          browserIssuer,
		"TOKEND_AUDIENCE":        browserAudience,
		"TOKEND_SERVICE_KEYS":    browserServiceKey,
		"TOKEND_ADMIN_KEYS":      browserAdminKey,
		"TOKEND_ALLOWED_ORIGINS": app,
		"TOKEND_TOKEN_TTL":       "10s",
		"TOKEND_RATE_SESSION":    "off",
		"TOKEND_RATE_IP":         "off",
		"TOKEND_DRAIN_DELAY":     "0s",
	})

	target, _ := url.Parse(fx.tokend.base)
	proxy := &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			r.SetURL(target)
			r.Out.Host = r.In.Host // tokend compares Origin with Host for same-origin calls
		},
		ModifyResponse: fx.modifyResponse,
	}
	serve := func(ln net.Listener, h http.Handler) {
		srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
		go func() { _ = srv.Serve(ln) }()
		t.Cleanup(func() { _ = srv.Close() })
	}
	t.Cleanup(func() { close(fx.closing) })
	serve(frontLn, fx.frontHandler(proxy))
	serve(appLn, fx.appHandler())
	serve(evilLn, fx.appHandler())

	// One browser for every test; each test gets its own browser context
	// (cookies, storage, locks), so they can run in parallel.
	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(chrome), chromedp.NoSandbox)
	alloc, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	t.Cleanup(cancelAlloc)
	brow, cancelBrowser := chromedp.NewContext(alloc)
	t.Cleanup(cancelBrowser)
	if err := chromedp.Do(brow); err != nil {
		t.Fatalf("start Chromium (%s): %v", chrome, err)
	}
	fx.alloc, fx.brow = alloc, brow
	return fx
}

// frontHandler records every request and applies the faults.
func (fx *browserFixture) frontHandler(proxy http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s := &seen{Method: r.Method, Path: r.URL.Path, Origin: r.Header.Get("Origin"), At: time.Now()}
		var f fault
		fx.mu.Lock()
		if c, err := r.Cookie("tokend_session"); err == nil {
			sid, _, _ := strings.Cut(c.Value, ".")
			s.Subject = fx.subjects[sid]
		}
		if r.Method == http.MethodPost && r.URL.Path == "/v1/token" && len(fx.faults[s.Subject]) > 0 {
			f = fx.faults[s.Subject][0]
			fx.faults[s.Subject] = fx.faults[s.Subject][1:]
		}
		fx.requests = append(fx.requests, s)
		fx.mu.Unlock()
		if f.hang {
			select {
			case <-r.Context().Done():
			case <-fx.closing:
			}
			fx.mu.Lock()
			s.Done = time.Now()
			fx.mu.Unlock()
			return
		}
		proxy.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), exchangeKey{}, &exchange{seen: s, fault: f})))
		fx.mu.Lock()
		s.Done = time.Now()
		fx.mu.Unlock()
	})
}

// modifyResponse notes what tokend answered and applies a status fault.
func (fx *browserFixture) modifyResponse(resp *http.Response) error {
	r := resp.Request
	x, _ := r.Context().Value(exchangeKey{}).(*exchange)
	if x == nil {
		return nil
	}
	if f := x.fault; f.status != 0 {
		body := fmt.Appendf(nil, `{"type":"urn:tokend:problem:overloaded","title":"The service is overloaded","status":%d,"code":"overloaded","detail":"injected by the test proxy"}`, f.status)
		resp.Body.Close()
		resp.StatusCode = f.status
		resp.Status = http.StatusText(f.status)
		resp.Header.Set("Content-Type", "application/problem+json")
		resp.Header.Set("Content-Length", strconv.Itoa(len(body)))
		resp.Header.Set("Retry-After", f.retryAfter)
		resp.Body = io.NopCloser(bytes.NewReader(body))
		resp.ContentLength = int64(len(body))
	}
	var tok struct {
		RefreshIn int `json:"refresh_in"`
		ExpiresIn int `json:"expires_in"`
	}
	if resp.StatusCode == http.StatusOK && r.URL.Path == "/v1/token" {
		raw, err := io.ReadAll(resp.Body)
		if err != nil {
			return err
		}
		resp.Body = io.NopCloser(bytes.NewReader(raw))
		_ = json.Unmarshal(raw, &tok)
	}
	fx.mu.Lock()
	x.seen.Status, x.seen.RefreshIn, x.seen.ExpiresIn = resp.StatusCode, tok.RefreshIn, tok.ExpiresIn
	fx.mu.Unlock()
	return nil
}

// appPage is the SPA: it signs in through its backend (/login) when asked,
// starts the client against tokend on its own origin, and records what the
// client reports in window.events.
const appPage = `<!doctype html>
<meta charset="utf-8"><link rel="icon" href="data:,"><title>app</title>
<script type="module">
import { createTokenClient } from "TOKEND/js/tokend.js";
const q = new URLSearchParams(location.search);
window.events = [];
const note = (type, fields) => events.push({ type, at: Date.now(), ...fields });
if (q.get("login") === "1") {
  const r = await fetch("/login?subject=" + encodeURIComponent(q.get("subject")), { method: "POST" });
  if (!r.ok) throw new Error("login: HTTP " + r.status);
}
window.client = createTokenClient({
  baseUrl: "TOKEND",
  onToken: (token, info) => note("token", { token, source: info.source, refreshAt: info.refreshAt, expiresAt: info.expiresAt }),
  onSessionEnd: (err) => note("end", { code: err.code, status: err.status }),
  onError: (err) => note("error", { code: err.code, status: err.status, retryInMs: err.retryInMs ?? null }),
});
window.ready = true;
</script>`

// appHandler is the app: its page, and its backend's login, which creates a
// tokend session with the service key and hands the cookie to the browser.
func (fx *browserFixture) appHandler() http.Handler {
	mux := http.NewServeMux()
	pageHTML := strings.ReplaceAll(appPage, "TOKEND", fx.front)
	mux.HandleFunc("GET /app", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		_, _ = io.WriteString(w, pageHTML)
	})
	mux.HandleFunc("POST /login", func(w http.ResponseWriter, r *http.Request) {
		subject := r.URL.Query().Get("subject")
		body := fmt.Sprintf(`{"subject":%q}`, subject)
		req, _ := http.NewRequest("POST", fx.tokend.base+"/v1/sessions", strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+browserServiceKey)
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		defer resp.Body.Close()
		var created struct {
			SID    string `json:"sid"`
			Cookie struct {
				SetCookie string `json:"set_cookie"`
			} `json:"cookie"`
		}
		if resp.StatusCode != http.StatusCreated || json.NewDecoder(resp.Body).Decode(&created) != nil {
			http.Error(w, "tokend refused the session", http.StatusBadGateway)
			return
		}
		fx.mu.Lock()
		fx.subjects[created.SID], fx.sids[subject] = subject, created.SID
		fx.mu.Unlock()
		w.Header().Add("Set-Cookie", created.Cookie.SetCookie)
		w.WriteHeader(http.StatusNoContent)
	})
	return mux
}

func (fx *browserFixture) addFault(subject string, f fault) {
	fx.mu.Lock()
	defer fx.mu.Unlock()
	fx.faults[subject] = append(fx.faults[subject], f)
}

// seenBy returns copies of the requests of subject to method path.
func (fx *browserFixture) seenBy(subject, method, path string) []seen {
	fx.mu.Lock()
	defer fx.mu.Unlock()
	var out []seen
	for _, s := range fx.requests {
		if s.Subject == subject && s.Method == method && s.Path == path {
			out = append(out, *s)
		}
	}
	return out
}

func (fx *browserFixture) tokenRequests(subject string) []seen {
	return fx.seenBy(subject, http.MethodPost, "/v1/token")
}

func (fx *browserFixture) sid(t *testing.T, subject string) string {
	t.Helper()
	fx.mu.Lock()
	defer fx.mu.Unlock()
	sid := fx.sids[subject]
	if sid == "" {
		t.Fatalf("no session was created for %s", subject)
	}
	return sid
}

// waitSeen polls until cond holds for the proxy's record of subject's token
// requests.
func (fx *browserFixture) waitSeen(t *testing.T, subject, what string, timeout time.Duration, cond func([]seen) bool) []seen {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		reqs := fx.tokenRequests(subject)
		if cond(reqs) {
			return reqs
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s; token requests seen: %s", what, timeout, describe(reqs))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func describe(reqs []seen) string {
	var b strings.Builder
	for i, r := range reqs {
		fmt.Fprintf(&b, "\n  #%d %s %s origin=%s status=%d at=%s refresh_in=%d", i, r.Method, r.Path, r.Origin, r.Status,
			r.At.Format("15:04:05.000"), r.RefreshIn)
	}
	return b.String()
}

// --- Tabs ------------------------------------------------------------------------

// tab is a page of the app in Chromium.
type tab struct {
	t      *testing.T
	ctx    context.Context
	cancel context.CancelFunc
}

// newBrowserContext returns a fresh browser context (its own cookies,
// storage and locks) for one test's tabs. It holds a blank tab, so that
// closing any of the test's tabs leaves the others running.
func (fx *browserFixture) newBrowserContext(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := chromedp.NewContext(fx.brow, chromedp.WithNewBrowserContext())
	t.Cleanup(cancel)
	if err := chromedp.Do(ctx); err != nil {
		t.Fatalf("new browser context: %v", err)
	}
	return ctx
}

// open opens a tab in bctx at target and waits until its script has started
// the client. Uncaught exceptions in the page are logged.
func (fx *browserFixture) open(t *testing.T, bctx context.Context, target string) *tab {
	t.Helper()
	var logMu sync.Mutex
	var logs []string
	ctx, cancel := chromedp.NewContext(bctx, chromedp.WithListener(func(ev any) {
		var line string
		switch e := ev.(type) {
		case *runtime.EventExceptionThrown:
			line = "exception: " + e.ExceptionDetails.Text
			if e.ExceptionDetails.Exception != nil {
				line += " " + e.ExceptionDetails.Exception.Description
			}
		case *runtime.EventConsoleAPICalled:
			if e.Type != runtime.ConsoleAPICalledTypeError && e.Type != runtime.ConsoleAPICalledTypeWarning {
				return
			}
			var parts []string
			for _, a := range e.Args {
				parts = append(parts, string(a.Value)+a.Description)
			}
			line = fmt.Sprintf("console.%s: %s", e.Type, strings.Join(parts, " "))
		default:
			return
		}
		logMu.Lock()
		logs = append(logs, line)
		logMu.Unlock()
	}))
	t.Cleanup(func() {
		cancel()
		logMu.Lock()
		defer logMu.Unlock()
		if t.Failed() && len(logs) > 0 {
			t.Logf("page %s:\n  %s", target, strings.Join(logs, "\n  "))
		}
	})
	p := &tab{t: t, ctx: ctx, cancel: cancel}
	if err := chromedp.Do(ctx, chromedp.Navigate(target)); err != nil {
		t.Fatalf("open %s: %v", target, err)
	}
	p.waitJS("window.ready === true", 10*time.Second)
	return p
}

func (fx *browserFixture) appURL(origin, subject string, login bool) string {
	l := "0"
	if login {
		l = "1"
	}
	return origin + "/app?login=" + l + "&subject=" + url.QueryEscape(subject)
}

// waitJS polls expr in the page until it is truthy.
func (p *tab) waitJS(expr string, timeout time.Duration) {
	p.t.Helper()
	_, err := chromedp.Run(p.ctx, chromedp.Poll[bool](expr,
		chromedp.WithPollingInterval(25*time.Millisecond), chromedp.WithPollingTimeout(timeout)))
	if err != nil {
		p.t.Fatalf("waiting for %s: %v; events: %s", expr, err, p.eventsJSON())
	}
}

// eval evaluates expr in the page, awaiting it if it is a promise.
func eval[T any](p *tab, expr string) T {
	p.t.Helper()
	v, err := chromedp.Run(p.ctx, chromedp.Evaluate[T](expr, chromedp.EvalAwaitPromise))
	if err != nil {
		p.t.Fatalf("evaluate %s: %v", expr, err)
	}
	return v
}

// pageEvent is what the page's callbacks recorded.
type pageEvent struct {
	Type      string   `json:"type"`
	At        float64  `json:"at"`
	Token     string   `json:"token"`
	Source    string   `json:"source"`
	RefreshAt float64  `json:"refreshAt"`
	ExpiresAt float64  `json:"expiresAt"`
	Code      string   `json:"code"`
	Status    int      `json:"status"`
	RetryInMs *float64 `json:"retryInMs"`
}

func (p *tab) events(kind string) []pageEvent {
	p.t.Helper()
	all := eval[[]pageEvent](p, "window.events")
	var out []pageEvent
	for _, e := range all {
		if e.Type == kind {
			out = append(out, e)
		}
	}
	return out
}

func (p *tab) eventsJSON() string {
	v, err := chromedp.Run(p.ctx, chromedp.Evaluate[[]byte]("JSON.stringify(window.events ?? null)"))
	if err != nil {
		return "(unavailable: " + err.Error() + ")"
	}
	return string(v)
}

// waitEvents waits until the page has recorded n events of kind.
func (p *tab) waitEvents(kind string, n int, timeout time.Duration) []pageEvent {
	p.t.Helper()
	p.waitJS(fmt.Sprintf("window.events.filter(e => e.type === %q).length >= %d", kind, n), timeout)
	return p.events(kind)
}

// close closes the tab the way a user does, whatever its script is doing.
func (p *tab) close() {
	p.t.Helper()
	if err := chromedp.Cancel(p.ctx); err != nil {
		p.t.Fatalf("close tab: %v", err)
	}
}

// setLifecycle freezes or resumes the page, as Chrome does with background
// tabs: a frozen page runs no timers and no script at all.
func (p *tab) setLifecycle(state page.SetWebLifecycleStateState) {
	p.t.Helper()
	_, err := chromedp.Run(p.ctx, chromedp.Action[chromedp.Void](func(ctx context.Context, tg *chromedp.Target) (chromedp.Void, error) {
		_, err := cdp.Call(ctx, tg, page.SetWebLifecycleState, page.SetWebLifecycleStateParams{State: state})
		return chromedp.Void{}, err
	}))
	if err != nil {
		p.t.Fatalf("set lifecycle state %s: %v", state, err)
	}
}

// httpDo sends a request to tokend directly (as a backend or an admin).
func httpDo(t *testing.T, method, target, bearer, body string) (int, http.Header, []byte) {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, target, rd)
	if err != nil {
		t.Fatal(err)
	}
	if bearer != "" {
		req.Header.Set("Authorization", "Bearer "+bearer)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := (&http.Client{Timeout: 10 * time.Second}).Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, target, err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header, raw
}

// --- The tests ---------------------------------------------------------------------

func TestBrowser(t *testing.T) {
	fx := newBrowserFixture(t)
	start := time.Now()
	t.Cleanup(func() { t.Logf("browser tests took %s", time.Since(start).Round(time.Millisecond)) })

	// The subtests run in parallel inside this group, so that the fixture
	// outlives them all.
	t.Run("group", func(t *testing.T) {
		t.Run("CrossOriginPageGetsToken", func(t *testing.T) {
			t.Parallel()
			testCrossOriginToken(t, fx)
		})
		t.Run("RefreshAtRefreshIn", func(t *testing.T) {
			t.Parallel()
			testRefreshAtRefreshIn(t, fx)
		})
		t.Run("TwoTabsOneRequestPerRefresh", func(t *testing.T) {
			t.Parallel()
			testTwoTabs(t, fx)
		})
		t.Run("LeaderTabClosedMidRefresh", func(t *testing.T) {
			t.Parallel()
			testLeaderClosedMidRefresh(t, fx)
		})
		t.Run("RevokedSessionStopsForGood", func(t *testing.T) {
			t.Parallel()
			testRevoked(t, fx)
		})
		t.Run("RetryAfterHonoured", func(t *testing.T) {
			t.Parallel()
			testRetryAfter(t, fx)
		})
		t.Run("DisallowedOriginGetsNoToken", func(t *testing.T) {
			t.Parallel()
			testDisallowedOrigin(t, fx)
		})
		t.Run("LogoutEndsEveryTab", func(t *testing.T) {
			t.Parallel()
			testLogout(t, fx)
		})
		t.Run("WakeAfterFreezeRefreshesFirst", func(t *testing.T) {
			t.Parallel()
			testWakeAfterFreeze(t, fx)
		})
		t.Run("ScriptAndDevRoutes", func(t *testing.T) {
			t.Parallel()
			testScriptAndDevRoutes(t, fx)
		})
		t.Run("DemoPage", func(t *testing.T) {
			t.Parallel()
			testDemoPage(t, fx)
		})
	})
}

// A page on the allowed app origin imports the client from tokend, signs in
// through its backend and gets a token that verifies against the JWKS.
func testCrossOriginToken(t *testing.T, fx *browserFixture) {
	const subject = "cross-origin"
	p := fx.open(t, fx.newBrowserContext(t), fx.appURL(fx.app, subject, true))
	tok := p.waitEvents("token", 1, 10*time.Second)[0]
	if tok.Source != "fetch" {
		t.Errorf("source = %q, want fetch", tok.Source)
	}
	claims := verifyWithKeyfuncIssuer(t, fx.tokend.base, tok.Token, browserIssuer, browserAudience)
	if claims["sub"] != subject || claims["sid"] != fx.sid(t, subject) {
		t.Errorf("claims = %v, want sub %s and the session's sid", claims, subject)
	}
	if got := eval[string](p, "client.getToken()"); got != tok.Token {
		t.Errorf("getToken() = %.20s…, want the token onToken got", got)
	}
	if role := eval[string](p, "client.role"); role != "leader" {
		t.Errorf("role = %q, want leader", role)
	}
	reqs := fx.tokenRequests(subject)
	if len(reqs) != 1 || reqs[0].Origin != fx.app || reqs[0].Status != http.StatusOK {
		t.Errorf("token requests: %s; want one, from %s, answered 200", describe(reqs), fx.app)
	}
	// The module itself came from tokend, cross-origin (module scripts are
	// fetched with CORS, and Chromium checks the MIME type).
	if js := fx.seenBy("", "GET", "/js/tokend.js"); len(js) == 0 {
		t.Error("the page did not load /js/tokend.js from tokend")
	}
}

// The client refreshes when the server said: each request comes refresh_in
// seconds after the answer that carried it, never sooner.
func testRefreshAtRefreshIn(t *testing.T, fx *browserFixture) {
	const subject = "refresh-timing"
	p := fx.open(t, fx.newBrowserContext(t), fx.appURL(fx.app, subject, true))
	reqs := fx.waitSeen(t, subject, "three token requests", 30*time.Second, func(r []seen) bool {
		return len(r) >= 3 && r[2].Status == http.StatusOK
	})
	for i := 1; i < 3; i++ {
		prev, next := reqs[i-1], reqs[i]
		if prev.Status != http.StatusOK {
			t.Fatalf("request #%d: status %d", i-1, prev.Status)
		}
		// tokend draws refresh_in from 50–90 % of the token's actual life
		// (10 s), and floors both to whole seconds: expires_in is 9 or 10.
		if prev.ExpiresIn < 9 || prev.ExpiresIn > 10 || prev.RefreshIn < prev.ExpiresIn/2 || prev.RefreshIn > 9 {
			t.Errorf("answer #%d: refresh_in %d s, expires_in %d s; want expires_in 9–10 and refresh_in 50–90 %% of it", i-1, prev.RefreshIn, prev.ExpiresIn)
		}
		want := time.Duration(prev.RefreshIn) * time.Second
		gap := next.At.Sub(prev.Done)
		t.Logf("refresh #%d: refresh_in %s, next request %s after the answer (+%s)", i, want, gap.Round(time.Millisecond), (gap - want).Round(time.Millisecond))
		// Lower bound from the protocol: the client received the answer
		// after the proxy sent it, and refreshes refresh_in after receipt.
		if gap < want {
			t.Errorf("refresh #%d came %s after the answer, before refresh_in %s", i, gap, want)
		}
		if gap > want+1500*time.Millisecond {
			t.Errorf("refresh #%d came %s after the answer, long after refresh_in %s", i, gap, want)
		}
	}
	if n := len(p.events("token")); n < 3 {
		t.Errorf("the page got %d tokens, want 3", n)
	}
}

// Two tabs of one app share the refresh: one request per refresh, and both
// tabs hold the same tokens.
func testTwoTabs(t *testing.T, fx *browserFixture) {
	const subject = "two-tabs"
	bctx := fx.newBrowserContext(t)
	a := fx.open(t, bctx, fx.appURL(fx.app, subject, true))
	a.waitEvents("token", 1, 10*time.Second)
	b := fx.open(t, bctx, fx.appURL(fx.app, subject, false))
	first := b.waitEvents("token", 1, 5*time.Second)[0]
	if n := len(fx.tokenRequests(subject)); n != 1 {
		t.Fatalf("after the second tab opened: %d token requests, want 1", n)
	}
	if first.Source != "tab" {
		t.Errorf("second tab's token came from %q, want tab", first.Source)
	}
	if ra, rb := eval[string](a, "client.role"), eval[string](b, "client.role"); ra != "leader" || rb != "follower" {
		t.Errorf("roles = %s, %s; want leader, follower", ra, rb)
	}

	// Through two refreshes.
	fx.waitSeen(t, subject, "the third token request", 25*time.Second, func(r []seen) bool {
		return len(r) >= 3 && r[2].Status == http.StatusOK
	})
	ta, tb := a.waitEvents("token", 3, 5*time.Second), b.waitEvents("token", 3, 5*time.Second)
	time.Sleep(300 * time.Millisecond)
	reqs := fx.tokenRequests(subject)
	if len(reqs) != 3 {
		t.Fatalf("two tabs, three tokens each: %d token requests, want 3: %s", len(reqs), describe(reqs))
	}
	for i := range 3 {
		if ta[i].Token != tb[i].Token {
			t.Errorf("token #%d differs between the tabs", i)
		}
		if ta[i].Source != "fetch" || tb[i].Source != "tab" {
			t.Errorf("token #%d sources %s, %s; want fetch, tab", i, ta[i].Source, tb[i].Source)
		}
	}
	if got, want := eval[string](b, "client.getToken()"), ta[2].Token; got != want {
		t.Error("the follower's getToken() is not the newest token")
	}
}

// The leader tab closes while its refresh is on the wire: the browser drops
// its lock, and the other tab takes over at once instead of waiting forever.
func testLeaderClosedMidRefresh(t *testing.T, fx *browserFixture) {
	const subject = "leader-closed"
	bctx := fx.newBrowserContext(t)
	a := fx.open(t, bctx, fx.appURL(fx.app, subject, true))
	a.waitEvents("token", 1, 10*time.Second)
	b := fx.open(t, bctx, fx.appURL(fx.app, subject, false))
	b.waitEvents("token", 1, 5*time.Second)
	fx.addFault(subject, fault{hang: true})

	fx.waitSeen(t, subject, "the leader's refresh", 15*time.Second, func(r []seen) bool { return len(r) >= 2 })
	closed := time.Now()
	a.close()
	toks := b.waitEvents("token", 2, 8*time.Second)
	took := time.Duration(toks[1].At*float64(time.Millisecond)) - time.Duration(closed.UnixNano())
	t.Logf("closed the leader mid-refresh; the other tab had a new token %s later", took.Round(time.Millisecond))
	if toks[1].Source != "fetch" {
		t.Errorf("new token source = %q, want fetch (the survivor took over)", toks[1].Source)
	}
	if role := eval[string](b, "client.role"); role != "leader" {
		t.Errorf("survivor's role = %q, want leader", role)
	}
	reqs := fx.tokenRequests(subject)
	if len(reqs) != 3 || reqs[1].Status != 0 || reqs[2].Status != http.StatusOK {
		t.Errorf("token requests: %s; want the first, the held one, the survivor's", describe(reqs))
	}
}

// A revoked session ends the client for good: onSessionEnd, then silence.
func testRevoked(t *testing.T, fx *browserFixture) {
	const subject = "revoked"
	p := fx.open(t, fx.newBrowserContext(t), fx.appURL(fx.app, subject, true))
	p.waitEvents("token", 1, 10*time.Second)
	status, _, body := httpDo(t, "DELETE", fx.tokend.base+"/v1/admin/sessions/"+fx.sid(t, subject)+"?reason=test", browserAdminKey, "")
	if status != http.StatusOK {
		t.Fatalf("admin revoke: %d %s", status, body)
	}
	end := p.waitEvents("end", 1, 12*time.Second)[0]
	if end.Code != "session_revoked" || end.Status != http.StatusUnauthorized {
		t.Errorf("onSessionEnd got %s %d, want session_revoked 401", end.Code, end.Status)
	}
	reqs := fx.tokenRequests(subject)
	last := reqs[len(reqs)-2].RefreshIn // the answer before the refusal
	watch := 2 * time.Duration(last) * time.Second
	time.Sleep(watch)
	after := fx.tokenRequests(subject)
	t.Logf("after the 401: watched %s (2 × refresh_in), %d more token requests", watch, len(after)-len(reqs))
	if len(after) != len(reqs) || after[len(after)-1].Status != http.StatusUnauthorized {
		t.Errorf("token requests after the session ended: %s", describe(after[len(reqs)-1:]))
	}
	if n := len(p.events("end")); n != 1 {
		t.Errorf("onSessionEnd called %d times", n)
	}
	if n := len(p.events("error")); n != 0 {
		t.Errorf("onError called %d times", n)
	}
	if code := eval[string](p, "client.getToken().then(() => 'resolved', e => e.code)"); code != "session_revoked" {
		t.Errorf("getToken() after the end: %s, want a rejection with session_revoked", code)
	}
}

// A 503 with Retry-After: 2 delays the retry by at least 2 s. tokend's own
// CORS headers are kept on the injected answer, so this also proves that a
// cross-origin page can read Retry-After.
func testRetryAfter(t *testing.T, fx *browserFixture) {
	const subject = "retry-after"
	fx.addFault(subject, fault{status: http.StatusServiceUnavailable, retryAfter: "2"})
	p := fx.open(t, fx.newBrowserContext(t), fx.appURL(fx.app, subject, true))
	p.waitEvents("token", 1, 10*time.Second)
	reqs := fx.tokenRequests(subject)
	if len(reqs) < 2 || reqs[0].Status != http.StatusServiceUnavailable || reqs[1].Status != http.StatusOK {
		t.Fatalf("token requests: %s; want 503, then 200", describe(reqs))
	}
	gap := reqs[1].At.Sub(reqs[0].Done)
	t.Logf("503 with Retry-After: 2 → retried %s after the answer", gap.Round(time.Millisecond))
	if gap < 2*time.Second || gap > 3500*time.Millisecond {
		t.Errorf("retried %s after the 503, want 2 s (at least Retry-After, at most a little more)", gap)
	}
	errs := p.events("error")
	if len(errs) != 1 || errs[0].Code != "overloaded" || errs[0].Status != 503 || errs[0].RetryInMs == nil || *errs[0].RetryInMs < 2000 {
		t.Errorf("onError: %+v; want one overloaded 503 with retryInMs ≥ 2000", errs)
	}
}

// A page on an origin tokend does not allow gets no token, even with a
// valid session cookie: tokend answers 403 without CORS headers, the
// browser hides the answer, and the client reports an error.
func testDisallowedOrigin(t *testing.T, fx *browserFixture) {
	const subject = "evil"
	p := fx.open(t, fx.newBrowserContext(t), fx.appURL(fx.evil, subject, true))
	errs := p.waitEvents("error", 1, 10*time.Second)
	time.Sleep(1500 * time.Millisecond)
	if n := len(p.events("token")); n != 0 {
		t.Fatalf("a disallowed origin got %d tokens", n)
	}
	if errs[0].Code != "network" || errs[0].Status != 0 {
		t.Errorf("onError got %s/%d, want network/0 (the browser hides a refused CORS answer)", errs[0].Code, errs[0].Status)
	}
	reqs := fx.tokenRequests(subject)
	if len(reqs) == 0 {
		t.Fatal("no token request reached tokend")
	}
	for _, r := range reqs {
		if r.Status != http.StatusForbidden || r.Origin != fx.evil {
			t.Errorf("request from %s answered %d, want 403", r.Origin, r.Status)
		}
	}
	t.Logf("disallowed origin: %d attempts in the first %s, all 403, backing off", len(reqs), time.Since(reqs[0].At).Round(100*time.Millisecond))
}

// logout() in one tab revokes the session (a real CORS preflight for
// DELETE, then the DELETE) and ends it in every tab.
func testLogout(t *testing.T, fx *browserFixture) {
	const subject = "logout"
	bctx := fx.newBrowserContext(t)
	a := fx.open(t, bctx, fx.appURL(fx.app, subject, true))
	a.waitEvents("token", 1, 10*time.Second)
	b := fx.open(t, bctx, fx.appURL(fx.app, subject, false))
	b.waitEvents("token", 1, 5*time.Second)
	if got := eval[string](b, "client.logout().then(() => 'ok', e => e.message)"); got != "ok" {
		t.Fatalf("logout: %s", got)
	}
	for _, p := range []*tab{a, b} {
		if end := p.waitEvents("end", 1, 5*time.Second)[0]; end.Code != "logged_out" {
			t.Errorf("onSessionEnd code %q, want logged_out", end.Code)
		}
	}
	preflights := fx.seenBy("", "OPTIONS", "/v1/session")
	deletes := fx.seenBy(subject, "DELETE", "/v1/session")
	if len(preflights) == 0 || preflights[0].Origin != fx.app || preflights[0].Status != http.StatusNoContent {
		t.Errorf("preflights: %s; want a 204 from %s", describe(preflights), fx.app)
	}
	if len(deletes) != 1 || deletes[0].Status != http.StatusNoContent {
		t.Errorf("DELETE /v1/session: %s; want one 204", describe(deletes))
	}
	status, _, body := httpDo(t, "GET", fx.tokend.base+"/v1/admin/sessions/"+fx.sid(t, subject), browserAdminKey, "")
	if status != http.StatusOK || !strings.Contains(string(body), `"status":"revoked"`) {
		t.Errorf("session after logout: %d %s", status, body)
	}
	n := len(fx.tokenRequests(subject))
	time.Sleep(time.Second)
	if m := len(fx.tokenRequests(subject)); m != n {
		t.Errorf("%d token requests after logout", m-n)
	}
}

// A page frozen past its token's expiry (as a background tab or a sleeping
// machine) refreshes on wake before getToken() hands anything out.
func testWakeAfterFreeze(t *testing.T, fx *browserFixture) {
	const subject = "wake"
	p := fx.open(t, fx.newBrowserContext(t), fx.appURL(fx.app, subject, true))
	first := p.waitEvents("token", 1, 10*time.Second)[0]
	p.setLifecycle(page.SetWebLifecycleStateStateFrozen)
	frozenAt := time.Now()
	before := len(fx.tokenRequests(subject))
	time.Sleep(11 * time.Second) // past the 10 s token's expiry and its refresh time
	if n := len(fx.tokenRequests(subject)); n != before {
		t.Fatalf("the frozen page made %d token requests", n-before)
	}
	// The page may resume, and refresh, before the command returns.
	woke := time.Now()
	p.setLifecycle(page.SetWebLifecycleStateStateActive)
	got := eval[string](p, "client.getToken()")
	returned := time.Now()
	if got == first.Token {
		t.Fatal("getToken() after wake returned the expired token")
	}
	claims := verifyWithKeyfuncIssuer(t, fx.tokend.base, got, browserIssuer, browserAudience)
	exp, _ := claims["exp"].(float64)
	if left := time.Until(time.Unix(int64(exp), 0)); left < 5*time.Second {
		t.Errorf("token from getToken() after wake expires in %s", left)
	}
	reqs := fx.tokenRequests(subject)
	if len(reqs) < 2 || reqs[len(reqs)-1].At.Before(woke) {
		t.Errorf("no token request after wake: %s", describe(reqs))
	}
	t.Logf("frozen %s; getToken() after wake returned a fresh token in %s", woke.Sub(frozenAt).Round(100*time.Millisecond), returned.Sub(woke).Round(time.Millisecond))
}

// GET /js/tokend.js is the embedded client with the right type, and the
// dev-only routes are 404 in production mode.
func testScriptAndDevRoutes(t *testing.T, fx *browserFixture) {
	status, h, body := httpDo(t, "GET", fx.tokend.base+"/js/tokend.js", "", "")
	if status != http.StatusOK || h.Get("Content-Type") != "text/javascript; charset=utf-8" || !bytes.Equal(body, client.JS) ||
		h.Get("Access-Control-Allow-Origin") != "*" || h.Get("ETag") == "" {
		t.Errorf("GET /js/tokend.js: %d %v (%d bytes)", status, h, len(body))
	}
	for _, r := range []struct{ method, path string }{{"GET", "/"}, {"POST", "/dev/session"}} {
		status, h, body := httpDo(t, r.method, fx.tokend.base+r.path, "", "")
		if status != http.StatusNotFound || h.Get("Content-Type") != "application/problem+json" || !strings.Contains(string(body), `"not_found"`) {
			t.Errorf("%s %s in production mode: %d %s", r.method, r.path, status, body)
		}
	}
}

// The demo page, on a dev-mode tokend: it starts a session, shows the
// token's claims and the countdown, and ends the session.
func testDemoPage(t *testing.T, fx *browserFixture) {
	dev := startInProcess(t, map[string]string{"TOKEND_DEV": "true", "TOKEND_LOG_LEVEL": "warn"})
	status, h, _ := httpDo(t, "GET", dev.base+"/js/tokend.js", "", "")
	if status != http.StatusOK || h.Get("Content-Type") != "text/javascript; charset=utf-8" {
		t.Errorf("GET /js/tokend.js in dev mode: %d %s", status, h.Get("Content-Type"))
	}
	p := fx.open0(t, fx.newBrowserContext(t), dev.base+"/")
	p.waitJS(`document.body.dataset.state === "nosession"`, 10*time.Second)
	if err := chromedp.Do(p.ctx, chromedp.Click(chromedp.ID("start"))); err != nil {
		t.Fatalf("click start: %v", err)
	}
	p.waitJS(`document.body.dataset.state === "active"`, 10*time.Second)
	claims := eval[string](p, `document.getElementById("claims").textContent`)
	for _, want := range []string{`"sub": "demo"`, `"demo": true`, `"sid": "`, `"exp": `} {
		if !strings.Contains(claims, want) {
			t.Errorf("claims panel lacks %s:\n%s", want, claims)
		}
	}
	p.waitJS(`/^\d+:\d\d$/.test(document.getElementById("countdown").textContent)`, 5*time.Second)
	if got := eval[string](p, `document.getElementById("countdown").textContent`); got == "" {
		t.Error("no countdown")
	}
	if n := eval[int](p, `document.querySelectorAll("#log li").length`); n < 2 {
		t.Errorf("log has %d entries", n)
	}
	if err := chromedp.Do(p.ctx, chromedp.Click(chromedp.ID("revoke"))); err != nil {
		t.Fatalf("click revoke: %v", err)
	}
	p.waitJS(`document.body.dataset.state === "ended"`, 10*time.Second)
	if got := eval[string](p, `document.getElementById("status").textContent`); !strings.Contains(got, "logged_out") {
		t.Errorf("status after revoke = %q", got)
	}
	if got := eval[string](p, `document.getElementById("claims").textContent`); strings.Contains(got, `"sub"`) {
		t.Error("claims still shown after the session ended")
	}
}

// open0 opens a page that has no window.ready of its own.
func (fx *browserFixture) open0(t *testing.T, bctx context.Context, target string) *tab {
	t.Helper()
	ctx, cancel := chromedp.NewContext(bctx)
	t.Cleanup(cancel)
	if err := chromedp.Do(ctx, chromedp.Navigate(target)); err != nil {
		t.Fatalf("open %s: %v", target, err)
	}
	return &tab{t: t, ctx: ctx, cancel: cancel}
}
