package realtime_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/coder/websocket/wsjson"

	"github.com/tokend/tokend/examples/wsserver/realtime"
	"github.com/tokend/tokend/issuer"
	"github.com/tokend/tokend/verify"
)

const (
	testIssuer   = "https://tokend.test"
	testAudience = "ws"
)

// fixture is a tokend stand-in (an issuer and its JWKS) and the server.
type fixture struct {
	iss *issuer.Issuer
	v   *verify.Verifier
	srv *realtime.Server
	url string
}

func newFixture(t *testing.T, cfg realtime.Config) *fixture {
	t.Helper()
	key, err := issuer.GenerateKey(issuer.ES256, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	iss, err := issuer.New(testIssuer, []string{testAudience})
	if err != nil {
		t.Fatal(err)
	}
	if err := iss.SetKeys(&key, []issuer.Key{key}); err != nil {
		t.Fatal(err)
	}
	jwks := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = w.Write(iss.JWKS().Body)
	}))
	t.Cleanup(jwks.Close)
	v, err := verify.New(t.Context(), verify.Config{JWKSURL: jwks.URL, Issuer: testIssuer, Audience: testAudience, Leeway: -1})
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{iss: iss, v: v, srv: realtime.New(v, cfg)}
	ws := httptest.NewServer(f.srv)
	t.Cleanup(ws.Close)
	f.url = "ws" + strings.TrimPrefix(ws.URL, "http")
	return f
}

// token mints a token of session sid that expires ttl from now, rounded
// up to the second (tokens carry whole seconds).
func (f *fixture) token(t *testing.T, sub, sid string, ttl time.Duration) string {
	t.Helper()
	tok, _ := f.tokenExp(t, sub, sid, ttl)
	return tok
}

func (f *fixture) tokenExp(t *testing.T, sub, sid string, ttl time.Duration) (string, time.Time) {
	t.Helper()
	now := time.Now()
	exp := now.Add(ttl).Truncate(time.Second)
	if exp.Before(now.Add(ttl)) {
		exp = exp.Add(time.Second)
	}
	tok, err := f.iss.Mint(context.Background(), issuer.Claims{Subject: sub, SessionID: sid, IssuedAt: now, ExpiresAt: exp})
	if err != nil {
		t.Fatal(err)
	}
	return tok, exp
}

type msg struct {
	Type      string     `json:"type"`
	Token     string     `json:"token,omitempty"`
	Data      any        `json:"data,omitempty"`
	Subject   string     `json:"sub,omitempty"`
	SessionID string     `json:"sid,omitempty"`
	ExpiresAt *time.Time `json:"expires_at,omitempty"`
	Error     string     `json:"error,omitempty"`
}

func dial(t *testing.T, url string, protocols ...string) *websocket.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, _, err := websocket.Dial(ctx, url, &websocket.DialOptions{Subprotocols: protocols})
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { _ = c.CloseNow() })
	return c
}

func send(t *testing.T, c *websocket.Conn, m msg) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := wsjson.Write(ctx, c, m); err != nil {
		t.Fatalf("write: %v", err)
	}
}

func recv(t *testing.T, c *websocket.Conn) msg {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var m msg
	if err := wsjson.Read(ctx, c, &m); err != nil {
		t.Fatalf("read: %v", err)
	}
	return m
}

// wantClosed reads until the server closes c and checks the close code.
func wantClosed(t *testing.T, c *websocket.Conn, code websocket.StatusCode, within time.Duration) websocket.CloseError {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	for {
		_, _, err := c.Read(ctx)
		if err == nil {
			continue
		}
		var ce websocket.CloseError
		if !errors.As(err, &ce) {
			t.Fatalf("the connection ended with %v, want close code %d within %v", err, code, within)
		}
		if ce.Code != code {
			t.Fatalf("closed with %d %q, want %d", ce.Code, ce.Reason, code)
		}
		return ce
	}
}

func authenticate(t *testing.T, c *websocket.Conn, token string) msg {
	t.Helper()
	send(t, c, msg{Type: "auth", Token: token})
	ready := recv(t, c)
	if ready.Type != "ready" {
		t.Fatalf("after auth: %+v, want ready", ready)
	}
	return ready
}

func TestAuthenticateWithFirstMessage(t *testing.T) {
	f := newFixture(t, realtime.Config{})
	c := dial(t, f.url)
	ready := authenticate(t, c, f.token(t, "alice", "S1", time.Minute))
	if ready.Subject != "alice" || ready.SessionID != "S1" || ready.ExpiresAt == nil {
		t.Errorf("ready = %+v", ready)
	}
	send(t, c, msg{Type: "echo", Data: "hi"})
	if m := recv(t, c); m.Type != "echo" || m.Data != "hi" {
		t.Errorf("echo = %+v", m)
	}
	send(t, c, msg{Type: "nonsense"})
	if m := recv(t, c); m.Type != "error" {
		t.Errorf("unknown type = %+v", m)
	}
	if n := f.srv.Connections("S1"); n != 1 {
		t.Errorf("Connections(S1) = %d", n)
	}
}

func TestAuthenticateInHandshake(t *testing.T) {
	f := newFixture(t, realtime.Config{})
	c := dial(t, f.url, realtime.Subprotocol, realtime.BearerPrefix+f.token(t, "alice", "S1", time.Minute))
	if c.Subprotocol() != realtime.Subprotocol {
		t.Errorf("negotiated %q, want %q (never the token)", c.Subprotocol(), realtime.Subprotocol)
	}
	if m := recv(t, c); m.Type != "ready" || m.SessionID != "S1" {
		t.Errorf("first message = %+v, want ready", m)
	}
}

func TestTokenInURLRefused(t *testing.T) {
	f := newFixture(t, realtime.Config{})
	for _, q := range []string{"?token=abc", "?access_token=abc"} {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, resp, err := websocket.Dial(ctx, f.url+q, nil)
		cancel()
		if err == nil || resp == nil || resp.StatusCode != http.StatusBadRequest {
			t.Errorf("%s: err %v, status %v; want 400 before the upgrade", q, err, resp)
		}
	}
}

func TestAuthenticationRefused(t *testing.T) {
	f := newFixture(t, realtime.Config{AuthTimeout: 200 * time.Millisecond})

	t.Run("no auth message", func(t *testing.T) {
		c := dial(t, f.url)
		wantClosed(t, c, realtime.CloseAuthRequired, 2*time.Second)
	})
	t.Run("another message first", func(t *testing.T) {
		c := dial(t, f.url)
		send(t, c, msg{Type: "echo", Data: 1})
		wantClosed(t, c, realtime.CloseAuthRequired, 2*time.Second)
	})
	t.Run("expired token", func(t *testing.T) {
		c := dial(t, f.url)
		send(t, c, msg{Type: "auth", Token: f.token(t, "alice", "S1", -time.Second)})
		if ce := wantClosed(t, c, realtime.CloseAuthFailed, 2*time.Second); ce.Reason != "token refused: expired" {
			t.Errorf("reason = %q", ce.Reason)
		}
	})
	t.Run("garbage", func(t *testing.T) {
		c := dial(t, f.url, realtime.Subprotocol, realtime.BearerPrefix+"a.b.c")
		if ce := wantClosed(t, c, realtime.CloseAuthFailed, 2*time.Second); ce.Reason != "token refused: malformed" {
			t.Errorf("reason = %q", ce.Reason)
		}
	})
	t.Run("revoked session", func(t *testing.T) {
		f.v.AddRevocation(verify.Revocation{SID: "gone", RevokedAt: time.Now(), TokensExpireAt: time.Now().Add(time.Minute)})
		c := dial(t, f.url)
		send(t, c, msg{Type: "auth", Token: f.token(t, "alice", "gone", time.Minute)})
		if ce := wantClosed(t, c, realtime.CloseAuthFailed, 2*time.Second); ce.Reason != "token refused: revoked" {
			t.Errorf("reason = %q", ce.Reason)
		}
	})
}

func TestRefresh(t *testing.T) {
	f := newFixture(t, realtime.Config{})
	c := dial(t, f.url)
	first, firstExp := f.tokenExp(t, "alice", "S1", 200*time.Millisecond)
	authenticate(t, c, first)

	// A refresh with a token of the same session moves the expiry.
	send(t, c, msg{Type: "refresh", Token: f.token(t, "alice", "S1", time.Hour)})
	m := recv(t, c)
	if m.Type != "refreshed" || m.ExpiresAt == nil || time.Until(*m.ExpiresAt) < 50*time.Minute {
		t.Fatalf("refresh = %+v", m)
	}
	// A refused refresh token leaves the connection as it was.
	send(t, c, msg{Type: "refresh", Token: f.token(t, "alice", "S1", -time.Second)})
	if m := recv(t, c); m.Type != "refresh_failed" || m.Error != "token refused: expired" {
		t.Fatalf("expired refresh = %+v", m)
	}
	time.Sleep(time.Until(firstExp) + 100*time.Millisecond) // past the first token's expiry
	send(t, c, msg{Type: "echo", Data: "still here"})
	if m := recv(t, c); m.Type != "echo" {
		t.Fatalf("after the first token's expiry: %+v", m)
	}

	// A token of another session closes the connection.
	send(t, c, msg{Type: "refresh", Token: f.token(t, "alice", "S2", time.Hour)})
	wantClosed(t, c, realtime.CloseWrongSession, 2*time.Second)

	other := dial(t, f.url)
	authenticate(t, other, f.token(t, "alice", "S3", time.Hour))
	send(t, other, msg{Type: "refresh", Token: f.token(t, "mallory", "S3", time.Hour)})
	wantClosed(t, other, realtime.CloseWrongSession, 2*time.Second)
}

func TestExpiryClosesTheSocket(t *testing.T) {
	f := newFixture(t, realtime.Config{})
	c := dial(t, f.url)
	tok, exp := f.tokenExp(t, "alice", "S1", 200*time.Millisecond)
	authenticate(t, c, tok)
	wantClosed(t, c, realtime.CloseTokenExpired, 3*time.Second)
	if late := time.Since(exp); late < 0 || late > 300*time.Millisecond {
		t.Errorf("closed %v after the token's expiry, want at it", late)
	}
	waitFor(t, func() bool { return f.srv.Connections("") == 0 }, "the connection to be forgotten")
}

func TestRevocationClosesEverySocketOfTheSession(t *testing.T) {
	f := newFixture(t, realtime.Config{})
	a1, a2, b := dial(t, f.url), dial(t, f.url), dial(t, f.url)
	authenticate(t, a1, f.token(t, "alice", "A", time.Hour))
	authenticate(t, a2, f.token(t, "alice", "A", time.Hour))
	authenticate(t, b, f.token(t, "alice", "B", time.Hour))

	rev := verify.Revocation{SID: "A", RevokedAt: time.Now(), TokensExpireAt: time.Now().Add(time.Hour), Reason: "stolen"}
	f.v.AddRevocation(rev) // as Subscribe does, before the callback
	start := time.Now()
	f.srv.Revoked(rev)
	for _, c := range []*websocket.Conn{a1, a2} {
		wantClosed(t, c, realtime.CloseSessionRevoked, time.Second)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("closing took %v", d)
	}
	// The other session is untouched.
	send(t, b, msg{Type: "echo", Data: 1})
	if m := recv(t, b); m.Type != "echo" {
		t.Errorf("other session: %+v", m)
	}
	waitFor(t, func() bool { return f.srv.Connections("A") == 0 }, "the revoked connections to be forgotten")
}

func waitFor(t *testing.T, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waited 5s for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
