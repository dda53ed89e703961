// Package realtime is the websocket service of examples/wsserver: a small
// echo service that shows how a realtime service uses tokend's tokens.
//
//   - A connection authenticates with a tokend access token, sent either as
//     the first message, {"type":"auth","token":"…"}, or in the
//     Sec-WebSocket-Protocol header, as the protocols "tokend.v1" and
//     "tokend.bearer.<token>" (the server answers "tokend.v1", never the
//     token). A token in the URL is refused: URLs end up in logs.
//   - The client refreshes in-band before its token expires,
//     {"type":"refresh","token":"…"}, with a token of the same session (sub
//     and sid); it gets {"type":"refreshed","expires_at":…}.
//   - A connection whose token expires without a refresh is closed with
//     CloseTokenExpired; every connection of a revoked session is closed
//     with CloseSessionRevoked as soon as the revocation arrives (Revoked
//     is the callback for verify.Verifier.Subscribe).
//
// The application part is an echo: {"type":"echo","data":…} comes back.
package realtime

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/coder/websocket"
	"github.com/coder/websocket/wsjson"

	"github.com/tokend/tokend/verify"
)

// Close codes (RFC 6455 reserves 4000–4999 for applications). Reasons are
// fixed strings; a client reconnects after 4003 (with a fresh token) and
// sends its user to sign in after 4004.
const (
	// CloseAuthRequired: no auth message within the auth timeout, or a
	// first message that is not one.
	CloseAuthRequired websocket.StatusCode = 4001
	// CloseAuthFailed: the token was refused; the reason names the kind
	// ("expired", "bad signature", …).
	CloseAuthFailed websocket.StatusCode = 4002
	// CloseTokenExpired: the token expired and no refresh came.
	CloseTokenExpired websocket.StatusCode = 4003
	// CloseSessionRevoked: the session was revoked.
	CloseSessionRevoked websocket.StatusCode = 4004
	// CloseWrongSession: a refresh carried a token of another session.
	CloseWrongSession websocket.StatusCode = 4005
)

// Subprotocol is the protocol the server speaks; a client authenticating
// in the handshake offers it together with BearerPrefix + token.
const (
	Subprotocol  = "tokend.v1"
	BearerPrefix = "tokend.bearer."
)

// DefaultAuthTimeout is how long a connection may take to authenticate.
const DefaultAuthTimeout = 10 * time.Second

// Verifier checks tokens; *verify.Verifier implements it.
type Verifier interface {
	Verify(ctx context.Context, token string) (verify.Claims, error)
	// Revoked reports whether a session's tokens are refused as revoked.
	Revoked(sid string) bool
	Leeway() time.Duration
}

// Config configures a Server.
type Config struct {
	// AuthTimeout bounds the wait for the auth message; 0 means
	// DefaultAuthTimeout.
	AuthTimeout time.Duration
	// OriginPatterns are the browser origins (host patterns, as in
	// websocket.AcceptOptions) allowed besides the server's own.
	OriginPatterns []string
	Logger         *slog.Logger
}

// Server serves websocket connections authenticated by tokend tokens.
type Server struct {
	v   Verifier
	cfg Config
	log *slog.Logger

	mu    sync.Mutex
	bySID map[string]map[*conn]struct{}
}

// New returns a Server verifying tokens with v.
func New(v Verifier, cfg Config) *Server {
	if cfg.AuthTimeout <= 0 {
		cfg.AuthTimeout = DefaultAuthTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Server{v: v, cfg: cfg, log: cfg.Logger, bySID: make(map[string]map[*conn]struct{})}
}

// message is every message of the protocol, both ways.
type message struct {
	Type      string          `json:"type"`
	Token     string          `json:"token,omitempty"`
	Data      json.RawMessage `json:"data,omitempty"`
	Subject   string          `json:"sub,omitempty"`
	SessionID string          `json:"sid,omitempty"`
	ExpiresAt *time.Time      `json:"expires_at,omitempty"`
	Error     string          `json:"error,omitempty"`
}

// conn is one authenticated connection.
type conn struct {
	ws  *websocket.Conn
	sub string
	sid string

	mu      sync.Mutex
	expires *time.Timer
	closed  bool
}

// close closes the socket once, with code and reason; it does not wait for
// the peer's answer.
func (c *conn) close(code websocket.StatusCode, reason string) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	if c.expires != nil {
		c.expires.Stop()
	}
	c.mu.Unlock()
	// Close waits up to 5s for the peer's close frame; the reader loop
	// ends as soon as the frame is out.
	go func() { _ = c.ws.Close(code, reason) }()
}

// release stops the expiry timer of a connection that has ended.
func (c *conn) release() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	if c.expires != nil {
		c.expires.Stop()
	}
}

// expireAt (re)arms the expiry: the socket closes at exp plus the leeway
// unless a refresh moves it.
func (c *conn) expireAt(exp time.Time, leeway time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	d := time.Until(exp.Add(leeway))
	if c.expires == nil {
		c.expires = time.AfterFunc(d, func() { c.close(CloseTokenExpired, "token expired") })
		return
	}
	c.expires.Reset(d)
}

// Revoked closes every connection of the revoked session. It returns at
// once; use it as the callback of verify.Verifier.Subscribe.
func (s *Server) Revoked(r verify.Revocation) {
	s.mu.Lock()
	conns := make([]*conn, 0, len(s.bySID[r.SID]))
	for c := range s.bySID[r.SID] {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.close(CloseSessionRevoked, "session revoked")
	}
	if len(conns) > 0 {
		s.log.Info("closed the connections of a revoked session",
			slog.String("sid", r.SID), slog.Int("connections", len(conns)), slog.String("reason", r.Reason))
	}
}

// Connections returns how many authenticated connections session sid has
// ("" for all).
func (s *Server) Connections(sid string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if sid != "" {
		return len(s.bySID[sid])
	}
	n := 0
	for _, cs := range s.bySID {
		n += len(cs)
	}
	return n
}

func (s *Server) register(c *conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.bySID[c.sid] == nil {
		s.bySID[c.sid] = make(map[*conn]struct{})
	}
	s.bySID[c.sid][c] = struct{}{}
}

func (s *Server) unregister(c *conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.bySID[c.sid], c)
	if len(s.bySID[c.sid]) == 0 {
		delete(s.bySID, c.sid)
	}
}

// handshakeToken returns the token offered in Sec-WebSocket-Protocol, if
// any.
func handshakeToken(r *http.Request) string {
	for _, h := range r.Header.Values("Sec-WebSocket-Protocol") {
		for p := range strings.SplitSeq(h, ",") {
			if tok, ok := strings.CutPrefix(strings.TrimSpace(p), BearerPrefix); ok {
				return tok
			}
		}
	}
	return ""
}

// refusal is the close reason for a refused token: its kind.
func refusal(err error) string {
	var e *verify.Error
	if errors.As(err, &e) {
		return "token refused: " + e.Kind.String()
	}
	return "token refused"
}

// ServeHTTP accepts a websocket connection and serves it until it closes.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	if q.Has("token") || q.Has("access_token") {
		http.Error(w, "Do not put tokens in URLs (they end up in logs): send the token as the first message or in Sec-WebSocket-Protocol.", http.StatusBadRequest)
		return
	}
	handshake := handshakeToken(r)
	ws, err := websocket.Accept(w, r, &websocket.AcceptOptions{
		Subprotocols:   []string{Subprotocol},
		OriginPatterns: s.cfg.OriginPatterns,
	})
	if err != nil {
		return // Accept has answered
	}
	defer ws.CloseNow()
	ws.SetReadLimit(16 << 10)
	ctx := r.Context()

	token := handshake
	if token == "" {
		// Not a read deadline: a read whose context ends closes the
		// socket without a close code.
		const reason = "authenticate first: {\"type\":\"auth\",\"token\":\"...\"}"
		timeout := time.AfterFunc(s.cfg.AuthTimeout, func() { _ = ws.Close(CloseAuthRequired, reason) })
		var m message
		err := wsjson.Read(ctx, ws, &m)
		if !timeout.Stop() {
			return // timed out and closed
		}
		if err != nil || m.Type != "auth" || m.Token == "" {
			_ = ws.Close(CloseAuthRequired, reason)
			return
		}
		token = m.Token
	}
	claims, err := s.v.Verify(ctx, token)
	if err != nil {
		_ = ws.Close(CloseAuthFailed, refusal(err))
		return
	}
	c := &conn{ws: ws, sub: claims.Subject, sid: claims.SessionID}
	s.register(c)
	defer s.unregister(c)
	defer c.release()
	// A revocation that arrived between Verify and register found no
	// connection to close; it is in the verifier by then, so ask again.
	if s.v.Revoked(c.sid) {
		c.close(CloseSessionRevoked, "session revoked")
	}
	c.expireAt(claims.ExpiresAt, s.v.Leeway())
	exp := claims.ExpiresAt.UTC()
	if err := wsjson.Write(ctx, ws, message{Type: "ready", Subject: c.sub, SessionID: c.sid, ExpiresAt: &exp}); err != nil {
		return
	}
	s.serve(ctx, c)
}

// serve reads messages until the connection ends.
func (s *Server) serve(ctx context.Context, c *conn) {
	for {
		var m message
		if err := wsjson.Read(ctx, c.ws, &m); err != nil {
			return // closed, by either side
		}
		var reply message
		switch m.Type {
		case "refresh":
			claims, err := s.v.Verify(ctx, m.Token)
			switch {
			case errors.Is(err, verify.ErrRevoked):
				c.close(CloseSessionRevoked, "session revoked")
				continue
			case err != nil:
				// The current token still holds until it expires; the
				// client may try again with another.
				reply = message{Type: "refresh_failed", Error: refusal(err)}
			case claims.Subject != c.sub || claims.SessionID != c.sid:
				c.close(CloseWrongSession, "the refresh token belongs to another session")
				continue
			default:
				c.expireAt(claims.ExpiresAt, s.v.Leeway())
				exp := claims.ExpiresAt.UTC()
				reply = message{Type: "refreshed", ExpiresAt: &exp}
			}
		case "echo":
			reply = message{Type: "echo", Data: m.Data}
		default:
			reply = message{Type: "error", Error: "unknown message type"}
		}
		if err := wsjson.Write(ctx, c.ws, reply); err != nil {
			return
		}
	}
}
