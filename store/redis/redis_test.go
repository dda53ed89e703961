package redis_test

import (
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/tokend/tokend/internal/testenv"
	"github.com/tokend/tokend/store/ratelimit"
	redisstore "github.com/tokend/tokend/store/redis"
)

// newLimiter returns a limiter on its own client (as each tokend instance
// has) for the shared test Redis.
func newLimiter(t *testing.T, prefix string) *redisstore.Limiter {
	t.Helper()
	testenv.RedisClient(t) // fails the test clearly when Redis is missing
	client, err := redisstore.NewClient(testenv.RedisURL(t))
	if err != nil {
		t.Fatalf("NewClient: %v", err)
	}
	t.Cleanup(func() { _ = client.Close() })
	return redisstore.NewLimiter(client, prefix)
}

func mustAllow(t *testing.T, l ratelimit.Limiter, key string, lim ratelimit.Limit) ratelimit.Result {
	t.Helper()
	res, err := l.Allow(context.Background(), key, lim)
	if err != nil {
		t.Fatalf("Allow(%q): %v", key, err)
	}
	return res
}

func TestLimiterBurstThenRefusal(t *testing.T) {
	prefix := testenv.RedisPrefix(t)
	l := newLimiter(t, prefix)
	lim := ratelimit.Limit{Rate: 3, Period: time.Minute, Burst: 3}

	for i, want := range []int{2, 1, 0} {
		res := mustAllow(t, l, "k", lim)
		if !res.Allowed || res.Remaining != want || res.RetryAfter != 0 || res.ResetAfter <= 0 {
			t.Fatalf("event %d: %+v, want allowed with %d remaining", i+1, res, want)
		}
	}
	res := mustAllow(t, l, "k", lim)
	if res.Allowed || res.RetryAfter <= 0 || res.RetryAfter > 20*time.Second || res.ResetAfter <= 0 {
		t.Fatalf("4th event: %+v, want refused with RetryAfter in (0, 20s]", res)
	}
	if res := mustAllow(t, l, "other", lim); !res.Allowed || res.Remaining != 2 {
		t.Fatalf("another key: %+v, want a fresh budget", res)
	}
	if res := mustAllow(t, l, "k", ratelimit.Limit{}); !res.Allowed {
		t.Fatalf("off limit refused: %+v", res)
	}

	// The state lives under our prefix and expires by itself, so that the
	// limiter cannot fill Redis with dead keys.
	c := testenv.RedisClient(t)
	ctx := context.Background()
	keys, err := c.Keys(ctx, "*"+prefix+"*").Result()
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != 2 {
		t.Fatalf("keys under the prefix: %q, want 2 (k and other)", keys)
	}
	for _, k := range keys {
		ttl, err := c.TTL(ctx, k).Result()
		if err != nil {
			t.Fatal(err)
		}
		if ttl <= 0 || ttl > time.Minute+time.Second {
			t.Errorf("key %s has TTL %v, want one in (0, 1m]", k, ttl)
		}
	}
}

// Two tokend instances have two clients: they must share one budget.
func TestLimiterSharedByTwoClients(t *testing.T) {
	prefix := testenv.RedisPrefix(t)
	a, b := newLimiter(t, prefix), newLimiter(t, prefix)
	lim := ratelimit.Limit{Rate: 4, Period: time.Minute, Burst: 4}
	for i, l := range []*redisstore.Limiter{a, b, a, b} {
		if res := mustAllow(t, l, "s:shared", lim); !res.Allowed || res.Remaining != 3-i {
			t.Fatalf("event %d: %+v, want allowed with %d remaining", i+1, res, 3-i)
		}
	}
	for name, l := range map[string]*redisstore.Limiter{"a": a, "b": b} {
		if res := mustAllow(t, l, "s:shared", lim); res.Allowed {
			t.Fatalf("instance %s: 5th event allowed: %+v", name, res)
		}
	}

	// Another prefix (another deployment) has budgets of its own.
	c := newLimiter(t, testenv.RedisPrefix(t))
	if res := mustAllow(t, c, "s:shared", lim); !res.Allowed {
		t.Fatalf("another prefix shares the budget: %+v", res)
	}
}

func TestLimiterErrorWhenRedisDown(t *testing.T) {
	port := testenv.FreePort(t) // nothing listens there
	client, err := redisstore.NewClient("redis://127.0.0.1:" + strconv.Itoa(port) + "/0")
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	l := redisstore.NewLimiter(client, "test:")
	res, err := l.Allow(context.Background(), "k", ratelimit.Limit{Rate: 1, Period: time.Second, Burst: 1})
	if err == nil {
		t.Fatalf("Allow with Redis down = %+v, nil; want an error (not a refusal)", res)
	}
	if res.Allowed || !strings.Contains(err.Error(), "redis rate limit") {
		t.Fatalf("Allow with Redis down = %+v, %v", res, err)
	}
	// An off limit needs no Redis.
	if res, err := l.Allow(context.Background(), "k", ratelimit.Limit{}); err != nil || !res.Allowed {
		t.Fatalf("off limit with Redis down = %+v, %v", res, err)
	}
}

func TestNewClientSingle(t *testing.T) {
	for _, tc := range []struct {
		url            string
		addr, user, pw string
		db             int
		tls            bool
		dialTimeout    time.Duration
		readTimeout    time.Duration
		poolSize       int
	}{
		{url: "redis://localhost:6379", addr: "localhost:6379", dialTimeout: 500 * time.Millisecond, readTimeout: 250 * time.Millisecond},
		{url: "redis://redis.internal", addr: "redis.internal:6379", dialTimeout: 500 * time.Millisecond, readTimeout: 250 * time.Millisecond},
		{url: "redis://:s3cret@10.0.0.5:6380/2", addr: "10.0.0.5:6380", pw: "s3cret", db: 2, dialTimeout: 500 * time.Millisecond, readTimeout: 250 * time.Millisecond},
		{url: "redis://tokend:s3cret@[::1]:6379/3", addr: "[::1]:6379", user: "tokend", pw: "s3cret", db: 3, dialTimeout: 500 * time.Millisecond, readTimeout: 250 * time.Millisecond},
		{url: "rediss://:s3cret@cache.example:6380/1", addr: "cache.example:6380", pw: "s3cret", db: 1, tls: true, dialTimeout: 500 * time.Millisecond, readTimeout: 250 * time.Millisecond},
		// Query options pass through; I/O timeouts cannot exceed the
		// adapter's bound, which keeps a slow Redis from holding requests.
		{url: "redis://localhost:6379?dial_timeout=2s&read_timeout=100ms&pool_size=7", addr: "localhost:6379", dialTimeout: 2 * time.Second, readTimeout: 100 * time.Millisecond, poolSize: 7},
		{url: "redis://localhost:6379?read_timeout=30s", addr: "localhost:6379", dialTimeout: 500 * time.Millisecond, readTimeout: 250 * time.Millisecond},
	} {
		c, err := redisstore.NewClient(tc.url)
		if err != nil {
			t.Errorf("NewClient(%q): %v", tc.url, err)
			continue
		}
		cl, ok := c.(*goredis.Client)
		if !ok {
			t.Errorf("NewClient(%q) is a %T, want *redis.Client", tc.url, c)
			continue
		}
		o := cl.Options()
		if o.Addr != tc.addr || o.Username != tc.user || o.Password != tc.pw || o.DB != tc.db {
			t.Errorf("NewClient(%q): addr %q user %q password %q db %d; want %q %q %q %d",
				tc.url, o.Addr, o.Username, o.Password, o.DB, tc.addr, tc.user, tc.pw, tc.db)
		}
		if (o.TLSConfig != nil) != tc.tls {
			t.Errorf("NewClient(%q): TLS %v, want %v", tc.url, o.TLSConfig != nil, tc.tls)
		}
		if tc.tls && (o.TLSConfig.ServerName != "cache.example" || o.TLSConfig.InsecureSkipVerify) {
			t.Errorf("NewClient(%q): TLS config %+v does not verify the server", tc.url, o.TLSConfig)
		}
		if o.DialTimeout != tc.dialTimeout || o.ReadTimeout != tc.readTimeout || o.WriteTimeout > 250*time.Millisecond {
			t.Errorf("NewClient(%q): dial %v read %v write %v; want dial %v read %v write <= 250ms",
				tc.url, o.DialTimeout, o.ReadTimeout, o.WriteTimeout, tc.dialTimeout, tc.readTimeout)
		}
		// go-redis normalizes MaxRetries -1 (no retries) to 0; unset
		// would read 3. One dial attempt per call: go-redis would otherwise
		// dial a dead server 5 times, 100ms apart, holding the request.
		if o.MaxRetries != 0 || o.DialerRetries != 1 {
			t.Errorf("NewClient(%q): MaxRetries %d, DialerRetries %d; want 0 (none) and 1 (fail fast, fall back)",
				tc.url, o.MaxRetries, o.DialerRetries)
		}
		if tc.poolSize != 0 && o.PoolSize != tc.poolSize {
			t.Errorf("NewClient(%q): pool size %d, want %d", tc.url, o.PoolSize, tc.poolSize)
		}
		_ = c.Close()
	}
}

func TestNewClientCluster(t *testing.T) {
	c, err := redisstore.NewClient("redis://:s3cret@node1:7000?addr=node2:7001&addr=node3:7002&read_timeout=10s")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	cc, ok := c.(*goredis.ClusterClient)
	if !ok {
		t.Fatalf("cluster URL gave a %T, want *redis.ClusterClient", c)
	}
	o := cc.Options()
	if strings.Join(o.Addrs, ",") != "node1:7000,node2:7001,node3:7002" {
		t.Errorf("cluster seeds %q", o.Addrs)
	}
	if o.Password != "s3cret" || o.MaxRetries != -1 || o.DialerRetries != 1 || o.ReadTimeout != 250*time.Millisecond || o.DialTimeout != 500*time.Millisecond {
		t.Errorf("cluster options: password %q retries %d dial retries %d read %v dial %v",
			o.Password, o.MaxRetries, o.DialerRetries, o.ReadTimeout, o.DialTimeout)
	}

	tc, err := redisstore.NewClient("rediss://node1:7000?addr=node2:7001")
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	if o := tc.(*goredis.ClusterClient).Options(); o.TLSConfig == nil || o.TLSConfig.ServerName != "node1" {
		t.Errorf("rediss cluster: TLS config %+v", o.TLSConfig)
	}
}

func TestNewClientSentinel(t *testing.T) {
	c, err := redisstore.NewClient("redis://:s3cret@sentinel1:26379/4?master_name=mymaster&addr=sentinel2:26379&pool_size=9&dial_timeout=3s&read_timeout=10s")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	cl, ok := c.(*goredis.Client)
	if !ok {
		t.Fatalf("sentinel URL gave a %T, want the *redis.Client of a failover client", c)
	}
	o := cl.Options()
	if o.Addr != "FailoverClient" {
		t.Fatalf("sentinel URL gave a plain client for %q, want a failover client", o.Addr)
	}
	if o.Password != "s3cret" || o.DB != 4 || o.MaxRetries != 0 || o.DialerRetries != 1 {
		t.Errorf("sentinel options: password %q db %d retries %d dial retries %d; want s3cret, 4, 0 (none), 1",
			o.Password, o.DB, o.MaxRetries, o.DialerRetries)
	}
	// The documented pass-through of go-redis query options holds for
	// Sentinel too, with the same bounds as for one server.
	if o.PoolSize != 9 || o.DialTimeout != 3*time.Second || o.ReadTimeout != 250*time.Millisecond || o.WriteTimeout != 250*time.Millisecond {
		t.Errorf("sentinel options: pool %d dial %v read %v write %v; want 9, 3s, 250ms, 250ms",
			o.PoolSize, o.DialTimeout, o.ReadTimeout, o.WriteTimeout)
	}

	d, err := redisstore.NewClient("redis://sentinel1:26379?master_name=mymaster")
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if o := d.(*goredis.Client).Options(); o.DialTimeout != 500*time.Millisecond || o.ReadTimeout != 250*time.Millisecond || o.MaxRetries != 0 || o.DialerRetries != 1 {
		t.Errorf("sentinel defaults: dial %v read %v retries %d dial retries %d", o.DialTimeout, o.ReadTimeout, o.MaxRetries, o.DialerRetries)
	}
}

func TestNewClientErrors(t *testing.T) {
	const password = "hunter2-Pa55"
	for _, raw := range []string{
		"",
		"localhost:6379",
		"http://:" + password + "@localhost:6379",
		"unix://:" + password + "@/tmp/redis.sock",
		"redis://:" + password + "@[::1",
		"redis://:" + password + "@host:notaport",
		"redis://:" + password + "@host:6379/notadb",
		"redis://:" + password + "@host:6379/1/2",
		"redis://:" + password + "@host:6379/0?unknown_option=1",
		"redis://:" + password + "@host:6379/0?dial_timeout=banana",
		"redis://:" + password + "@host:7000?addr=bad-addr",
		"redis://:" + password + "@host:7000?addr=host2:7001&dial_timeout=banana",
		"redis://:" + password + "@host:26379?master_name=m&dial_timeout=banana",
		"redis://:" + password + "@host:26379/x?master_name=m",
		"redis://:" + password + "@host:26379?master_name=m&bogus=1",
		"\x00redis://:" + password + "@host",
	} {
		c, err := redisstore.NewClient(raw)
		if err == nil {
			_ = c.Close()
			t.Errorf("NewClient(%q): no error", raw)
			continue
		}
		if strings.Contains(err.Error(), password) {
			t.Errorf("NewClient(%q): the error reveals the password: %v", raw, err)
		}
		if !strings.Contains(err.Error(), "redis") {
			t.Errorf("NewClient(%q): error %q does not say it is about Redis", raw, err)
		}
	}
}
