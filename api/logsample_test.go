package api

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
	"time"
)

func TestLogSamplerCapsLinesPerSecond(t *testing.T) {
	var buf bytes.Buffer
	l := &logSampler{perSecond: 5, log: slog.New(slog.NewTextHandler(&buf, nil))}
	t0 := time.Unix(1_800_000_000, 0)
	allowed := 0
	for i := range 20 {
		if l.allow(t0.Add(time.Duration(i) * time.Millisecond)) {
			allowed++
		}
	}
	if allowed != 5 {
		t.Errorf("allowed %d lines in one second, want 5", allowed)
	}
	if buf.Len() != 0 {
		t.Errorf("summary logged before the second ended: %s", buf.String())
	}
	if !l.allow(t0.Add(time.Second)) {
		t.Error("the first line of the next second was suppressed")
	}
	if out := buf.String(); !strings.Contains(out, "access log sampled") || !strings.Contains(out, "suppressed=15") || !strings.Contains(out, "logged=5") {
		t.Errorf("summary = %q, want suppressed=15 logged=5", out)
	}

	var unlimited *logSampler
	if !unlimited.allow(t0) || !(&logSampler{}).allow(t0) {
		t.Error("a nil or zero sampler must allow everything")
	}
}
