package ratelimit

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

// DefaultRetryShared is how long Fallback decides locally after the shared
// limiter failed, before it tries the shared one again.
const DefaultRetryShared = 2 * time.Second

// Fallback decides with the shared limiter while it answers and with a local
// one while it does not. After a failure it stays local for a short while,
// then lets one request probe the shared limiter; when that succeeds, shared
// limiting resumes by itself. A failure of the shared limiter therefore
// never reaches the client as an error, and a dead Redis costs one probe per
// interval rather than a timeout per request.
type Fallback struct {
	shared Limiter
	local  *Local
	log    *slog.Logger
	retry  time.Duration
	now    func() time.Time

	mu        sync.Mutex
	degraded  bool
	nextProbe time.Time
	probing   bool

	localDecisions atomic.Uint64
	sharedErrors   atomic.Uint64
	outages        atomic.Uint64
}

// FallbackOptions configure a Fallback; zero fields take defaults.
type FallbackOptions struct {
	Logger *slog.Logger
	// RetryShared is the pause after a failure of the shared limiter.
	RetryShared time.Duration
	// LocalKeys bounds the local limiter's memory.
	LocalKeys int
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// NewFallback returns a limiter using shared, or a local limiter while shared
// fails. With shared nil, it is purely local.
func NewFallback(shared Limiter, o FallbackOptions) *Fallback {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.RetryShared <= 0 {
		o.RetryShared = DefaultRetryShared
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return &Fallback{
		shared: shared,
		local:  NewLocal(o.LocalKeys, o.Now),
		log:    o.Logger,
		retry:  o.RetryShared,
		now:    o.Now,
	}
}

// Allow never returns an error: when the shared limiter cannot decide, the
// local one does.
func (f *Fallback) Allow(ctx context.Context, key string, l Limit) (Result, error) {
	if l.Off() {
		return Result{Allowed: true, Remaining: l.Burst}, nil
	}
	if f.shared == nil || !f.tryShared() {
		f.localDecisions.Add(1)
		return f.local.Allow(ctx, key, l)
	}
	res, err := f.shared.Allow(ctx, key, l)
	if err != nil {
		if ctx.Err() != nil {
			// The client went away; that says nothing about the shared limiter.
			f.doneProbing()
			f.localDecisions.Add(1)
			return f.local.Allow(ctx, key, l)
		}
		f.sharedFailed(err)
		f.localDecisions.Add(1)
		return f.local.Allow(ctx, key, l)
	}
	f.sharedOK()
	return res, nil
}

// tryShared reports whether this call should use the shared limiter: always
// while it is healthy; while degraded, one caller at a time once the pause
// has passed.
func (f *Fallback) tryShared() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.degraded {
		return true
	}
	if f.probing || f.now().Before(f.nextProbe) {
		return false
	}
	f.probing = true
	return true
}

func (f *Fallback) doneProbing() {
	f.mu.Lock()
	f.probing = false
	f.mu.Unlock()
}

func (f *Fallback) sharedFailed(err error) {
	f.sharedErrors.Add(1)
	f.mu.Lock()
	was := f.degraded
	f.degraded = true
	f.probing = false
	f.nextProbe = f.now().Add(f.retry)
	f.mu.Unlock()
	if !was {
		f.outages.Add(1)
		f.log.Warn("shared rate limiter unavailable; limiting per instance until it answers again",
			slog.Any("error", err), slog.Duration("retry_in", f.retry))
	}
}

func (f *Fallback) sharedOK() {
	f.mu.Lock()
	was := f.degraded
	f.degraded = false
	f.probing = false
	f.mu.Unlock()
	if was {
		f.log.Info("shared rate limiter answers again; shared limiting resumed")
	}
}

// FallbackStats are counters for metrics.
type FallbackStats struct {
	// Degraded is true while limits are applied per instance.
	Degraded bool
	// LocalDecisions counts events decided by the local limiter.
	LocalDecisions uint64
	// SharedErrors counts failed calls to the shared limiter.
	SharedErrors uint64
	// Outages counts transitions from shared to local limiting.
	Outages uint64
}

// Stats returns the current counters.
func (f *Fallback) Stats() FallbackStats {
	f.mu.Lock()
	degraded := f.degraded
	f.mu.Unlock()
	return FallbackStats{
		Degraded:       degraded,
		LocalDecisions: f.localDecisions.Load(),
		SharedErrors:   f.sharedErrors.Load(),
		Outages:        f.outages.Load(),
	}
}
