// Package ratelimit holds the rate limits tokend applies per session, per
// client IP and per service key: the Limit type and its configuration syntax,
// the Limiter interface the API consumes, an in-process limiter with bounded
// memory, and Fallback, which uses a shared limiter (Redis) while it answers
// and the in-process one while it does not.
package ratelimit

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Limit allows Rate events per Period, with bursts of up to Burst events.
// The algorithm is GCRA (a token bucket measured in time), the same in the
// shared and the local limiter. The zero Limit is "off".
type Limit struct {
	Rate   int
	Period time.Duration
	Burst  int
}

// Off reports whether the limit is disabled.
func (l Limit) Off() bool { return l.Rate <= 0 || l.Period <= 0 }

// Interval is the time one event costs: Period / Rate.
func (l Limit) Interval() time.Duration { return l.Period / time.Duration(l.Rate) }

func (l Limit) String() string {
	if l.Off() {
		return "off"
	}
	s := strconv.Itoa(l.Rate) + "/" + unitName(l.Period)
	if l.Burst != l.Rate {
		s += " burst " + strconv.Itoa(l.Burst)
	}
	return s
}

func unitName(d time.Duration) string {
	switch d {
	case time.Second:
		return "s"
	case time.Minute:
		return "min"
	case time.Hour:
		return "h"
	}
	return d.String()
}

// Parse reads a limit written as "off" or "N/UNIT" with UNIT one of s, min
// or h (also sec, second, m, minute, hour), optionally followed by
// " burst B". Without a burst, the burst is N.
func Parse(s string) (Limit, error) {
	s = strings.TrimSpace(s)
	if strings.EqualFold(s, "off") {
		return Limit{}, nil
	}
	spec, burstPart, hasBurst := strings.Cut(s, " burst ")
	n, unit, ok := strings.Cut(strings.TrimSpace(spec), "/")
	if !ok {
		return Limit{}, fmt.Errorf("%q is not a rate: use N/s, N/min, N/h or off", s)
	}
	rate, err := strconv.Atoi(strings.TrimSpace(n))
	if err != nil || rate <= 0 || rate > 1_000_000 {
		return Limit{}, fmt.Errorf("%q: the count must be a whole number from 1 to 1000000", s)
	}
	var period time.Duration
	switch strings.ToLower(strings.TrimSpace(unit)) {
	case "s", "sec", "second":
		period = time.Second
	case "m", "min", "minute":
		period = time.Minute
	case "h", "hour":
		period = time.Hour
	default:
		return Limit{}, fmt.Errorf("%q: the unit must be s, min or h", s)
	}
	l := Limit{Rate: rate, Period: period, Burst: rate}
	if hasBurst {
		b, err := strconv.Atoi(strings.TrimSpace(burstPart))
		if err != nil || b <= 0 || b > 1_000_000 {
			return Limit{}, fmt.Errorf("%q: the burst must be a whole number from 1 to 1000000", s)
		}
		l.Burst = b
	}
	return l, nil
}

// Result is a limiter's decision about one event.
type Result struct {
	// Allowed is true when the event is within the limit.
	Allowed bool
	// Remaining is how many more events the limit allows right now.
	Remaining int
	// RetryAfter is, for a refused event, when the next one will be allowed.
	RetryAfter time.Duration
	// ResetAfter is when the limit will be back to its full burst.
	ResetAfter time.Duration
}

// Limiter decides whether the event identified by key is within l.
// Implementations are safe for concurrent use. An error means the limiter
// could not decide; callers must not turn it into a refusal on its own.
type Limiter interface {
	Allow(ctx context.Context, key string, l Limit) (Result, error)
}
