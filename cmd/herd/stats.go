package main

import (
	"math"
	"math/rand/v2"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"time"
)

// Columns of the per-second counts, in CSV and chart order.
const (
	colOK = iota
	col429
	col503
	colOther
	colError
	numCols
)

var colNames = [numCols]string{"200", "429", "503", "other", "error"}

func column(status int) int {
	switch status {
	case http.StatusOK:
		return colOK
	case http.StatusTooManyRequests:
		return col429
	case http.StatusServiceUnavailable:
		return col503
	case statusError:
		return colError
	}
	return colOther
}

// second is one per-second bucket of a run.
type second struct {
	counts [numCols]int
	// held is how many clients held an unexpired token at the end of the
	// second; -1 until sampled.
	held int
}

func (s second) total() int {
	n := 0
	for _, c := range s.counts {
		n += c
	}
	return n
}

// stats counts a run's requests by status and by second since start, and
// keeps the latencies of the successful ones. It is safe for concurrent use.
type stats struct {
	start time.Time

	mu       sync.Mutex
	requests int
	status   map[int]int
	seconds  []second
	latency  reservoir
}

func newStats(start time.Time, latencySamples int, seed uint64) *stats {
	return &stats{
		start:   start,
		status:  make(map[int]int),
		latency: reservoir{size: latencySamples, rnd: rand.New(rand.NewPCG(seed, 0x5eed))},
	}
}

// bucket returns the index of the second t falls in.
func (s *stats) bucket(t time.Time) int {
	return max(int(t.Sub(s.start)/time.Second), 0)
}

// grow makes second i exist; s.mu must be held.
func (s *stats) grow(i int) {
	for len(s.seconds) <= i {
		s.seconds = append(s.seconds, second{held: -1})
	}
}

// record counts one finished request.
func (s *stats) record(r result) {
	i := s.bucket(r.at)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.grow(i)
	s.seconds[i].counts[column(r.status)]++
	s.status[r.status]++
	s.requests++
	if r.ok() {
		s.latency.add(r.latency)
	}
}

// has reports whether second i has been recorded or sampled.
func (s *stats) has(i int) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return i < len(s.seconds)
}

// setHeld records how many tokens were held at the end of second i.
func (s *stats) setHeld(i, n int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.grow(i)
	s.seconds[i].held = n
}

// reservoir keeps a uniform sample of at most size latencies (Algorithm R),
// so percentiles are exact until size successes and estimates beyond; the
// maximum and count are always exact.
type reservoir struct {
	size    int
	seen    int
	samples []time.Duration
	max     time.Duration
	rnd     *rand.Rand
}

func (r *reservoir) add(d time.Duration) {
	r.seen++
	r.max = max(r.max, d)
	if len(r.samples) < r.size {
		r.samples = append(r.samples, d)
		return
	}
	if j := r.rnd.IntN(r.seen); j < r.size {
		r.samples[j] = d
	}
}

// percentile returns the nearest-rank p-quantile (0 < p ≤ 1) of sorted.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	rank := int(math.Ceil(p * float64(len(sorted))))
	return sorted[min(max(rank, 1), len(sorted))-1]
}

// report is the machine-readable result of a run, printed as the last line.
type report struct {
	Scenario           string         `json:"scenario"`
	Clients            int            `json:"clients"`
	Requests           int            `json:"requests"`
	Status             map[string]int `json:"status"`
	SecondsToAllTokens *float64       `json:"seconds_to_all_tokens"`
	LatencyMS          latencyReport  `json:"latency_ms"`
	PeakRPS            int            `json:"peak_rps"`
	MeanRPS            float64        `json:"mean_rps"`
	// GoodputRPS is 200 answers per second over the run, what flood measures.
	GoodputRPS float64 `json:"goodput_rps"`
	DurationS  float64 `json:"duration_s"`

	seconds []second
}

// latencyReport is in milliseconds; null fields mean no request succeeded.
type latencyReport struct {
	P50 *float64 `json:"p50"`
	P99 *float64 `json:"p99"`
	Max *float64 `json:"max"`
}

// report summarises the run that ended after duration.
func (s *stats) report(scenario string, clients int, duration time.Duration) report {
	s.mu.Lock()
	defer s.mu.Unlock()
	rep := report{
		Scenario: scenario,
		Clients:  clients,
		Requests: s.requests,
		Status:   map[string]int{"200": 0, "429": 0, "503": 0, "error": 0},
		seconds:  slices.Clone(s.seconds),
	}
	for status, n := range s.status {
		key := strconv.Itoa(status)
		if status == statusError {
			key = "error"
		}
		rep.Status[key] = n
	}
	for _, sec := range s.seconds {
		rep.PeakRPS = max(rep.PeakRPS, sec.total())
	}
	rep.DurationS = round(duration.Seconds(), 3)
	if duration > 0 {
		rep.MeanRPS = round(float64(s.requests)/duration.Seconds(), 1)
		rep.GoodputRPS = round(float64(s.status[http.StatusOK])/duration.Seconds(), 1)
	}
	if len(s.latency.samples) > 0 {
		sorted := slices.Clone(s.latency.samples)
		slices.Sort(sorted)
		rep.LatencyMS = latencyReport{
			P50: ms(percentile(sorted, 0.50)),
			P99: ms(percentile(sorted, 0.99)),
			Max: ms(s.latency.max),
		}
	}
	return rep
}

func ms(d time.Duration) *float64 {
	v := round(float64(d)/float64(time.Millisecond), 3)
	return &v
}

func round(v float64, digits int) float64 {
	p := math.Pow(10, float64(digits))
	return math.Round(v*p) / p
}
