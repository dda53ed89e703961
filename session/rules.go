package session

import (
	"bytes"
	"encoding/json"
	"fmt"
	"time"
	"unicode"
	"unicode/utf8"
)

// Limits on what a session may carry.
const (
	// MinSessionTTL is the shortest session life a caller may ask for.
	MinSessionTTL = time.Minute
	// MinIdleTimeout is the shortest idle timeout a caller may ask for.
	MinIdleTimeout = time.Minute
	// MaxSubjectLength bounds the subject, in bytes.
	MaxSubjectLength = 256
	// MaxClaimsSize bounds the extra claims, in bytes of canonical JSON.
	MaxClaimsSize = 4096
	// MaxReasonLength bounds a revocation reason, in bytes.
	MaxReasonLength = 256
	// DefaultListLimit and MaxListLimit bound admin listings.
	DefaultListLimit = 100
	MaxListLimit     = 1000
)

// reservedClaims are set by tokend itself and may not be supplied as extra
// claims: the registered JWT claims and the session id.
var reservedClaims = map[string]bool{
	"iss": true, "sub": true, "aud": true, "exp": true, "nbf": true,
	"iat": true, "jti": true, "sid": true,
}

// Plan is the timing of one access token.
type Plan struct {
	// Now is when the refresh was accepted.
	Now time.Time
	// IssuedAt is the token's iat: Now truncated to the second, so never
	// later than the moment of issue.
	IssuedAt time.Time
	// ExpiresAt is the token's exp: whole seconds, never later than now plus
	// the token TTL, the session's absolute expiry, its idle deadline or its
	// cookie's end.
	ExpiresAt time.Time
	// RefreshIn is when the client should refresh, counted from Now: drawn
	// uniformly from 50–90 % of the token's actual lifetime, in whole seconds.
	RefreshIn time.Duration
}

// ExpiresIn is the token's remaining life at issue, in whole seconds.
func (p Plan) ExpiresIn() time.Duration {
	return p.ExpiresAt.Sub(p.Now).Truncate(time.Second)
}

// RefreshAt is the wall-clock time matching RefreshIn.
func (p Plan) RefreshAt() time.Time { return p.Now.Add(p.RefreshIn) }

// Refresh fractions: refresh_in lies in [refreshMin, refreshMin+refreshSpan)
// of the token's lifetime.
const (
	refreshMin  = 0.5
	refreshSpan = 0.4
)

// PlanToken computes the timing of a token for s at now. jitter is a uniform
// draw from [0, 1) that places refresh_in within its window; values outside
// that range are clamped. It returns ErrExpired if the session leaves no whole
// second of token life.
func PlanToken(s Session, now time.Time, ttl time.Duration, jitter float64) (Plan, error) {
	exp := now.Add(ttl)
	if d := s.Deadline(); d.Before(exp) {
		exp = d
	}
	exp = exp.Truncate(time.Second)
	if !exp.After(now) {
		return Plan{}, ErrExpired
	}
	switch {
	case jitter < 0 || jitter != jitter: // NaN too
		jitter = 0
	case jitter >= 1:
		jitter = 0.999999
	}
	life := exp.Sub(now)
	refreshIn := time.Duration(float64(life) * (refreshMin + refreshSpan*jitter)).Truncate(time.Second)
	return Plan{
		Now:       now,
		IssuedAt:  now.Truncate(time.Second),
		ExpiresAt: exp,
		RefreshIn: refreshIn,
	}, nil
}

// touchInterval is how stale LastSeenAt may get before a refresh writes it.
// It is short against the idle timeout, so that the idle rule stays exact to
// within a quarter of it, and bounded so admin views stay fresh.
func touchInterval(s Session, max time.Duration) time.Duration {
	if s.IdleTimeout > 0 && s.IdleTimeout/4 < max {
		return s.IdleTimeout / 4
	}
	return max
}

// validSubject reports what is wrong with a subject, or "".
func validSubject(subject string) string {
	switch {
	case subject == "":
		return "is required"
	case len(subject) > MaxSubjectLength:
		return fmt.Sprintf("must be at most %d bytes", MaxSubjectLength)
	case !utf8.ValidString(subject):
		return "must be valid UTF-8"
	}
	for _, r := range subject {
		if unicode.IsControl(r) {
			return "must not contain control characters"
		}
	}
	return ""
}

// validReason reports what is wrong with a revocation reason, or "".
func validReason(reason string) string {
	switch {
	case len(reason) > MaxReasonLength:
		return fmt.Sprintf("must be at most %d bytes", MaxReasonLength)
	case !utf8.ValidString(reason):
		return "must be valid UTF-8"
	}
	for _, r := range reason {
		if unicode.IsControl(r) {
			return "must not contain control characters"
		}
	}
	return ""
}

// canonicalClaims checks extra claims and returns them as compact JSON with
// sorted, unique keys (so a token never carries a claim twice), or nil when
// there are none. It returns a message describing the first problem.
func canonicalClaims(raw json.RawMessage) (json.RawMessage, string) {
	trimmed := bytes.TrimSpace(raw)
	if len(trimmed) == 0 || bytes.Equal(trimmed, []byte("null")) {
		return nil, ""
	}
	if trimmed[0] != '{' {
		return nil, "must be a JSON object"
	}
	dec := json.NewDecoder(bytes.NewReader(trimmed))
	dec.UseNumber()
	var m map[string]any
	if err := dec.Decode(&m); err != nil || dec.InputOffset() != int64(len(trimmed)) {
		return nil, "must be a JSON object" // malformed, or followed by more data
	}
	if len(m) == 0 {
		return nil, ""
	}
	for k := range m {
		switch {
		case k == "":
			return nil, "claim names must not be empty"
		case reservedClaims[k]:
			return nil, fmt.Sprintf("%q is reserved and set by tokend", k)
		}
	}
	out, err := json.Marshal(m)
	if err != nil {
		return nil, "must be a JSON object"
	}
	if len(out) > MaxClaimsSize {
		return nil, fmt.Sprintf("must be at most %d bytes of JSON", MaxClaimsSize)
	}
	return out, ""
}
