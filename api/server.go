// Package api is tokend's HTTP interface: the chi router, its handlers and
// middleware, and the one place where errors become status codes.
//
// Handlers are thin: decode, validate, one domain call, encode. No store,
// Redis or JWT code lives here.
package api

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"log/slog"
	"net/http"
	"net/netip"
	"runtime"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/tokend/tokend/issuer"
	"github.com/tokend/tokend/session"
)

// Sessions is what the API needs from the session domain; *session.Service
// implements it.
type Sessions interface {
	Create(ctx context.Context, req session.CreateRequest) (session.Created, error)
	Refresh(ctx context.Context, cookie string) (session.Token, error)
	Logout(ctx context.Context, cookie string) (session.Session, error)
	Get(ctx context.Context, sid string) (session.Session, error)
	List(ctx context.Context, subject string, limit int) ([]session.Session, error)
	Revoke(ctx context.Context, sid, reason string) (session.Session, error)
	RevokeSubject(ctx context.Context, subject, reason string) ([]string, error)
}

// Keys publishes the verification keys; *issuer.Issuer implements it.
type Keys interface {
	JWKS() *issuer.JWKS
}

// KeyAdmin shows and rotates the signing keys; *issuer.Keyring implements
// it.
type KeyAdmin interface {
	Status() []issuer.KeyStatus
	Rotate(ctx context.Context) (issuer.KeyStatus, error)
}

// Cookie describes the session cookie's attributes.
type Cookie struct {
	Name     string
	Path     string
	Domain   string
	Secure   bool
	SameSite http.SameSite
}

// Config is the API's share of tokend's configuration.
type Config struct {
	Cookie Cookie
	// AllowedOrigins may call the cookie endpoints from a browser, with
	// credentials. Same-origin requests are always allowed.
	AllowedOrigins []string
	ServiceKeys    []string
	AdminKeys      []string
	// JWKSMaxAge is the Cache-Control max-age of the JWKS document.
	JWKSMaxAge time.Duration
	// PreflightMaxAge is how long browsers may cache a CORS preflight.
	PreflightMaxAge time.Duration
	// TrustedProxies are the peers whose Forwarded / X-Forwarded-For
	// headers are believed when finding the client IP.
	TrustedProxies []netip.Prefix
	// ClientIPHeader is the header the trusted proxies write:
	// HeaderXForwardedFor (the default) or HeaderForwarded.
	ClientIPHeader string
	// Protection holds the rate limits and the shedding bound.
	Protection Protection
	// Dev serves the demo page at / and lets it create sessions at
	// POST /dev/session; outside dev mode both answer 404.
	Dev bool
	// AccessLogPerSecond caps access-log lines per second (errors are
	// always logged); 0 logs every request.
	AccessLogPerSecond int
	// StreamHeartbeat is how often an idle revocation stream sends a
	// comment line; 0 means DefaultStreamHeartbeat.
	StreamHeartbeat time.Duration
	// StreamPoll is how often a revocation stream reads the log without
	// being woken; 0 means DefaultStreamPoll.
	StreamPoll time.Duration
}

// Options are the dependencies of the server.
type Options struct {
	Logger   *slog.Logger
	Sessions Sessions
	Keys     Keys
	// KeyAdmin serves /v1/admin/keys; nil answers 404 there.
	KeyAdmin KeyAdmin
	Config   Config
	// Ready reports whether the instance should receive traffic; nil means
	// always. It turns false while draining.
	Ready func() bool
	// Now is the clock used to report session status; nil means time.Now.
	// It should be the clock the session service uses.
	Now func() time.Time
	// RandN returns a uniform integer in [0, n), for Retry-After jitter;
	// nil means math/rand/v2.
	RandN func(n int) int
	// Metrics collects what /metrics serves; nil means a fresh set.
	Metrics *Metrics
	// Revocations serves /v1/revocations and its stream; nil means
	// Sessions, if it implements RevocationFeed, and 404 otherwise.
	Revocations RevocationFeed
	// Shutdown is closed when the HTTP server starts shutting down:
	// long-lived responses (the revocation stream) end then, since
	// http.Server.Shutdown waits for them. nil means never.
	Shutdown <-chan struct{}
}

type server struct {
	log         *slog.Logger
	sessions    Sessions
	keys        Keys
	keyAdmin    KeyAdmin
	cfg         Config
	ready       func() bool
	now         func() time.Time
	origins     map[string]bool
	serviceKeys [][32]byte
	adminKeys   [][32]byte
	trusted     []netip.Prefix
	protect     Protection
	gate        *gate
	randN       func(n int) int
	router      *chi.Mux
	metrics     *Metrics
	logSampler  *logSampler
	feed        RevocationFeed
	shutdown    <-chan struct{}
}

// NewServer returns the HTTP handler serving every tokend route.
//
// GET /.well-known/jwks.json is answered before the router: validators
// poll it, so it skips the request id, access log and latency histogram
// (the JWKS counters still count it), and its 304 path allocates nothing.
func NewServer(o Options) http.Handler {
	s := newServer(o)
	jwks := s.handleJWKS()
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == jwksPath && r.Method == http.MethodGet {
			jwks(w, r)
			return
		}
		s.router.ServeHTTP(w, r)
	})
}

const jwksPath = "/.well-known/jwks.json"

func newServer(o Options) *server {
	s := &server{
		log:         o.Logger,
		sessions:    o.Sessions,
		keys:        o.Keys,
		keyAdmin:    o.KeyAdmin,
		cfg:         o.Config,
		ready:       o.Ready,
		now:         o.Now,
		origins:     make(map[string]bool),
		serviceKeys: hashKeys(o.Config.ServiceKeys),
		adminKeys:   hashKeys(o.Config.AdminKeys),
		trusted:     o.Config.TrustedProxies,
		protect:     o.Config.Protection,
		randN:       o.RandN,
		metrics:     o.Metrics,
		feed:        o.Revocations,
		shutdown:    o.Shutdown,
	}
	if s.feed == nil {
		s.feed, _ = o.Sessions.(RevocationFeed)
	}
	if s.cfg.StreamHeartbeat <= 0 {
		s.cfg.StreamHeartbeat = DefaultStreamHeartbeat
	}
	if s.cfg.StreamPoll <= 0 {
		s.cfg.StreamPoll = DefaultStreamPoll
	}
	if s.metrics == nil {
		s.metrics = NewMetrics()
	}
	if o.Config.AccessLogPerSecond > 0 {
		s.logSampler = &logSampler{perSecond: int64(o.Config.AccessLogPerSecond), log: s.log}
	}
	if s.randN == nil {
		s.randN = defaultRandN
	}
	if s.protect.ShedRetryAfter < time.Second {
		s.protect.ShedRetryAfter = DefaultShedRetryAfter
	}
	s.gate = newGate(s.protect.MaxInflight, s.protect.MaxQueue, s.protect.QueueWait)
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.now == nil {
		s.now = time.Now
	}
	if s.ready == nil {
		s.ready = func() bool { return true }
	}
	if s.cfg.JWKSMaxAge <= 0 {
		s.cfg.JWKSMaxAge = 5 * time.Minute
	}
	if s.cfg.PreflightMaxAge <= 0 {
		s.cfg.PreflightMaxAge = 10 * time.Minute
	}
	for _, origin := range o.Config.AllowedOrigins {
		s.origins[origin] = true
	}
	s.metrics.bind(s)
	s.router = chi.NewRouter()
	s.addRoutes(s.router)
	return s
}

// addRoutes lists every route of the service.
func (s *server) addRoutes(r *chi.Mux) {
	// requestID comes first so that a recovered panic is answered and logged
	// with the request id.
	r.Use(s.requestID, s.recoverPanics, s.accessLog)
	r.NotFound(s.handleNotFound())
	r.MethodNotAllowed(s.handleMethodNotAllowed(r))

	r.Get("/healthz", s.handleHealthz())
	r.Get("/readyz", s.handleReadyz())
	// Served before the router (see NewServer); routed too, so that other
	// methods get 405 and the route is listed with the others.
	r.Get(jwksPath, s.handleJWKS())
	r.Get("/metrics", s.metrics.handler().ServeHTTP)
	// The browser client (client/tokend.js): public, cacheable, never limited.
	r.Get(clientJSPath, s.handleClientJS())

	// Dev mode only, 404 otherwise: the demo page, and a way for it to get a
	// session without an application backend (same-origin callers only).
	r.With(s.devOnly).Get("/", s.handleDemoPage())
	r.With(s.devOnly, s.checkOrigin).Post("/dev/session", s.handleDevSession())

	// Browser endpoints: authenticated by the session cookie, callable
	// cross-origin by allowed origins only.
	// Preflights are answered before any limit: they are cheap, cached by
	// browsers, and refusing them would hide the real answer's headers.
	r.Group(func(r chi.Router) {
		r.Use(s.checkOrigin)
		r.Options("/v1/token", s.handlePreflight("POST"))
		r.Options("/v1/session", s.handlePreflight("DELETE"))
		r.Group(func(r chi.Router) {
			r.Use(s.shed, s.rateLimit(
				limitPolicy{name: "ip", limit: s.protect.IPLimit, key: ipKey},
				limitPolicy{name: "session", limit: s.protect.SessionLimit, key: sessionKey},
			))
			r.Post("/v1/token", s.handleToken())
			r.Delete("/v1/session", s.handleLogout())
		})
	})

	// Application backends: service API key.
	r.Group(func(r chi.Router) {
		r.Use(s.requireKey(s.serviceKeys), s.shed,
			s.rateLimit(limitPolicy{name: "service", limit: s.protect.ServiceLimit, key: serviceKey}))
		r.Post("/v1/sessions", s.handleCreateSession())
	})

	// Validators: service API key. Neither shed nor rate-limited: a stream
	// lives for hours and would hold a slot, and validators must not
	// spend the budget of session creation.
	r.Group(func(r chi.Router) {
		r.Use(s.requireKey(s.serviceKeys))
		r.Get("/v1/revocations", s.handleRevocations())
		r.Get("/v1/revocations/stream", s.handleRevocationStream())
	})

	// Admins: admin API key.
	r.Group(func(r chi.Router) {
		r.Use(s.requireKey(s.adminKeys))
		r.Get("/v1/admin/sessions", s.handleListSessions())
		r.Get("/v1/admin/sessions/{sid}", s.handleGetSession())
		r.Delete("/v1/admin/sessions/{sid}", s.handleRevokeSession())
		r.Post("/v1/admin/subjects/{subject}/revoke", s.handleRevokeSubject())
		r.Get("/v1/admin/keys", s.handleListKeys())
		r.Post("/v1/admin/keys/rotate", s.handleRotateKeys())
	})
}

func hashKeys(keys []string) [][32]byte {
	out := make([][32]byte, len(keys))
	for i, k := range keys {
		out[i] = sha256.Sum256([]byte(k))
	}
	return out
}

// keyMatches compares the presented key against every configured key in
// constant time, without stopping at the first match.
func keyMatches(presented string, keys [][32]byte) bool {
	h := sha256.Sum256([]byte(presented))
	match := 0
	for i := range keys {
		match |= subtle.ConstantTimeCompare(h[:], keys[i][:])
	}
	return match == 1
}

// DefaultMaxInflight sizes the shedding bound from the CPUs available: token
// work is CPU-bound (one signature each), so a few requests per CPU keep
// every core busy while the rest wait in the short queue or are shed.
func DefaultMaxInflight() int { return 8 * runtime.GOMAXPROCS(0) }
