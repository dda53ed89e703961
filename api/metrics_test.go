package api

import (
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/tokend/tokend/issuer"
	"github.com/tokend/tokend/store/ratelimit"
)

// TestMetricsAfterScriptedSequence drives a known sequence of requests and
// checks that /metrics reports each of them under the right labels.
func TestMetricsAfterScriptedSequence(t *testing.T) {
	e := newEnv(t,
		withProtection(func(now func() time.Time) Protection {
			return Protection{
				Limiter:      ratelimit.NewFallback(nil, ratelimit.FallbackOptions{Now: now}),
				SessionLimit: ratelimit.Limit{Rate: 1, Period: time.Minute, Burst: 1},
			}
		}, nil),
		withKeyAdmin(func(_ *issuer.Issuer, key issuer.Key, _ func() time.Time) KeyAdmin {
			return issuer.FixedKey{Key: key}
		}))

	a := e.createSession(t, `{"subject":"alice"}`)
	b := e.createSession(t, `{"subject":"bob"}`)
	c := e.createSession(t, `{"subject":"carol"}`)
	if rec := e.token(t, a.Cookie.Value); rec.Code != http.StatusOK {
		t.Fatalf("token: %d %s", rec.Code, rec.Body)
	}
	if rec := e.token(t, a.Cookie.Value); rec.Code != http.StatusTooManyRequests {
		t.Fatalf("second token within the session limit: %d, want 429", rec.Code)
	}
	if rec := e.token(t, "garbage"); rec.Code != http.StatusUnauthorized {
		t.Fatalf("garbage cookie: %d", rec.Code)
	}
	jwks := e.do(t, "GET", "/.well-known/jwks.json", "")
	if rec := e.do(t, "GET", "/.well-known/jwks.json", "", "If-None-Match", jwks.Header().Get("ETag")); rec.Code != http.StatusNotModified {
		t.Fatalf("JWKS revalidation: %d", rec.Code)
	}
	if rec := e.do(t, "DELETE", "/v1/session", "", withCookie(b.Cookie.Value)...); rec.Code != http.StatusNoContent {
		t.Fatalf("logout: %d %s", rec.Code, rec.Body)
	}
	if rec := e.do(t, "DELETE", "/v1/admin/sessions/"+c.SID, "", bearer(testAdminKey)...); rec.Code != http.StatusOK {
		t.Fatalf("admin revoke: %d", rec.Code)
	}
	if rec := e.do(t, "POST", "/v1/admin/subjects/alice/revoke", "", bearer(testAdminKey)...); rec.Code != http.StatusOK {
		t.Fatalf("subject revoke: %d", rec.Code)
	}

	rec := e.do(t, "GET", "/metrics", "")
	if rec.Code != http.StatusOK || !strings.HasPrefix(rec.Header().Get("Content-Type"), "text/plain") {
		t.Fatalf("/metrics: %d %q", rec.Code, rec.Header().Get("Content-Type"))
	}
	body := rec.Body.String()
	for _, want := range []string{
		`tokend_tokens_issued_total 1`,
		`tokend_token_refusals_total{reason="rate_limited"} 1`,
		`tokend_token_refusals_total{reason="session_invalid"} 1`,
		`tokend_rate_limited_total{limit="session"} 1`,
		`tokend_sessions_created_total 3`,
		`tokend_sessions_revoked_total{how="logout"} 1`,
		`tokend_sessions_revoked_total{how="admin"} 1`,
		`tokend_sessions_revoked_total{how="subject"} 1`,
		`tokend_jwks_requests_total{status="200"} 1`,
		`tokend_jwks_requests_total{status="304"} 1`,
		`tokend_http_request_duration_seconds_count{method="POST",route="/v1/token",status="200"} 1`,
		`tokend_http_request_duration_seconds_count{method="POST",route="/v1/token",status="429"} 1`,
		`tokend_http_request_duration_seconds_count{method="POST",route="/v1/sessions",status="201"} 3`,
		`tokend_token_refresh_in_seconds_count 1`,
		`tokend_signing_keys{state="active"} 1`,
		`tokend_signing_keys{state="next"} 0`,
		`tokend_ratelimit_degraded 0`,
		`tokend_shed_total 0`,
		`tokend_http_in_flight_requests 1`, // the scrape itself
	} {
		if !strings.Contains(body, "\n"+want+"\n") {
			t.Errorf("metrics lack %q", want)
		}
	}
	// Refreshes with refresh_in = 50-90 % of 600s fall in the 300..540 buckets.
	if !regexp.MustCompile(`tokend_token_refresh_in_seconds_bucket\{le="540"\} 1\n`).MatchString(body) ||
		!regexp.MustCompile(`tokend_token_refresh_in_seconds_bucket\{le="240"\} 0\n`).MatchString(body) {
		t.Errorf("refresh_in histogram does not place the token between 240s and 540s:\n%s", grepLines(body, "refresh_in"))
	}
	if !regexp.MustCompile(`\ntokend_ratelimit_local_decisions_total [1-9]`).MatchString(body) {
		t.Errorf("local rate-limit decisions not counted:\n%s", grepLines(body, "ratelimit"))
	}
	if !regexp.MustCompile(`\ntokend_signing_key_age_seconds\{kid="` + regexp.QuoteMeta(e.key.ID) + `",state="active"\} `).MatchString(body) {
		t.Errorf("no age for the active key:\n%s", grepLines(body, "signing_key"))
	}
	for _, secret := range []string{a.Cookie.Value, testAdminKey, testServiceKey} {
		if strings.Contains(body, secret) {
			t.Errorf("metrics contain a secret")
		}
	}
}

func grepLines(s, substr string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, substr) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
