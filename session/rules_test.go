package session

import (
	"encoding/json"
	"errors"
	"math"
	"reflect"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

// t0 has a fractional second so that every truncation is visible.
var t0 = time.Date(2026, 3, 4, 10, 0, 0, 250_000_000, time.UTC)

// sec is a shorthand for whole seconds.
func sec(n int) time.Duration { return time.Duration(n) * time.Second }

// longSession is active for hours around t0 and has no idle timeout.
func longSession() Session {
	return Session{
		ID:              "AAAAAAAAAAAAAAAAAAAAAA",
		Subject:         "alice",
		CreatedAt:       t0.Add(-time.Hour).Truncate(time.Second),
		ExpiresAt:       t0.Add(8 * time.Hour).Truncate(time.Second),
		CookieExpiresAt: t0.Add(8 * time.Hour).Truncate(time.Second),
		LastSeenAt:      t0.Add(-time.Minute),
	}
}

func TestPlanTokenExpiry(t *testing.T) {
	whole := t0.Truncate(time.Second) // 10:00:00
	tests := []struct {
		name    string
		edit    func(*Session)
		ttl     time.Duration
		wantExp time.Time
	}{
		{
			name:    "token ttl caps",
			ttl:     10 * time.Minute,
			wantExp: whole.Add(10 * time.Minute), // 10:10:00.25 truncated
		},
		{
			name: "absolute expiry caps",
			edit: func(s *Session) {
				s.ExpiresAt = t0.Add(3*time.Minute + 700*time.Millisecond) // 10:03:00.95
				s.CookieExpiresAt = time.Time{}
			},
			ttl:     10 * time.Minute,
			wantExp: whole.Add(3 * time.Minute),
		},
		{
			name: "cookie end caps",
			edit: func(s *Session) {
				s.CookieExpiresAt = t0.Add(2*time.Minute + 100*time.Millisecond) // 10:02:00.35
			},
			ttl:     10 * time.Minute,
			wantExp: whole.Add(2 * time.Minute),
		},
		{
			name: "idle deadline caps",
			edit: func(s *Session) {
				s.IdleTimeout = 5 * time.Minute
				s.LastSeenAt = t0.Add(-time.Minute - 500*time.Millisecond) // deadline 10:03:59.75
			},
			ttl:     10 * time.Minute,
			wantExp: whole.Add(3*time.Minute + 59*time.Second),
		},
		{
			name: "idle deadline later than ttl does not cap",
			edit: func(s *Session) {
				s.IdleTimeout = time.Hour
				s.LastSeenAt = t0
			},
			ttl:     10 * time.Minute,
			wantExp: whole.Add(10 * time.Minute),
		},
		{
			name: "zero idle timeout is ignored even with an old last seen",
			edit: func(s *Session) {
				s.IdleTimeout = 0
				s.LastSeenAt = t0.Add(-7 * time.Hour)
			},
			ttl:     10 * time.Minute,
			wantExp: whole.Add(10 * time.Minute),
		},
		{
			name: "earliest of all four wins: cookie",
			edit: func(s *Session) {
				s.ExpiresAt = t0.Add(5 * time.Minute)
				s.CookieExpiresAt = t0.Add(4 * time.Minute)
				s.IdleTimeout = 6 * time.Minute
				s.LastSeenAt = t0
			},
			ttl:     7 * time.Minute,
			wantExp: whole.Add(4 * time.Minute),
		},
		{
			name: "cookie later than absolute expiry is ignored",
			edit: func(s *Session) {
				s.ExpiresAt = t0.Add(90 * time.Second)
				s.CookieExpiresAt = t0.Add(time.Hour)
			},
			ttl:     10 * time.Minute,
			wantExp: whole.Add(90 * time.Second),
		},
		{
			name: "deadline on a whole second just after now",
			edit: func(s *Session) {
				s.ExpiresAt = whole.Add(time.Second) // 10:00:01, 750ms of life
				s.CookieExpiresAt = time.Time{}
			},
			ttl:     10 * time.Minute,
			wantExp: whole.Add(time.Second),
		},
		{
			name:    "short ttl",
			ttl:     10 * time.Second,
			wantExp: whole.Add(10 * time.Second),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := longSession()
			if tt.edit != nil {
				tt.edit(&s)
			}
			p, err := PlanToken(s, t0, tt.ttl, 0)
			if err != nil {
				t.Fatalf("PlanToken: %v", err)
			}
			if !p.ExpiresAt.Equal(tt.wantExp) {
				t.Errorf("ExpiresAt = %v, want %v", p.ExpiresAt, tt.wantExp)
			}
			if !p.Now.Equal(t0) {
				t.Errorf("Now = %v, want %v", p.Now, t0)
			}
			if !p.IssuedAt.Equal(whole) {
				t.Errorf("IssuedAt = %v, want %v", p.IssuedAt, whole)
			}
			if want := tt.wantExp.Sub(t0).Truncate(time.Second); p.ExpiresIn() != want {
				t.Errorf("ExpiresIn = %v, want %v", p.ExpiresIn(), want)
			}
			if !p.RefreshAt().Equal(t0.Add(p.RefreshIn)) {
				t.Errorf("RefreshAt = %v, want now+%v", p.RefreshAt(), p.RefreshIn)
			}
		})
	}
}

func TestPlanTokenNoLifeLeft(t *testing.T) {
	tests := []struct {
		name string
		edit func(*Session)
	}{
		{"absolute expiry in the past", func(s *Session) { s.ExpiresAt = t0.Add(-time.Second) }},
		{"absolute expiry exactly now", func(s *Session) { s.ExpiresAt = t0 }},
		{"less than a whole second left", func(s *Session) {
			s.ExpiresAt = t0.Add(600 * time.Millisecond) // 10:00:00.85 truncates to 10:00:00
		}},
		{"cookie ended", func(s *Session) { s.CookieExpiresAt = t0.Add(-time.Millisecond) }},
		{"idle deadline passed", func(s *Session) {
			s.IdleTimeout = time.Minute
			s.LastSeenAt = t0.Add(-time.Minute)
		}},
		{"idle deadline within the current second", func(s *Session) {
			s.IdleTimeout = time.Minute
			s.LastSeenAt = t0.Add(-time.Minute + 500*time.Millisecond)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := longSession()
			tt.edit(&s)
			p, err := PlanToken(s, t0, 10*time.Minute, 0.5)
			if !errors.Is(err, ErrExpired) {
				t.Fatalf("PlanToken = %+v, %v; want ErrExpired", p, err)
			}
			if p != (Plan{}) {
				t.Errorf("plan = %+v, want zero on error", p)
			}
		})
	}
	t.Run("zero ttl", func(t *testing.T) {
		if _, err := PlanToken(longSession(), t0, 0, 0); !errors.Is(err, ErrExpired) {
			t.Fatalf("err = %v, want ErrExpired", err)
		}
	})
}

func TestPlanTokenRefreshIn(t *testing.T) {
	// Life is 10:10:00 - 10:00:00.25 = 599.75s.
	tests := []struct {
		name   string
		jitter float64
		want   time.Duration
	}{
		{"jitter 0: 50%", 0, sec(299)},                    // 299.875
		{"jitter 0.5: 70%", 0.5, sec(419)},                // 419.825
		{"jitter just below 1: 90%", 0.9999999, sec(539)}, // 539.77…
		{"jitter 1 clamps below 90%", 1, sec(539)},
		{"jitter above 1 clamps", 7.5, sec(539)},
		{"+Inf clamps", math.Inf(1), sec(539)},
		{"negative jitter clamps to 0", -0.3, sec(299)},
		{"-Inf clamps to 0", math.Inf(-1), sec(299)},
		{"NaN counts as 0", math.NaN(), sec(299)},
		{"jitter 0.25: 60%", 0.25, sec(359)}, // 359.85
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := PlanToken(longSession(), t0, 10*time.Minute, tt.jitter)
			if err != nil {
				t.Fatal(err)
			}
			if p.RefreshIn != tt.want {
				t.Errorf("RefreshIn = %v, want %v", p.RefreshIn, tt.want)
			}
		})
	}

	t.Run("tiny life gives zero refresh_in", func(t *testing.T) {
		s := longSession()
		s.ExpiresAt = t0.Truncate(time.Second).Add(time.Second) // 750ms of life
		p, err := PlanToken(s, t0, 10*time.Minute, 0.99)
		if err != nil {
			t.Fatal(err)
		}
		if p.RefreshIn != 0 {
			t.Errorf("RefreshIn = %v, want 0", p.RefreshIn)
		}
	})
}

// TestPlanTokenInvariants checks the documented bounds over a grid of
// sessions, clocks and jitters.
func TestPlanTokenInvariants(t *testing.T) {
	ttls := []time.Duration{10 * time.Second, time.Minute, 10 * time.Minute, 24 * time.Hour}
	remaining := []time.Duration{1500 * time.Millisecond, 7 * time.Second, 3 * time.Minute, 11 * time.Minute, 30 * time.Hour}
	offsets := []time.Duration{0, time.Nanosecond, 999 * time.Millisecond, 123456789}
	jitters := []float64{0, 0.001, 0.25, 0.5, 0.75, 0.999, 0.9999999999}
	for _, ttl := range ttls {
		for _, rem := range remaining {
			for _, off := range offsets {
				now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).Add(off)
				s := Session{ExpiresAt: now.Add(rem)}
				for _, j := range jitters {
					p, err := PlanToken(s, now, ttl, j)
					if err != nil {
						t.Fatalf("ttl %v rem %v off %v jitter %v: %v", ttl, rem, off, j, err)
					}
					life := p.ExpiresAt.Sub(now)
					switch {
					case p.ExpiresAt.Nanosecond() != 0:
						t.Errorf("ExpiresAt %v is not whole seconds", p.ExpiresAt)
					case p.IssuedAt.Nanosecond() != 0 || p.IssuedAt.After(now) || now.Sub(p.IssuedAt) >= time.Second:
						t.Errorf("IssuedAt %v is not now %v truncated", p.IssuedAt, now)
					case p.ExpiresAt.After(now.Add(ttl)) || p.ExpiresAt.After(s.Deadline()):
						t.Errorf("ExpiresAt %v beyond now+ttl %v or deadline %v", p.ExpiresAt, now.Add(ttl), s.Deadline())
					case now.Add(ttl).Sub(p.ExpiresAt) >= time.Second && s.Deadline().Sub(p.ExpiresAt) >= time.Second:
						t.Errorf("ExpiresAt %v is a second or more short of both bounds", p.ExpiresAt)
					case p.RefreshIn%time.Second != 0:
						t.Errorf("RefreshIn %v is not whole seconds", p.RefreshIn)
					case float64(p.RefreshIn) > 0.9*float64(life):
						t.Errorf("RefreshIn %v above 90%% of life %v", p.RefreshIn, life)
					case p.RefreshIn < time.Duration(0.5*float64(life)).Truncate(time.Second):
						t.Errorf("RefreshIn %v below 50%% of life %v", p.RefreshIn, life)
					case life > 2*time.Second && j == 0 && p.RefreshIn != time.Duration(0.5*float64(life)).Truncate(time.Second):
						t.Errorf("jitter 0: RefreshIn %v, want floor(life/2) of %v", p.RefreshIn, life)
					}
				}
			}
		}
	}
}

func TestSessionDeadlines(t *testing.T) {
	base := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	tests := []struct {
		name               string
		s                  Session
		wantIdle, wantEnds time.Time
		wantDeadline       time.Time
	}{
		{
			name:         "no idle, cookie equals expiry",
			s:            Session{ExpiresAt: base.Add(time.Hour), CookieExpiresAt: base.Add(time.Hour), LastSeenAt: base},
			wantEnds:     base.Add(time.Hour),
			wantDeadline: base.Add(time.Hour),
		},
		{
			name:         "cookie earlier",
			s:            Session{ExpiresAt: base.Add(time.Hour), CookieExpiresAt: base.Add(time.Minute)},
			wantEnds:     base.Add(time.Minute),
			wantDeadline: base.Add(time.Minute),
		},
		{
			name:         "cookie later",
			s:            Session{ExpiresAt: base.Add(time.Hour), CookieExpiresAt: base.Add(2 * time.Hour)},
			wantEnds:     base.Add(time.Hour),
			wantDeadline: base.Add(time.Hour),
		},
		{
			name:         "no cookie end",
			s:            Session{ExpiresAt: base.Add(time.Hour)},
			wantEnds:     base.Add(time.Hour),
			wantDeadline: base.Add(time.Hour),
		},
		{
			name:         "idle first",
			s:            Session{ExpiresAt: base.Add(time.Hour), IdleTimeout: 5 * time.Minute, LastSeenAt: base},
			wantIdle:     base.Add(5 * time.Minute),
			wantEnds:     base.Add(time.Hour),
			wantDeadline: base.Add(5 * time.Minute),
		},
		{
			name:         "idle after the end",
			s:            Session{ExpiresAt: base.Add(time.Hour), IdleTimeout: 30 * time.Minute, LastSeenAt: base.Add(45 * time.Minute)},
			wantIdle:     base.Add(75 * time.Minute),
			wantEnds:     base.Add(time.Hour),
			wantDeadline: base.Add(time.Hour),
		},
		{
			name:         "negative idle is none",
			s:            Session{ExpiresAt: base.Add(time.Hour), IdleTimeout: -time.Minute, LastSeenAt: base},
			wantEnds:     base.Add(time.Hour),
			wantDeadline: base.Add(time.Hour),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.s.IdleDeadline(); !got.Equal(tt.wantIdle) {
				t.Errorf("IdleDeadline = %v, want %v", got, tt.wantIdle)
			}
			if got := tt.s.EndsAt(); !got.Equal(tt.wantEnds) {
				t.Errorf("EndsAt = %v, want %v", got, tt.wantEnds)
			}
			if got := tt.s.Deadline(); !got.Equal(tt.wantDeadline) {
				t.Errorf("Deadline = %v, want %v", got, tt.wantDeadline)
			}
		})
	}
}

func TestSessionStatusAt(t *testing.T) {
	base := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	live := Session{ExpiresAt: base.Add(time.Hour), CookieExpiresAt: base.Add(time.Hour), LastSeenAt: base}
	with := func(f func(*Session)) Session { s := live; f(&s); return s }
	tests := []struct {
		name string
		s    Session
		now  time.Time
		want Status
	}{
		{"active", live, base.Add(time.Minute), StatusActive},
		{"active one ns before expiry", live, base.Add(time.Hour - 1), StatusActive},
		{"expired exactly at expiry", live, base.Add(time.Hour), StatusExpired},
		{"expired after expiry", live, base.Add(2 * time.Hour), StatusExpired},
		{"revoked", with(func(s *Session) { s.RevokedAt = base; s.RevokeReason = "x" }), base.Add(time.Minute), StatusRevoked},
		{"revoked wins over expired", with(func(s *Session) { s.RevokedAt = base }), base.Add(2 * time.Hour), StatusRevoked},
		{"revoked in the future still revoked", with(func(s *Session) { s.RevokedAt = base.Add(time.Minute) }), base, StatusRevoked},
		{"cookie ended", with(func(s *Session) { s.CookieExpiresAt = base.Add(time.Minute) }), base.Add(time.Minute), StatusExpired},
		{"idle active one ns before", with(func(s *Session) { s.IdleTimeout = 5 * time.Minute }), base.Add(5*time.Minute - 1), StatusActive},
		{"idle expired at deadline", with(func(s *Session) { s.IdleTimeout = 5 * time.Minute }), base.Add(5 * time.Minute), StatusExpired},
		{"idle moves with last seen", with(func(s *Session) {
			s.IdleTimeout = 5 * time.Minute
			s.LastSeenAt = base.Add(4 * time.Minute)
		}), base.Add(8 * time.Minute), StatusActive},
		{"before creation is active", live, base.Add(-time.Hour), StatusActive},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.s.StatusAt(tt.now); got != tt.want {
				t.Errorf("StatusAt = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestTouchInterval(t *testing.T) {
	tests := []struct {
		idle, max, want time.Duration
	}{
		{0, time.Minute, time.Minute},
		{-time.Minute, time.Minute, time.Minute},
		{time.Hour, time.Minute, time.Minute},
		{4 * time.Minute, time.Minute, time.Minute}, // a quarter equals max
		{2 * time.Minute, time.Minute, 30 * time.Second},
		{time.Minute, time.Minute, 15 * time.Second},
		{3 * time.Minute, 10 * time.Second, 10 * time.Second},
		{5 * time.Minute, 2 * time.Minute, 75 * time.Second},
	}
	for _, tt := range tests {
		if got := touchInterval(Session{IdleTimeout: tt.idle}, tt.max); got != tt.want {
			t.Errorf("touchInterval(idle %v, max %v) = %v, want %v", tt.idle, tt.max, got, tt.want)
		}
	}
}

func TestValidSubject(t *testing.T) {
	tests := []struct {
		name, in string
		wantErr  string // substring; "" means valid
	}{
		{"plain", "alice", ""},
		{"email", "alice@example.com", ""},
		{"unicode", "José 山田 🎉", ""},
		{"spaces", "  a b  ", ""},
		{"slash and percent", "org/42%2F", ""},
		{"max length", strings.Repeat("a", MaxSubjectLength), ""},
		{"max length multibyte", strings.Repeat("é", MaxSubjectLength/2), ""},
		{"empty", "", "is required"},
		{"one byte too long", strings.Repeat("a", MaxSubjectLength+1), "at most 256 bytes"},
		{"multibyte too long", strings.Repeat("é", MaxSubjectLength/2) + "a", "at most 256 bytes"},
		{"invalid utf-8", "al\xffice", "valid UTF-8"},
		{"truncated rune", "\xe2\x82", "valid UTF-8"},
		{"NUL", "a\x00b", "control characters"},
		{"newline", "a\nb", "control characters"},
		{"tab", "\t", "control characters"},
		{"DEL", "a\x7f", "control characters"},
		{"C1 control", "a\u0085", "control characters"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := validSubject(tt.in)
			if tt.wantErr == "" {
				if got != "" {
					t.Errorf("validSubject(%q) = %q, want valid", tt.in, got)
				}
				return
			}
			if !strings.Contains(got, tt.wantErr) {
				t.Errorf("validSubject(%q) = %q, want %q", tt.in, got, tt.wantErr)
			}
		})
	}
}

func TestValidReason(t *testing.T) {
	tests := []struct {
		name, in string
		wantErr  string
	}{
		{"empty is fine", "", ""},
		{"plain", "stolen laptop", ""},
		{"unicode", "vol d'ordinateur — 盗難", ""},
		{"max length", strings.Repeat("r", MaxReasonLength), ""},
		{"too long", strings.Repeat("r", MaxReasonLength+1), "at most 256 bytes"},
		{"invalid utf-8", "\xc3\x28", "valid UTF-8"},
		{"newline", "line1\nline2", "control characters"},
		{"carriage return", "a\rb", "control characters"},
		{"escape", "\x1b[31m", "control characters"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := validReason(tt.in)
			if tt.wantErr == "" {
				if got != "" {
					t.Errorf("validReason(%q) = %q, want valid", tt.in, got)
				}
				return
			}
			if !strings.Contains(got, tt.wantErr) {
				t.Errorf("validReason(%q) = %q, want %q", tt.in, got, tt.wantErr)
			}
		})
	}
}

func TestCanonicalClaims(t *testing.T) {
	// bigValue returns an object whose canonical form is exactly n bytes.
	bigValue := func(n int) string { return `{"k":"` + strings.Repeat("x", n-8) + `"}` }
	tests := []struct {
		name    string
		in      string
		want    string // canonical output; "" means nil
		wantErr string // substring of the message
	}{
		{name: "absent", in: ""},
		{name: "whitespace only", in: " \n\t "},
		{name: "null", in: "null"},
		{name: "padded null", in: "  null\n"},
		{name: "empty object", in: "{}"},
		{name: "empty object with spaces", in: " { } "},
		{name: "sorted", in: `{"b":1,"a":"x"}`, want: `{"a":"x","b":1}`},
		{name: "whitespace removed, nested sorted", in: "{ \"z\" : {\"y\":2, \"x\":[1, 2, {\"q\":null, \"p\":false}]} ,\n \"a\":true }",
			want: `{"a":true,"z":{"x":[1,2,{"p":false,"q":null}],"y":2}}`},
		{name: "numbers kept verbatim", in: `{"big":12345678901234567890,"f":1.0,"e":1e3,"neg":-0}`,
			want: `{"big":12345678901234567890,"e":1e3,"f":1.0,"neg":-0}`},
		{name: "duplicate keys collapse to the last", in: `{"a":1,"a":2}`, want: `{"a":2}`},
		{name: "unicode escapes decoded", in: `{"name":"\u00e9t\u00e9"}`, want: `{"name":"été"}`},
		{name: "reserved names only at top level", in: `{"ctx":{"sub":"x","iss":"y"}}`, want: `{"ctx":{"iss":"y","sub":"x"}}`},
		{name: "reserved names are case-sensitive", in: `{"SUB":"x","Exp":1}`, want: `{"Exp":1,"SUB":"x"}`},
		{name: "roles array", in: `{"roles":["a","b"],"tenant":"t1"}`, want: `{"roles":["a","b"],"tenant":"t1"}`},
		{name: "exactly the size limit", in: bigValue(MaxClaimsSize), want: bigValue(MaxClaimsSize)},
		{name: "over the size limit", in: bigValue(MaxClaimsSize + 1), wantErr: "at most 4096 bytes"},
		{name: "size counts canonical bytes", in: "{\"k\":" + strings.Repeat(" ", 2*MaxClaimsSize) + "1}", want: `{"k":1}`},
		{name: "array", in: `[{"a":1}]`, wantErr: "must be a JSON object"},
		{name: "string", in: `"a"`, wantErr: "must be a JSON object"},
		{name: "number", in: `42`, wantErr: "must be a JSON object"},
		{name: "true", in: `true`, wantErr: "must be a JSON object"},
		{name: "truncated", in: `{"a":`, wantErr: "must be a JSON object"},
		{name: "unquoted key", in: `{a:1}`, wantErr: "must be a JSON object"},
		{name: "trailing comma", in: `{"a":1,}`, wantErr: "must be a JSON object"},
		{name: "trailing data", in: `{"a":1} {"b":2}`, wantErr: "must be a JSON object"},
		{name: "trailing garbage", in: `{"a":1}x`, wantErr: "must be a JSON object"},
		{name: "empty name", in: `{"":1}`, wantErr: "must not be empty"},
	}
	for _, name := range []string{"iss", "sub", "aud", "exp", "nbf", "iat", "jti", "sid"} {
		tests = append(tests, struct {
			name    string
			in      string
			want    string
			wantErr string
		}{name: "reserved " + name, in: `{"ok":1,"` + name + `":"x"}`, wantErr: `"` + name + `" is reserved`})
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, msg := canonicalClaims(json.RawMessage(tt.in))
			if tt.wantErr != "" {
				if !strings.Contains(msg, tt.wantErr) {
					t.Errorf("message = %q, want %q", msg, tt.wantErr)
				}
				if got != nil {
					t.Errorf("claims = %s, want nil with an error", got)
				}
				return
			}
			if msg != "" {
				t.Fatalf("unexpected message %q", msg)
			}
			if tt.want == "" {
				if got != nil {
					t.Errorf("claims = %q, want nil", got)
				}
				return
			}
			if string(got) != tt.want {
				t.Errorf("claims = %s, want %s", got, tt.want)
			}
			// Canonical output is a fixed point.
			again, msg := canonicalClaims(got)
			if msg != "" || string(again) != string(got) {
				t.Errorf("canonicalClaims(%s) = %s, %q; want a fixed point", got, again, msg)
			}
		})
	}
}

// TestCanonicalClaimsEscaping checks that awkward strings come out as valid
// JSON carrying the same values.
func TestCanonicalClaimsEscaping(t *testing.T) {
	in := `{"html":"<script>&</script>","ls":"a\u2028b","ctl":"\u0001\n","bad":"` + "\xff" + `","quote":"\"\\"}`
	got, msg := canonicalClaims(json.RawMessage(in))
	if msg != "" {
		t.Fatalf("message %q", msg)
	}
	if !json.Valid(got) || !utf8.Valid(got) {
		t.Fatalf("output %q is not valid UTF-8 JSON", got)
	}
	var gotMap map[string]string
	if err := json.Unmarshal(got, &gotMap); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		"html": "<script>&</script>", "ls": "a\u2028b", "ctl": "\u0001\n", "bad": "\ufffd", "quote": `"\`,
	}
	if !reflect.DeepEqual(gotMap, want) {
		t.Errorf("decoded %q, want %q", gotMap, want)
	}
}
