package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tokend/tokend/internal/testenv"
)

// Phases of a fault test, for the report.
const (
	phaseBefore = iota
	phaseFault
	phaseRecovery
	phases
)

var phaseNames = [phases]string{"before", "fault", "recovery"}

// trackedSession is a session whose creation was acknowledged (201).
type trackedSession struct {
	sid    string
	cookie string // name=value
	// revoked: a revocation (admin or logout) was acknowledged.
	revoked bool
	// uncertain: a revocation was tried and not acknowledged (503), so it
	// may or may not have happened.
	uncertain bool
}

// faultLoad drives an instance with session creations, token requests,
// admin revocations and logouts while a dependency fails, and checks every
// answer as it comes.
type faultLoad struct {
	base   string
	client *http.Client
	phase  atomic.Int32
	// xff, when set, sends each worker's requests as coming from one of a
	// few client addresses through a trusted proxy.
	xff bool

	mu         sync.Mutex
	sessions   []*trackedSession
	statuses   [phases]map[string]map[int]int // phase → endpoint → status → count
	violations []string
	tokens     atomic.Int64 // answers on the token endpoint
}

func newFaultLoad(base string) *faultLoad {
	l := &faultLoad{base: base, client: &http.Client{Timeout: 15 * time.Second}}
	for i := range l.statuses {
		l.statuses[i] = map[string]map[int]int{}
	}
	return l
}

// answer is one response, fully read.
type answer struct {
	status int
	body   map[string]any // the JSON body; nil if there was none
	header http.Header
}

// fetch sends one request and reads the whole answer, which must be JSON
// if it has a body. Any argument may be empty; clientIP goes into
// X-Forwarded-For.
func fetch(client *http.Client, base, method, path, bearer, cookie, body, clientIP string) (answer, error) {
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, base+path, rd)
	if err != nil {
		return answer{}, err
	}
	if bearer != "" {
		req.Header.Set("Authorization", "Bearer "+bearer)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	if cookie != "" {
		req.Header.Set("Cookie", cookie)
	}
	if clientIP != "" {
		req.Header.Set("X-Forwarded-For", clientIP)
	}
	resp, err := client.Do(req)
	if err != nil {
		return answer{}, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return answer{}, fmt.Errorf("read body: %w", err)
	}
	a := answer{status: resp.StatusCode, header: resp.Header}
	if len(raw) > 0 {
		if err := json.Unmarshal(raw, &a.body); err != nil {
			return a, fmt.Errorf("status %d, body is not JSON: %q", resp.StatusCode, raw)
		}
	}
	return a, nil
}

func (l *faultLoad) send(method, path, bearer, cookie, body, clientIP string) (answer, error) {
	return fetch(l.client, l.base, method, path, bearer, cookie, body, clientIP)
}

func (l *faultLoad) violate(format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.violations) < 50 {
		l.violations = append(l.violations, fmt.Sprintf("[%s] ", phaseNames[l.phase.Load()])+fmt.Sprintf(format, args...))
	}
}

// check records a, and reports it unless its status is one of allowed.
// Every 429 and 503 must carry a Retry-After of whole seconds ≥ 1.
func (l *faultLoad) check(endpoint string, a answer, err error, allowed ...int) bool {
	if err != nil {
		l.violate("%s: %v", endpoint, err)
		return false
	}
	l.mu.Lock()
	m := l.statuses[l.phase.Load()][endpoint]
	if m == nil {
		m = map[int]int{}
		l.statuses[l.phase.Load()][endpoint] = m
	}
	m[a.status]++
	l.mu.Unlock()
	if !slices.Contains(allowed, a.status) {
		l.violate("%s: %d %v, want one of %v", endpoint, a.status, a.body, allowed)
		return false
	}
	if a.status == http.StatusTooManyRequests || a.status == http.StatusServiceUnavailable {
		if n, err := strconv.Atoi(a.header.Get("Retry-After")); err != nil || n < 1 {
			l.violate("%s: %d %v without a Retry-After of whole seconds (%q)", endpoint, a.status, a.body["code"], a.header.Get("Retry-After"))
		}
	}
	return true
}

// run is one worker. It owns the sessions it creates, so that no other
// worker revokes them behind its back: a token request for a session that
// is neither revoked nor possibly revoked may only be answered 200, 429 or
// 503.
func (l *faultLoad) run(seed uint64, stop <-chan struct{}) {
	rng := rand.New(rand.NewPCG(seed, seed))
	ip := ""
	if l.xff {
		ip = fmt.Sprintf("192.0.2.%d", 1+seed%4)
	}
	var mine []*trackedSession
	for {
		select {
		case <-stop:
			return
		default:
		}
		if len(mine) < 40 && (len(mine) == 0 || rng.IntN(4) == 0) {
			a, err := l.send("POST", "/v1/sessions", pgServiceKey, "", `{"subject":"load"}`, ip)
			if !l.check("POST /v1/sessions", a, err, http.StatusCreated, http.StatusTooManyRequests, http.StatusServiceUnavailable) ||
				a.status != http.StatusCreated {
				time.Sleep(2 * time.Millisecond)
				continue
			}
			c, _ := a.body["cookie"].(map[string]any)
			sid, _ := a.body["sid"].(string)
			name, _ := c["name"].(string)
			value, _ := c["value"].(string)
			if sid == "" || value == "" {
				l.violate("POST /v1/sessions: 201 without sid or cookie: %v", a.body)
				continue
			}
			s := &trackedSession{sid: sid, cookie: name + "=" + value}
			mine = append(mine, s)
			l.mu.Lock()
			l.sessions = append(l.sessions, s)
			l.mu.Unlock()
			continue
		}
		s := mine[rng.IntN(len(mine))]
		switch n := rng.IntN(20); {
		case n == 0: // an admin revokes it
			a, err := l.send("DELETE", "/v1/admin/sessions/"+s.sid+"?reason=fault-test", pgAdminKey, "", "", ip)
			if l.check("DELETE /v1/admin/sessions/{sid}", a, err, http.StatusOK, http.StatusServiceUnavailable) {
				l.settle(s, a.status == http.StatusOK)
			}
			mine = slices.DeleteFunc(mine, func(x *trackedSession) bool { return x == s })
		case n == 1: // the user logs out
			a, err := l.send("DELETE", "/v1/session", "", s.cookie, "", ip)
			if l.check("DELETE /v1/session", a, err, http.StatusNoContent, http.StatusTooManyRequests, http.StatusServiceUnavailable) {
				if a.status == http.StatusTooManyRequests {
					continue // refused before it was tried: nothing happened
				}
				l.settle(s, a.status == http.StatusNoContent)
			}
			mine = slices.DeleteFunc(mine, func(x *trackedSession) bool { return x == s })
		default:
			a, err := l.send("POST", "/v1/token", "", s.cookie, "", ip)
			l.tokens.Add(1)
			if l.check("POST /v1/token", a, err, http.StatusOK, http.StatusTooManyRequests, http.StatusServiceUnavailable) &&
				a.status == http.StatusOK {
				if tok, _ := a.body["access_token"].(string); tok == "" {
					l.violate("POST /v1/token: 200 without a token: %v", a.body)
				}
			}
		}
	}
}

// settle records the outcome of a revocation of s.
func (l *faultLoad) settle(s *trackedSession, acknowledged bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if acknowledged {
		s.revoked = true
	} else {
		s.uncertain = true
	}
}

func (l *faultLoad) count(phase int, endpoint string, status int) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.statuses[phase][endpoint][status]
}

// start runs workers until the returned function is called.
func (l *faultLoad) start(workers int) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	for i := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l.run(uint64(i+1), done)
		}()
	}
	return sync.OnceFunc(func() { close(done); wg.Wait() })
}

// report logs the statuses seen in each phase.
func (l *faultLoad) report(t *testing.T) {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	for p, byEndpoint := range l.statuses {
		endpoints := slices.Sorted(func(yield func(string) bool) {
			for e := range byEndpoint {
				if !yield(e) {
					return
				}
			}
		})
		var parts []string
		for _, e := range endpoints {
			parts = append(parts, fmt.Sprintf("%s %v", e, byEndpoint[e]))
		}
		t.Logf("%-8s %s", phaseNames[p]+":", strings.Join(parts, "; "))
	}
}

// verify checks, after recovery, that every acknowledged session still
// refreshes and every acknowledged revocation still holds. Answers of 503
// and 429 are retried for a while: the instance may still be reconnecting.
func (l *faultLoad) verify(t *testing.T) {
	t.Helper()
	l.mu.Lock()
	sessions := slices.Clone(l.sessions)
	l.mu.Unlock()
	var active, revoked, uncertain int
	deadline := time.Now().Add(20 * time.Second)
	for i, s := range sessions {
		var a answer
		for {
			var err error
			// A client address of its own for each session, so that the
			// per-IP limit never refuses the check.
			a, err = l.send("POST", "/v1/token", "", s.cookie, "", fmt.Sprintf("198.51.%d.%d", i/250, 1+i%250))
			if err != nil {
				t.Fatalf("verify %s: %v", s.sid, err)
			}
			if (a.status != http.StatusServiceUnavailable && a.status != http.StatusTooManyRequests) || time.Now().After(deadline) {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		code, _ := a.body["code"].(string)
		switch {
		case s.revoked:
			revoked++
			if a.status != http.StatusUnauthorized || code != "session_revoked" {
				t.Errorf("session %s, whose revocation was acknowledged, answers %d %s after recovery, want 401 session_revoked", s.sid, a.status, code)
			}
		case s.uncertain:
			uncertain++
			if a.status != http.StatusOK && (a.status != http.StatusUnauthorized || code != "session_revoked") {
				t.Errorf("session %s, whose revocation was not acknowledged, answers %d %s after recovery, want 200 or 401 session_revoked", s.sid, a.status, code)
			}
		default:
			active++
			if a.status != http.StatusOK {
				t.Errorf("session %s, whose creation was acknowledged, answers %d %s after recovery, want 200", s.sid, a.status, code)
			}
		}
	}
	t.Logf("after recovery: %d acknowledged sessions refresh, %d acknowledged revocations hold, %d unacknowledged revocations checked",
		active, revoked, uncertain)
}

func (l *faultLoad) failOnViolations(t *testing.T) {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.violations) > 0 {
		t.Errorf("%d answers broke the rules (only 200/201/204, 429 and 503 with Retry-After; never 500; never 401 for a live session):\n%s",
			len(l.violations), strings.Join(l.violations, "\n"))
	}
}

// TestPostgresRestartUnderLoad stops a throw-away PostgreSQL under load and
// starts it again. While it is away the instance answers 503 with
// Retry-After, never 500; afterwards no acknowledged session or revocation
// is lost.
func TestPostgresRestartUnderLoad(t *testing.T) {
	pg := testenv.StartPostgres(t)
	p := startInProcess(t, pgEnv(pg.URL()))
	l := newFaultLoad(p.base)
	stop := l.start(8)
	defer stop()

	pollUntil(t, 20*time.Second, "50 acknowledged sessions before the fault", func() bool {
		l.mu.Lock()
		defer l.mu.Unlock()
		return len(l.sessions) >= 50
	})

	l.phase.Store(phaseFault)
	pg.Stop()
	// The outage lasts until the health check has noticed it and the
	// token endpoint has answered 503 a few hundred times.
	pollUntil(t, 20*time.Second, "/readyz to turn 503 and 200 token requests to get 503", func() bool {
		status, _, _ := p.call("GET", "/readyz", "", nil, "")
		return status == http.StatusServiceUnavailable && strings.Contains(p.log.String(), "PostgreSQL is unreachable") &&
			l.count(phaseFault, "POST /v1/token", http.StatusServiceUnavailable) >= 200
	})

	l.phase.Store(phaseRecovery)
	pg.Start()
	pollUntil(t, 30*time.Second, "the instance to reconnect, create 20 sessions and mint 50 tokens", func() bool {
		return strings.Contains(p.log.String(), "PostgreSQL is reachable again") &&
			l.count(phaseRecovery, "POST /v1/sessions", http.StatusCreated) >= 20 &&
			l.count(phaseRecovery, "POST /v1/token", http.StatusOK) >= 50
	})
	stop()

	l.report(t)
	l.failOnViolations(t)
	l.verify(t)
	if l.count(phaseFault, "POST /v1/token", http.StatusInternalServerError) > 0 {
		t.Errorf("500s on the token endpoint during the outage")
	}
}

// TestRedisRestartUnderLoad kills a throw-away Redis holding the shared
// rate limits under load and starts it again. No request fails because of
// it: limits fall back to the instance, every refusal carries Retry-After,
// and shared limiting resumes by itself once Redis answers.
func TestRedisRestartUnderLoad(t *testing.T) {
	pg := testenv.StartPostgres(t)
	rd := testenv.StartRedis(t, 0)
	env := pgEnv(pg.URL())
	env["TOKEND_REDIS_URL"] = rd.URL()
	env["TOKEND_RATE_SESSION"] = "5/s burst 5"
	env["TOKEND_RATE_IP"] = "100/s burst 50"
	env["TOKEND_TRUSTED_PROXIES"] = "127.0.0.1/32"
	p := startInProcess(t, env)
	redis := rd.Client()
	sharedKeys := func() int64 {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		n, err := redis.DBSize(ctx).Result()
		if err != nil {
			return -1
		}
		return n
	}

	l := newFaultLoad(p.base)
	l.xff = true
	stop := l.start(8)
	defer stop()

	pollUntil(t, 20*time.Second, "50 acknowledged sessions and shared limits in Redis before the fault", func() bool {
		l.mu.Lock()
		n := len(l.sessions)
		l.mu.Unlock()
		return n >= 50 && sharedKeys() > 0 && l.count(phaseBefore, "POST /v1/token", http.StatusTooManyRequests) > 0
	})

	l.phase.Store(phaseFault)
	rd.Kill()
	faultFrom := l.tokens.Load()
	pollUntil(t, 20*time.Second, "the fallback to per-instance limits and 300 token requests during the outage", func() bool {
		return strings.Contains(p.log.String(), "shared rate limiter unavailable") && l.tokens.Load()-faultFrom >= 300
	})

	l.phase.Store(phaseRecovery)
	rd.Start()
	pollUntil(t, 20*time.Second, "shared limiting to resume in the new Redis", func() bool {
		return strings.Contains(p.log.String(), "shared rate limiter answers again") && sharedKeys() > 0
	})
	recoveryFrom := l.tokens.Load()
	pollUntil(t, 20*time.Second, "100 more token requests", func() bool { return l.tokens.Load()-recoveryFrom >= 100 })
	stop()

	l.report(t)
	l.failOnViolations(t)
	if n := l.count(phaseFault, "POST /v1/token", http.StatusTooManyRequests); n == 0 {
		t.Errorf("no 429 during the outage: the per-instance fallback did not limit")
	}
	l.verify(t)
}
