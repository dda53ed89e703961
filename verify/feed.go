package verify

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"mime"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Defaults of Feed.
const (
	// DefaultFeedIdleTimeout is how long a stream may stay silent before it
	// is considered dead: three of tokend's 15-second heartbeats.
	DefaultFeedIdleTimeout = 45 * time.Second
	DefaultFeedMinBackoff  = 250 * time.Millisecond
	DefaultFeedMaxBackoff  = 10 * time.Second
)

// StreamPath is the path of tokend's revocation stream.
const StreamPath = "/v1/revocations/stream"

// ErrFeedUnauthorized means tokend refused the feed's service key. It does
// not fix itself, so Subscribe returns it instead of retrying.
var ErrFeedUnauthorized = errors.New("verify: tokend refused the service key of the revocation feed")

// Feed says where Subscribe follows revocations: tokend's revocation
// stream, GET /v1/revocations/stream (Server-Sent Events).
type Feed struct {
	// URL is tokend's base URL, such as https://auth.example.com.
	URL string
	// ServiceKey is one of tokend's service keys (TOKEND_SERVICE_KEYS).
	ServiceKey string
	// HTTPClient opens the stream. It must not have an overall Timeout,
	// which would cut the stream; nil means a client whose connection and
	// response-header waits are bounded.
	HTTPClient *http.Client
	// IdleTimeout: a stream that sends nothing, not even a heartbeat, for
	// this long is dropped and opened again. Zero means
	// DefaultFeedIdleTimeout.
	IdleTimeout time.Duration
	// MinBackoff and MaxBackoff bound the wait before reconnecting, which
	// doubles after each failed attempt and is jittered. Zero means
	// DefaultFeedMinBackoff and DefaultFeedMaxBackoff.
	MinBackoff, MaxBackoff time.Duration
	// OnConnect, if set, is called each time the stream is established.
	OnConnect func()
	// OnError, if set, is called with each failure of the stream (an
	// unreachable tokend, a stream that ended) before reconnecting. Use it
	// to log.
	OnError func(error)
}

var defaultFeedClient = sync.OnceValue(func() *http.Client {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.ResponseHeaderTimeout = 10 * time.Second
	return &http.Client{Transport: t}
})

// Subscribe follows the revocation feed until ctx ends. For each revoked
// session it first makes Verify refuse the session's tokens (until they
// would have expired anyway), then calls fn, one revocation at a time, in
// the order they were revoked; fn should return quickly (close sockets,
// not wait for them).
//
// The first subscription of a Verifier to a feed starts at the beginning
// of tokend's retained log, which holds every revocation whose tokens may
// still be valid, so a service that starts after a revocation still
// refuses its tokens. When the stream breaks (tokend restarts, the network
// drops, no heartbeat for IdleTimeout) Subscribe reconnects with jittered
// exponential backoff and resumes after the last revocation it received
// (Last-Event-ID): none is lost or delivered twice, across tokend restarts
// too. A later Subscribe of the same Verifier to the same feed resumes the
// same way.
//
// Subscribe returns nil when ctx ends. It returns an error at once if f is
// invalid or tokend refuses the service key (ErrFeedUnauthorized), since
// those do not fix themselves.
func (v *Verifier) Subscribe(ctx context.Context, f Feed, fn func(Revocation)) error {
	base, err := url.Parse(f.URL)
	if err != nil || (base.Scheme != "http" && base.Scheme != "https") || base.Host == "" {
		return fmt.Errorf("verify: Feed.URL %q must be tokend's absolute http(s) base URL", f.URL)
	}
	if f.ServiceKey == "" {
		return errors.New("verify: Feed.ServiceKey is required")
	}
	streamURL := strings.TrimSuffix(base.String(), "/") + StreamPath
	if f.HTTPClient == nil {
		f.HTTPClient = defaultFeedClient()
	}
	if f.IdleTimeout <= 0 {
		f.IdleTimeout = DefaultFeedIdleTimeout
	}
	if f.MinBackoff <= 0 {
		f.MinBackoff = DefaultFeedMinBackoff
	}
	if f.MaxBackoff <= 0 {
		f.MaxBackoff = DefaultFeedMaxBackoff
	}
	f.MaxBackoff = max(f.MaxBackoff, f.MinBackoff)
	if fn == nil {
		fn = func(Revocation) {}
	}
	backoff := f.MinBackoff
	for {
		connected, err := v.follow(ctx, f, streamURL, fn)
		if ctx.Err() != nil {
			return nil
		}
		if errors.Is(err, ErrFeedUnauthorized) {
			return err
		}
		if f.OnError != nil {
			f.OnError(err)
		}
		if connected {
			backoff = f.MinBackoff
		}
		wait := backoff/2 + rand.N(backoff/2+1)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		backoff = min(backoff*2, f.MaxBackoff)
	}
}

func (v *Verifier) cursor(feed string) int64 {
	v.feedMu.Lock()
	defer v.feedMu.Unlock()
	return v.cursors[feed]
}

// advance records cursor as seen on feed and reports whether it is new.
func (v *Verifier) advance(feed string, cursor int64) bool {
	v.feedMu.Lock()
	defer v.feedMu.Unlock()
	if cursor <= v.cursors[feed] {
		return false
	}
	v.cursors[feed] = cursor
	return true
}

var errIdle = errors.New("the revocation stream sent nothing, not even a heartbeat")

// wireRevocation is one event's data.
type wireRevocation struct {
	Cursor         int64     `json:"cursor"`
	SID            string    `json:"sid"`
	Subject        string    `json:"subject"`
	RevokedAt      time.Time `json:"revoked_at"`
	Reason         string    `json:"reason"`
	TokensExpireAt time.Time `json:"tokens_expire_at"`
}

// follow reads one connection of the stream until it ends, and reports
// whether it was established.
func (v *Verifier) follow(ctx context.Context, f Feed, streamURL string, fn func(Revocation)) (bool, error) {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	watchdog := time.AfterFunc(f.IdleTimeout, func() { cancel(errIdle) })
	defer watchdog.Stop()

	req, err := http.NewRequestWithContext(ctx, http.MethodGet, streamURL, nil)
	if err != nil {
		return false, err
	}
	req.Header.Set("Authorization", "Bearer "+f.ServiceKey)
	req.Header.Set("Accept", "text/event-stream")
	if c := v.cursor(streamURL); c > 0 {
		req.Header.Set("Last-Event-ID", strconv.FormatInt(c, 10))
	}
	resp, err := f.HTTPClient.Do(req)
	if err != nil {
		return false, fmt.Errorf("revocation stream: %w", causeOf(ctx, err))
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var p struct {
			Code   string `json:"code"`
			Detail string `json:"detail"`
		}
		_ = json.NewDecoder(io.LimitReader(resp.Body, 16<<10)).Decode(&p)
		if resp.StatusCode == http.StatusUnauthorized {
			return false, fmt.Errorf("%w: %s", ErrFeedUnauthorized, p.Detail)
		}
		return false, fmt.Errorf("revocation stream: %s %s %s", resp.Status, p.Code, p.Detail)
	}
	if mt, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type")); mt != "text/event-stream" {
		return false, fmt.Errorf("revocation stream: the answer is %q, not text/event-stream", mt)
	}
	if f.OnConnect != nil {
		f.OnConnect()
	}

	sc := bufio.NewScanner(resp.Body)
	var (
		event string
		data  strings.Builder
	)
	for sc.Scan() {
		watchdog.Reset(f.IdleTimeout)
		line := sc.Text()
		if line == "" { // dispatch
			if event == "revocation" && data.Len() > 0 {
				if err := v.deliver(streamURL, data.String(), fn); err != nil {
					return true, err
				}
			}
			event = ""
			data.Reset()
			continue
		}
		if line[0] == ':' { // comment: a heartbeat
			continue
		}
		name, value, _ := strings.Cut(line, ":")
		value = strings.TrimPrefix(value, " ")
		switch name {
		case "event":
			event = value
		case "data":
			if data.Len() > 0 {
				data.WriteByte('\n')
			}
			data.WriteString(value)
		}
		// id repeats the cursor, which the data carries; retry is
		// replaced by the backoff above.
	}
	if err := sc.Err(); err != nil {
		return true, fmt.Errorf("revocation stream: %w", causeOf(ctx, err))
	}
	if err := context.Cause(ctx); err != nil {
		return true, fmt.Errorf("revocation stream: %w", err)
	}
	return true, errors.New("revocation stream: tokend ended the stream")
}

// deliver handles one revocation event.
func (v *Verifier) deliver(feed, data string, fn func(Revocation)) error {
	var w wireRevocation
	if err := json.Unmarshal([]byte(data), &w); err != nil || w.Cursor <= 0 || w.SID == "" {
		return fmt.Errorf("revocation stream: an event is not a revocation: %q", data)
	}
	if !v.advance(feed, w.Cursor) {
		return nil // seen already
	}
	r := Revocation{Cursor: w.Cursor, SID: w.SID, Subject: w.Subject, RevokedAt: w.RevokedAt,
		Reason: w.Reason, TokensExpireAt: w.TokensExpireAt}
	v.AddRevocation(r)
	fn(r)
	return nil
}

// causeOf prefers why ctx was cancelled (the idle watchdog) to the error
// the cancellation caused.
func causeOf(ctx context.Context, err error) error {
	if c := context.Cause(ctx); c != nil && !errors.Is(c, context.Canceled) {
		return c
	}
	return err
}
