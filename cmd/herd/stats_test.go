package main

import (
	"encoding/csv"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

func TestPercentileNearestRank(t *testing.T) {
	var sorted []time.Duration
	for i := 1; i <= 100; i++ {
		sorted = append(sorted, time.Duration(i)*time.Millisecond)
	}
	for _, tc := range []struct {
		p    float64
		want time.Duration
	}{
		{0.50, 50 * time.Millisecond},
		{0.99, 99 * time.Millisecond},
		{1, 100 * time.Millisecond},
		{0.001, 1 * time.Millisecond},
	} {
		if got := percentile(sorted, tc.p); got != tc.want {
			t.Errorf("percentile(1..100ms, %v) = %v, want %v", tc.p, got, tc.want)
		}
	}
	if got := percentile([]time.Duration{7}, 0.99); got != 7 {
		t.Errorf("percentile of one sample = %v, want it", got)
	}
	if got := percentile(nil, 0.5); got != 0 {
		t.Errorf("percentile of nothing = %v, want 0", got)
	}
}

func TestStatsBucketsAndReport(t *testing.T) {
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	st := newStats(start, 1000, 1)
	at := func(d time.Duration) time.Time { return start.Add(d) }
	for _, r := range []result{
		{status: 200, at: at(500 * time.Millisecond), latency: 3 * time.Millisecond},
		{status: 200, at: at(1200 * time.Millisecond), latency: 1 * time.Millisecond},
		{status: 503, at: at(1900 * time.Millisecond), latency: 9 * time.Millisecond},
		{status: 429, at: at(1999 * time.Millisecond)},
		{status: statusError, at: at(3 * time.Second)},
		{status: 401, at: at(3500 * time.Millisecond)},
		{status: 200, at: at(3999 * time.Millisecond), latency: 2 * time.Millisecond},
		{status: 200, at: at(-time.Millisecond), latency: 4 * time.Millisecond}, // clock edge: first second
	} {
		st.record(r)
	}
	st.setHeld(0, 2)
	st.setHeld(1, 3)

	rep := st.report("restart", 10, 4*time.Second)
	want := [][numCols]int{
		{2, 0, 0, 0, 0},
		{1, 1, 1, 0, 0},
		{0, 0, 0, 0, 0},
		{1, 0, 0, 1, 1},
	}
	if len(rep.seconds) != len(want) {
		t.Fatalf("%d seconds, want %d", len(rep.seconds), len(want))
	}
	for i, w := range want {
		if rep.seconds[i].counts != w {
			t.Errorf("second %d: counts %v, want %v", i, rep.seconds[i].counts, w)
		}
	}
	if rep.seconds[0].held != 2 || rep.seconds[1].held != 3 || rep.seconds[2].held != -1 {
		t.Errorf("held = %d, %d, %d; want 2, 3, unsampled", rep.seconds[0].held, rep.seconds[1].held, rep.seconds[2].held)
	}
	if rep.Requests != 8 {
		t.Errorf("requests = %d, want 8", rep.Requests)
	}
	wantStatus := map[string]int{"200": 4, "429": 1, "503": 1, "401": 1, "error": 1}
	for k, n := range wantStatus {
		if rep.Status[k] != n {
			t.Errorf("status[%s] = %d, want %d", k, rep.Status[k], n)
		}
	}
	if rep.PeakRPS != 3 {
		t.Errorf("peak = %d, want 3", rep.PeakRPS)
	}
	if rep.MeanRPS != 2 || rep.GoodputRPS != 1 {
		t.Errorf("mean %v, goodput %v; want 2 and 1", rep.MeanRPS, rep.GoodputRPS)
	}
	// Latencies of the 200s only: 1, 2, 3, 4 ms.
	if *rep.LatencyMS.P50 != 2 || *rep.LatencyMS.P99 != 4 || *rep.LatencyMS.Max != 4 {
		t.Errorf("latency p50 %v p99 %v max %v, want 2, 4, 4", *rep.LatencyMS.P50, *rep.LatencyMS.P99, *rep.LatencyMS.Max)
	}
}

func TestReportWithoutSuccessHasNullLatency(t *testing.T) {
	st := newStats(time.Now(), 10, 1)
	st.record(result{status: 503, at: time.Now()})
	rep := st.report("flood", 1, time.Second)
	if rep.LatencyMS.P50 != nil || rep.LatencyMS.Max != nil {
		t.Errorf("latency = %+v, want nulls", rep.LatencyMS)
	}
}

func TestReservoirKeepsExactMaxAndBoundedSample(t *testing.T) {
	r := reservoir{size: 100, rnd: rand.New(rand.NewPCG(1, 1))}
	for i := 1; i <= 10000; i++ {
		r.add(time.Duration(i))
	}
	if len(r.samples) != 100 || r.seen != 10000 || r.max != 10000 {
		t.Fatalf("samples %d, seen %d, max %v; want 100, 10000, 10000", len(r.samples), r.seen, r.max)
	}
	// A uniform sample of 1..10000: its median lands well inside.
	s := slices.Sorted(slices.Values(r.samples))
	if m := percentile(s, 0.5); m < 3000 || m > 7000 {
		t.Errorf("sample median %v, want near 5000", m)
	}
}

func TestWriteCSV(t *testing.T) {
	path := filepath.Join(t.TempDir(), "x.csv")
	seconds := []second{
		{counts: [numCols]int{5, 1, 2, 0, 3}, held: 5},
		{counts: [numCols]int{0, 0, 0, 1, 0}, held: -1},
	}
	if err := writeCSV(path, seconds); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rows, err := csv.NewReader(f).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	want := [][]string{
		{"second", "200", "429", "503", "other", "error", "tokens_held"},
		{"0", "5", "1", "2", "0", "3", "5"},
		{"1", "0", "0", "0", "1", "0", ""},
	}
	if !slices.EqualFunc(rows, want, slices.Equal) {
		t.Errorf("csv = %q, want %q", rows, want)
	}
}

// The steady scenario's first requests follow the forward recurrence time
// of refresh intervals uniform in [lo, hi]: flat density 1/E up to lo,
// then falling linearly to 0 at hi.
func TestResidualMatchesSteadyState(t *testing.T) {
	h := &herd{rnd: rand.New(rand.NewPCG(1, 2))}
	lo, hi := 50*time.Second, 90*time.Second
	const n = 200_000
	var below, upperHalf int
	for range n {
		x := h.residual(lo, hi)
		if x < 0 || x >= hi {
			t.Fatalf("residual %v outside [0, %v)", x, hi)
		}
		if x < lo {
			below++
		}
		if x >= 70*time.Second {
			upperHalf++
		}
	}
	// P(x < lo) = lo / E[interval] = 50/70; P(x >= 70s) = ∫70..90 (90-x)/(40·70) dx = 200/2800.
	if got, want := float64(below)/n, 50.0/70; got < want-0.01 || got > want+0.01 {
		t.Errorf("P(x < lo) = %.3f, want %.3f", got, want)
	}
	if got, want := float64(upperHalf)/n, 200.0/2800; got < want-0.01 || got > want+0.01 {
		t.Errorf("P(x >= 70s) = %.3f, want %.3f", got, want)
	}
}
