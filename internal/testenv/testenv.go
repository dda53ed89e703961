// Package testenv gives tokend's tests the external services they talk to:
// a fresh database per test on the shared PostgreSQL (TEST_DATABASE_URL),
// the shared test Redis (TOKEND_TEST_REDIS_URL), and throw-away PostgreSQL
// and Redis servers that a test may stop and restart.
//
// A test that needs a service FAILS when the service is missing; it never
// skips. CI must not go green by testing nothing. Run
// scripts/ensure-services.sh (or `make test`) to start the services locally.
//
// Tests sharing one server must not see each other's data: each takes its
// own database or a unique key prefix (RedisPrefix) and never flushes the
// server.
package testenv

import (
	"crypto/rand"
	"encoding/hex"
	"net"
	"net/url"
	"strconv"
	"strings"
	"testing"
)

// uniqueName returns t's name reduced to characters that are safe in keys,
// database names and glob patterns, followed by a random suffix, so that
// repeated and concurrent runs of the same test never collide.
func uniqueName(t testing.TB) string {
	name := strings.Map(func(r rune) rune {
		switch {
		case 'a' <= r && r <= 'z', 'A' <= r && r <= 'Z', '0' <= r && r <= '9', r == '_', r == '-':
			return r
		}
		return '_'
	}, t.Name())
	if len(name) > 64 {
		name = name[:64]
	}
	var b [6]byte
	_, _ = rand.Read(b[:])
	return name + "_" + hex.EncodeToString(b[:])
}

// redactURL returns raw with any password replaced, for messages.
func redactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "(unparsable URL)"
	}
	return u.Redacted()
}

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func FreePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("testenv: find a free port: %v", err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	if err := ln.Close(); err != nil {
		t.Fatalf("testenv: find a free port: %v", err)
	}
	return port
}

func itoa(n int) string { return strconv.Itoa(n) }
