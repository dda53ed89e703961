package main

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"github.com/tokend/tokend/api"
	"github.com/tokend/tokend/issuer"
	"github.com/tokend/tokend/session"
	"github.com/tokend/tokend/store/memory"
	"github.com/tokend/tokend/store/postgres"
	"github.com/tokend/tokend/store/ratelimit"
	redisstore "github.com/tokend/tokend/store/redis"
)

// run is the whole program: it returns when ctx is cancelled (after a
// graceful shutdown) or when serving fails.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	if len(args) > 0 && args[0] == "healthcheck" {
		return healthcheck(ctx, getenv, stdout)
	}
	cfg, err := loadConfig(args, getenv, stderr)
	if err != nil {
		return err
	}
	logger := newLogger(cfg, stderr)

	if cfg.Dev && len(cfg.ServiceKeys) == 0 {
		cfg.ServiceKeys = []string{"tkd_svc_" + randomKey()}
		cfg.generatedAPIKeys = true
	}
	if cfg.Dev && len(cfg.AdminKeys) == 0 {
		cfg.AdminKeys = []string{"tkd_adm_" + randomKey()}
		cfg.generatedAPIKeys = true
	}

	ln, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	defer ln.Close()
	baseURL := "http://" + dialable(ln.Addr().(*net.TCPAddr))
	if cfg.Issuer == "" {
		cfg.Issuer = baseURL
	}

	iss, err := issuer.New(cfg.Issuer, cfg.Audience)
	if err != nil {
		return err
	}

	bgCtx, stopBackground := context.WithCancel(context.WithoutCancel(ctx))
	defer stopBackground()

	// Sessions: PostgreSQL when configured, memory otherwise.
	var (
		store     session.Store
		keyStore  issuer.KeyStore
		pg        *postgres.Store
		storeName = "memory"
		healthy   = func() bool { return true }
	)
	if cfg.DatabaseURL != "" {
		if cfg.insecureKEK {
			logger.Warn("INSECURE: no TOKEND_KEY_ENCRYPTION_KEY set; signing keys in PostgreSQL are sealed with a fixed development key. Never use this database in production.")
		}
		pg, err = postgres.Open(ctx, cfg.DatabaseURL, postgres.Options{Logger: logger, KEK: cfg.KEK})
		if err != nil {
			return err
		}
		defer pg.Close()
		if err := pg.Migrate(ctx); err != nil {
			return err
		}
		go pg.Run(bgCtx)
		store, keyStore, storeName, healthy = pg, pg, "postgres", pg.Healthy
	} else {
		store, keyStore = memory.New(), memory.NewKeyStore()
	}

	// Signing keys: a fixed key from a file, or a rotating keyring.
	var (
		keyAdmin  api.KeyAdmin
		keySource string
	)
	if cfg.SigningKeyFile != "" {
		key, err := fixedKey(cfg)
		if err != nil {
			return err
		}
		if err := iss.SetKeys(&key, []issuer.Key{key}); err != nil {
			return err
		}
		keyAdmin, keySource = issuer.FixedKey{Key: key}, "file"
	} else {
		ring := issuer.NewKeyring(iss, keyStore, issuer.KeyringConfig{
			Algorithm:    cfg.SigningAlg,
			Rotation:     cfg.KeyRotation,
			PublishDelay: cfg.KeyPublishDelay,
			RetireAfter:  cfg.TokenTTL + min(cfg.TokenTTL, maxKeyLeeway),
		}, logger, nil)
		if err := ring.Init(ctx); err != nil {
			return err
		}
		var changed <-chan struct{}
		if pg != nil {
			changed = pg.KeysChanged()
		}
		go ring.Run(bgCtx, changed, 30*time.Second)
		keyAdmin, keySource = ring, storeName
	}

	limiter, publisher, closeRedis, err := newLimiter(ctx, cfg, logger)
	if err != nil {
		return err
	}
	defer closeRedis()

	var sessionOpts []session.Option
	if publisher != nil {
		sessionOpts = append(sessionOpts, session.WithRevocationPublisher(publisher))
	}
	sessions := session.NewService(store, iss, session.Config{
		TokenTTL:    cfg.TokenTTL,
		SessionTTL:  cfg.SessionTTL,
		ReuseWindow: cfg.TokenReuseWindow,
	}, sessionOpts...)
	if pg != nil {
		// Revocation streams on this instance wake when any instance
		// revokes, not only at their next poll.
		go forward(bgCtx, pg.RevocationNotices(), sessions.NotifyRevocations)
	}
	// Closed when srv starts shutting down, so that revocation streams end
	// and the drain can finish.
	shuttingDown := make(chan struct{})

	var ready, draining atomic.Bool
	handler := api.NewServer(api.Options{
		Logger:   logger,
		Sessions: sessions,
		Keys:     iss,
		KeyAdmin: keyAdmin,
		Ready:    func() bool { return ready.Load() && healthy() },
		Shutdown: shuttingDown,
		Config: api.Config{
			Cookie: api.Cookie{
				Name:     cfg.CookieName,
				Path:     cfg.CookiePath,
				Domain:   cfg.CookieDomain,
				Secure:   !cfg.Dev,
				SameSite: cfg.CookieSameSite,
			},
			AllowedOrigins:     cfg.AllowedOrigins,
			Dev:                cfg.Dev,
			ServiceKeys:        cfg.ServiceKeys,
			AdminKeys:          cfg.AdminKeys,
			JWKSMaxAge:         cfg.JWKSMaxAge,
			TrustedProxies:     cfg.TrustedProxies,
			ClientIPHeader:     cfg.ClientIPHeader,
			AccessLogPerSecond: cfg.AccessLogRate,
			Protection: api.Protection{
				Limiter:      limiter,
				SessionLimit: cfg.RateSession,
				IPLimit:      cfg.RateIP,
				ServiceLimit: cfg.RateService,
				MaxInflight:  cfg.MaxInflight,
				MaxQueue:     cfg.MaxInflight,
			},
		},
	})
	srv := &http.Server{
		Handler:           closeWhileDraining(handler, &draining),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      15 * time.Second,
		IdleTimeout:       90 * time.Second,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
	}
	srv.RegisterOnShutdown(func() { close(shuttingDown) })

	go purgeLoop(bgCtx, logger, store.(purger), cfg.SessionRetention, cfg.TokenTTL+revocationLeeway)

	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(ln) }()
	ready.Store(true)

	logger.Info("tokend started",
		slog.String("addr", ln.Addr().String()),
		slog.Bool("dev", cfg.Dev),
		slog.String("issuer", cfg.Issuer),
		slog.String("kid", iss.ActiveKeyID()),
		slog.String("alg", string(cfg.SigningAlg)),
		slog.String("key_source", keySource),
		slog.String("store", storeName),
		slog.String("rate_limits", limitsSummary(cfg)),
		slog.Int("max_inflight", cfg.MaxInflight))
	if cfg.Dev {
		printDevBanner(stdout, cfg, baseURL)
	}

	select {
	case err := <-serveErr:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}

	// Drain: stop advertising readiness, give load balancers time to notice,
	// then let in-flight requests finish.
	ready.Store(false)
	draining.Store(true)
	logger.Info("shutting down", slog.Duration("drain_delay", cfg.DrainDelay))
	time.Sleep(cfg.DrainDelay)
	shutdownCtx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	if err := <-serveErr; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve: %w", err)
	}
	logger.Info("stopped")
	return nil
}

func newLogger(cfg config, w io.Writer) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(cfg.LogLevel))
	opts := &slog.HandlerOptions{Level: level}
	if cfg.LogFormat == "text" {
		return slog.New(slog.NewTextHandler(w, opts))
	}
	return slog.New(slog.NewJSONHandler(w, opts))
}

// maxKeyLeeway bounds the time added to the token TTL before a retired key
// leaves the JWKS, for validators whose clocks run behind. The leeway is the
// TTL itself when that is shorter.
const maxKeyLeeway = time.Minute

// fixedKey loads the configured key file.
func fixedKey(cfg config) (issuer.Key, error) {
	data, err := os.ReadFile(cfg.SigningKeyFile)
	if err != nil {
		return issuer.Key{}, fmt.Errorf("TOKEND_SIGNING_KEY_FILE: %w", err)
	}
	k, err := issuer.ParsePrivateKeyPEM(data, time.Now())
	if err != nil {
		return issuer.Key{}, fmt.Errorf("TOKEND_SIGNING_KEY_FILE %s: %w", cfg.SigningKeyFile, err)
	}
	return k, nil
}

// newLimiter returns the rate limiter: Redis-backed with a per-instance
// fallback when TOKEND_REDIS_URL is set, per-instance otherwise. An
// unreachable Redis does not stop start-up: refusing to start would turn a
// Redis outage into a tokend outage exactly when a fleet restarts. With
// Redis it also returns the publisher of revocations on
// redisstore.RevocationsChannel (nil without).
func newLimiter(ctx context.Context, cfg config, logger *slog.Logger) (*ratelimit.Fallback, session.RevocationPublisher, func(), error) {
	opts := ratelimit.FallbackOptions{Logger: logger}
	if cfg.RedisURL == "" {
		return ratelimit.NewFallback(nil, opts), nil, func() {}, nil
	}
	redisstore.UseLogger(logger)
	client, err := redisstore.NewClient(cfg.RedisURL)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("TOKEND_REDIS_URL: %w", err)
	}
	pingCtx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := client.Ping(pingCtx).Err(); err != nil {
		logger.Warn("redis is not reachable; rate limits apply per instance until it is", slog.Any("error", err))
	}
	shared := redisstore.NewLimiter(client, "tokend:rl:")
	publisher := redisstore.NewPublisher(client, redisstore.RevocationsChannel, logger)
	return ratelimit.NewFallback(shared, opts), publisher, func() { _ = client.Close() }, nil
}

// forward calls f for every signal on ch until ctx ends.
func forward(ctx context.Context, ch <-chan struct{}, f func()) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-ch:
			f()
		}
	}
}

func limitsSummary(cfg config) string {
	where := "per instance"
	if cfg.RedisURL != "" {
		where = "shared via redis"
	}
	return fmt.Sprintf("session %s, ip %s, service %s (%s)", cfg.RateSession, cfg.RateIP, cfg.RateService, where)
}

// purger is implemented by stores that can delete ended sessions and old
// entries of the revocation log.
type purger interface {
	Purge(ctx context.Context, cutoff time.Time) (int, error)
	PurgeRevocations(ctx context.Context, cutoff time.Time) (int, error)
}

// revocationLeeway is how long, beyond the token TTL, revocations stay in
// the log: longer than any validator's clock leeway (verify.MaxLeeway).
const revocationLeeway = 5 * time.Minute

// purgeLoop deletes sessions that ended more than retention ago, and
// revocations older than revocations (by then every token of their
// sessions has expired).
func purgeLoop(ctx context.Context, logger *slog.Logger, p purger, retention, revocations time.Duration) {
	t := time.NewTicker(10 * time.Minute)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		n, err := p.Purge(ctx, time.Now().Add(-retention))
		if err != nil {
			logger.Warn("purging ended sessions failed", slog.Any("error", err))
			continue
		}
		if n > 0 {
			logger.Info("purged ended sessions", slog.Int("count", n))
		}
		if n, err := p.PurgeRevocations(ctx, time.Now().Add(-revocations)); err != nil {
			logger.Warn("purging old revocations failed", slog.Any("error", err))
		} else if n > 0 {
			logger.Info("purged old revocations", slog.Int("count", n))
		}
	}
}

func randomKey() string {
	var b [24]byte
	_, _ = rand.Read(b[:])
	return base64.RawURLEncoding.EncodeToString(b[:])
}

// dialable turns a listen address into one a local client can dial.
func dialable(a *net.TCPAddr) string {
	ip := a.IP
	if ip == nil || ip.IsUnspecified() {
		ip = net.IPv4(127, 0, 0, 1)
	}
	return net.JoinHostPort(ip.String(), fmt.Sprint(a.Port))
}

// printDevBanner tells a newcomer how to use the dev instance. Printing the
// generated keys is the point: they exist only in this process.
func printDevBanner(w io.Writer, cfg config, base string) {
	var b strings.Builder
	where := "in-memory sessions and keys"
	if cfg.DatabaseURL != "" {
		where = "sessions and keys in PostgreSQL"
	}
	fmt.Fprintf(&b, "tokend is running at %s (dev mode: %s, %s keys, cookies without Secure; not for production)\n\n", base, where, cfg.SigningAlg)
	svc, adm := cfg.ServiceKeys[0], cfg.AdminKeys[0]
	if cfg.generatedAPIKeys {
		fmt.Fprintf(&b, "  service key: %s\n  admin key:   %s\n\n", svc, adm)
	} else {
		svc, adm = "$TOKEND_SERVICE_KEY", "$TOKEND_ADMIN_KEY"
	}
	fmt.Fprintf(&b, "Demo page:      %s/  (a live token refresh in your browser; open it in two tabs)\n", base)
	fmt.Fprintf(&b, "Browser client: %s/js/tokend.js\n\n", base)
	fmt.Fprintf(&b, "Try it:\n\n")
	fmt.Fprintf(&b, "  # 1. your backend creates a session for a signed-in user and hands the cookie to the browser\n")
	fmt.Fprintf(&b, "  COOKIE=$(curl -s -X POST %s/v1/sessions -H 'Authorization: Bearer %s' -H 'Content-Type: application/json' -d '{\"subject\":\"alice\"}' | sed -n 's/.*\"value\":\"\\([^\"]*\\)\".*/\\1/p')\n", base, svc)
	fmt.Fprintf(&b, "  # 2. the browser exchanges the cookie for a 10-minute token\n")
	fmt.Fprintf(&b, "  curl -s -X POST %s/v1/token -H \"Cookie: %s=$COOKIE\"\n", base, cfg.CookieName)
	fmt.Fprintf(&b, "  # 3. websocket services verify tokens with these keys\n")
	fmt.Fprintf(&b, "  curl -s %s/.well-known/jwks.json\n", base)
	fmt.Fprintf(&b, "  # 4. an admin revokes all of alice's sessions; the next token request gets 401\n")
	fmt.Fprintf(&b, "  curl -s -X POST %s/v1/admin/subjects/alice/revoke -H 'Authorization: Bearer %s'\n", base, adm)
	fmt.Fprintf(&b, "  curl -s -X POST %s/v1/token -H \"Cookie: %s=$COOKIE\"\n\n", base, cfg.CookieName)
	fmt.Fprintf(&b, "Stop with Ctrl-C.\n")
	_, _ = io.WriteString(w, b.String())
}

// closeWhileDraining answers with "Connection: close" once draining is set,
// so that every kept-alive connection is retired by the response to its
// next request while the listener is still open. Left to Shutdown, a
// connection between two requests is closed as idle, and a request its
// client sends at that moment fails without an answer (a POST is not
// retried by clients).
func closeWhileDraining(h http.Handler, draining *atomic.Bool) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if draining.Load() {
			w.Header().Set("Connection", "close")
		}
		h.ServeHTTP(w, r)
	})
}
