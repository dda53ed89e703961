package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httptrace"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tokend/tokend/internal/testenv"
)

// rollBackend is one tokend instance behind rollProxy.
type rollBackend struct {
	name  string // "A" or "B"
	base  string // http://127.0.0.1:port, the same across restarts
	gen   atomic.Int32
	ready atomic.Bool // the last health check answered 200
}

// label names the backend's current instance: A1 before its restart, A2
// after.
func (b *rollBackend) label() string { return fmt.Sprintf("%s%d", b.name, b.gen.Load()) }

// rollProxy is a minimal load balancer, as any would be in front of
// tokend:
//
//   - it health-checks GET /readyz of every backend every 100ms, on fresh
//     connections, and routes only to backends whose last check answered
//     200 (round robin among them);
//   - if a request could not be delivered to a backend at all (no
//     connection could be established, or not a byte of the request could
//     be written on it), the backend never saw it, and the proxy sends it
//     once more to another ready backend. A request that was delivered is never sent
//     again: it is not idempotent (it creates a session, mints a token,
//     revokes), so a failure after delivery is answered 502.
//
// It answers 503 when no backend is ready. Everything it cannot forward is
// counted; the test requires those counts to stay zero.
type rollProxy struct {
	backends  []*rollBackend
	next      atomic.Uint64
	transport *http.Transport
	probe     *http.Client

	mu       sync.Mutex
	answered map[string]int // responses forwarded, by instance label
	drained  map[string]int // of those, answered with Connection: close
	retried  map[string]int // requests not delivered to an instance, sent to another
	failed   []string       // requests answered 502 or 503 by the proxy itself
}

func newRollProxy(backends ...*rollBackend) *rollProxy {
	dialer := &net.Dialer{Timeout: 2 * time.Second}
	return &rollProxy{
		backends: backends,
		transport: &http.Transport{
			Proxy: nil,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				c, err := dialer.DialContext(ctx, network, addr)
				if err != nil {
					return nil, err
				}
				return &countingConn{Conn: c}, nil
			},
			MaxIdleConnsPerHost:   32,
			IdleConnTimeout:       30 * time.Second,
			ResponseHeaderTimeout: 10 * time.Second,
			DisableCompression:    true,
		},
		probe: &http.Client{
			Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true},
			Timeout:   time.Second,
		},
		answered: map[string]int{},
		drained:  map[string]int{},
		retried:  map[string]int{},
	}
}

// healthLoop checks every backend's /readyz every 100ms until ctx ends.
func (p *rollProxy) healthLoop(ctx context.Context) {
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		for _, b := range p.backends {
			b.ready.Store(p.check(ctx, b))
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (p *rollProxy) check(ctx context.Context, b *rollBackend) bool {
	req, err := http.NewRequestWithContext(ctx, "GET", b.base+"/readyz", nil)
	if err != nil {
		return false
	}
	resp, err := p.probe.Do(req)
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	return resp.StatusCode == http.StatusOK
}

// pick returns the next ready backend other than not, round robin, or nil.
func (p *rollProxy) pick(not *rollBackend) *rollBackend {
	n := uint64(len(p.backends))
	start := p.next.Add(1)
	for i := range n {
		b := p.backends[(start+i)%n]
		if b != not && b.ready.Load() {
			return b
		}
	}
	return nil
}

// hopHeaders are connection-level headers a proxy must not forward
// (RFC 9110, 7.6.1). Dropping the backend's "Connection: close" matters:
// it retires the proxy's connection to a draining instance, not the
// client's connection to the proxy.
var hopHeaders = []string{"Connection", "Keep-Alive", "Proxy-Connection", "Proxy-Authenticate",
	"Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade"}

func (p *rollProxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	var tried *rollBackend
	for attempt := 0; attempt < 2; attempt++ {
		b := p.pick(tried)
		if b == nil {
			break
		}
		label := b.label()
		resp, delivered, err := p.forward(r, b, body)
		if err != nil {
			if !delivered && attempt == 0 {
				p.count(p.retried, label)
				tried = b
				continue
			}
			p.fail(w, http.StatusBadGateway, fmt.Sprintf("%s %s via %s (delivered %v, attempt %d): %v",
				r.Method, r.URL.Path, label, delivered, attempt+1, err))
			return
		}
		p.count(p.answered, label)
		if resp.Close {
			p.count(p.drained, label)
		}
		h := w.Header()
		for k, v := range resp.Header {
			h[k] = v
		}
		for _, k := range hopHeaders {
			h.Del(k)
		}
		h.Set("X-Tokend-Instance", label)
		w.WriteHeader(resp.StatusCode)
		_, err = io.Copy(w, resp.Body)
		resp.Body.Close()
		if err != nil {
			// Cut the client's response short too, so that it sees the
			// truncation rather than a shorter body.
			panic(http.ErrAbortHandler)
		}
		return
	}
	p.fail(w, http.StatusServiceUnavailable, fmt.Sprintf("%s %s: no ready backend (tried %v)", r.Method, r.URL.Path, tried != nil))
}

// forward sends r (with body) to b. delivered reports whether any byte of
// the request reached a connection to b, i.e. whether b may have handled
// it.
func (p *rollProxy) forward(r *http.Request, b *rollBackend, body []byte) (resp *http.Response, delivered bool, err error) {
	// The bytes written on the connection the (last) attempt used tell
	// whether the request left the proxy. httptrace's WroteRequest cannot:
	// it reports success once the request is in the transport's buffer,
	// before the buffer is flushed to the connection. The transport itself
	// retries, on a new connection, a request it wrote nothing of on a
	// kept-alive connection the backend had closed; GotConn then reports
	// the new one, if it could be dialled.
	var (
		mu      sync.Mutex // the transport calls GotConn from its goroutines
		conn    *countingConn
		written int64
	)
	trace := &httptrace.ClientTrace{
		GotConn: func(i httptrace.GotConnInfo) {
			mu.Lock()
			defer mu.Unlock()
			conn, _ = i.Conn.(*countingConn)
			if conn != nil {
				written = conn.written.Load()
			}
		},
	}
	ctx := httptrace.WithClientTrace(r.Context(), trace)
	out, err := http.NewRequestWithContext(ctx, r.Method, b.base+r.URL.RequestURI(), bytes.NewReader(body))
	if err != nil {
		return nil, false, err
	}
	out.Header = r.Header.Clone()
	for _, k := range hopHeaders {
		out.Header.Del(k)
	}
	resp, err = p.transport.RoundTrip(out)
	if err == nil {
		return resp, true, nil
	}
	// A failed dial (connection refused) sent nothing. Otherwise, the
	// transport has finished writing when RoundTrip returns an error.
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		return nil, false, err
	}
	mu.Lock()
	defer mu.Unlock()
	return nil, conn != nil && conn.written.Load() > written, err
}

// countingConn counts the bytes written to a connection of the proxy.
type countingConn struct {
	net.Conn
	written atomic.Int64
}

func (c *countingConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.written.Add(int64(n))
	return n, err
}

func (p *rollProxy) count(m map[string]int, label string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	m[label]++
}

func (p *rollProxy) fail(w http.ResponseWriter, status int, desc string) {
	p.mu.Lock()
	p.failed = append(p.failed, fmt.Sprintf("%d %s", status, desc))
	p.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = fmt.Fprintf(w, `{"code":"proxy_error","detail":%q}`, desc)
}

func (p *rollProxy) snapshot() (answered, drained, retried map[string]int, failed []string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	cp := func(m map[string]int) map[string]int {
		out := make(map[string]int, len(m))
		for k, v := range m {
			out[k] = v
		}
		return out
	}
	return cp(p.answered), cp(p.drained), cp(p.retried), append([]string(nil), p.failed...)
}

// rollClient sends the load through the proxy and records every request
// whose answer was not the expected one.
type rollClient struct {
	base   string
	client *http.Client

	mu       sync.Mutex
	total    int
	byWhat   map[string]int
	problems []string
}

// do sends one request and returns its decoded body if the answer is
// complete, is JSON and has status want (and code wantCode, if set);
// otherwise it records the problem and returns nil.
func (c *rollClient) do(what, method, path string, hdr http.Header, body string, want int, wantCode string) map[string]any {
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, c.base+path, rd)
	if err != nil {
		panic(err)
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	sent := time.Now()
	c.mu.Lock()
	c.total++
	c.byWhat[what]++
	c.mu.Unlock()
	problem := func(format string, args ...any) map[string]any {
		c.mu.Lock()
		defer c.mu.Unlock()
		c.problems = append(c.problems, fmt.Sprintf("%s %s %s (sent %s): ", what, method, path,
			sent.Format("15:04:05.000"))+fmt.Sprintf(format, args...))
		return nil
	}
	resp, err := c.client.Do(req)
	if err != nil {
		return problem("transport error: %v", err)
	}
	raw, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	inst := resp.Header.Get("X-Tokend-Instance")
	if err != nil {
		return problem("status %d from %s, body cut short after %d bytes: %v", resp.StatusCode, inst, len(raw), err)
	}
	var out map[string]any
	if err := json.Unmarshal(raw, &out); err != nil {
		return problem("status %d from %s, body is not JSON: %q", resp.StatusCode, inst, raw)
	}
	if resp.StatusCode != want || wantCode != "" && out["code"] != wantCode {
		return problem("status %d %v from %s, want %d %s: %s", resp.StatusCode, out["code"], inst, want, wantCode, raw)
	}
	return out
}

// session creates a session through the proxy and returns its sid and
// cookie ("" if the request failed).
func (c *rollClient) session(subject string) (sid, cookie string) {
	out := c.do("create", "POST", "/v1/sessions", http.Header{"Authorization": {"Bearer " + pgServiceKey}},
		fmt.Sprintf(`{"subject":%q}`, subject), http.StatusCreated, "")
	if out == nil {
		return "", ""
	}
	ck, _ := out["cookie"].(map[string]any)
	name, _ := ck["name"].(string)
	value, _ := ck["value"].(string)
	sid, _ = out["sid"].(string)
	if sid == "" || name == "" || value == "" {
		c.mu.Lock()
		c.problems = append(c.problems, fmt.Sprintf("create: no sid or cookie in %v", out))
		c.mu.Unlock()
		return "", ""
	}
	return sid, name + "=" + value
}

// token asks for a token with cookie and reports whether it got one.
func (c *rollClient) token(cookie string) bool {
	out := c.do("token", "POST", "/v1/token", http.Header{"Cookie": {cookie}}, "", http.StatusOK, "")
	if out == nil {
		return false
	}
	if tok, _ := out["access_token"].(string); tok == "" {
		c.mu.Lock()
		c.problems = append(c.problems, fmt.Sprintf("token: no access_token in %v", out))
		c.mu.Unlock()
		return false
	}
	return true
}

// TestRollingRestartBehindProxy restarts two instances sharing one
// PostgreSQL database, one after the other, while clients create sessions,
// fetch tokens and revoke sessions through a load balancer that follows
// /readyz. Not a single request may fail: every one must get its complete,
// expected answer, and sessions from before the restarts must still work
// after them.
func TestRollingRestartBehindProxy(t *testing.T) {
	const workers = 8
	env := pgEnv(testenv.DatabaseURL(t))
	env["TOKEND_DRAIN_DELAY"] = "1s"
	env["TOKEND_SHUTDOWN_TIMEOUT"] = "3s"
	env["TOKEND_RATE_SERVICE"] = "off"
	env["TOKEND_TOKEN_TTL"] = "5m" // tokens outlive the test; the restarts are what is tested

	// Fixed addresses: a restarted instance comes back where it was.
	envA, envB := cloneEnv(env), cloneEnv(env)
	envA["TOKEND_ADDR"], envB["TOKEND_ADDR"] = freeAddr(t), freeAddr(t)
	instances := []*inProcess{startInProcess(t, envA), startInProcess(t, envB)}
	backends := []*rollBackend{{name: "A", base: instances[0].base}, {name: "B", base: instances[1].base}}
	for _, b := range backends {
		b.gen.Store(1)
	}

	proxy := newRollProxy(backends...)
	defer proxy.transport.CloseIdleConnections()
	hctx, stopHealth := context.WithCancel(context.Background())
	healthDone := make(chan struct{})
	go func() { defer close(healthDone); proxy.healthLoop(hctx) }()
	defer func() { stopHealth(); <-healthDone }()
	front := httptest.NewServer(proxy)
	defer front.Close()

	inRotation := func(b *rollBackend) {
		t.Helper()
		pollUntil(t, 15*time.Second, "the proxy to route to "+b.label(), b.ready.Load)
	}
	for _, b := range backends {
		inRotation(b)
	}

	clientTransport := &http.Transport{Proxy: nil, MaxIdleConnsPerHost: workers, DisableCompression: true}
	defer clientTransport.CloseIdleConnections()
	c := &rollClient{base: front.URL, client: &http.Client{Transport: clientTransport, Timeout: 15 * time.Second},
		byWhat: map[string]int{}}

	// Sessions from before the restarts.
	var early []string
	for i := range 10 {
		_, cookie := c.session(fmt.Sprintf("early-%d", i))
		if cookie == "" || !c.token(cookie) {
			t.Fatalf("before the restarts: %v", c.problems)
		}
		early = append(early, cookie)
	}

	// The load: create a session, get a token, sometimes a second one;
	// every fifth session is revoked and its next token request must be
	// refused with 401 session_revoked.
	var (
		completed atomic.Int64 // sessions through the whole cycle
		revoked   atomic.Int64
		wg        sync.WaitGroup
	)
	stop := make(chan struct{})
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				sid, cookie := c.session(fmt.Sprintf("load-%d-%d", w, i))
				if cookie == "" || !c.token(cookie) {
					continue
				}
				if i%3 == 1 && !c.token(cookie) {
					continue
				}
				if i%5 == 4 {
					if c.do("revoke", "DELETE", "/v1/admin/sessions/"+sid, http.Header{"Authorization": {"Bearer " + pgAdminKey}},
						"", http.StatusOK, "") == nil {
						continue
					}
					if c.do("revoked-token", "POST", "/v1/token", http.Header{"Cookie": {cookie}}, "",
						http.StatusUnauthorized, "session_revoked") == nil {
						continue
					}
					revoked.Add(1)
				}
				completed.Add(1)
			}
		}()
	}
	stopLoad := sync.OnceFunc(func() { close(stop); wg.Wait() })
	defer stopLoad()

	// progress waits until n more sessions have gone through the cycle.
	progress := func(n int64, what string) {
		t.Helper()
		from := completed.Load()
		pollUntil(t, 15*time.Second, fmt.Sprintf("%d sessions through the load %s", n, what), func() bool {
			return completed.Load() >= from+n
		})
	}
	progress(100, "before the restarts")

	// The rolling restart: stop an instance as SIGTERM would (run must
	// return nil), start it again on its address, wait until the proxy
	// routes to it and it has served load, then the next one.
	for i, b := range backends {
		instances[i].stop()
		// Let the proxy see the old instance gone, so that the readiness
		// awaited below is the new instance's.
		pollUntil(t, 5*time.Second, "the proxy to take "+b.label()+" out of rotation", func() bool { return !b.ready.Load() })
		b.gen.Add(1)
		instances[i] = startInProcess(t, instances[i].env)
		inRotation(b)
		label := b.label()
		pollUntil(t, 15*time.Second, label+" to serve load through the proxy", func() bool {
			answered, _, _, _ := proxy.snapshot()
			return answered[label] >= 20
		})
		progress(50, "after restarting "+b.name)
	}
	stopLoad()

	// Sessions from before the restarts still get tokens.
	for i, cookie := range early {
		if !c.token(cookie) {
			t.Errorf("session early-%d, created before the restarts, gets no token after them", i)
		}
	}

	answered, drained, retried, failed := proxy.snapshot()
	c.mu.Lock()
	defer c.mu.Unlock()
	labels := make([]string, 0, len(answered))
	for l := range answered {
		labels = append(labels, l)
	}
	sort.Strings(labels)
	var per []string
	for _, l := range labels {
		per = append(per, fmt.Sprintf("%s %d (%d with Connection: close, %d not delivered and retried elsewhere)",
			l, answered[l], drained[l], retried[l]))
	}
	t.Logf("%d requests through the proxy (%v); %d sessions through the cycle, %d of them revoked; answered by: %s",
		c.total, c.byWhat, completed.Load(), revoked.Load(), strings.Join(per, ", "))

	if len(failed) > 0 {
		t.Errorf("the proxy could not forward %d requests:\n%s", len(failed), strings.Join(failed, "\n"))
	}
	if len(c.problems) > 0 {
		t.Errorf("%d of %d requests did not get their complete, expected answer:\n%s",
			len(c.problems), c.total, strings.Join(c.problems, "\n"))
	}
}
