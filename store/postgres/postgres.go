// Package postgres is tokend's PostgreSQL adapter: sessions and signing
// keys shared by every instance, schema migrations, change notifications
// (LISTEN/NOTIFY) and the in-process session cache they make safe.
package postgres

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/pressly/goose/v3"
	"github.com/pressly/goose/v3/lock"

	"github.com/tokend/tokend/migrations"
	"github.com/tokend/tokend/session"
)

// Notification channels.
const (
	sessionsChannel  = "tokend_sessions"  // payload: a revoked sid
	keysChannel      = "tokend_keys"      // payload: empty; the key set changed
	acksChannel      = "tokend_acks"      // payload: instance id, then the sids it dropped from its cache
	instancesChannel = "tokend_instances" // payload: an instance id ("+id" alive, "-id" leaving)
)

// Advisory lock ids, fixed so that every instance agrees on them.
const (
	migrateLockID int64 = 0x746f6b656e640001 // "tokend" 1
	keysLockID    int64 = 0x746f6b656e640002
	purgeLockID   int64 = 0x746f6b656e640003
	// revocationsLockID serialises appends to the revocation log (held
	// until commit), so that cursors become visible in increasing order.
	revocationsLockID int64 = 0x746f6b656e640004
)

// Options configure a Store.
type Options struct {
	Logger *slog.Logger
	// KEK is the 32-byte key-encryption key sealing private signing keys.
	KEK []byte
	// OpTimeout bounds each database operation on the request path.
	OpTimeout time.Duration
	// CacheSize bounds the in-process session cache (entries); 0 means
	// 100 000, negative disables the cache.
	CacheSize int
	// CacheTTL is how long a cached session is trusted before it is read
	// again, whatever notifications say.
	CacheTTL time.Duration
	// CacheWarmUp is how long after (re)connecting the cache stays unused,
	// so that every other instance has heard this one's announcement and
	// waits for its acknowledgements; 0 means one second.
	CacheWarmUp time.Duration
}

// Store is the PostgreSQL session and key store.
type Store struct {
	pool      *pgxpool.Pool
	log       *slog.Logger
	kek       []byte
	opTimeout time.Duration
	cache     *sessionCache

	peers       *peers
	ackQueue    chan string
	announceNow chan struct{}
	listening   atomic.Bool  // the LISTEN connection is up
	cacheFrom   atomic.Int64 // unix nanoseconds from which the cache may be used
	warmUp      time.Duration
	healthy     atomic.Bool // the last health check reached the database
	keysChanged chan struct{}
	revoked     chan struct{}
}

// Open connects to the database at url. It does not migrate; call Migrate.
func Open(ctx context.Context, url string, o Options) (*Store, error) {
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, errors.New("TOKEND_DATABASE_URL is not a valid PostgreSQL URL") // the URL may hold a password
	}
	if !strings.Contains(url, "pool_max_conns") {
		// pgxpool's default (one per CPU, at least 4) starves a herd of
		// first refreshes, each of which reads its session once; the
		// database serves more concurrent reads than that.
		cfg.MaxConns = int32(max(16, 4*runtime.NumCPU()))
	}
	if cfg.ConnConfig.ConnectTimeout == 0 {
		cfg.ConnConfig.ConnectTimeout = 3 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.OpTimeout <= 0 {
		o.OpTimeout = 3 * time.Second
	}
	if o.CacheTTL <= 0 {
		o.CacheTTL = 30 * time.Second
	}
	if o.CacheWarmUp <= 0 {
		o.CacheWarmUp = time.Second
	}
	if len(o.KEK) != 32 {
		return nil, errors.New("the key-encryption key must be 32 bytes")
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect to PostgreSQL: %w", scrub(err))
	}
	s := &Store{
		pool:        pool,
		log:         o.Logger,
		kek:         append([]byte(nil), o.KEK...),
		opTimeout:   o.OpTimeout,
		warmUp:      o.CacheWarmUp,
		keysChanged: make(chan struct{}, 1),
		revoked:     make(chan struct{}, 1),
	}
	s.peers = newPeers(randomID())
	s.ackQueue = make(chan string, 4096)
	s.announceNow = make(chan struct{}, 1)
	if o.CacheSize >= 0 {
		s.cache = newSessionCache(o.CacheSize, o.CacheTTL)
	}
	pingCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := pool.Ping(pingCtx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("connect to PostgreSQL: %w", scrub(err))
	}
	s.healthy.Store(true)
	return s, nil
}

// Close releases the connections.
func (s *Store) Close() { s.pool.Close() }

// Migrate applies the embedded migrations, holding a PostgreSQL advisory
// lock so that instances starting together apply them once.
func (s *Store) Migrate(ctx context.Context) error {
	db := stdlib.OpenDBFromPool(s.pool)
	defer db.Close()
	return migrate(ctx, db, s.log)
}

func migrate(ctx context.Context, db *sql.DB, log *slog.Logger) error {
	locker, err := lock.NewPostgresSessionLocker(lock.WithLockID(migrateLockID), lock.WithLockTimeout(1, 120))
	if err != nil {
		return err
	}
	p, err := goose.NewProvider(goose.DialectPostgres, db, migrations.FS,
		goose.WithSessionLocker(locker), goose.WithTableName("tokend_schema_migrations"),
		goose.WithDisableGlobalRegistry(true))
	if err != nil {
		return fmt.Errorf("migrations: %w", err)
	}
	results, err := p.Up(ctx)
	if err != nil {
		return fmt.Errorf("apply migrations: %w", scrub(err))
	}
	for _, r := range results {
		log.Info("applied migration", slog.String("migration", r.Source.Path), slog.Duration("took", r.Duration))
	}
	return nil
}

// Healthy reports whether the database answered the last health check.
func (s *Store) Healthy() bool { return s.healthy.Load() }

// KeysChanged fires when another instance changed the signing keys.
func (s *Store) KeysChanged() <-chan struct{} { return s.keysChanged }

// RevocationNotices fires when a revocation is announced through NOTIFY,
// by any instance (this one included), so that readers of the revocation
// log on this instance can look at once instead of at their next poll.
func (s *Store) RevocationNotices() <-chan struct{} { return s.revoked }

// Run keeps the LISTEN connection and the health check going until ctx
// ends.
func (s *Store) Run(ctx context.Context) {
	go s.healthLoop(ctx)
	go s.ackLoop(ctx)
	go s.announceLoop(ctx)
	s.listenLoop(ctx)
	// Tell the others not to wait for this instance's acknowledgements.
	bye, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
	defer cancel()
	_, _ = s.pool.Exec(bye, `SELECT pg_notify($1, $2)`, instancesChannel, "-"+s.peers.self)
}

func (s *Store) healthLoop(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		pctx, cancel := context.WithTimeout(ctx, time.Second)
		err := s.pool.Ping(pctx)
		cancel()
		was := s.healthy.Swap(err == nil)
		switch {
		case err != nil && was && ctx.Err() == nil:
			s.log.Warn("PostgreSQL is unreachable", slog.Any("error", scrub(err)))
		case err == nil && !was:
			s.log.Info("PostgreSQL is reachable again")
		}
	}
}

// op returns a context bounded by the operation timeout.
func (s *Store) op(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, s.opTimeout)
}

// classify wraps errors that mean "the database is not there right now" in
// session.ErrUnavailable, so that clients get 503 with Retry-After.
func classify(err error) error {
	if err == nil {
		return nil
	}
	var (
		pgErr   *pgconn.PgError
		netErr  net.Error
		connErr *pgconn.ConnectError
	)
	switch {
	case errors.Is(err, context.DeadlineExceeded), pgconn.Timeout(err),
		errors.As(err, &connErr), errors.As(err, &netErr),
		errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF),
		errors.Is(err, net.ErrClosed), pgconn.SafeToRetry(err):
		return fmt.Errorf("%w: %v", session.ErrUnavailable, scrub(err))
	case errors.As(err, &pgErr):
		switch pgErr.Code[:2] {
		case "08", "53", "57": // connection exception, insufficient resources, operator intervention
			return fmt.Errorf("%w: %v", session.ErrUnavailable, err)
		}
		if pgErr.Code == "40001" || pgErr.Code == "40P01" { // serialization failure, deadlock
			return fmt.Errorf("%w: %v", session.ErrUnavailable, err)
		}
	}
	return err
}

// scrub removes connection details (which may include a password) from
// pgx's connection errors.
func scrub(err error) error {
	var connErr *pgconn.ConnectError
	if errors.As(err, &connErr) {
		return fmt.Errorf("cannot connect to PostgreSQL: %v", errors.Unwrap(connErr))
	}
	return err
}
