package main

import (
	"math/rand/v2"
	"net/http"
	"testing"
	"time"
)

func TestBackoffFullJitterWithinCap(t *testing.T) {
	b := backoff{base: backoffBase, cap: backoffCap}
	rnd := rand.New(rand.NewPCG(1, 2))
	const draws = 20000
	for attempt := range 40 {
		ceiling := min(backoffBase<<min(attempt, 20), backoffCap)
		var lowHalf, highHalf int
		var sum time.Duration
		for range draws {
			d := b.delay(attempt, 0, rnd)
			if d < 0 || d > ceiling {
				t.Fatalf("attempt %d: delay %v outside [0, %v]", attempt, d, ceiling)
			}
			if d < ceiling/2 {
				lowHalf++
			} else {
				highHalf++
			}
			sum += d
		}
		// Full jitter, not "equal jitter" nor a fixed delay: both halves of
		// the range are used, and the mean sits near the middle.
		if lowHalf < draws/3 || highHalf < draws/3 {
			t.Errorf("attempt %d: %d draws below half the ceiling, %d above; want both near half", attempt, lowHalf, highHalf)
		}
		mean := sum / draws
		if mean < ceiling*45/100 || mean > ceiling*55/100 {
			t.Errorf("attempt %d: mean %v, want about %v", attempt, mean, ceiling/2)
		}
	}
}

func TestBackoffRetryAfterIsAFloor(t *testing.T) {
	b := backoff{base: backoffBase, cap: backoffCap}
	rnd := rand.New(rand.NewPCG(3, 4))
	for _, tc := range []struct {
		attempt    int
		retryAfter time.Duration
		lo, hi     time.Duration
	}{
		// The jitter ceiling (250ms) is below Retry-After: exactly the floor.
		{0, 5 * time.Second, 5 * time.Second, 5 * time.Second},
		// Ceiling 4s: uniform above the floor of 1s.
		{4, time.Second, time.Second, 4 * time.Second},
		// Retry-After above the cap is still obeyed.
		{30, time.Minute, time.Minute, time.Minute},
		{30, 0, 0, backoffCap},
	} {
		for range 10000 {
			d := b.delay(tc.attempt, tc.retryAfter, rnd)
			if d < tc.lo || d > tc.hi {
				t.Fatalf("delay(%d, %v) = %v, want within [%v, %v]", tc.attempt, tc.retryAfter, d, tc.lo, tc.hi)
			}
		}
	}
}

func TestBackoffHugeAttemptDoesNotOverflow(t *testing.T) {
	b := backoff{base: backoffBase, cap: backoffCap}
	rnd := rand.New(rand.NewPCG(5, 6))
	for _, attempt := range []int{62, 63, 64, 100, 1 << 20} {
		if d := b.delay(attempt, 0, rnd); d < 0 || d > backoffCap {
			t.Errorf("delay(%d) = %v, want within [0, %v]", attempt, d, backoffCap)
		}
	}
}

func TestParseRetryAfter(t *testing.T) {
	now := time.Date(2026, 12, 4, 15, 30, 0, 0, time.UTC)
	for _, tc := range []struct {
		header string
		want   time.Duration
	}{
		{"", 0},
		{"0", 0},
		{"1", time.Second},
		{"5", 5 * time.Second},
		{" 3 ", 3 * time.Second},
		{"-1", 0},
		{"1.5", 0},
		{"soon", 0},
		{"99999999999999999999", maxRetryAfter},
		{"86400", maxRetryAfter},
		{now.Add(7 * time.Second).Format(http.TimeFormat), 7 * time.Second},
		{now.Add(-time.Minute).Format(http.TimeFormat), 0},
		{now.Add(48 * time.Hour).Format(http.TimeFormat), maxRetryAfter},
	} {
		if got := parseRetryAfter(tc.header, now); got != tc.want {
			t.Errorf("parseRetryAfter(%q) = %v, want %v", tc.header, got, tc.want)
		}
	}
}

func TestResultRetryable(t *testing.T) {
	for status, want := range map[int]bool{
		statusError: true, 200: false, 400: false, 401: false, 403: false,
		429: true, 500: true, 502: true, 503: true,
	} {
		if got := (result{status: status}).retryable(); got != want {
			t.Errorf("retryable(%d) = %v, want %v", status, got, want)
		}
	}
}
