package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// Backoff rules of the browser client: capped exponential backoff with full
// jitter, the server's Retry-After as a floor.
const (
	backoffBase = 250 * time.Millisecond
	backoffCap  = 30 * time.Second
	// maxRetryAfter bounds the Retry-After herd believes, so that a bogus
	// header cannot park a client for the rest of the run (or overflow a
	// Duration).
	maxRetryAfter = time.Hour
	// maxBody bounds what herd reads of a response; tokend's largest answer
	// is a token of a few KiB.
	maxBody = 64 << 10
)

// backoff is a capped exponential backoff with full jitter.
type backoff struct {
	base, cap time.Duration
}

// delay returns how long to wait before retry number attempt (0 for the
// first retry): uniform in [0, min(cap, base·2^attempt)], and never less
// than retryAfter. The floor is the server's instruction; the jitter above
// it is what keeps clients refused together from returning together.
func (b backoff) delay(attempt int, retryAfter time.Duration, rnd *rand.Rand) time.Duration {
	ceiling := b.base
	for i := 0; i < attempt && ceiling < b.cap; i++ {
		ceiling *= 2
	}
	ceiling = min(ceiling, b.cap)
	sleep := time.Duration(rnd.Int64N(int64(ceiling) + 1))
	return max(sleep, retryAfter)
}

// parseRetryAfter reads a Retry-After header (RFC 9110 §10.2.3): a number of
// seconds or an HTTP date. Anything unreadable, or in the past, is no floor.
func parseRetryAfter(v string, now time.Time) time.Duration {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0
	}
	if n, err := strconv.ParseUint(v, 10, 64); err == nil || errors.Is(err, strconv.ErrRange) {
		if err != nil || n > uint64(maxRetryAfter/time.Second) {
			return maxRetryAfter
		}
		return time.Duration(n) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil {
		return min(max(t.Sub(now), 0), maxRetryAfter)
	}
	return 0
}

// statusError is the status under which a request that got no HTTP answer
// (connection refused, reset, timeout, unreadable body) is counted.
const statusError = 0

// result is the outcome of one token request.
type result struct {
	// status is the HTTP status, or statusError.
	status int
	// at is when the response was complete (or the request failed).
	at      time.Time
	latency time.Duration
	// retryAfter is the parsed Retry-After header.
	retryAfter time.Duration
	// refreshIn and expiresIn come from a 200 answer.
	refreshIn, expiresIn time.Duration
	// code is the problem code of an error answer, err why a request failed.
	code string
	err  error
}

// ok reports whether the request yielded a token.
func (r result) ok() bool { return r.status == http.StatusOK }

// retryable reports whether the browser rules retry after r: network
// errors, 429, 503 and other 5xx. 401 ends the session for good, and other
// 4xx answers will not change by asking again.
func (r result) retryable() bool {
	return r.status == statusError || r.status == http.StatusTooManyRequests || r.status >= 500
}

// tokend talks to the service under test. It only ever sends requests to
// the endpoints derived from the target URL and follows no redirects.
type tokend struct {
	http        *http.Client
	tokenURL    string
	sessionsURL string
	serviceKey  string
	timeout     time.Duration
	now         func() time.Time
}

func newTokend(target *url.URL, serviceKey string, conns int, timeout time.Duration) *tokend {
	transport := &http.Transport{
		Proxy: nil, // never detour through a proxy from the environment
		DialContext: (&net.Dialer{
			Timeout:   5 * time.Second,
			KeepAlive: 30 * time.Second,
		}).DialContext,
		MaxIdleConns:        0, // no global limit; per host is what matters
		MaxIdleConnsPerHost: conns,
		IdleConnTimeout:     90 * time.Second,
		DisableCompression:  true,
	}
	return &tokend{
		http: &http.Client{
			Transport: transport,
			CheckRedirect: func(*http.Request, []*http.Request) error {
				return http.ErrUseLastResponse
			},
		},
		tokenURL:    target.JoinPath("/v1/token").String(),
		sessionsURL: target.JoinPath("/v1/sessions").String(),
		serviceKey:  serviceKey,
		timeout:     timeout,
		now:         time.Now,
	}
}

func (t *tokend) close() { t.http.CloseIdleConnections() }

// do sends req with the per-request timeout, reads the body and fills in
// the status, timing, Retry-After and problem code of res.
func (t *tokend) do(ctx context.Context, req *http.Request) (res result, body []byte) {
	ctx, cancel := context.WithTimeout(ctx, t.timeout)
	defer cancel()
	start := t.now()
	resp, err := t.http.Do(req.WithContext(ctx))
	if err == nil {
		body, err = io.ReadAll(io.LimitReader(resp.Body, maxBody))
		resp.Body.Close()
	}
	res.at = t.now()
	res.latency = res.at.Sub(start)
	if err != nil {
		res.status, res.err = statusError, err
		return res, nil
	}
	res.status = resp.StatusCode
	res.retryAfter = parseRetryAfter(resp.Header.Get("Retry-After"), res.at)
	if resp.StatusCode >= 400 {
		var p struct {
			Code   string `json:"code"`
			Detail string `json:"detail"`
		}
		if json.Unmarshal(body, &p) == nil {
			res.code = p.Code
			if p.Detail != "" {
				res.err = fmt.Errorf("%d %s: %s", resp.StatusCode, p.Code, p.Detail)
			}
		}
		if res.err == nil {
			res.err = fmt.Errorf("HTTP %d", resp.StatusCode)
		}
	}
	return res, body
}

// token asks for a token with the session cookie, as the browser does.
func (t *tokend) token(ctx context.Context, cookie string) result {
	req, err := http.NewRequest(http.MethodPost, t.tokenURL, nil)
	if err != nil {
		return result{status: statusError, at: t.now(), err: err}
	}
	req.Header.Set("Cookie", cookie)
	res, body := t.do(ctx, req)
	if res.status != http.StatusOK {
		return res
	}
	var tok struct {
		AccessToken string `json:"access_token"`
		ExpiresIn   int64  `json:"expires_in"`
		RefreshIn   int64  `json:"refresh_in"`
	}
	if err := json.Unmarshal(body, &tok); err != nil || tok.AccessToken == "" {
		// A 200 without a token is as good as no answer.
		res.status, res.err = statusError, errors.New("200 without a token in the body")
		return res
	}
	res.expiresIn = time.Duration(tok.ExpiresIn) * time.Second
	res.refreshIn = time.Duration(tok.RefreshIn) * time.Second
	return res
}

// errUnauthorized marks a refused service key: no retry will help.
var errUnauthorized = errors.New("the service key was refused")

// createSession creates a session for subject through the service API and
// returns the Cookie header value the browser would send. 429, 503 and
// network errors are retried under the backoff rules, at most attempts
// times.
func (t *tokend) createSession(ctx context.Context, subject string, b backoff, attempts int, rnd *rand.Rand) (cookie string, retries int, err error) {
	payload, err := json.Marshal(map[string]string{"subject": subject})
	if err != nil {
		return "", 0, err
	}
	for attempt := 0; ; attempt++ {
		req, err := http.NewRequest(http.MethodPost, t.sessionsURL, bytes.NewReader(payload))
		if err != nil {
			return "", attempt, err
		}
		req.Header.Set("Authorization", "Bearer "+t.serviceKey)
		req.Header.Set("Content-Type", "application/json")
		res, body := t.do(ctx, req)
		if ctx.Err() != nil {
			return "", attempt, ctx.Err()
		}
		switch {
		case res.status == http.StatusCreated:
			var created struct {
				Cookie struct {
					Name  string `json:"name"`
					Value string `json:"value"`
				} `json:"cookie"`
			}
			if err := json.Unmarshal(body, &created); err != nil || created.Cookie.Name == "" || created.Cookie.Value == "" {
				return "", attempt, fmt.Errorf("create session: 201 without cookie.name and cookie.value in the body")
			}
			return created.Cookie.Name + "=" + created.Cookie.Value, attempt, nil
		case res.status == http.StatusUnauthorized:
			return "", attempt, fmt.Errorf("create session: %w (%v); check -service-key or TOKEND_SERVICE_KEY", errUnauthorized, res.err)
		case !res.retryable():
			return "", attempt, fmt.Errorf("create session: %w", res.err)
		case attempt+1 >= attempts:
			return "", attempt, fmt.Errorf("create session: gave up after %d attempts: %w", attempts, res.err)
		}
		if !sleep(ctx, b.delay(attempt, res.retryAfter, rnd)) {
			return "", attempt, ctx.Err()
		}
	}
}

// sleep waits for d or until ctx ends, reporting whether it slept fully.
func sleep(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
