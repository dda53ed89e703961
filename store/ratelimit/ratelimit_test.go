package ratelimit_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tokend/tokend/store/ratelimit"
)

// fakeClock is a settable clock.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *fakeClock {
	return &fakeClock{t: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func mustParse(t *testing.T, s string) ratelimit.Limit {
	t.Helper()
	l, err := ratelimit.Parse(s)
	if err != nil {
		t.Fatalf("Parse(%q): %v", s, err)
	}
	return l
}

func TestParse(t *testing.T) {
	valid := []struct {
		in   string
		want ratelimit.Limit
	}{
		{"6/min", ratelimit.Limit{Rate: 6, Period: time.Minute, Burst: 6}},
		{"100/s burst 20", ratelimit.Limit{Rate: 100, Period: time.Second, Burst: 20}},
		{"1/s burst 50", ratelimit.Limit{Rate: 1, Period: time.Second, Burst: 50}},
		{"600/min", ratelimit.Limit{Rate: 600, Period: time.Minute, Burst: 600}},
		{"2/h", ratelimit.Limit{Rate: 2, Period: time.Hour, Burst: 2}},
		{"5/sec", ratelimit.Limit{Rate: 5, Period: time.Second, Burst: 5}},
		{"5/second", ratelimit.Limit{Rate: 5, Period: time.Second, Burst: 5}},
		{"5/m", ratelimit.Limit{Rate: 5, Period: time.Minute, Burst: 5}},
		{"5/minute", ratelimit.Limit{Rate: 5, Period: time.Minute, Burst: 5}},
		{"5/hour", ratelimit.Limit{Rate: 5, Period: time.Hour, Burst: 5}},
		{"5/MIN", ratelimit.Limit{Rate: 5, Period: time.Minute, Burst: 5}},
		{"  10 / s  ", ratelimit.Limit{Rate: 10, Period: time.Second, Burst: 10}},
		{"6/min  burst 3", ratelimit.Limit{Rate: 6, Period: time.Minute, Burst: 3}},
		{"1000000/s burst 1000000", ratelimit.Limit{Rate: 1_000_000, Period: time.Second, Burst: 1_000_000}},
		{"off", ratelimit.Limit{}},
		{"OFF", ratelimit.Limit{}},
		{" Off ", ratelimit.Limit{}},
	}
	for _, tc := range valid {
		got, err := ratelimit.Parse(tc.in)
		if err != nil {
			t.Errorf("Parse(%q): unexpected error %v", tc.in, err)
			continue
		}
		if got != tc.want {
			t.Errorf("Parse(%q) = %+v, want %+v", tc.in, got, tc.want)
		}
		// String renders the canonical form, which parses back to the same limit.
		back, err := ratelimit.Parse(got.String())
		if err != nil || back != got {
			t.Errorf("Parse(%q).String() = %q, which parses to %+v, %v", tc.in, got.String(), back, err)
		}
	}

	invalid := []string{
		"", "6", "six/min", "6/", "/min", "6/day", "6/ms", "0/s", "-1/s", "1.5/s",
		"1000001/s", "6/min burst 0", "6/min burst -1", "6/min burst x", "6/min burst 1000001",
		"6/min burst", "6/min burst 2 burst 3", "off burst 3", "6 per min",
	}
	for _, in := range invalid {
		if l, err := ratelimit.Parse(in); err == nil {
			t.Errorf("Parse(%q) = %+v, want an error", in, l)
		} else if in != "" && !strings.Contains(err.Error(), in) {
			t.Errorf("Parse(%q) error %q does not quote the value", in, err)
		}
	}
}

func TestLimitString(t *testing.T) {
	for _, tc := range []struct {
		l    ratelimit.Limit
		want string
	}{
		{ratelimit.Limit{}, "off"},
		{ratelimit.Limit{Rate: 6, Period: time.Minute, Burst: 6}, "6/min"},
		{ratelimit.Limit{Rate: 100, Period: time.Second, Burst: 20}, "100/s burst 20"},
		{ratelimit.Limit{Rate: 2, Period: time.Hour, Burst: 2}, "2/h"},
	} {
		if got := tc.l.String(); got != tc.want {
			t.Errorf("%+v.String() = %q, want %q", tc.l, got, tc.want)
		}
	}
	if got := mustParse(t, "6/min").Interval(); got != 10*time.Second {
		t.Errorf("Interval of 6/min = %v, want 10s", got)
	}
	for _, l := range []ratelimit.Limit{{}, {Rate: 0, Period: time.Second}, {Rate: 5}, {Rate: -1, Period: time.Second}} {
		if !l.Off() {
			t.Errorf("%+v.Off() = false, want true", l)
		}
	}
}

func allow(t *testing.T, l ratelimit.Limiter, key string, lim ratelimit.Limit) ratelimit.Result {
	t.Helper()
	res, err := l.Allow(context.Background(), key, lim)
	if err != nil {
		t.Fatalf("Allow(%q): %v", key, err)
	}
	return res
}

func TestLocalGCRA(t *testing.T) {
	clock := newClock()
	l := ratelimit.NewLocal(10, clock.Now)
	lim := mustParse(t, "3/min") // one event per 20s, bursts of 3

	for i, wantRemaining := range []int{2, 1, 0} {
		res := allow(t, l, "k", lim)
		if !res.Allowed || res.Remaining != wantRemaining || res.RetryAfter != 0 {
			t.Fatalf("event %d: %+v, want allowed with %d remaining", i+1, res, wantRemaining)
		}
		if want := time.Duration(i+1) * 20 * time.Second; res.ResetAfter != want {
			t.Errorf("event %d: ResetAfter %v, want %v", i+1, res.ResetAfter, want)
		}
	}
	res := allow(t, l, "k", lim)
	if res.Allowed || res.RetryAfter != 20*time.Second || res.Remaining != 0 || res.ResetAfter != time.Minute {
		t.Fatalf("4th event: %+v, want refused, RetryAfter 20s, ResetAfter 1m", res)
	}

	// Refusals cost nothing: hammering does not push the next slot away.
	for range 50 {
		allow(t, l, "k", lim)
	}
	clock.Advance(19 * time.Second)
	if res := allow(t, l, "k", lim); res.Allowed || res.RetryAfter != time.Second {
		t.Fatalf("after 19s: %+v, want refused with RetryAfter exactly 1s", res)
	}
	clock.Advance(time.Second)
	if res := allow(t, l, "k", lim); !res.Allowed || res.Remaining != 0 {
		t.Fatalf("after one interval: %+v, want one event allowed", res)
	}
	if res := allow(t, l, "k", lim); res.Allowed || res.RetryAfter != 20*time.Second {
		t.Fatalf("right after: %+v, want refused for 20s", res)
	}

	// A whole idle period restores the full burst, and no more than that.
	clock.Advance(10 * time.Minute)
	for i := range 3 {
		if res := allow(t, l, "k", lim); !res.Allowed {
			t.Fatalf("after idling, event %d refused: %+v", i+1, res)
		}
	}
	if res := allow(t, l, "k", lim); res.Allowed {
		t.Fatalf("idling must not bank more than the burst: %+v", res)
	}
}

func TestLocalBurstDiffersFromRate(t *testing.T) {
	clock := newClock()
	l := ratelimit.NewLocal(0, clock.Now)
	lim := mustParse(t, "1/s burst 5")
	for i := range 5 {
		if res := allow(t, l, "k", lim); !res.Allowed || res.Remaining != 4-i {
			t.Fatalf("event %d: %+v, want allowed with %d remaining", i+1, res, 4-i)
		}
	}
	if res := allow(t, l, "k", lim); res.Allowed || res.RetryAfter != time.Second {
		t.Fatalf("6th event: %+v, want refused for exactly 1s", res)
	}
	clock.Advance(500 * time.Millisecond)
	if res := allow(t, l, "k", lim); res.Allowed || res.RetryAfter != 500*time.Millisecond {
		t.Fatalf("half an interval later: %+v, want refused for exactly 500ms", res)
	}
}

func TestLocalKeysAreIndependent(t *testing.T) {
	clock := newClock()
	l := ratelimit.NewLocal(10, clock.Now)
	lim := mustParse(t, "2/h")
	allow(t, l, "a", lim)
	allow(t, l, "a", lim)
	if res := allow(t, l, "a", lim); res.Allowed {
		t.Fatalf("a: third event allowed: %+v", res)
	}
	for _, k := range []string{"b", "c"} {
		if res := allow(t, l, k, lim); !res.Allowed || res.Remaining != 1 {
			t.Fatalf("%s: %+v, want a fresh budget", k, res)
		}
	}
	// The same key under a different limit is still the same key: the
	// caller must encode the policy in the key if it wants separate budgets.
	if res := allow(t, l, "b", lim); !res.Allowed {
		t.Fatalf("b: second event refused: %+v", res)
	}
}

func TestLocalMemoryIsBounded(t *testing.T) {
	clock := newClock()
	const maxKeys = 8
	l := ratelimit.NewLocal(maxKeys, clock.Now)
	lim := mustParse(t, "1/h")
	for i := range 1000 {
		allow(t, l, fmt.Sprintf("k%d", i), lim)
		if n := l.Len(); n > maxKeys {
			t.Fatalf("after %d keys, Len() = %d > %d", i+1, n, maxKeys)
		}
	}
	if n := l.Len(); n != maxKeys {
		t.Fatalf("Len() = %d, want %d", n, maxKeys)
	}
	// Off limits remember nothing.
	l2 := ratelimit.NewLocal(maxKeys, clock.Now)
	for i := range 100 {
		if res := allow(t, l2, fmt.Sprintf("k%d", i), ratelimit.Limit{}); !res.Allowed {
			t.Fatalf("off limit refused: %+v", res)
		}
	}
	if n := l2.Len(); n != 0 {
		t.Fatalf("off limits stored %d keys", n)
	}
}

func TestLocalForgetsLeastRecentlyUsed(t *testing.T) {
	clock := newClock()
	l := ratelimit.NewLocal(3, clock.Now)
	lim := mustParse(t, "1/h")

	allow(t, l, "hot", lim) // exhausted
	allow(t, l, "b", lim)
	allow(t, l, "c", lim)
	// A refused request still counts as use: a client being refused keeps
	// its key remembered and cannot get a fresh burst by waiting for
	// eviction while it keeps hammering.
	if res := allow(t, l, "hot", lim); res.Allowed {
		t.Fatalf("hot: second event allowed: %+v", res)
	}
	allow(t, l, "d", lim) // evicts b, the least recently used
	if res := allow(t, l, "hot", lim); res.Allowed {
		t.Fatalf("hot was forgotten although recently used: %+v", res)
	}
	if res := allow(t, l, "b", lim); !res.Allowed {
		t.Fatalf("b should have been forgotten and start with a full burst: %+v", res)
	}
}

func TestLocalConcurrent(t *testing.T) {
	clock := newClock() // frozen: exactly the burst may pass
	l := ratelimit.NewLocal(0, clock.Now)
	lim := mustParse(t, "1/h burst 7")
	var allowed atomic.Int64
	var wg sync.WaitGroup
	for range 32 {
		wg.Go(func() {
			for range 20 {
				res, err := l.Allow(context.Background(), "shared", lim)
				if err != nil {
					t.Error(err)
					return
				}
				if res.Allowed {
					allowed.Add(1)
				}
			}
		})
	}
	wg.Wait()
	if n := allowed.Load(); n != 7 {
		t.Fatalf("%d events allowed concurrently, want exactly the burst of 7", n)
	}
}

func TestLocalRealClock(t *testing.T) {
	l := ratelimit.NewLocal(0, nil)
	lim := mustParse(t, "2/h")
	allow(t, l, "k", lim)
	allow(t, l, "k", lim)
	if res := allow(t, l, "k", lim); res.Allowed || res.RetryAfter <= 0 || res.RetryAfter > 30*time.Minute {
		t.Fatalf("3rd event: %+v, want refused with RetryAfter in (0, 30m]", res)
	}
}

// fakeShared is a shared limiter whose decisions are recognisable
// (Remaining 999) and that can be made to fail or to block.
type fakeShared struct {
	mu      sync.Mutex
	failing bool
	block   chan struct{} // when set, the next call waits on it
	entered chan struct{} // signalled when a call starts, if set
	calls   int
	keys    []string
}

const sharedRemaining = 999

var errRedisDown = errors.New("dial tcp 127.0.0.1:6379: connect: connection refused")

func (f *fakeShared) Allow(ctx context.Context, key string, l ratelimit.Limit) (ratelimit.Result, error) {
	f.mu.Lock()
	f.calls++
	f.keys = append(f.keys, key)
	failing, block, entered := f.failing, f.block, f.entered
	f.block = nil // only the first call blocks: a broken limiter must fail the test, not hang it
	f.mu.Unlock()
	if entered != nil {
		select {
		case entered <- struct{}{}:
		default:
		}
	}
	if block != nil {
		select {
		case <-block:
		case <-ctx.Done():
			return ratelimit.Result{}, ctx.Err()
		}
	}
	if err := ctx.Err(); err != nil {
		return ratelimit.Result{}, fmt.Errorf("redis: %w", err)
	}
	if failing {
		return ratelimit.Result{}, errRedisDown
	}
	return ratelimit.Result{Allowed: true, Remaining: sharedRemaining}, nil
}

func (f *fakeShared) set(failing bool) {
	f.mu.Lock()
	f.failing = failing
	f.mu.Unlock()
}

func (f *fakeShared) Calls() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls
}

// syncBuffer is a log sink safe for concurrent writers.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func newFallback(shared ratelimit.Limiter, clock *fakeClock, logs *syncBuffer) *ratelimit.Fallback {
	return ratelimit.NewFallback(shared, ratelimit.FallbackOptions{
		Logger:      slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		RetryShared: 2 * time.Second,
		LocalKeys:   100,
		Now:         clock.Now,
	})
}

func fbAllow(t *testing.T, f *ratelimit.Fallback, key string, lim ratelimit.Limit) ratelimit.Result {
	t.Helper()
	res, err := f.Allow(context.Background(), key, lim)
	if err != nil {
		t.Fatalf("Fallback.Allow returned an error: %v", err)
	}
	return res
}

func TestFallbackOutageAndRecovery(t *testing.T) {
	clock := newClock()
	shared := &fakeShared{}
	logs := &syncBuffer{}
	f := newFallback(shared, clock, logs)
	lim := mustParse(t, "2/h")
	// Keys as the API builds them: they hold a digest of the session secret.
	secretKey := "s:AAAAAAAAAAAAAAAAAAAAAA:0123456789ab"

	// Healthy: every decision is the shared limiter's.
	for range 5 {
		if res := fbAllow(t, f, secretKey, lim); res.Remaining != sharedRemaining {
			t.Fatalf("healthy: decision %+v did not come from the shared limiter", res)
		}
	}
	if st := f.Stats(); st != (ratelimit.FallbackStats{}) {
		t.Fatalf("healthy: stats %+v, want zero", st)
	}
	if shared.Calls() != 5 {
		t.Fatalf("healthy: %d shared calls, want 5", shared.Calls())
	}

	// Outage: the error never reaches the caller; the local limiter decides
	// (and really limits).
	shared.set(true)
	r1 := fbAllow(t, f, secretKey, lim)
	if !r1.Allowed || r1.Remaining == sharedRemaining {
		t.Fatalf("first call in the outage: %+v, want a local decision", r1)
	}
	st := f.Stats()
	if !st.Degraded || st.SharedErrors != 1 || st.Outages != 1 || st.LocalDecisions != 1 {
		t.Fatalf("after the first failure: %+v", st)
	}
	callsAtOutage := shared.Calls()

	// While degraded, within the pause, the shared limiter is not called.
	r2 := fbAllow(t, f, secretKey, lim)
	r3 := fbAllow(t, f, secretKey, lim)
	if !r2.Allowed || r3.Allowed {
		t.Fatalf("local limiting in the outage: 2nd %+v, 3rd %+v; want allowed then refused (2/h)", r2, r3)
	}
	for range 20 {
		fbAllow(t, f, "other", lim)
	}
	clock.Advance(1999 * time.Millisecond)
	fbAllow(t, f, "other", lim)
	if n := shared.Calls(); n != callsAtOutage {
		t.Fatalf("shared limiter called %d times during the pause, want 0", n-callsAtOutage)
	}
	if st := f.Stats(); st.LocalDecisions != 1+2+20+1 {
		t.Fatalf("LocalDecisions = %d, want %d", st.LocalDecisions, 1+2+20+1)
	}

	// The pause is over: exactly one call probes; it fails, which is not a
	// new outage, and starts another pause.
	clock.Advance(time.Millisecond)
	for range 10 {
		fbAllow(t, f, "other", lim)
	}
	if n := shared.Calls(); n != callsAtOutage+1 {
		t.Fatalf("%d probes after the pause, want exactly 1", n-callsAtOutage)
	}
	st = f.Stats()
	if !st.Degraded || st.SharedErrors != 2 || st.Outages != 1 {
		t.Fatalf("after a failed probe: %+v, want degraded, 2 errors, 1 outage", st)
	}

	// Recovery: the next probe succeeds and shared decisions resume.
	shared.set(false)
	clock.Advance(2 * time.Second)
	if res := fbAllow(t, f, secretKey, lim); res.Remaining != sharedRemaining {
		t.Fatalf("probe after recovery: %+v, want the shared decision", res)
	}
	before := f.Stats().LocalDecisions
	for range 5 {
		if res := fbAllow(t, f, secretKey, lim); res.Remaining != sharedRemaining {
			t.Fatalf("after recovery: %+v, want shared decisions", res)
		}
	}
	st = f.Stats()
	if st.Degraded || st.LocalDecisions != before || st.Outages != 1 {
		t.Fatalf("after recovery: %+v", st)
	}

	// A second outage is counted and logged again.
	shared.set(true)
	fbAllow(t, f, secretKey, lim)
	if st := f.Stats(); !st.Degraded || st.Outages != 2 || st.SharedErrors != 3 {
		t.Fatalf("second outage: %+v", st)
	}

	out := logs.String()
	if n := strings.Count(out, "level=WARN"); n != 2 {
		t.Errorf("%d warnings logged, want one per outage (2):\n%s", n, out)
	}
	if !strings.Contains(out, "shared rate limiter unavailable") || !strings.Contains(out, "connection refused") {
		t.Errorf("the warning does not say what happened and why:\n%s", out)
	}
	if n := strings.Count(out, "level=INFO"); n != 1 || !strings.Contains(out, "resumed") {
		t.Errorf("want exactly one info line on recovery:\n%s", out)
	}
	for _, secret := range []string{secretKey, "0123456789ab", "AAAAAAAAAAAAAAAAAAAAAA"} {
		if strings.Contains(out, secret) {
			t.Errorf("the log contains %q, part of a limiter key:\n%s", secret, out)
		}
	}
}

func TestFallbackOneProbeAtATime(t *testing.T) {
	clock := newClock()
	shared := &fakeShared{}
	f := newFallback(shared, clock, &syncBuffer{})
	lim := mustParse(t, "100/s")

	shared.set(true)
	fbAllow(t, f, "k", lim) // degrade
	clock.Advance(2 * time.Second)

	// The probe hangs (a slow Redis): meanwhile nobody else probes.
	block, entered := make(chan struct{}), make(chan struct{}, 1)
	shared.mu.Lock()
	shared.block, shared.entered = block, entered
	shared.mu.Unlock()
	probeDone := make(chan error)
	go func() {
		_, err := f.Allow(context.Background(), "k", lim)
		probeDone <- err
	}()
	<-entered
	callsDuringProbe := shared.Calls()
	for range 20 {
		if res := fbAllow(t, f, "k", lim); res.Remaining == sharedRemaining {
			t.Fatalf("decision during the probe came from the shared limiter: %+v", res)
		}
	}
	if n := shared.Calls(); n != callsDuringProbe {
		t.Fatalf("%d more shared calls while a probe was in flight, want 0", n-callsDuringProbe)
	}
	close(block)
	if err := <-probeDone; err != nil {
		t.Fatalf("the failed probe surfaced an error: %v", err)
	}
	if st := f.Stats(); !st.Degraded || st.SharedErrors != 2 {
		t.Fatalf("after the failed probe: %+v", st)
	}
}

func TestFallbackConcurrentProbeCount(t *testing.T) {
	clock := newClock() // frozen: one pause never ends by itself
	shared := &fakeShared{}
	f := newFallback(shared, clock, &syncBuffer{})
	lim := mustParse(t, "1000/s")
	shared.set(true)
	fbAllow(t, f, "k", lim)
	clock.Advance(3 * time.Second)
	before := shared.Calls()

	var wg sync.WaitGroup
	var errs atomic.Int64
	for g := range 64 {
		wg.Go(func() {
			for i := range 50 {
				if _, err := f.Allow(context.Background(), fmt.Sprintf("k%d-%d", g, i%5), lim); err != nil {
					errs.Add(1)
				}
			}
		})
	}
	wg.Wait()
	if errs.Load() != 0 {
		t.Fatalf("%d errors surfaced", errs.Load())
	}
	if n := shared.Calls() - before; n != 1 {
		t.Fatalf("%d calls reached the failing shared limiter from 3200 concurrent requests, want exactly 1 probe", n)
	}
	if st := f.Stats(); st.LocalDecisions != 1+64*50 {
		t.Fatalf("LocalDecisions = %d, want %d", st.LocalDecisions, 1+64*50)
	}
}

func TestFallbackCancelledRequestIsNotAnOutage(t *testing.T) {
	clock := newClock()
	shared := &fakeShared{}
	logs := &syncBuffer{}
	f := newFallback(shared, clock, logs)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	res, err := f.Allow(ctx, "k", mustParse(t, "5/s"))
	if err != nil || !res.Allowed {
		t.Fatalf("cancelled request: %+v, %v", res, err)
	}
	if st := f.Stats(); st.Degraded || st.SharedErrors != 0 || st.Outages != 0 || st.LocalDecisions != 1 {
		t.Fatalf("a client going away was taken for an outage: %+v", st)
	}
	if logs.String() != "" {
		t.Fatalf("logged: %s", logs.String())
	}
	// The next request uses the shared limiter again.
	if res := fbAllow(t, f, "k", mustParse(t, "5/s")); res.Remaining != sharedRemaining {
		t.Fatalf("after a cancelled request: %+v, want the shared decision", res)
	}
}

func TestFallbackOffAndLocalOnly(t *testing.T) {
	clock := newClock()
	shared := &fakeShared{}
	f := newFallback(shared, clock, &syncBuffer{})
	for range 100 {
		if res := fbAllow(t, f, "k", ratelimit.Limit{}); !res.Allowed {
			t.Fatalf("off limit refused: %+v", res)
		}
	}
	shared.set(true)
	for range 100 {
		if res := fbAllow(t, f, "k", ratelimit.Limit{}); !res.Allowed {
			t.Fatalf("off limit refused: %+v", res)
		}
	}
	if shared.Calls() != 0 || f.Stats() != (ratelimit.FallbackStats{}) {
		t.Fatalf("off limits reached the limiters: %d shared calls, stats %+v", shared.Calls(), f.Stats())
	}

	// Without a shared limiter, Fallback is a local limiter and never degraded.
	local := ratelimit.NewFallback(nil, ratelimit.FallbackOptions{Now: clock.Now})
	lim := mustParse(t, "2/min")
	fbAllow(t, local, "k", lim)
	fbAllow(t, local, "k", lim)
	if res := fbAllow(t, local, "k", lim); res.Allowed || res.RetryAfter != 30*time.Second {
		t.Fatalf("local-only: 3rd event %+v, want refused for 30s", res)
	}
	if st := local.Stats(); st.Degraded || st.LocalDecisions != 3 || st.SharedErrors != 0 {
		t.Fatalf("local-only stats: %+v", st)
	}
}
