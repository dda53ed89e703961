package api

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/tokend/tokend/session"
	"github.com/tokend/tokend/store/ratelimit"
)

// Protection configures how the token endpoints defend themselves against a
// herd: rate limits per client IP, per session and per service key, and a
// bound on concurrent work beyond which requests are shed.
type Protection struct {
	// Limiter decides the rate limits; nil disables them.
	Limiter ratelimit.Limiter
	// SessionLimit applies per session to POST /v1/token and DELETE /v1/session.
	SessionLimit ratelimit.Limit
	// IPLimit applies per client IP to the cookie endpoints.
	IPLimit ratelimit.Limit
	// ServiceLimit applies per service key to POST /v1/sessions.
	ServiceLimit ratelimit.Limit
	// MaxInflight bounds concurrent token and session work; 0 disables
	// shedding.
	MaxInflight int
	// MaxQueue is how many requests may wait for a slot; beyond it they are
	// shed at once.
	MaxQueue int
	// QueueWait is the longest a request waits for a slot.
	QueueWait time.Duration
	// ShedRetryAfter is the upper bound of the Retry-After sent with 503
	// overloaded; each answer draws a whole number of seconds from
	// [1, ShedRetryAfter].
	ShedRetryAfter time.Duration
}

// Defaults for Protection.
const (
	DefaultQueueWait      = 50 * time.Millisecond
	DefaultShedRetryAfter = 5 * time.Second
)

// gate is the concurrency bound. A request takes a slot if one is free,
// otherwise joins a short queue if there is room and waits at most
// QueueWait; everything else is refused at once, which costs two atomic
// operations.
type gate struct {
	slots    chan struct{}
	waiting  atomic.Int64
	maxQueue int64
	wait     time.Duration
}

func newGate(size, queue int, wait time.Duration) *gate {
	if size <= 0 {
		return nil
	}
	if wait <= 0 {
		wait = DefaultQueueWait
	}
	return &gate{slots: make(chan struct{}, size), maxQueue: int64(queue), wait: wait}
}

func (g *gate) enter(ctx context.Context) bool {
	select {
	case g.slots <- struct{}{}:
		return true
	default:
	}
	if g.waiting.Add(1) > g.maxQueue {
		g.waiting.Add(-1)
		return false
	}
	defer g.waiting.Add(-1)
	t := time.NewTimer(g.wait)
	defer t.Stop()
	select {
	case g.slots <- struct{}{}:
		return true
	case <-t.C:
		return false
	case <-ctx.Done():
		return false
	}
}

func (g *gate) leave() { <-g.slots }

// shed bounds concurrent work on the routes it wraps; excess requests get
// 503 overloaded with a jittered Retry-After.
func (s *server) shed(next http.Handler) http.Handler {
	if s.gate == nil {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !s.gate.enter(r.Context()) {
			s.metrics.shed.Inc()
			s.fail(w, r, &Error{Status: http.StatusServiceUnavailable, Code: "overloaded",
				Detail: "The service is at capacity; retry after the number of seconds in Retry-After.",
				Header: retryAfterHeader(s.jitterSeconds(1, int(s.protect.ShedRetryAfter/time.Second)))})
			return
		}
		defer s.gate.leave()
		next.ServeHTTP(w, r)
	})
}

// jitterSeconds draws a whole number of seconds uniformly from [lo, hi].
func (s *server) jitterSeconds(lo, hi int) int {
	if hi <= lo {
		return lo
	}
	return lo + s.randN(hi-lo+1)
}

// limitPolicy is one rate limit applied to a request.
type limitPolicy struct {
	name  string // the RateLimit-Policy name
	limit ratelimit.Limit
	key   func(s *server, r *http.Request) string // "" skips the limit
}

// ipKey keys IPv4 clients by address and IPv6 clients by their /64: one
// subscriber usually holds a whole /64 and could otherwise rotate through it.
func ipKey(s *server, r *http.Request) string {
	a := clientIP(r, s.trusted, s.cfg.ClientIPHeader)
	if a.Is6() {
		p, _ := a.Prefix(64)
		return "ip:" + p.String()
	}
	return "ip:" + a.String()
}

// sessionKey identifies the session by its sid and a digest of the secret.
// The sid is public (it is in every token), so keying by it alone would let
// anyone exhaust a victim's limit with made-up secrets; with the digest, a
// wrong secret only spends its own budget (and the IP's).
func sessionKey(s *server, r *http.Request) string {
	c, err := r.Cookie(s.cfg.Cookie.Name)
	if err != nil {
		return ""
	}
	creds, err := session.ParseCookie(c.Value)
	if err != nil {
		return ""
	}
	d := sha256.Sum256([]byte(creds.Secret))
	return "s:" + creds.SID + ":" + hex.EncodeToString(d[:6])
}

func serviceKey(s *server, r *http.Request) string {
	_, key, _ := strings.Cut(r.Header.Get("Authorization"), " ")
	d := sha256.Sum256([]byte(strings.TrimSpace(key)))
	return "k:" + hex.EncodeToString(d[:8])
}

// rateLimit applies policies in order; the first that refuses answers 429.
// A limiter error lets the request through: limits protect the service, and
// failing closed would turn a Redis hiccup into an outage. (The limiter
// tokend wires in falls back to local limits itself and never errs.)
func (s *server) rateLimit(policies ...limitPolicy) func(http.Handler) http.Handler {
	var active []limitPolicy
	for _, p := range policies {
		if !p.limit.Off() {
			active = append(active, p)
		}
	}
	return func(next http.Handler) http.Handler {
		if s.protect.Limiter == nil || len(active) == 0 {
			return next
		}
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			var policyHdr, stateHdr []string
			for _, p := range active {
				key := p.key(s, r)
				if key == "" {
					continue
				}
				res, err := s.protect.Limiter.Allow(r.Context(), key, p.limit)
				if err != nil {
					s.metrics.storeErrors.WithLabelValues("limiter").Inc()
					continue
				}
				policyHdr = append(policyHdr, policyField(p))
				if !res.Allowed {
					s.metrics.rateLimited.WithLabelValues(p.name).Inc()
					retry := s.retryAfter429(res.RetryAfter)
					h := http.Header{
						"Retry-After":      {strconv.Itoa(retry)},
						"Ratelimit-Policy": {strings.Join(policyHdr, ", ")},
						"Ratelimit":        {rateField(p.name, 0, retry)},
					}
					s.fail(w, r, &Error{Status: http.StatusTooManyRequests, Code: "rate_limited",
						Detail: "Too many requests for this " + p.name + "; retry after the number of seconds in Retry-After.",
						Header: h})
					return
				}
				stateHdr = append(stateHdr, rateField(p.name, res.Remaining, ceilSeconds(res.ResetAfter)))
			}
			if len(policyHdr) > 0 {
				h := w.Header()
				h["Ratelimit-Policy"] = []string{strings.Join(policyHdr, ", ")}
				h["Ratelimit"] = []string{strings.Join(stateHdr, ", ")}
			}
			next.ServeHTTP(w, r)
		})
	}
}

// retryAfter429 turns the limiter's exact wait into whole seconds with
// jitter: uniformly between the wait and twice the wait, so that clients
// refused in the same second come back spread over a window as long as the
// wait itself rather than all at once.
func (s *server) retryAfter429(wait time.Duration) int {
	base := max(ceilSeconds(wait), 1)
	return s.jitterSeconds(base, 2*base)
}

func ceilSeconds(d time.Duration) int {
	if d <= 0 {
		return 0
	}
	return int((d + time.Second - 1) / time.Second)
}

// policyField renders one RateLimit-Policy item
// (draft-ietf-httpapi-ratelimit-headers): quota q per window w seconds, the
// configured rate. The burst has no field of its own in the draft.
func policyField(p limitPolicy) string {
	return `"` + p.name + `";q=` + strconv.Itoa(p.limit.Rate) + ";w=" + strconv.Itoa(max(int(p.limit.Period/time.Second), 1))
}

// rateField renders one RateLimit item: r remaining, t seconds to reset.
func rateField(name string, remaining, reset int) string {
	return `"` + name + `";r=` + strconv.Itoa(remaining) + ";t=" + strconv.Itoa(reset)
}

// defaultRandN is the jitter source: math/rand/v2's per-goroutine
// generator, which needs no lock.
func defaultRandN(n int) int { return rand.IntN(n) }
