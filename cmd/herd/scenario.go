package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// Scenario names.
const (
	scenarioRestart = "restart"
	scenarioSteady  = "steady"
	scenarioNaive   = "naive"
	scenarioFlood   = "flood"
)

// tokend draws refresh_in uniformly from 50–90 % of a token's life.
const (
	refreshMinFrac = 0.5
	refreshMaxFrac = 0.9
)

// sessionAttempts bounds the tries of one session creation (or the probe),
// so an overloaded service ends the run instead of stalling it.
const sessionAttempts = 6

// latencySamples bounds the latencies kept for percentiles.
const latencySamples = 1 << 20

// holders tracks which clients hold an unexpired token.
type holders struct {
	expiry []atomic.Int64 // UnixNano of the token's expiry; 0 before the first
	first  atomic.Int64   // clients that got at least one token
}

func newHolders(n int) *holders { return &holders{expiry: make([]atomic.Int64, n)} }

// got records that client i holds a token until exp.
func (h *holders) got(i int, exp time.Time) {
	if h.expiry[i].Swap(exp.UnixNano()) == 0 {
		h.first.Add(1)
	}
}

// held counts the clients whose token is still valid at now.
func (h *holders) held(now time.Time) int {
	t, n := now.UnixNano(), 0
	for i := range h.expiry {
		if h.expiry[i].Load() > t {
			n++
		}
	}
	return n
}

// herd is one run: the service under test, the clients' sessions and the
// counters.
type herd struct {
	cfg     config
	api     *tokend
	cookies []string // the Cookie header of each client
	backoff backoff
	rnd     *rand.Rand // the scheduler's own draws; clients have theirs
}

// createSessions creates one session per client, -batch at a time, and
// calls progress after each. The first failure cancels the rest.
func (h *herd) createSessions(ctx context.Context, n int, progress func()) (retries int, err error) {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	h.cookies = make([]string, n)
	var (
		next    atomic.Int64
		retried atomic.Int64
		wg      sync.WaitGroup
	)
	for w := range min(h.cfg.batch, n) {
		rnd := rand.New(rand.NewPCG(h.cfg.seed, uint64(1<<32+w)))
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= n || ctx.Err() != nil {
					return
				}
				cookie, r, err := h.api.createSession(ctx, fmt.Sprintf("herd-%d", i), h.backoff, sessionAttempts, rnd)
				retried.Add(int64(r))
				if err != nil {
					cancel(err)
					return
				}
				h.cookies[i] = cookie
				progress()
			}
		})
	}
	wg.Wait()
	if err := context.Cause(ctx); err != nil {
		return int(retried.Load()), err
	}
	return int(retried.Load()), nil
}

// probe asks for one token with its own session, to learn the token
// lifetime the service hands out. It is not part of the measured run.
func (h *herd) probe(ctx context.Context) (result, error) {
	cookie, _, err := h.api.createSession(ctx, "herd-probe", h.backoff, sessionAttempts, h.rnd)
	if err != nil {
		return result{}, err
	}
	for attempt := 0; attempt < sessionAttempts; attempt++ {
		r := h.api.token(ctx, cookie)
		switch {
		case ctx.Err() != nil:
			return result{}, ctx.Err()
		case r.ok():
			if r.expiresIn <= 0 {
				return result{}, errors.New("probe: the token's expires_in is not positive")
			}
			return r, nil
		case !r.retryable():
			return result{}, fmt.Errorf("probe token request: %w", r.err)
		}
		if !sleep(ctx, h.backoff.delay(attempt, r.retryAfter, h.rnd)) {
			return result{}, ctx.Err()
		}
	}
	return result{}, fmt.Errorf("probe token request: gave up after %d attempts", sessionAttempts)
}

// outcome is what a scenario measured besides the counters.
type outcome struct {
	start, end time.Time
	// allTokens is when every client first held a valid token at the same
	// time (restart only); zero if that never happened.
	allTokens time.Time
	// notes are scenario details for the human summary.
	notes []string
	stats *stats
}

// schedule decides when a client asks again after a token.
type schedule func(r result) time.Time

// play runs the scenario. It returns when -duration has passed, every
// client has stopped, the restart goal is reached, or ctx ends.
func (h *herd) play(ctx context.Context) (outcome, error) {
	out := outcome{}
	n := len(h.cookies)
	var (
		offsets = make([]time.Duration, n) // of each client's first request
		next    func(start time.Time) schedule
	)
	refreshIn := func(time.Time) schedule {
		// The browser rule: come back when the server says, never on a
		// fixed interval. A zero refresh_in would spin, so wait a second.
		return func(r result) time.Time { return r.at.Add(max(r.refreshIn, time.Second)) }
	}

	switch h.cfg.scenario {
	case scenarioRestart:
		next = refreshIn
		for i := range offsets {
			offsets[i] = h.offset(h.cfg.window)
		}
		out.notes = append(out.notes, fmt.Sprintf("first requests spread uniformly over %v", h.cfg.window))
	case scenarioSteady, scenarioNaive:
		p, err := h.probe(ctx)
		if err != nil {
			return out, err
		}
		out.notes = append(out.notes, fmt.Sprintf("probe: tokens live %v, first refresh_in %v", p.expiresIn, p.refreshIn))
		if h.cfg.scenario == scenarioSteady {
			next = refreshIn
			lo := time.Duration(refreshMinFrac * float64(p.expiresIn))
			hi := time.Duration(refreshMaxFrac * float64(p.expiresIn))
			for i := range offsets {
				offsets[i] = h.residual(lo, hi)
			}
			out.notes = append(out.notes, fmt.Sprintf("first requests placed as in a population already refreshing every %v–%v, then every refresh at refresh_in", lo, hi))
			break
		}
		interval := h.cfg.interval
		if interval <= 0 {
			interval = p.expiresIn / 2
		}
		next = func(start time.Time) schedule {
			// Fixed slots start + k·interval: every client in the same slot.
			return func(r result) time.Time {
				k := r.at.Sub(start)/interval + 1
				return start.Add(k * interval)
			}
		}
		out.notes = append(out.notes, fmt.Sprintf("all clients start together and refresh every %v", interval))
	case scenarioFlood:
		out.notes = append(out.notes, fmt.Sprintf("%d workers send POST /v1/token back to back over %d sessions", h.cfg.concurrency, n))
	}

	runCtx, cancel := context.WithTimeout(ctx, h.cfg.duration)
	defer cancel()
	out.start = time.Now()
	st := newStats(out.start, latencySamples, h.cfg.seed)
	tokens := newHolders(n)
	out.stats = st

	var (
		clients  sync.WaitGroup
		goalOnce sync.Once
		goal     = make(chan struct{})
		goalAt   time.Time
	)
	onToken := func(i int, r result) {
		tokens.got(i, r.at.Add(r.expiresIn))
		if h.cfg.scenario != scenarioRestart || tokens.first.Load() < int64(n) {
			return
		}
		if now := time.Now(); tokens.held(now) == n {
			goalOnce.Do(func() { goalAt = now; close(goal) })
		}
	}

	if h.cfg.scenario == scenarioFlood {
		var turn atomic.Uint64
		for range h.cfg.concurrency {
			clients.Go(func() { h.flood(runCtx, st, &turn, onToken) })
		}
	} else {
		sched := next(out.start)
		for i := range n {
			first := out.start.Add(offsets[i])
			rnd := rand.New(rand.NewPCG(h.cfg.seed, uint64(i)))
			clients.Go(func() { h.client(runCtx, i, first, sched, rnd, st, onToken) })
		}
	}
	allStopped := make(chan struct{})
	go func() { clients.Wait(); close(allStopped) }()

	sampled := make(chan struct{})
	go func() { defer close(sampled); sampleHeld(runCtx, st, tokens, out.start) }()

	select {
	case <-runCtx.Done():
	case <-allStopped:
	case <-goal:
	}
	out.end = time.Now()
	cancel()
	<-allStopped
	<-sampled
	// The last sample goes to the second the run ended in, unless that
	// second barely began and saw nothing: then it refreshes the one before.
	last := st.bucket(out.end)
	if out.end.Sub(out.start)%time.Second < 100*time.Millisecond && last > 0 && !st.has(last) {
		last--
	}
	st.setHeld(last, tokens.held(out.end))
	select {
	case <-goal:
		out.allTokens = goalAt
	default:
	}
	return out, nil
}

// offset draws a uniform delay in [0, d).
// residual draws the time until a client's next refresh in a population
// that has been refreshing for a long time at intervals uniform in
// [lo, hi]: the forward recurrence time, whose density at x is
// P(interval > x) / E[interval] — flat up to lo, then falling linearly to
// zero at hi. Starting clients this way, the load is steady from the first
// second; starting them uniformly over the mean interval instead makes the
// first refreshes of early clients overlap the last starts (a 1.4× bump).
func (h *herd) residual(lo, hi time.Duration) time.Duration {
	for {
		x := h.offset(hi)
		if x < lo || hi <= lo || h.rnd.Float64()*float64(hi-lo) < float64(hi-x) {
			return x
		}
	}
}

func (h *herd) offset(d time.Duration) time.Duration {
	if d <= 0 {
		return 0
	}
	return time.Duration(h.rnd.Int64N(int64(d)))
}

// client plays one browser: first request at first, then as sched says
// after a token, backoff after errors, and nothing more after a 401.
func (h *herd) client(ctx context.Context, i int, first time.Time, sched schedule, rnd *rand.Rand, st *stats, onToken func(int, result)) {
	at, attempt := first, 0
	for {
		if !sleep(ctx, time.Until(at)) {
			return
		}
		r := h.api.token(ctx, h.cookies[i])
		if ctx.Err() != nil {
			return // cut off by the end of the run, not an answer
		}
		st.record(r)
		switch {
		case r.ok():
			onToken(i, r)
			attempt = 0
			at = sched(r)
		case r.retryable():
			at = r.at.Add(h.backoff.delay(attempt, r.retryAfter, rnd))
			attempt++
		case r.status == http.StatusUnauthorized:
			return // session_expired, session_revoked, session_invalid: sign in again
		default:
			return // another 4xx: asking again will not change it
		}
	}
}

// flood is one misbehaving worker: token requests back to back over the
// sessions in turn, whatever the answer.
func (h *herd) flood(ctx context.Context, st *stats, turn *atomic.Uint64, onToken func(int, result)) {
	n := uint64(len(h.cookies))
	for ctx.Err() == nil {
		i := int(turn.Add(1) % n)
		r := h.api.token(ctx, h.cookies[i])
		if ctx.Err() != nil {
			return
		}
		st.record(r)
		if r.ok() {
			onToken(i, r)
		}
	}
}

// sampleHeld records the tokens held at the end of every whole second.
func sampleHeld(ctx context.Context, st *stats, tokens *holders, start time.Time) {
	for k := 1; ; k++ {
		if !sleep(ctx, time.Until(start.Add(time.Duration(k)*time.Second))) {
			return
		}
		st.setHeld(k-1, tokens.held(time.Now()))
	}
}
