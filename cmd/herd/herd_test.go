package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tokend/tokend/api"
	"github.com/tokend/tokend/issuer"
	"github.com/tokend/tokend/session"
	"github.com/tokend/tokend/store/memory"
)

const testServiceKey = "tkd_svc_herd-test-0123456789abcdef"

// startTokend serves a real tokend handler, wired as cmd/tokend wires it:
// memory store, issuer with a generated ES256 key, session service, and the
// API with no rate limits and no shedding.
func startTokend(t *testing.T) string {
	t.Helper()
	srv := httptest.NewUnstartedServer(nil)
	base := "http://" + srv.Listener.Addr().String()
	key, err := issuer.GenerateKey(issuer.ES256, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	iss, err := issuer.New(base, []string{"tokend-test"})
	if err != nil {
		t.Fatal(err)
	}
	if err := iss.SetKeys(&key, []issuer.Key{key}); err != nil {
		t.Fatal(err)
	}
	sessions := session.NewService(memory.New(), iss, session.Config{
		TokenTTL:   10 * time.Minute,
		SessionTTL: 8 * time.Hour,
	})
	srv.Config.Handler = api.NewServer(api.Options{
		Sessions: sessions,
		Keys:     iss,
		Config: api.Config{
			Cookie: api.Cookie{
				Name:     "tokend_session",
				Path:     "/v1",
				SameSite: http.SameSiteStrictMode,
			},
			ServiceKeys: []string{testServiceKey},
			AdminKeys:   []string{"tkd_adm_herd-test-0123456789abcdef"},
			Protection:  api.Protection{},
		},
	})
	srv.Start()
	t.Cleanup(srv.Close)
	return base
}

// runHerd runs herd with args and returns its report (the last line of
// stdout) and the whole output.
func runHerd(t *testing.T, args ...string) (report, string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	if err := run(ctx, args, &stdout, &stderr); err != nil {
		t.Fatalf("herd %s: %v\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	out := stdout.String()
	lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
	var rep report
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &rep); err != nil {
		t.Fatalf("last line is not the JSON report: %v\n%s", err, out)
	}
	return rep, out
}

// checkStatusSum checks that the status counts add up to the requests.
func checkStatusSum(t *testing.T, rep report) {
	t.Helper()
	sum := 0
	for _, n := range rep.Status {
		sum += n
	}
	if sum != rep.Requests {
		t.Errorf("status counts %v sum to %d, requests = %d", rep.Status, sum, rep.Requests)
	}
}

// checkOnly checks that every request got one of the given statuses.
func checkOnly(t *testing.T, rep report, statuses ...string) {
	t.Helper()
	for k, n := range rep.Status {
		if n > 0 && !strings.Contains(" "+strings.Join(statuses, " ")+" ", " "+k+" ") {
			t.Errorf("%d requests got %s; want only %v (status %v)", n, k, statuses, rep.Status)
		}
	}
}

func TestRestartAgainstTokend(t *testing.T) {
	t.Parallel()
	base := startTokend(t)
	out := t.TempDir()
	rep, text := runHerd(t, "-target", base, "-service-key", testServiceKey,
		"-clients", "50", "-scenario", "restart", "-window", "200ms", "-duration", "20s",
		"-batch", "10", "-seed", "7", "-out", out)

	if rep.Scenario != "restart" || rep.Clients != 50 {
		t.Errorf("scenario %q clients %d, want restart and 50", rep.Scenario, rep.Clients)
	}
	if rep.SecondsToAllTokens == nil {
		t.Fatalf("not every client got a token:\n%s", text)
	}
	// Tokens live 10 minutes: one request per client, no refresh in the run.
	if rep.Requests != 50 || rep.Status["200"] != 50 {
		t.Errorf("requests %d, 200s %d; want 50 and 50", rep.Requests, rep.Status["200"])
	}
	checkOnly(t, rep, "200")
	checkStatusSum(t, rep)
	if rep.LatencyMS.P50 == nil || *rep.LatencyMS.P50 > *rep.LatencyMS.P99 || *rep.LatencyMS.P99 > *rep.LatencyMS.Max {
		t.Errorf("latency %+v: want p50 ≤ p99 ≤ max", rep.LatencyMS)
	}
	if rep.PeakRPS < 1 || rep.DurationS <= 0 {
		t.Errorf("peak %d, duration %v", rep.PeakRPS, rep.DurationS)
	}

	csvData, err := os.ReadFile(filepath.Join(out, "restart.csv"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(string(csvData), "second,200,429,503,other,error,tokens_held\n") {
		t.Errorf("csv starts %q", csvData[:min(len(csvData), 80)])
	}
	if !strings.HasSuffix(strings.TrimSpace(string(csvData)), ",50") {
		t.Errorf("csv's last row should hold 50 tokens:\n%s", csvData)
	}
	png, err := os.ReadFile(filepath.Join(out, "restart.png"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(png, []byte("\x89PNG\r\n\x1a\n")) {
		t.Error("restart.png is not a PNG")
	}
}

func TestNaiveAgainstTokend(t *testing.T) {
	t.Parallel()
	base := startTokend(t)
	rep, text := runHerd(t, "-target", base, "-service-key", testServiceKey,
		"-clients", "20", "-scenario", "naive", "-interval", "300ms", "-duration", "1s")
	checkOnly(t, rep, "200")
	checkStatusSum(t, rep)
	// Slots at 0, 0.3, 0.6 and 0.9 s: at least the first two fit however
	// slow the machine.
	if rep.Requests < 40 {
		t.Errorf("%d requests, want at least 2 per client:\n%s", rep.Requests, text)
	}
}

func TestFloodAgainstTokend(t *testing.T) {
	t.Parallel()
	base := startTokend(t)
	rep, text := runHerd(t, "-target", base, "-service-key", testServiceKey,
		"-clients", "10", "-scenario", "flood", "-concurrency", "4", "-duration", "500ms")
	checkOnly(t, rep, "200")
	checkStatusSum(t, rep)
	if rep.Requests <= 10 {
		t.Errorf("%d requests: flood should go round the 10 sessions more than once:\n%s", rep.Requests, text)
	}
}

func TestRefusedServiceKeyFails(t *testing.T) {
	t.Parallel()
	base := startTokend(t)
	var stdout, stderr bytes.Buffer
	err := run(t.Context(), []string{"-target", base, "-service-key", "tkd_svc_wrong-key-0123456789",
		"-clients", "5", "-duration", "5s"}, &stdout, &stderr)
	if !errors.Is(err, errUnauthorized) {
		t.Fatalf("err = %v, want the refused key", err)
	}
	if !strings.Contains(err.Error(), "-service-key") {
		t.Errorf("error %q should say which flag to fix", err)
	}
}

func TestFlagProblemsReportedTogether(t *testing.T) {
	t.Setenv("TOKEND_SERVICE_KEY", "")
	var stdout, stderr bytes.Buffer
	err := run(t.Context(), []string{"-clients", "0", "-scenario", "stampede", "-target", "ftp://x"}, &stdout, &stderr)
	if err == nil {
		t.Fatal("run accepted bad flags")
	}
	for _, want := range []string{"-clients 0", "-scenario", "-target", "service key"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %s", err, want)
		}
	}
}

// fakeTokend answers POST /v1/sessions with the subject as the cookie
// value, and POST /v1/token as answer says; it records when each session
// asked for a token.
type fakeTokend struct {
	answer func(w http.ResponseWriter, subject string, n int)

	mu       sync.Mutex
	requests map[string][]time.Time
}

func startFake(t *testing.T, answer func(w http.ResponseWriter, subject string, n int)) (*fakeTokend, string) {
	t.Helper()
	f := &fakeTokend{answer: answer, requests: make(map[string][]time.Time)}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/sessions", func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer "+testServiceKey {
			http.Error(w, `{"code":"unauthorized"}`, http.StatusUnauthorized)
			return
		}
		var req struct{ Subject string }
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		w.WriteHeader(http.StatusCreated)
		fmt.Fprintf(w, `{"cookie":{"name":"fake_session","value":%q}}`, req.Subject)
	})
	mux.HandleFunc("POST /v1/token", func(w http.ResponseWriter, r *http.Request) {
		c, err := r.Cookie("fake_session")
		if err != nil {
			http.Error(w, "no cookie", http.StatusBadRequest)
			return
		}
		f.mu.Lock()
		f.requests[c.Value] = append(f.requests[c.Value], time.Now())
		n := len(f.requests[c.Value])
		f.mu.Unlock()
		f.answer(w, c.Value, n)
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return f, srv.URL
}

// times returns the recorded token requests of each herd client.
func (f *fakeTokend) times() map[string][]time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make(map[string][]time.Time)
	for k, v := range f.requests {
		if strings.HasPrefix(k, "herd-") && k != "herd-probe" {
			out[k] = append([]time.Time(nil), v...)
		}
	}
	return out
}

func writeToken(w http.ResponseWriter, expiresIn, refreshIn int) {
	w.Header().Set("Content-Type", "application/json")
	fmt.Fprintf(w, `{"access_token":"x.y.z","token_type":"Bearer","expires_in":%d,"refresh_in":%d}`, expiresIn, refreshIn)
}

func TestOverloadedClientsWaitRetryAfter(t *testing.T) {
	t.Parallel()
	f, base := startFake(t, func(w http.ResponseWriter, _ string, n int) {
		if n == 1 {
			w.Header().Set("Retry-After", "1")
			w.Header().Set("Content-Type", "application/problem+json")
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprint(w, `{"code":"overloaded","status":503}`)
			return
		}
		writeToken(w, 3600, 3000)
	})
	const clients = 8
	rep, text := runHerd(t, "-target", base, "-service-key", testServiceKey,
		"-clients", fmt.Sprint(clients), "-scenario", "restart", "-window", "100ms", "-duration", "20s")

	times := f.times()
	if len(times) != clients {
		t.Fatalf("%d clients asked for tokens, want %d", len(times), clients)
	}
	for subject, ts := range times {
		if len(ts) != 2 {
			t.Errorf("%s sent %d token requests, want 2 (503, then 200)", subject, len(ts))
			continue
		}
		// The server sent Retry-After: 1 after it received the first
		// request, and the client may not come back sooner.
		if gap := ts[1].Sub(ts[0]); gap < time.Second {
			t.Errorf("%s retried after %v, before Retry-After's 1s", subject, gap)
		}
	}
	if rep.Status["503"] != clients || rep.Status["200"] != clients || rep.Requests != 2*clients {
		t.Errorf("status %v, requests %d; want %d 503s then %d 200s", rep.Status, rep.Requests, clients, clients)
	}
	checkStatusSum(t, rep)
	if rep.SecondsToAllTokens == nil || *rep.SecondsToAllTokens < 1 {
		t.Errorf("seconds_to_all_tokens = %v, want at least 1:\n%s", rep.SecondsToAllTokens, text)
	}
}

func TestUnauthorizedClientsStop(t *testing.T) {
	t.Parallel()
	f, base := startFake(t, func(w http.ResponseWriter, _ string, _ int) {
		w.Header().Set("Content-Type", "application/problem+json")
		w.WriteHeader(http.StatusUnauthorized)
		fmt.Fprint(w, `{"code":"session_revoked","status":401}`)
	})
	const clients = 6
	// A long -duration: the run must end because every client stopped.
	rep, text := runHerd(t, "-target", base, "-service-key", testServiceKey,
		"-clients", fmt.Sprint(clients), "-scenario", "restart", "-window", "100ms", "-duration", "25s")

	times := f.times()
	for subject, ts := range times {
		if len(ts) != 1 {
			t.Errorf("%s sent %d token requests after a 401, want exactly 1", subject, len(ts))
		}
	}
	if len(times) != clients || rep.Requests != clients || rep.Status["401"] != clients {
		t.Errorf("%d clients, %d requests, status %v; want %d single 401s", len(times), rep.Requests, rep.Status, clients)
	}
	checkStatusSum(t, rep)
	if rep.SecondsToAllTokens != nil {
		t.Errorf("seconds_to_all_tokens = %v, want null:\n%s", *rep.SecondsToAllTokens, text)
	}
}

func TestSteadyRefreshesAtRefreshIn(t *testing.T) {
	t.Parallel()
	f, base := startFake(t, func(w http.ResponseWriter, _ string, _ int) {
		writeToken(w, 2, 1)
	})
	const clients = 10
	rep, text := runHerd(t, "-target", base, "-service-key", testServiceKey,
		"-clients", fmt.Sprint(clients), "-scenario", "steady", "-duration", "3s")
	checkOnly(t, rep, "200")
	checkStatusSum(t, rep)

	times := f.times()
	if len(times) != clients {
		t.Fatalf("%d clients asked for tokens, want %d:\n%s", len(times), clients, text)
	}
	refreshed := 0
	for subject, ts := range times {
		for i := 1; i < len(ts); i++ {
			// refresh_in is 1s: the next request waits at least that long
			// after the answer, so after the previous request too.
			if gap := ts[i].Sub(ts[i-1]); gap < time.Second {
				t.Errorf("%s refreshed after %v, before refresh_in's 1s", subject, gap)
			}
		}
		if len(ts) > 1 {
			refreshed++
		}
	}
	// First requests fall within 1.4s (70 % of the 2s life), so everyone
	// but a very slow machine refreshes before 3s.
	if refreshed == 0 {
		t.Errorf("no client refreshed within the run:\n%s", text)
	}
	// A request cut off by the end of the run reached the server but is
	// not counted by herd; the reverse is impossible.
	if seen := len(flatten(times)); rep.Requests > seen || rep.Requests < seen-clients {
		t.Errorf("herd counted %d requests, the server saw %d", rep.Requests, seen)
	}
}

func flatten(m map[string][]time.Time) []time.Time {
	var all []time.Time
	for _, ts := range m {
		all = append(all, ts...)
	}
	return all
}
