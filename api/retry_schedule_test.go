package api

import (
	"testing"
	"time"
)

func TestRetrySchedule(t *testing.T) {
	t0 := time.Date(2026, 12, 4, 12, 0, 0, 0, time.UTC)
	var rs retrySchedule

	// A quiet instance assumes the floor rate (here 10/s): a burst of shed
	// requests at one moment gets slots 100ms apart from 1s on.
	for k := range 20 {
		got, full := rs.slot(t0, time.Minute, 10)
		if want := time.Second + time.Duration(k)*100*time.Millisecond; got != want || full {
			t.Fatalf("shed #%d at once: wait %v (full %v), want %v", k, got, full, want)
		}
	}

	// Completions measured over a window set the spacing: 1000 completed in
	// the first second means 1ms apart.
	rs = retrySchedule{}
	rs.slot(t0, time.Minute, 1) // opens the window
	rs.completed.Add(1000)
	first, _ := rs.slot(t0.Add(time.Second), time.Minute, 1)
	second, _ := rs.slot(t0.Add(time.Second), time.Minute, 1)
	if first != time.Second || second-first != time.Millisecond {
		t.Errorf("at 1000/s: waits %v then %v, want 1s then 1.001s", first, second)
	}

	// The rate shown is remembered through a stall: nothing completes for
	// three seconds, yet the spacing still reflects 1000/s (decayed by
	// 2^(-3/30)), not the floor.
	third, _ := rs.slot(t0.Add(4*time.Second), time.Minute, 1)
	fourth, _ := rs.slot(t0.Add(4*time.Second), time.Minute, 1)
	if gap := fourth - third; gap < time.Millisecond || gap > 1100*time.Microsecond {
		t.Errorf("after a stall: spacing %v, want about 1.07ms", gap)
	}

	// Within a window, a partial measurement already counts: 500 in 200ms.
	rs = retrySchedule{}
	rs.slot(t0, time.Minute, 1)
	rs.completed.Add(500)
	a, _ := rs.slot(t0.Add(200*time.Millisecond), time.Minute, 1)
	b, _ := rs.slot(t0.Add(200*time.Millisecond), time.Minute, 1)
	if b-a != 400*time.Microsecond {
		t.Errorf("at 2500/s measured over 200ms: spacing %v, want 400µs", b-a)
	}

	// Booked up to the cap: the caller is told so (and draws a wait up to
	// the cap), and the schedule does not grow past it.
	rs = retrySchedule{}
	for range 100 {
		rs.slot(t0, 5*time.Second, 10)
	}
	if got, full := rs.slot(t0, 5*time.Second, 10); got != 5*time.Second || !full {
		t.Errorf("past the cap: wait %v full %v, want 5s and full", got, full)
	}
	if rs.next.After(t0.Add(5*time.Second + 100*time.Millisecond)) {
		t.Errorf("the schedule grew to %v past the cap", rs.next.Sub(t0))
	}

	// Slots in the past are not handed out: later sheds wait at least 1s.
	if got, _ := rs.slot(t0.Add(time.Hour), time.Minute, 10); got != time.Second {
		t.Errorf("after a quiet hour: wait %v, want 1s", got)
	}
}

func TestRoundSecondsSpreadsFractions(t *testing.T) {
	draws := []int{0, 999_999}
	i := 0
	s := &server{randN: func(n int) int { d := draws[i%2]; i++; return d }}
	if got := s.roundSeconds(2500 * time.Millisecond); got != 3 {
		t.Errorf("2.5s with a low draw = %d, want 3 (rounded up)", got)
	}
	if got := s.roundSeconds(2500 * time.Millisecond); got != 2 {
		t.Errorf("2.5s with a high draw = %d, want 2 (rounded down)", got)
	}
	if got := s.roundSeconds(3 * time.Second); got != 3 {
		t.Errorf("3s = %d, want 3", got)
	}
	if got := s.roundSeconds(200 * time.Millisecond); got != 1 {
		t.Errorf("200ms = %d, want at least 1", got)
	}
}
