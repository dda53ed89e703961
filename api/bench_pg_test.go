package api

import (
	"context"
	"net/http"
	"net/http/httptest"
	"syscall"
	"testing"
	"time"

	"github.com/tokend/tokend/internal/testenv"
	"github.com/tokend/tokend/issuer"
	"github.com/tokend/tokend/session"
	"github.com/tokend/tokend/store/postgres"
	"github.com/tokend/tokend/store/ratelimit"
	redisstore "github.com/tokend/tokend/store/redis"
)

// processCPU is the CPU time (user + system) this process has used.
func processCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// reportCPU adds a cpu-ns/op metric: CPU the process spent per operation,
// which is what a token costs the service (wall time per op also contains
// the wait for PostgreSQL and Redis).
func reportCPU(b *testing.B, start time.Duration) {
	b.ReportMetric(float64(processCPU()-start)/float64(b.N), "cpu-ns/op")
}

// BenchmarkTokenEndpointPostgresRedis is the production token path through
// the real router: sessions and keys in PostgreSQL (read through the
// session cache), rate limits per IP and per session in Redis, shedding on.
func BenchmarkTokenEndpointPostgresRedis(b *testing.B) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	kek := make([]byte, 32)
	pg, err := postgres.Open(ctx, testenv.DatabaseURL(b), postgres.Options{KEK: kek, CacheWarmUp: time.Millisecond})
	if err != nil {
		b.Fatal(err)
	}
	defer pg.Close()
	if err := pg.Migrate(ctx); err != nil {
		b.Fatal(err)
	}
	go pg.Run(ctx)
	iss, err := issuer.New("https://tokend.example.com", []string{"realtime"})
	if err != nil {
		b.Fatal(err)
	}
	ring := issuer.NewKeyring(iss, pg, issuer.KeyringConfig{Algorithm: issuer.ES256, PublishDelay: time.Minute, RetireAfter: time.Hour}, nil, nil)
	if err := ring.Init(ctx); err != nil {
		b.Fatal(err)
	}
	client, err := redisstore.NewClient(testenv.RedisURL(b))
	if err != nil {
		b.Fatal(err)
	}
	defer client.Close()
	limiter := ratelimit.NewFallback(redisstore.NewLimiter(client, testenv.RedisPrefix(b)), ratelimit.FallbackOptions{})
	huge := ratelimit.Limit{Rate: 1_000_000, Period: time.Second, Burst: 1_000_000}
	svc := session.NewService(pg, iss, session.Config{})
	h := NewServer(Options{
		Sessions: svc,
		Keys:     iss,
		Config: Config{
			Cookie: Cookie{Name: "tokend_session", Path: "/v1"},
			Protection: Protection{Limiter: limiter, IPLimit: huge, SessionLimit: huge,
				MaxInflight: DefaultMaxInflight(), MaxQueue: DefaultMaxInflight()},
		},
	})
	created, err := svc.Create(ctx, session.CreateRequest{Subject: "user-1234567"})
	if err != nil {
		b.Fatal(err)
	}
	req := httptest.NewRequest(http.MethodPost, "/v1/token", nil)
	req.Header.Set("Cookie", "tokend_session="+created.Credentials.String())
	w := &discardWriter{h: http.Header{}}
	// Warm the pools and the session cache (past its warm-up).
	for range 2 {
		time.Sleep(20 * time.Millisecond)
		w.reset()
		h.ServeHTTP(w, req)
		if w.status != http.StatusOK {
			b.Fatalf("status %d", w.status)
		}
	}
	if limiter.Stats().Degraded {
		b.Fatal("the Redis limiter is not in use")
	}
	b.Run("serial", func(b *testing.B) {
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
	// In parallel, as under load: the CPUs stay busy while requests wait
	// for Redis, so the CPU per token is what it costs a loaded server
	// (serially, the scheduler's spinning while idle is counted too).
	b.Run("parallel", func(b *testing.B) {
		b.SetParallelism(8)
		b.ReportAllocs()
		start := processCPU()
		b.RunParallel(func(pb *testing.PB) {
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
	if limiter.Stats().LocalDecisions > 0 {
		b.Fatalf("%d decisions fell back to the local limiter", limiter.Stats().LocalDecisions)
	}
}
