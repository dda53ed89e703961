package api

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/tokend/tokend/issuer"
	"github.com/tokend/tokend/session"
	"github.com/tokend/tokend/store/memory"
	"github.com/tokend/tokend/store/ratelimit"
)

// benchServer is the in-memory service exactly as cmd/tokend wires it, and
// the cookie of one live session.
func benchServer(b *testing.B, p Protection) (http.Handler, string) {
	b.Helper()
	now := time.Now()
	key, err := issuer.GenerateKey(issuer.ES256, now)
	if err != nil {
		b.Fatal(err)
	}
	iss, err := issuer.New("https://tokend.example.com", []string{"realtime"})
	if err != nil {
		b.Fatal(err)
	}
	if err := iss.SetKeys(&key, []issuer.Key{key}); err != nil {
		b.Fatal(err)
	}
	svc := session.NewService(memory.New(), iss, session.Config{})
	h := NewServer(Options{
		Sessions: svc,
		Keys:     iss,
		Config: Config{
			Cookie:      Cookie{Name: "tokend_session", Path: "/v1", SameSite: http.SameSiteStrictMode},
			ServiceKeys: []string{"svc-bench-0123456789"},
			Protection:  p,
		},
	})
	created, err := svc.Create(context.Background(), session.CreateRequest{
		Subject: "user-1234567", Claims: json.RawMessage(`{"role":"editor","tenant":"acme"}`)})
	if err != nil {
		b.Fatal(err)
	}
	return h, "tokend_session=" + created.Credentials.String()
}

// discardWriter is a ResponseWriter that keeps nothing but the status, so
// that benchmarks measure the server and not a recorder.
type discardWriter struct {
	h      http.Header
	status int
	n      int
}

func (w *discardWriter) Header() http.Header { return w.h }
func (w *discardWriter) WriteHeader(s int)   { w.status = s }
func (w *discardWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = 200
	}
	w.n += len(p)
	return len(p), nil
}
func (w *discardWriter) reset() {
	clear(w.h)
	w.status, w.n = 0, 0
}

// BenchmarkTokenEndpoint is the in-memory mint path through the real router:
// middleware, cookie parsing, session lookup and rules, signing, JSON.
// Compare it with issuer's BenchmarkES256Signature from the same run.
func BenchmarkTokenEndpoint(b *testing.B) {
	cases := []struct {
		name string
		p    Protection
	}{
		{"unprotected", Protection{}},
		{"shedding+local-limits", Protection{
			Limiter:      ratelimit.NewFallback(nil, ratelimit.FallbackOptions{}),
			IPLimit:      ratelimit.Limit{Rate: 1_000_000, Period: time.Second, Burst: 1_000_000},
			SessionLimit: ratelimit.Limit{Rate: 1_000_000, Period: time.Second, Burst: 1_000_000},
			MaxInflight:  DefaultMaxInflight(), MaxQueue: DefaultMaxInflight(),
		}},
	}
	for _, c := range cases {
		b.Run(c.name, func(b *testing.B) {
			h, cookie := benchServer(b, c.p)
			req := httptest.NewRequest(http.MethodPost, "/v1/token", nil)
			req.Header.Set("Cookie", cookie)
			w := &discardWriter{h: http.Header{}}
			b.ReportAllocs()
			start := processCPU()
			for b.Loop() {
				w.reset()
				h.ServeHTTP(w, req)
				if w.status != http.StatusOK {
					b.Fatalf("status %d", w.status)
				}
			}
			reportCPU(b, start)
		})
	}
	b.Run("parallel", func(b *testing.B) {
		h, cookie := benchServer(b, Protection{})
		b.SetParallelism(8)
		b.ReportAllocs()
		start := processCPU()
		b.RunParallel(func(pb *testing.PB) {
			req := httptest.NewRequest(http.MethodPost, "/v1/token", nil)
			req.Header.Set("Cookie", cookie)
			w := &discardWriter{h: http.Header{}}
			for pb.Next() {
				w.reset()
				h.ServeHTTP(w, req)
				if w.status != http.StatusOK {
					b.Errorf("status %d", w.status)
					return
				}
			}
		})
		reportCPU(b, start)
	})
}

// BenchmarkJWKS serves the key set through the handler NewServer returns,
// fresh (200) and revalidated (304).
func BenchmarkJWKS(b *testing.B) {
	h, _ := benchServer(b, Protection{})
	probe := httptest.NewRecorder()
	h.ServeHTTP(probe, httptest.NewRequest(http.MethodGet, "/.well-known/jwks.json", nil))
	etag := probe.Header().Get("ETag")
	if etag == "" {
		b.Fatal("no ETag")
	}
	for _, c := range []struct {
		name   string
		inm    string
		status int
	}{{"200", "", http.StatusOK}, {"304", etag, http.StatusNotModified}} {
		b.Run(c.name, func(b *testing.B) {
			req := httptest.NewRequest(http.MethodGet, "/.well-known/jwks.json", nil)
			if c.inm != "" {
				req.Header.Set("If-None-Match", c.inm)
			}
			w := &discardWriter{h: http.Header{}}
			b.ReportAllocs()
			for b.Loop() {
				w.reset()
				h.ServeHTTP(w, req)
				if w.status != c.status {
					b.Fatalf("status %d", w.status)
				}
			}
		})
	}
}

// BenchmarkJWKSHandler is the JWKS handler function alone.
func BenchmarkJWKSHandler(b *testing.B) {
	key, err := issuer.GenerateKey(issuer.ES256, time.Now())
	if err != nil {
		b.Fatal(err)
	}
	iss, err := issuer.New("https://tokend.example.com", []string{"realtime"})
	if err != nil {
		b.Fatal(err)
	}
	if err := iss.SetKeys(&key, []issuer.Key{key}); err != nil {
		b.Fatal(err)
	}
	handler := newServer(Options{Keys: iss}).handleJWKS()
	etag := iss.JWKS().ETag
	for _, c := range []struct {
		name   string
		inm    string
		status int
	}{{"200", "", http.StatusOK}, {"304", etag, http.StatusNotModified}} {
		b.Run(c.name, func(b *testing.B) {
			req := httptest.NewRequest(http.MethodGet, "/.well-known/jwks.json", nil)
			if c.inm != "" {
				req.Header.Set("If-None-Match", c.inm)
			}
			w := &discardWriter{h: http.Header{}}
			b.ReportAllocs()
			for b.Loop() {
				w.reset()
				handler(w, req)
				if w.status != c.status {
					b.Fatalf("status %d", w.status)
				}
			}
		})
	}
}
