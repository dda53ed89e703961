package testenv

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"sync"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"
)

// DefaultRedisURL is the test Redis that scripts/ensure-services.sh provides.
const DefaultRedisURL = "redis://127.0.0.1:6379/0"

// RedisURL returns the URL of the shared test Redis: TOKEND_TEST_REDIS_URL,
// or DefaultRedisURL.
func RedisURL(t testing.TB) string {
	t.Helper()
	if u := os.Getenv("TOKEND_TEST_REDIS_URL"); u != "" {
		return u
	}
	return DefaultRedisURL
}

// RedisClient returns a plain client for the shared test Redis (a single
// server), closed when t ends. It fails t, with a message saying how to
// provide one, when that Redis does not answer.
func RedisClient(t testing.TB) *goredis.Client {
	t.Helper()
	raw := RedisURL(t)
	opt, err := goredis.ParseURL(raw)
	if err != nil {
		t.Fatalf("testenv: TOKEND_TEST_REDIS_URL=%s: %v", redactURL(raw), err)
	}
	c := goredis.NewClient(opt)
	t.Cleanup(func() { _ = c.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if err := c.Ping(ctx).Err(); err != nil {
		t.Fatalf("testenv: the test Redis at %s does not answer (%v). These tests need it and never skip: "+
			"run scripts/ensure-services.sh, or point TOKEND_TEST_REDIS_URL at a Redis you may write to.",
			redactURL(raw), err)
	}
	return c
}

// RedisPrefix returns a key prefix unique to this run of t, such as
// "test:TestX_1a2b3c4d5e6f:". Keys containing it are deleted from the shared
// test Redis when t ends (best effort: rate-limit keys expire anyway).
func RedisPrefix(t testing.TB) string {
	t.Helper()
	c := RedisClient(t)
	prefix := "test:" + uniqueName(t) + ":"
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		// Keys may carry a library's own prefix before ours ("rate:"), so
		// match anywhere; the name is reduced to glob-safe characters.
		iter := c.Scan(ctx, 0, "*"+prefix+"*", 1000).Iterator()
		var keys []string
		for iter.Next(ctx) {
			keys = append(keys, iter.Val())
		}
		if len(keys) > 0 {
			_ = c.Del(ctx, keys...).Err()
		}
	})
	return prefix
}

// RedisServer is a redis-server process owned by one test, on a port of its
// own, without persistence. Kill and Start let a test simulate an outage.
type RedisServer struct {
	t    testing.TB
	bin  string
	port int

	mu  sync.Mutex
	cmd *exec.Cmd
	out *bytes.Buffer
}

// StartRedis starts redis-server on 127.0.0.1:port (0: a free port) and
// waits until it answers. The server is killed when t ends. It fails t when
// the redis-server binary is not installed.
func StartRedis(t testing.TB, port int) *RedisServer {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		t.Fatalf("testenv: redis-server is not installed (%v); this test starts and kills its own Redis "+
			"and never skips: install it (apt-get install redis-server) or run scripts/ensure-services.sh", err)
	}
	if port == 0 {
		port = FreePort(t)
	}
	s := &RedisServer{t: t, bin: bin, port: port}
	t.Cleanup(func() {
		s.Kill()
	})
	s.Start()
	return s
}

// Addr is the server's host:port.
func (s *RedisServer) Addr() string { return "127.0.0.1:" + itoa(s.port) }

// URL is a redis:// URL for the server.
func (s *RedisServer) URL() string { return "redis://" + s.Addr() + "/0" }

// Start (re)starts the server on its port and waits until it answers. It
// fails the test if the server is already running or does not come up.
func (s *RedisServer) Start() {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd != nil {
		s.t.Fatalf("testenv: redis-server on port %d is already running", s.port)
	}
	out := new(bytes.Buffer)
	cmd := exec.Command(s.bin,
		"--port", itoa(s.port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--daemonize", "no")
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		s.t.Fatalf("testenv: start redis-server: %v", err)
	}
	s.cmd, s.out = cmd, out

	c := goredis.NewClient(&goredis.Options{Addr: s.Addr(), MaxRetries: -1, DialTimeout: 200 * time.Millisecond})
	defer c.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
		err := c.Ping(ctx).Err()
		cancel()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			s.cmd = nil
			s.t.Fatalf("testenv: redis-server on port %d did not answer: %v\n%s", s.port, err, out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Kill stops the server at once (SIGKILL, by its PID) and waits for it to
// exit. It does nothing if the server is not running.
func (s *RedisServer) Kill() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		return
	}
	_ = s.cmd.Process.Kill()
	_ = s.cmd.Wait()
	s.cmd = nil
}

// Client returns a plain client for the server, closed when the test ends.
func (s *RedisServer) Client() *goredis.Client {
	c := goredis.NewClient(&goredis.Options{Addr: s.Addr()})
	s.t.Cleanup(func() { _ = c.Close() })
	return c
}
