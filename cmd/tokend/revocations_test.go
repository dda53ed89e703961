package main

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/coder/websocket/wsjson"
	"github.com/golang-jwt/jwt/v5"

	"github.com/tokend/tokend/examples/wsserver/realtime"
	"github.com/tokend/tokend/internal/testenv"
	redisstore "github.com/tokend/tokend/store/redis"
	"github.com/tokend/tokend/verify"
)

// These tests run real tokend instances (run, in process) with the
// example websocket service of examples/wsserver and the verify package,
// as a realtime service would deploy them.

// memEnv is a production configuration without a database: sessions and
// keys in memory, 10-second tokens, keys that sign one second after a
// rotation.
func memEnv() map[string]string {
	return map[string]string{
		"TOKEND_ISSUER":             pgIssuer,
		"TOKEND_AUDIENCE":           pgAudience,
		"TOKEND_SERVICE_KEYS":       pgServiceKey,
		"TOKEND_ADMIN_KEYS":         pgAdminKey,
		"TOKEND_TOKEN_TTL":          "10s",
		"TOKEND_TOKEN_REUSE_WINDOW": "0s",
		"TOKEND_JWKS_MAX_AGE":       "1s",
		"TOKEND_KEY_PUBLISH_DELAY":  "1s",
		"TOKEND_RATE_SESSION":       "off",
		"TOKEND_RATE_IP":            "off",
		"TOKEND_DRAIN_DELAY":        "0s",
	}
}

// follower is a verifier following an instance's revocation feed.
type follower struct {
	v         *verify.Verifier
	revs      chan verify.Revocation
	connected chan struct{}
	cancel    context.CancelFunc
	done      chan error
	onRevoke  func(verify.Revocation)
}

// follow builds a verifier for p and subscribes it to p's feed, calling
// onRevoke (if set) for each revocation.
func follow(t *testing.T, p *inProcess, leeway time.Duration, onRevoke func(verify.Revocation)) *follower {
	t.Helper()
	v, err := verify.New(t.Context(), verify.Config{
		JWKSURL: p.base + "/.well-known/jwks.json", Issuer: pgIssuer, Audience: pgAudience,
		Leeway: leeway, MinRefreshInterval: 200 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	f := &follower{v: v, revs: make(chan verify.Revocation, 100), connected: make(chan struct{}, 100), onRevoke: onRevoke}
	f.resubscribe(t, p)
	return f
}

// resubscribe (re)starts the subscription, on p's feed.
func (f *follower) resubscribe(t *testing.T, p *inProcess) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	f.cancel, f.done = cancel, make(chan error, 1)
	done := f.done
	go func() {
		done <- f.v.Subscribe(ctx, verify.Feed{
			URL: p.base, ServiceKey: pgServiceKey, MinBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond,
			OnConnect: func() { f.connected <- struct{}{} },
		}, func(r verify.Revocation) {
			if f.onRevoke != nil {
				f.onRevoke(r)
			}
			f.revs <- r
		})
	}()
	t.Cleanup(func() { f.unsubscribe(t) })
	select {
	case <-f.connected:
	case <-time.After(10 * time.Second):
		t.Fatal("the subscription did not connect within 10s")
	}
}

func (f *follower) unsubscribe(t *testing.T) {
	t.Helper()
	f.cancel()
	select {
	case err := <-f.done:
		if err != nil {
			t.Errorf("Subscribe returned %v, want nil", err)
		}
		f.done <- nil // for the cleanup
	case <-time.After(5 * time.Second):
		t.Error("Subscribe did not return within 5s of its context ending")
	}
}

// want reads the next revocations and checks their sids, in any order,
// and that nothing else arrives.
func (f *follower) want(t *testing.T, sids ...string) {
	t.Helper()
	want := make(map[string]bool)
	for _, s := range sids {
		want[s] = true
	}
	deadline := time.After(5 * time.Second)
	for len(want) > 0 {
		select {
		case r := <-f.revs:
			if !want[r.SID] {
				t.Fatalf("revocation of %s (cursor %d): not expected, or delivered twice", r.SID, r.Cursor)
			}
			delete(want, r.SID)
		case <-deadline:
			t.Fatalf("revocations of %v did not arrive within 5s", want)
		}
	}
	select {
	case r := <-f.revs:
		t.Fatalf("unexpected revocation of %s (cursor %d)", r.SID, r.Cursor)
	case <-time.After(100 * time.Millisecond):
	}
}

// wsClient is a browser-like client of the websocket service.
type wsClient struct {
	t    *testing.T
	conn *websocket.Conn
}

type wsMessage struct {
	Type      string     `json:"type"`
	Token     string     `json:"token,omitempty"`
	Data      any        `json:"data,omitempty"`
	SessionID string     `json:"sid,omitempty"`
	ExpiresAt *time.Time `json:"expires_at,omitempty"`
	Error     string     `json:"error,omitempty"`
}

func connectWS(t *testing.T, url, token string) *wsClient {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, _, err := websocket.Dial(ctx, url, nil)
	if err != nil {
		t.Fatalf("dial %s: %v", url, err)
	}
	t.Cleanup(func() { _ = conn.CloseNow() })
	c := &wsClient{t: t, conn: conn}
	c.send(wsMessage{Type: "auth", Token: token})
	if m := c.recv(); m.Type != "ready" {
		t.Fatalf("after auth: %+v, want ready", m)
	}
	return c
}

func (c *wsClient) send(m wsMessage) {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := wsjson.Write(ctx, c.conn, m); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

func (c *wsClient) recv() wsMessage {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var m wsMessage
	if err := wsjson.Read(ctx, c.conn, &m); err != nil {
		c.t.Fatalf("read: %v", err)
	}
	return m
}

// refresh refreshes in-band and fails unless the service accepts.
func (c *wsClient) refresh(token string) {
	c.t.Helper()
	c.send(wsMessage{Type: "refresh", Token: token})
	if m := c.recv(); m.Type != "refreshed" {
		c.t.Fatalf("in-band refresh: %+v, want refreshed", m)
	}
}

// closed waits (at most within) for the service to close the socket and
// returns the close code and when the close frame arrived.
func (c *wsClient) closed(within time.Duration) (websocket.StatusCode, time.Time) {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	for {
		_, _, err := c.conn.Read(ctx)
		if err == nil {
			continue
		}
		at := time.Now()
		var ce websocket.CloseError
		if !errors.As(err, &ce) {
			c.t.Fatalf("the socket was not closed by the service within %v: %v", within, err)
		}
		return ce.Code, at
	}
}

// TestWebsocketServiceEndToEnd runs tokend (in memory), the example
// websocket service and its verifier: a client connects with a token and
// refreshes in-band, across a key rotation; an admin revocation closes the
// sockets of the session within a second; a token that expires without a
// refresh closes its socket; a subscriber that was away gets the
// revocations it missed, each once.
func TestWebsocketServiceEndToEnd(t *testing.T) {
	t.Parallel()
	p := startInProcess(t, memEnv())
	var service *realtime.Server
	f := follow(t, p, time.Second, func(r verify.Revocation) { service.Revoked(r) })
	service = realtime.New(f.v, realtime.Config{})
	ws := httptest.NewServer(service)
	t.Cleanup(ws.Close)
	wsURL := "ws" + strings.TrimPrefix(ws.URL, "http")

	// A session whose socket will expire: connected first, never refreshed.
	_, idleCookie := p.createSession("idle")
	idleToken := p.token(idleCookie)
	idle := connectWS(t, wsURL, idleToken)
	idleExp := expiry(t, idleToken)

	// Connect, then refresh in-band with a fresh token of the same session.
	sid, cookie := p.createSession("alice")
	alice := connectWS(t, wsURL, p.token(cookie))
	second := connectWS(t, wsURL, p.token(cookie)) // a second tab
	alice.refresh(p.token(cookie))

	// Rotate the signing key mid-connection: the new key signs after the
	// one-second publish delay; refreshes with tokens of either key, and
	// new connections, keep working.
	oldKid := kidOf(t, p.token(cookie))
	if status, body, _ := p.call("POST", "/v1/admin/keys/rotate", pgAdminKey, nil, ""); status != http.StatusOK {
		t.Fatalf("rotate: %d %v", status, body)
	}
	var rotated string
	pollUntil(t, 5*time.Second, "the new key to sign", func() bool {
		rotated = p.token(cookie)
		alice.refresh(rotated) // every token along the way is accepted
		return kidOf(t, rotated) != oldKid
	})
	second.refresh(rotated)
	connectWS(t, wsURL, rotated).conn.CloseNow()
	alice.send(wsMessage{Type: "echo", Data: "after rotation"})
	if m := alice.recv(); m.Type != "echo" {
		t.Fatalf("echo after rotation: %+v", m)
	}

	// An admin revokes the session: both of its sockets close within a
	// second of the call's return.
	if status, body, _ := p.call("DELETE", "/v1/admin/sessions/"+sid+"?reason=stolen", pgAdminKey, nil, ""); status != http.StatusOK {
		t.Fatalf("revoke: %d %v", status, body)
	}
	revoked := time.Now()
	for _, c := range []*wsClient{alice, second} {
		code, at := c.closed(5 * time.Second)
		if code != realtime.CloseSessionRevoked {
			t.Errorf("closed with %d, want %d (session revoked)", code, realtime.CloseSessionRevoked)
		}
		if d := at.Sub(revoked); d >= time.Second {
			t.Errorf("the socket closed %v after the revocation returned, want within 1s", d)
		} else {
			t.Logf("socket closed %v after the revocation returned", d)
		}
	}
	f.want(t, sid)
	// The session's tokens are refused from now on, also for new sockets.
	if _, err := f.v.Verify(context.Background(), rotated); !errors.Is(err, verify.ErrRevoked) {
		t.Errorf("Verify of the revoked session's token: %v, want ErrRevoked", err)
	}

	// The subscriber goes away; two sessions are revoked meanwhile (one by
	// logout, one subject-wide); back, it gets both, once each.
	f.unsubscribe(t)
	bobSID, _ := p.createSession("bob")
	carolSID, carolCookie := p.createSession("carol")
	if status, body, _ := p.call("POST", "/v1/admin/subjects/bob/revoke", pgAdminKey, nil, ""); status != http.StatusOK {
		t.Fatalf("revoke bob: %d %v", status, body)
	}
	if status, _, _ := p.call("DELETE", "/v1/session", "", carolCookie, ""); status != http.StatusNoContent {
		t.Fatalf("logout: %d", status)
	}
	f.resubscribe(t, p)
	f.want(t, bobSID, carolSID)

	// The idle socket closes when its token expires (plus the verifier's
	// one-second leeway).
	code, at := idle.closed(time.Until(idleExp) + 5*time.Second)
	if code != realtime.CloseTokenExpired {
		t.Errorf("idle socket closed with %d, want %d (token expired)", code, realtime.CloseTokenExpired)
	}
	if late := at.Sub(idleExp); late < time.Second-100*time.Millisecond || late > 3*time.Second {
		t.Errorf("idle socket closed %v after its token's exp, want about the one-second leeway", late)
	}
}

// expiry returns a token's exp (unverified).
func expiry(t *testing.T, token string) time.Time {
	t.Helper()
	claims := jwt.MapClaims{}
	if _, _, err := jwt.NewParser().ParseUnverified(token, claims); err != nil {
		t.Fatalf("parse token: %v", err)
	}
	exp, err := claims.GetExpirationTime()
	if err != nil || exp == nil {
		t.Fatalf("token without exp: %v", err)
	}
	return exp.Time
}

// TestRevocationFeedAcrossInstancesAndRestarts follows the feed of one
// PostgreSQL instance while revocations happen on another, and while the
// followed instance restarts: every revocation arrives once, promptly, and
// is also published on Redis.
func TestRevocationFeedAcrossInstancesAndRestarts(t *testing.T) {
	t.Parallel()
	redis := testenv.RedisClient(t)
	pubsub := redis.Subscribe(context.Background(), redisstore.RevocationsChannel)
	t.Cleanup(func() { _ = pubsub.Close() })
	if _, err := pubsub.Receive(context.Background()); err != nil {
		t.Fatal(err)
	}
	var (
		published   = make(map[string]int)
		publishedMu sync.Mutex
	)
	go func() {
		for m := range pubsub.Channel() {
			var msg redisstore.RevocationMessage
			if json.Unmarshal([]byte(m.Payload), &msg) == nil {
				publishedMu.Lock()
				published[msg.SID]++
				publishedMu.Unlock()
			}
		}
	}()

	env := pgEnv(testenv.DatabaseURL(t))
	env["TOKEND_REDIS_URL"] = testenv.RedisURL(t)
	a := startInProcess(t, env)
	b := startInProcess(t, env)
	f := follow(t, a, 0, nil)

	// Revoked on B, followed on A: NOTIFY wakes A's stream at once.
	first, _ := b.createSession("alice")
	if status, _, _ := b.call("DELETE", "/v1/admin/sessions/"+first, pgAdminKey, nil, ""); status != http.StatusOK {
		t.Fatalf("revoke on B: %d", status)
	}
	start := time.Now()
	f.want(t, first)
	if d := time.Since(start); d > time.Second {
		t.Errorf("a revocation on B reached A's stream %v later, want within 1s", d)
	}

	// A restarts (its stream ends cleanly at shutdown, or stop would fail);
	// two revocations happen on B meanwhile.
	a.stop()
	s1, _ := b.createSession("bob")
	s2, _ := b.createSession("bob")
	if status, body, _ := b.call("POST", "/v1/admin/subjects/bob/revoke", pgAdminKey, nil, ""); status != http.StatusOK {
		t.Fatalf("revoke bob on B: %d %v", status, body)
	}
	a = startInProcess(t, a.env)
	f.want(t, s1, s2) // and not the first again

	publishedMu.Lock()
	defer publishedMu.Unlock()
	for _, sid := range []string{first, s1, s2} {
		if published[sid] != 1 {
			t.Errorf("the revocation of %s was published on Redis %d times, want once", sid, published[sid])
		}
	}
}
