// Package redis is tokend's Redis adapter: the client built from
// TOKEND_REDIS_URL (one server, a Sentinel-managed primary or a Cluster) and
// the shared rate limiter on top of it.
package redis

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"time"

	"github.com/go-redis/redis_rate/v10"
	goredis "github.com/redis/go-redis/v9"

	"github.com/tokend/tokend/store/ratelimit"
)

// Timeouts keep a slow or dead Redis from holding requests: the rate limiter
// falls back to per-instance limits instead of waiting.
const (
	dialTimeout = 500 * time.Millisecond
	ioTimeout   = 250 * time.Millisecond
	poolTimeout = 250 * time.Millisecond
)

// NewClient returns a client for url, which has one of these forms:
//
//	redis://[user:password@]host:port[/db]            one server
//	rediss://...                                       the same over TLS
//	redis://host:port?addr=host2:port&addr=host3:port  a Redis Cluster (seed nodes)
//	redis://host:port?master_name=NAME[&addr=...]      Sentinel: the addresses are sentinels
//
// Options that go-redis understands in the query (pool_size, dial_timeout,
// ...) are passed through. The returned client is not connected yet.
func NewClient(rawURL string) (goredis.UniversalClient, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, errors.New("redis URL is not a valid URL")
	}
	if u.Scheme != "redis" && u.Scheme != "rediss" {
		return nil, fmt.Errorf("redis URL scheme must be redis or rediss, not %q", u.Scheme)
	}
	q := u.Query()
	masterName := q.Get("master_name")
	extra := q["addr"]
	switch {
	case masterName != "":
		q.Del("master_name")
		q.Del("addr")
		u.RawQuery = q.Encode()
		opt, err := goredis.ParseURL(u.String())
		if err != nil {
			return nil, cleanErr(err)
		}
		setDefaults(opt)
		addrs := append([]string{opt.Addr}, extra...)
		return goredis.NewFailoverClient(&goredis.FailoverOptions{
			MasterName:    masterName,
			SentinelAddrs: addrs,
			ClientName:    opt.ClientName,
			Protocol:      opt.Protocol,
			Username:      opt.Username,
			Password:      opt.Password,
			DB:            opt.DB,
			TLSConfig:     opt.TLSConfig,
			// The query options parsed above, bounded by setDefaults.
			DialTimeout:     opt.DialTimeout,
			DialerRetries:   opt.DialerRetries,
			ReadTimeout:     opt.ReadTimeout,
			WriteTimeout:    opt.WriteTimeout,
			PoolTimeout:     opt.PoolTimeout,
			PoolFIFO:        opt.PoolFIFO,
			PoolSize:        opt.PoolSize,
			MinIdleConns:    opt.MinIdleConns,
			MaxIdleConns:    opt.MaxIdleConns,
			MaxActiveConns:  opt.MaxActiveConns,
			ConnMaxIdleTime: opt.ConnMaxIdleTime,
			ConnMaxLifetime: opt.ConnMaxLifetime,
			MaxRetries:      opt.MaxRetries,
		}), nil
	case len(extra) > 0:
		opt, err := goredis.ParseClusterURL(rawURL)
		if err != nil {
			return nil, cleanErr(err)
		}
		setClusterDefaults(opt)
		return goredis.NewClusterClient(opt), nil
	default:
		opt, err := goredis.ParseURL(rawURL)
		if err != nil {
			return nil, cleanErr(err)
		}
		setDefaults(opt)
		return goredis.NewClient(opt), nil
	}
}

func setDefaults(o *goredis.Options) {
	if o.DialTimeout == 0 { // not set in the URL
		o.DialTimeout = dialTimeout
	}
	o.ReadTimeout = min(nonZero(o.ReadTimeout, ioTimeout), ioTimeout)
	o.WriteTimeout = min(nonZero(o.WriteTimeout, ioTimeout), ioTimeout)
	o.PoolTimeout = min(nonZero(o.PoolTimeout, poolTimeout), poolTimeout)
	// A limiter call that fails falls back at once; retrying against a
	// dead server would only hold the request.
	o.MaxRetries = -1
	if o.DialerRetries == 0 { // go-redis would dial 5 times, 100ms apart
		o.DialerRetries = 1
	}
}

func setClusterDefaults(o *goredis.ClusterOptions) {
	if o.DialTimeout == 0 {
		o.DialTimeout = dialTimeout
	}
	o.ReadTimeout = min(nonZero(o.ReadTimeout, ioTimeout), ioTimeout)
	o.WriteTimeout = min(nonZero(o.WriteTimeout, ioTimeout), ioTimeout)
	o.PoolTimeout = min(nonZero(o.PoolTimeout, poolTimeout), poolTimeout)
	o.MaxRetries = -1
	if o.DialerRetries == 0 {
		o.DialerRetries = 1
	}
}

func nonZero(d, def time.Duration) time.Duration {
	if d <= 0 {
		return def
	}
	return d
}

// cleanErr drops the URL from go-redis's parse errors: it may hold a password.
func cleanErr(err error) error {
	var uerr *url.Error
	if errors.As(err, &uerr) {
		return fmt.Errorf("redis URL: %v", uerr.Err)
	}
	return fmt.Errorf("redis URL: %v", err)
}

// Limiter is the shared GCRA rate limiter, one Redis key per limited key.
// It implements ratelimit.Limiter.
type Limiter struct {
	rl     *redis_rate.Limiter
	prefix string
}

// NewLimiter returns a limiter whose keys start with prefix (for example
// "tokend:"), so that several deployments can share one Redis.
func NewLimiter(client goredis.UniversalClient, prefix string) *Limiter {
	return &Limiter{rl: redis_rate.NewLimiter(client), prefix: prefix}
}

// Allow implements ratelimit.Limiter.
func (l *Limiter) Allow(ctx context.Context, key string, lim ratelimit.Limit) (ratelimit.Result, error) {
	if lim.Off() {
		return ratelimit.Result{Allowed: true, Remaining: lim.Burst}, nil
	}
	res, err := l.rl.Allow(ctx, l.prefix+key, redis_rate.Limit{Rate: lim.Rate, Period: lim.Period, Burst: lim.Burst})
	if err != nil {
		return ratelimit.Result{}, fmt.Errorf("redis rate limit: %w", err)
	}
	out := ratelimit.Result{
		Allowed:    res.Allowed > 0,
		Remaining:  res.Remaining,
		ResetAfter: res.ResetAfter,
	}
	if !out.Allowed {
		out.RetryAfter = res.RetryAfter
	}
	return out, nil
}

// UseLogger sends go-redis's own messages (pool and connection trouble)
// to logger at warning level instead of the standard library's logger. It
// is process-wide.
func UseLogger(logger *slog.Logger) { goredis.SetLogger(slogLogger{logger}) }

type slogLogger struct{ l *slog.Logger }

func (s slogLogger) Printf(ctx context.Context, format string, v ...any) {
	s.l.WarnContext(ctx, "redis client", slog.String("message", fmt.Sprintf(format, v...)))
}
