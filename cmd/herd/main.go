// Command herd is a load tool for tokend: it plays N browser clients against
// a running instance over HTTP, with the refresh and backoff rules of the
// browser client, and reports how the token endpoint held up.
//
// It only ever sends requests to the -target URL, and always stops by
// itself: after -duration, when every client has stopped, or on SIGINT.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if errors.Is(err, flag.ErrHelp) {
		return
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "herd:", err)
		os.Exit(1)
	}
}

// config is herd's command line.
type config struct {
	target      *url.URL
	serviceKey  string
	clients     int
	scenario    string
	window      time.Duration
	duration    time.Duration
	interval    time.Duration
	concurrency int
	out         string
	batch       int
	timeout     time.Duration
	seed        uint64
}

// maxConnsPerHost caps the idle connections herd keeps to the target.
const maxConnsPerHost = 1024

const usageText = `Usage: herd [flags]

herd plays N browser clients against a running tokend over HTTP, with the
rules of the browser client: the next refresh at the server's refresh_in
(never a fixed interval); after a network error, 429 or 503 a retry after a
capped exponential backoff with full jitter (uniform in [0, min(30s,
250ms*2^attempt)]) that is never shorter than Retry-After; after a 401
(session_expired, session_revoked, session_invalid) nothing more. Other 5xx
are retried like 503, other 4xx stop the client.

It first creates one session per client (POST /v1/sessions with the service
key, subjects herd-0 ... herd-N-1), then plays one scenario:

  restart  every client asks for its first token at a uniformly random moment
           within -window, as after a websocket fleet restart. Ends as soon as
           every client holds a valid token, or after -duration; reports the
           seconds until then.
  steady   clients that already hold tokens: first requests spread uniformly
           over one typical refresh interval (70% of the token life, learnt
           from a probe request), then every refresh at refresh_in. Runs
           -duration and shows how the refresh load spreads.
  naive    the same clients all starting at once and refreshing every
           -interval, without jitter, for contrast: the load comes in waves.
           Errors are still retried with backoff. Runs -duration.
  flood    -concurrency workers send POST /v1/token back to back over the
           sessions, ignoring refresh_in and Retry-After: a capacity probe
           for goodput (200s per second). tokend sheds beyond
           TOKEND_MAX_INFLIGHT (8 per CPU by default); try that number and
           ten times it. Runs -duration.

tokend counts every herd client as one client IP and would rate-limit the
herd as a whole; to measure the token path, run it with
  TOKEND_RATE_IP=off TOKEND_RATE_SESSION=off TOKEND_RATE_SERVICE=off
and, so that steady and naive show several refresh rounds within a minute,
a short token life, e.g. TOKEND_TOKEN_TTL=30s.

Output: a summary on stdout whose last line is one JSON object. With -out DIR,
also DIR/<scenario>.csv (requests per second by status, tokens held) and
DIR/<scenario>.png (a chart of it).

Example:
  herd -service-key tkd_svc_... -clients 2000 -scenario restart -window 1s -out /tmp/herd

Flags:
`

// parseConfig reads the flags; every problem is reported at once.
func parseConfig(args []string, stderr io.Writer) (config, error) {
	fs := flag.NewFlagSet("herd", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), usageText)
		fs.PrintDefaults()
	}
	var (
		cfg    config
		target string
	)
	fs.StringVar(&target, "target", "http://127.0.0.1:8080", "base URL of the tokend under test; herd sends requests nowhere else")
	// The environment is read after parsing, so -help never prints the key.
	fs.StringVar(&cfg.serviceKey, "service-key", "", "service API key for POST /v1/sessions (default $TOKEND_SERVICE_KEY)")
	fs.IntVar(&cfg.clients, "clients", 1000, "number of browser clients, one session each")
	fs.StringVar(&cfg.scenario, "scenario", scenarioRestart, "restart, steady, naive or flood")
	fs.DurationVar(&cfg.window, "window", time.Second, "restart: the window in which every client asks for its first token")
	fs.DurationVar(&cfg.duration, "duration", 60*time.Second, "how long steady, naive and flood run; for restart, the longest wait for every client to hold a token")
	fs.DurationVar(&cfg.interval, "interval", 0, "naive: the fixed refresh interval (default half the token life the server reports, 15s with TOKEND_TOKEN_TTL=30s)")
	fs.IntVar(&cfg.concurrency, "concurrency", 64, "flood: number of workers sending requests back to back")
	fs.StringVar(&cfg.out, "out", "", "directory for <scenario>.csv and <scenario>.png (created if missing)")
	fs.IntVar(&cfg.batch, "batch", 100, "sessions created concurrently before the scenario")
	fs.DurationVar(&cfg.timeout, "timeout", 10*time.Second, "per-request timeout; a request that takes longer counts as a network error")
	fs.Uint64Var(&cfg.seed, "seed", 0, "seed of every random draw herd makes (0: a random seed, printed in the summary)")
	if err := fs.Parse(args); err != nil {
		return cfg, err
	}

	var problems []error
	if fs.NArg() > 0 {
		problems = append(problems, fmt.Errorf("unexpected arguments: %s", strings.Join(fs.Args(), " ")))
	}
	u, err := url.Parse(target)
	switch {
	case err != nil:
		problems = append(problems, fmt.Errorf("-target: %w", err))
	case u.Scheme != "http" && u.Scheme != "https", u.Host == "":
		problems = append(problems, fmt.Errorf("-target %q: want an http:// or https:// URL with a host", target))
	case u.RawQuery != "" || u.Fragment != "":
		problems = append(problems, fmt.Errorf("-target %q: want a base URL without query or fragment", target))
	default:
		cfg.target = u
	}
	if cfg.serviceKey == "" {
		cfg.serviceKey = os.Getenv("TOKEND_SERVICE_KEY")
	}
	if cfg.serviceKey == "" {
		problems = append(problems, errors.New("no service key: pass -service-key or set TOKEND_SERVICE_KEY"))
	}
	if cfg.clients < 1 || cfg.clients > 1_000_000 {
		problems = append(problems, fmt.Errorf("-clients %d: want 1 to 1000000", cfg.clients))
	}
	if !slices.Contains([]string{scenarioRestart, scenarioSteady, scenarioNaive, scenarioFlood}, cfg.scenario) {
		problems = append(problems, fmt.Errorf("-scenario %q: want restart, steady, naive or flood", cfg.scenario))
	}
	if cfg.window < 0 {
		problems = append(problems, fmt.Errorf("-window %v: must not be negative", cfg.window))
	}
	if cfg.duration <= 0 {
		problems = append(problems, fmt.Errorf("-duration %v: must be positive", cfg.duration))
	}
	if cfg.interval < 0 {
		problems = append(problems, fmt.Errorf("-interval %v: must not be negative", cfg.interval))
	}
	if cfg.concurrency < 1 {
		problems = append(problems, fmt.Errorf("-concurrency %d: must be at least 1", cfg.concurrency))
	}
	if cfg.batch < 1 {
		problems = append(problems, fmt.Errorf("-batch %d: must be at least 1", cfg.batch))
	}
	if cfg.timeout <= 0 {
		problems = append(problems, fmt.Errorf("-timeout %v: must be positive", cfg.timeout))
	}
	if cfg.seed == 0 {
		cfg.seed = rand.Uint64()
	}
	return cfg, errors.Join(problems...)
}

// run is the whole program.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cfg, err := parseConfig(args, stderr)
	if err != nil {
		return err
	}
	conns := cfg.clients
	if cfg.scenario == scenarioFlood {
		conns = cfg.concurrency
	}
	api := newTokend(cfg.target, cfg.serviceKey, min(max(conns, cfg.batch), maxConnsPerHost), cfg.timeout)
	defer api.close()
	h := &herd{
		cfg:     cfg,
		api:     api,
		backoff: backoff{base: backoffBase, cap: backoffCap},
		rnd:     rand.New(rand.NewPCG(cfg.seed, 1<<40)),
	}
	fmt.Fprintf(stdout, "herd: scenario %s, %d clients against %s (seed %d)\n", cfg.scenario, cfg.clients, cfg.target, cfg.seed)

	bar := newProgress(stderr, cfg.clients)
	began := time.Now()
	retries, err := h.createSessions(ctx, cfg.clients, bar.add)
	bar.done(err == nil)
	if err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("interrupted while creating sessions: %w", err)
		}
		return err
	}
	fmt.Fprintf(stdout, "sessions: %d created in %.2fs (%d retries)\n", cfg.clients, time.Since(began).Seconds(), retries)

	out, err := h.play(ctx)
	if err != nil {
		return err
	}
	rep := out.stats.report(cfg.scenario, cfg.clients, out.end.Sub(out.start))
	if !out.allTokens.IsZero() {
		s := round(out.allTokens.Sub(out.start).Seconds(), 3)
		rep.SecondsToAllTokens = &s
	}
	var written []string
	if cfg.out != "" {
		written, err = writeFiles(cfg.out, rep)
		if err != nil {
			return err
		}
	}
	printSummary(stdout, out, rep, written)
	line, err := json.Marshal(rep)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%s\n", line)
	if ctx.Err() != nil {
		return fmt.Errorf("interrupted after %.1fs; the results above are partial", rep.DurationS)
	}
	return nil
}

// writeFiles writes DIR/<scenario>.csv and DIR/<scenario>.png.
func writeFiles(dir string, rep report) ([]string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("-out: %w", err)
	}
	csvPath := filepath.Join(dir, rep.Scenario+".csv")
	pngPath := filepath.Join(dir, rep.Scenario+".png")
	if err := writeCSV(csvPath, rep.seconds); err != nil {
		return nil, err
	}
	if err := writeChart(pngPath, rep); err != nil {
		return nil, err
	}
	return []string{csvPath, pngPath}, nil
}

// printSummary writes the human part of the output.
func printSummary(w io.Writer, out outcome, rep report, written []string) {
	for _, n := range out.notes {
		fmt.Fprintf(w, "scenario: %s\n", n)
	}
	keys := make([]string, 0, len(rep.Status))
	for k, n := range rep.Status {
		if n > 0 {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys) // numbers sort before "error"
	var parts []string
	for _, k := range keys {
		parts = append(parts, k+": "+strconv.Itoa(rep.Status[k]))
	}
	fmt.Fprintf(w, "ran %.2fs: %d token requests (%s)\n", rep.DurationS, rep.Requests, strings.Join(parts, ", "))
	if rep.Scenario == scenarioRestart {
		if rep.SecondsToAllTokens != nil {
			fmt.Fprintf(w, "every client held a valid token after %.3fs\n", *rep.SecondsToAllTokens)
		} else {
			fmt.Fprintf(w, "NOT every client held a valid token by the end (%d of %d did at the end)\n", lastHeld(rep.seconds), rep.Clients)
		}
	}
	if rep.LatencyMS.Max != nil {
		fmt.Fprintf(w, "latency of 200s: p50 %.2f ms, p99 %.2f ms, max %.2f ms\n", *rep.LatencyMS.P50, *rep.LatencyMS.P99, *rep.LatencyMS.Max)
	} else {
		fmt.Fprintln(w, "latency of 200s: no request succeeded")
	}
	fmt.Fprintf(w, "requests per second: peak %d, mean %.1f; 200s per second: %.1f\n", rep.PeakRPS, rep.MeanRPS, rep.GoodputRPS)
	if len(rep.seconds) <= 120 {
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "second\t200\t429\t503\tother\terror\ttokens held\t")
		for i, s := range rep.seconds {
			fmt.Fprintf(tw, "%d\t%d\t%d\t%d\t%d\t%d\t%s\t\n", i, s.counts[colOK], s.counts[col429], s.counts[col503], s.counts[colOther], s.counts[colError], heldText(s.held))
		}
		tw.Flush()
	}
	for _, p := range written {
		fmt.Fprintf(w, "wrote %s\n", p)
	}
}

func heldText(n int) string {
	if n < 0 {
		return "-"
	}
	return strconv.Itoa(n)
}

func lastHeld(seconds []second) int {
	for i := len(seconds) - 1; i >= 0; i-- {
		if seconds[i].held >= 0 {
			return seconds[i].held
		}
	}
	return 0
}

// progress shows session creation on a terminal, and nothing elsewhere.
type progress struct {
	bar *progressbar.ProgressBar
}

func newProgress(w io.Writer, n int) *progress {
	f, ok := w.(*os.File)
	if !ok || !term.IsTerminal(int(f.Fd())) {
		return &progress{}
	}
	return &progress{bar: progressbar.NewOptions(n,
		progressbar.OptionSetWriter(w),
		progressbar.OptionSetDescription("creating sessions"),
		progressbar.OptionShowCount(),
		progressbar.OptionThrottle(100*time.Millisecond),
		progressbar.OptionClearOnFinish(),
	)}
}

func (p *progress) add() {
	if p.bar != nil {
		_ = p.bar.Add(1)
	}
}

func (p *progress) done(ok bool) {
	if p.bar == nil {
		return
	}
	if ok {
		_ = p.bar.Finish()
		return
	}
	_ = p.bar.Exit()
}
