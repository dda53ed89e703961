package ratelimit

import (
	"context"
	"sync"
	"time"

	"github.com/hashicorp/golang-lru/v2/simplelru"
)

// DefaultLocalKeys bounds the keys a Local limiter remembers.
const DefaultLocalKeys = 100_000

// Local is an in-process GCRA limiter. It remembers at most a fixed number
// of keys, forgetting the least recently used first, so its memory is
// bounded whatever the traffic; a forgotten key starts again with a full
// burst. It never returns an error.
type Local struct {
	mu  sync.Mutex
	tat *simplelru.LRU[string, time.Time] // theoretical arrival time per key
	now func() time.Time
}

// NewLocal returns a limiter remembering at most maxKeys keys (0 means
// DefaultLocalKeys). now is the clock; nil means time.Now.
func NewLocal(maxKeys int, now func() time.Time) *Local {
	if maxKeys <= 0 {
		maxKeys = DefaultLocalKeys
	}
	if now == nil {
		now = time.Now
	}
	lru, err := simplelru.NewLRU[string, time.Time](maxKeys, nil)
	if err != nil {
		panic(err) // only for a non-positive size, excluded above
	}
	return &Local{tat: lru, now: now}
}

// Allow applies GCRA, with the arithmetic of the shared Redis limiter so
// that both decide alike.
func (l *Local) Allow(_ context.Context, key string, lim Limit) (Result, error) {
	if lim.Off() {
		return Result{Allowed: true, Remaining: lim.Burst}, nil
	}
	interval := lim.Interval()
	burstOffset := interval * time.Duration(lim.Burst)
	now := l.now()

	l.mu.Lock()
	defer l.mu.Unlock()
	tat, ok := l.tat.Get(key)
	if !ok || tat.Before(now) {
		tat = now
	}
	newTAT := tat.Add(interval)
	diff := now.Sub(newTAT.Add(-burstOffset))
	remaining := int(diff / interval)
	if diff < 0 {
		return Result{Allowed: false, RetryAfter: -diff, ResetAfter: tat.Sub(now)}, nil
	}
	l.tat.Add(key, newTAT)
	return Result{Allowed: true, Remaining: remaining, ResetAfter: newTAT.Sub(now)}, nil
}

// Len reports how many keys the limiter remembers.
func (l *Local) Len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.tat.Len()
}
