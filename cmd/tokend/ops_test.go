package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// loadOutcome is how one request of the load ended, as the client saw it.
type loadOutcome int

const (
	// outcomeComplete: a status line, headers and the whole body, which
	// parses as JSON.
	outcomeComplete loadOutcome = iota
	// outcomeRefused: no connection could be opened (the listener is
	// closed, or the load balancer routes no more connections to the
	// instance). The request never reached the server.
	outcomeRefused
	// outcomeNoResponse: the request was (perhaps partly) sent on an open
	// connection and no response came: EOF or reset before the first
	// byte. Whether the server handled it is decided from its log.
	outcomeNoResponse
	// outcomeTruncated: a response began but its body was cut short or
	// does not parse. Always a failure.
	outcomeTruncated
)

func (o loadOutcome) String() string {
	return [...]string{"complete", "refused", "no response", "truncated"}[o]
}

// loadRecord is one request of the load.
type loadRecord struct {
	id      string // X-Request-Id, which the access log repeats
	what    string // "create" or "token"
	sent    time.Time
	outcome loadOutcome
	status  int
	reused  bool // sent on a kept-alive connection
	wrote   bool // the transport finished writing the request
	err     error
}

// loadWorker sends create-session and token requests back to back over
// keep-alive connections until stop is closed.
type loadWorker struct {
	id     int
	base   string
	client *http.Client
	svcKey string
	recs   []loadRecord
	n      int
}

func (w *loadWorker) do(what, method, path string, hdr http.Header) (loadRecord, []byte) {
	w.n++
	rec := loadRecord{id: fmt.Sprintf("load-%02d-%06d", w.id, w.n), what: what, sent: time.Now()}
	// The transport may call these from its own goroutines.
	var reused, wrote atomic.Bool
	trace := &httptrace.ClientTrace{
		GotConn:      func(i httptrace.GotConnInfo) { reused.Store(i.Reused) },
		WroteRequest: func(i httptrace.WroteRequestInfo) { wrote.Store(i.Err == nil) },
	}
	req, err := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace), method, w.base+path, nil)
	if err != nil {
		panic(err)
	}
	if what == "create" {
		req.Body = io.NopCloser(strings.NewReader(`{"subject":"load"}`))
		req.ContentLength = int64(len(`{"subject":"load"}`))
		req.Header.Set("Content-Type", "application/json")
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	req.Header.Set("X-Request-Id", rec.id)
	resp, err := w.client.Do(req)
	rec.reused, rec.wrote = reused.Load(), wrote.Load()
	if err != nil {
		rec.err = err
		var op *net.OpError
		if errors.Is(err, errOutOfRotation) || errors.As(err, &op) && op.Op == "dial" {
			rec.outcome = outcomeRefused
		} else {
			rec.outcome = outcomeNoResponse
		}
		w.recs = append(w.recs, rec)
		return rec, nil
	}
	rec.status = resp.StatusCode
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	switch {
	case err != nil:
		rec.outcome, rec.err = outcomeTruncated, err
	case !json.Valid(body):
		rec.outcome, rec.err = outcomeTruncated, fmt.Errorf("body is not JSON: %q", body)
	default:
		rec.outcome = outcomeComplete
	}
	w.recs = append(w.recs, rec)
	return rec, body
}

func (w *loadWorker) run(stop <-chan struct{}, completed *atomic.Int64) {
	for {
		select {
		case <-stop:
			return
		default:
		}
		rec, body := w.do("create", "POST", "/v1/sessions", http.Header{"Authorization": {"Bearer " + w.svcKey}})
		if rec.outcome == outcomeRefused {
			time.Sleep(5 * time.Millisecond) // the listener is gone; do not spin
			continue
		}
		if rec.outcome != outcomeComplete || rec.status != http.StatusCreated {
			continue
		}
		completed.Add(1)
		var created struct {
			Cookie struct{ Name, Value string }
		}
		if err := json.Unmarshal(body, &created); err != nil || created.Cookie.Value == "" {
			continue
		}
		rec, _ = w.do("token", "POST", "/v1/token", http.Header{"Cookie": {created.Cookie.Name + "=" + created.Cookie.Value}})
		if rec.outcome == outcomeComplete {
			completed.Add(1)
		}
	}
}

// servedRequests reads a JSON access log and returns the status it logged
// for each request id.
func servedRequests(t *testing.T, log []byte) map[string]int {
	t.Helper()
	served := map[string]int{}
	sc := bufio.NewScanner(bytes.NewReader(log))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		var line struct {
			Msg       string `json:"msg"`
			RequestID string `json:"request_id"`
			Status    int    `json:"status"`
		}
		if json.Unmarshal(sc.Bytes(), &line) == nil && line.Msg == "request" && line.RequestID != "" {
			served[line.RequestID] = line.Status
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatalf("read the access log: %v", err)
	}
	return served
}

// errOutOfRotation is what the load balancer of TestSIGTERMUnderLoad says
// when asked for a new connection to an instance that is not ready.
var errOutOfRotation = errors.New("instance out of rotation")

// TestSIGTERMUnderLoad stops the real binary with SIGTERM while 16 clients
// create sessions and fetch tokens back to back over keep-alive
// connections. In both subtests every request the server handled must reach
// its client complete, /readyz must answer 503 during the drain delay while
// requests are still served, and the process must exit 0 once the drain
// delay and the in-flight requests are over.
//
// Whether the server handled a request is read from its access log, which
// names each request by the X-Request-Id the client chose. A request that
// failed without any response and that the log does not name never reached
// a handler; one that the log names was handled and its response lost.
func TestSIGTERMUnderLoad(t *testing.T) {
	// Clients behind a load balancer, which opens no new connection to the
	// instance once /readyz has said 503 but keeps using the connections it
	// holds (as proxies' pools and kube-proxy do): not a single request may
	// fail. The instance must retire those connections during the drain.
	t.Run("behind a load balancer", func(t *testing.T) { sigtermUnderLoad(t, true) })
	// Clients talking to the instance directly, ignoring /readyz, until it
	// refuses connections. Requests written to a connection in the instant
	// the listener closes can fail unanswered (net/http drops a request it
	// reads once Shutdown has begun, and the kernel resets connections
	// still queued on the closed listener); they are counted, and must be
	// on new connections and unhandled: none on a kept-alive connection,
	// none handled and lost, none cut short.
	t.Run("direct", func(t *testing.T) { sigtermUnderLoad(t, false) })
}

func sigtermUnderLoad(t *testing.T, balanced bool) {
	const (
		svcKey          = "sigterm-service-key-0123456789"
		admKey          = "sigterm-admin-key-0123456789"
		drain           = time.Second
		shutdownTimeout = 3 * time.Second
		workers         = 16
	)
	addr := freeAddr(t)
	inst := startBinaryNoBanner(t, "http://"+addr,
		"TOKEND_ADDR="+addr,
		"TOKEND_ISSUER=https://tokend.test",
		"TOKEND_AUDIENCE=ws",
		"TOKEND_SERVICE_KEYS="+svcKey,
		"TOKEND_ADMIN_KEYS="+admKey,
		"TOKEND_DRAIN_DELAY="+drain.String(),
		"TOKEND_SHUTDOWN_TIMEOUT="+shutdownTimeout.String(),
		"TOKEND_RATE_SESSION=off",
		"TOKEND_RATE_IP=off",
		"TOKEND_RATE_SERVICE=off",
		"TOKEND_ACCESS_LOG_RATE=0", // every request is logged: the log is the oracle
		"TOKEND_LOG_FORMAT=json",
	)

	var outOfRotation atomic.Bool
	dialer := &net.Dialer{Timeout: 5 * time.Second}
	transport := &http.Transport{
		Proxy: nil,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			if balanced && outOfRotation.Load() {
				return nil, errOutOfRotation
			}
			return dialer.DialContext(ctx, network, addr)
		},
		MaxIdleConnsPerHost: workers,
		DisableCompression:  true,
	}
	defer transport.CloseIdleConnections()
	client := &http.Client{Transport: transport, Timeout: 20 * time.Second}

	stop := make(chan struct{})
	var (
		completed atomic.Int64
		wg        sync.WaitGroup
		ws        []*loadWorker
	)
	for i := range workers {
		w := &loadWorker{id: i, base: inst.base, client: client, svcKey: svcKey}
		ws = append(ws, w)
		wg.Add(1)
		go func() {
			defer wg.Done()
			w.run(stop, &completed)
		}()
	}
	stopLoad := sync.OnceFunc(func() { close(stop); wg.Wait() })
	defer stopLoad()

	// Let the load establish itself: every worker on a kept-alive
	// connection, some hundreds of requests served.
	pollUntil(t, 30*time.Second, "200 completed requests before SIGTERM", func() bool { return completed.Load() >= 200 })

	// /readyz, asked on fresh connections as a load balancer does.
	probe := &http.Client{Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true}, Timeout: 5 * time.Second}
	readyz := func() (int, string) {
		resp, err := probe.Get(inst.base + "/readyz")
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		var p struct{ Code string }
		_ = json.NewDecoder(resp.Body).Decode(&p)
		return resp.StatusCode, p.Code
	}
	if status, _ := readyz(); status != http.StatusOK {
		t.Fatalf("/readyz before SIGTERM: %d, want 200", status)
	}

	before := completed.Load()
	sigterm := time.Now()
	if err := inst.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}

	// During the drain: /readyz turns 503 not_ready (and never back), and
	// the load goes on being served.
	var (
		readySeq   []string
		saw503     bool
		backTo200  bool
		exitErr    error
		exitedAt   time.Time
		exited     bool
		exitWithin = drain + shutdownTimeout + 10*time.Second
	)
	deadline := time.After(exitWithin)
	for !exited {
		select {
		case exitErr = <-inst.done:
			exitedAt, exited = time.Now(), true
			inst.done <- exitErr // for the cleanup
			continue
		case <-deadline:
			t.Fatalf("tokend did not exit within %s of SIGTERM (drain %s + shutdown timeout %s + 10s)", exitWithin, drain, shutdownTimeout)
		default:
		}
		status, code := readyz()
		switch {
		case status == http.StatusServiceUnavailable && code == "not_ready":
			saw503 = true
			outOfRotation.Store(true)
		case status == http.StatusOK && saw503:
			backTo200 = true
		}
		if len(readySeq) == 0 || readySeq[len(readySeq)-1] != fmt.Sprint(status) {
			readySeq = append(readySeq, fmt.Sprint(status))
		}
		time.Sleep(10 * time.Millisecond)
	}
	duringDrain := completed.Load() - before
	stopLoad()
	took := exitedAt.Sub(sigterm)

	if exitErr != nil {
		t.Errorf("exit after SIGTERM: %v, want status 0", exitErr)
	}
	if took < drain {
		t.Errorf("tokend exited %s after SIGTERM, before its drain delay of %s was over", took, drain)
	}
	if !saw503 {
		t.Errorf("/readyz never answered 503 not_ready between SIGTERM and exit (answers: %v)", readySeq)
	}
	if backTo200 {
		t.Errorf("/readyz answered 200 again after 503 during the drain (answers: %v)", readySeq)
	}
	if duringDrain == 0 {
		t.Errorf("no request completed after SIGTERM: the drain delay did not keep serving")
	}

	// Judge every request against the server's own account of it.
	served := servedRequests(t, inst.stderr.Bytes())
	var (
		total, afterSIGTERM int
		byOutcome           = map[loadOutcome]int{}
		notReached          []string
		onKeptAlive         []string
		lost, truncated     []string
		unlogged            []string
	)
	for _, w := range ws {
		for _, r := range w.recs {
			total++
			byOutcome[r.outcome]++
			if r.sent.After(sigterm) {
				afterSIGTERM++
			}
			status, handled := served[r.id]
			desc := fmt.Sprintf("%s %s (sent %+v after SIGTERM, kept-alive conn %v, request written %v): %v",
				r.what, r.id, r.sent.Sub(sigterm).Round(time.Millisecond), r.reused, r.wrote, r.err)
			switch r.outcome {
			case outcomeComplete:
				if !handled {
					unlogged = append(unlogged, desc)
				}
			case outcomeTruncated:
				truncated = append(truncated, desc)
			case outcomeNoResponse:
				switch {
				case handled:
					lost = append(lost, fmt.Sprintf("%s; the server logged status %d", desc, status))
				case r.reused:
					onKeptAlive = append(onKeptAlive, desc)
				default:
					notReached = append(notReached, desc)
				}
			}
		}
	}
	t.Logf("%d requests (%d sent after SIGTERM; %d completed after it); outcomes: complete %d, refused %d, "+
		"no response %d (%d on kept-alive connections, %d handled), truncated %d; exit %s after SIGTERM; /readyz answers: %v",
		total, afterSIGTERM, duringDrain, byOutcome[outcomeComplete], byOutcome[outcomeRefused],
		byOutcome[outcomeNoResponse], len(onKeptAlive), len(lost), byOutcome[outcomeTruncated], took.Round(time.Millisecond), readySeq)
	sort.Strings(notReached)
	if len(unlogged) > 0 {
		// The oracle must see every request, or "not in the log" proves nothing.
		t.Errorf("%d complete responses are missing from the access log, which must name every request; e.g. %s",
			len(unlogged), unlogged[0])
	}
	if len(lost) > 0 {
		t.Errorf("%d requests were handled by the server but their responses never arrived:\n%s", len(lost), strings.Join(lost, "\n"))
	}
	if len(truncated) > 0 {
		t.Errorf("%d responses were cut short:\n%s", len(truncated), strings.Join(truncated, "\n"))
	}
	if len(onKeptAlive) > 0 {
		t.Errorf("%d requests sent on kept-alive connections got no answer: the drain did not retire the connections:\n%s",
			len(onKeptAlive), strings.Join(onKeptAlive, "\n"))
	}
	if balanced && len(notReached) > 0 {
		t.Errorf("behind a load balancer, %d requests got no answer:\n%s", len(notReached), strings.Join(notReached, "\n"))
	}
	if !balanced && len(notReached) > 0 {
		t.Logf("%d requests went unanswered, unhandled, on new connections as the listener closed; e.g. %s",
			len(notReached), notReached[0])
	}
}
