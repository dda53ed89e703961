// Command wsserver is an example websocket service that authenticates its
// connections with tokend's access tokens, verifies them offline (package
// verify) and drops the sockets of revoked sessions within a second of the
// revocation, through tokend's revocation stream. See package realtime for
// the protocol.
//
// With a dev tokend (go run ./cmd/tokend) running on 127.0.0.1:8080:
//
//	go run ./examples/wsserver -service-key "$SERVICE_KEY"
//
// Settings, as flags or environment variables (a flag wins):
//
//	-addr         WSSERVER_ADDR        listen address (127.0.0.1:8090)
//	-tokend-url   TOKEND_URL           tokend's base URL (http://127.0.0.1:8080)
//	-jwks-url     TOKEND_JWKS_URL      key set (tokend-url + /.well-known/jwks.json)
//	-issuer       TOKEND_ISSUER        iss of accepted tokens (tokend-url)
//	-audience     TOKEND_AUDIENCE      aud this service accepts (tokend-dev)
//	-service-key  TOKEND_SERVICE_KEY   a tokend service key, for the revocation stream (required)
//	-origins      WSSERVER_ORIGINS     browser origins allowed besides the server's own, comma list of host patterns
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/tokend/tokend/examples/wsserver/realtime"
	"github.com/tokend/tokend/verify"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := run(ctx, os.Args[1:], os.Getenv, os.Stderr)
	switch {
	case errors.Is(err, flag.ErrHelp):
	case err != nil:
		fmt.Fprintln(os.Stderr, "wsserver:", err)
		os.Exit(1)
	}
}

type config struct {
	addr, tokendURL, jwksURL, issuer, audience, serviceKey string
	origins                                                []string
}

func loadConfig(args []string, getenv func(string) string, stderr io.Writer) (config, error) {
	env := func(name, def string) string {
		if v := getenv(name); v != "" {
			return v
		}
		return def
	}
	var c config
	var origins string
	fs := flag.NewFlagSet("wsserver", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.addr, "addr", env("WSSERVER_ADDR", "127.0.0.1:8090"), "listen address")
	fs.StringVar(&c.tokendURL, "tokend-url", env("TOKEND_URL", "http://127.0.0.1:8080"), "tokend's base URL")
	fs.StringVar(&c.jwksURL, "jwks-url", getenv("TOKEND_JWKS_URL"), "tokend's key set (default tokend-url + /.well-known/jwks.json)")
	fs.StringVar(&c.issuer, "issuer", getenv("TOKEND_ISSUER"), "iss of accepted tokens (default tokend-url)")
	fs.StringVar(&c.audience, "audience", env("TOKEND_AUDIENCE", "tokend-dev"), "aud this service accepts")
	fs.StringVar(&c.serviceKey, "service-key", getenv("TOKEND_SERVICE_KEY"), "a tokend service key, for the revocation stream")
	fs.StringVar(&origins, "origins", getenv("WSSERVER_ORIGINS"), "browser origins allowed besides the server's own (host patterns, comma list)")
	if err := fs.Parse(args); err != nil {
		return config{}, err
	}
	c.tokendURL = strings.TrimSuffix(c.tokendURL, "/")
	if c.jwksURL == "" {
		c.jwksURL = c.tokendURL + "/.well-known/jwks.json"
	}
	if c.issuer == "" {
		c.issuer = c.tokendURL
	}
	for o := range strings.SplitSeq(origins, ",") {
		if o = strings.TrimSpace(o); o != "" {
			c.origins = append(c.origins, o)
		}
	}
	if c.serviceKey == "" {
		return config{}, errors.New("a tokend service key is required (-service-key or TOKEND_SERVICE_KEY): without the revocation stream, revoked sessions would keep their sockets")
	}
	return c, nil
}

// run serves until ctx ends.
func run(ctx context.Context, args []string, getenv func(string) string, stderr io.Writer) error {
	cfg, err := loadConfig(args, getenv, stderr)
	if err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(stderr, nil))
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	v, err := verify.New(ctx, verify.Config{JWKSURL: cfg.jwksURL, Issuer: cfg.issuer, Audience: cfg.audience})
	if err != nil {
		return err
	}
	srv := realtime.New(v, realtime.Config{OriginPatterns: cfg.origins, Logger: log})

	feedErr := make(chan error, 1)
	go func() {
		feedErr <- v.Subscribe(ctx, verify.Feed{
			URL:        cfg.tokendURL,
			ServiceKey: cfg.serviceKey,
			OnConnect:  func() { log.Info("following tokend's revocation stream", slog.String("tokend", cfg.tokendURL)) },
			OnError: func(err error) {
				log.Warn("revocation stream interrupted; reconnecting", slog.Any("error", err))
			},
		}, srv.Revoked)
	}()

	mux := http.NewServeMux()
	mux.Handle("GET /ws", srv)
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) { fmt.Fprintln(w, "ok") })
	ln, err := net.Listen("tcp", cfg.addr)
	if err != nil {
		return err
	}
	hs := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	serveErr := make(chan error, 1)
	go func() { serveErr <- hs.Serve(ln) }()
	log.Info("wsserver listening", slog.String("addr", ln.Addr().String()), slog.String("audience", cfg.audience))

	select {
	case err := <-serveErr:
		return err
	case err := <-feedErr:
		if err != nil {
			_ = hs.Close()
			return err
		}
	case <-ctx.Done():
	}
	shutdownCtx, stop := context.WithTimeout(context.Background(), 5*time.Second)
	defer stop()
	// Websockets are hijacked: Shutdown does not wait for them, and they
	// end with the process.
	return hs.Shutdown(shutdownCtx)
}
