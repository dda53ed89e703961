package postgres_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tokend/tokend/internal/testenv"
	"github.com/tokend/tokend/issuer"
	"github.com/tokend/tokend/migrations"
	"github.com/tokend/tokend/session"
	"github.com/tokend/tokend/store/postgres"
	"github.com/tokend/tokend/store/storetest"
)

// testKEK seals the signing keys of every store in these tests but one.
var testKEK = bytes.Repeat([]byte{0x4b}, 32)

var base = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)

// open opens a store on url without migrating it. The store is closed when
// t ends.
func open(t *testing.T, url string, kek []byte) *postgres.Store {
	t.Helper()
	s, err := postgres.Open(context.Background(), url, postgres.Options{KEK: kek, CacheWarmUp: 100 * time.Millisecond})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(s.Close)
	return s
}

// startStore opens and migrates a store on url and runs it (runStore).
func startStore(t *testing.T, url string, kek []byte) *postgres.Store {
	t.Helper()
	s := open(t, url, kek)
	if err := s.Migrate(context.Background()); err != nil {
		t.Fatalf("Migrate: %v", err)
	}
	runStore(t, s)
	return s
}

// runStore runs s's background loops until t ends. It returns once s
// listens for notifications.
func runStore(t *testing.T, s *postgres.Store) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.Run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	// The listener signals KeysChanged each time it (re)connects: keys may
	// have changed while nobody listened.
	select {
	case <-s.KeysChanged():
	case <-time.After(10 * time.Second):
		t.Fatal("the store did not start listening for notifications within 10s")
	}
	// And once its cache is in use, after the warm-up.
	for deadline := time.Now().Add(10 * time.Second); !s.CacheReady(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the store's cache was not in use 10s after it started listening")
		}
	}
}

// connect returns a plain connection to url, for looking at what the store
// wrote.
func connect(t *testing.T, url string) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), url)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	t.Cleanup(func() { _ = conn.Close(context.Background()) })
	return conn
}

func newID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return base64.RawURLEncoding.EncodeToString(b[:])
}

func newSession(subject string, created, expires time.Time) session.Session {
	id := newID()
	return session.Session{
		ID: id, Subject: subject, SecretHash: session.HashSecret(id),
		CreatedAt: created, ExpiresAt: expires, CookieExpiresAt: expires, LastSeenAt: created,
	}
}

func TestContract(t *testing.T) {
	storetest.Run(t, func(t *testing.T) session.Store {
		return startStore(t, testenv.DatabaseURL(t), testKEK)
	})
}

func TestMigrate(t *testing.T) {
	ctx := context.Background()

	t.Run("FromEmptyAndAgain", func(t *testing.T) {
		url := testenv.DatabaseURL(t)
		s := open(t, url, testKEK)
		for i := range 2 {
			if err := s.Migrate(ctx); err != nil {
				t.Fatalf("Migrate #%d: %v", i+1, err)
			}
			checkSchema(t, url)
		}
		if err := s.CreateSession(ctx, newSession("alice", base, base.Add(time.Hour))); err != nil {
			t.Fatalf("CreateSession on the migrated schema: %v", err)
		}
	})

	t.Run("Concurrent", func(t *testing.T) {
		url := testenv.DatabaseURL(t)
		stores := []*postgres.Store{open(t, url, testKEK), open(t, url, testKEK), open(t, url, testKEK)}
		errs := make([]error, len(stores))
		var wg sync.WaitGroup
		for i, s := range stores {
			wg.Go(func() { errs[i] = s.Migrate(ctx) })
		}
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Errorf("instance %d: Migrate: %v", i, err)
			}
		}
		checkSchema(t, url)
	})
}

// checkSchema verifies that every migration was applied exactly once.
func checkSchema(t *testing.T, url string) {
	t.Helper()
	conn := connect(t, url)
	ctx := context.Background()
	for _, table := range []string{"sessions", "signing_keys", "revocations"} {
		var exists bool
		if err := conn.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL`, table).Scan(&exists); err != nil {
			t.Fatal(err)
		}
		if !exists {
			t.Errorf("table %s does not exist after Migrate", table)
		}
	}
	rows, err := conn.Query(ctx, `SELECT version_id FROM tokend_schema_migrations WHERE version_id > 0 ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	versions, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		t.Fatal(err)
	}
	files, err := fs.Glob(migrations.FS, "*.sql")
	if err != nil {
		t.Fatal(err)
	}
	var want []int64
	for i := range files {
		want = append(want, int64(i+1))
	}
	if !slices.Equal(versions, want) {
		t.Errorf("applied migrations = %v, want %v (each applied once)", versions, want)
	}
}

func TestPurge(t *testing.T) {
	ctx := context.Background()
	url := testenv.DatabaseURL(t)
	s := startStore(t, url, testKEK)
	cutoff := base
	created := cutoff.Add(-8 * time.Hour)

	type entry struct {
		name    string
		sess    session.Session
		revoke  time.Time // zero: not revoked
		touch   time.Time // zero: not touched
		deleted bool
	}
	mk := func(expires time.Time) session.Session { return newSession("alice", created, expires) }
	idle := func(lastSeen time.Time) session.Session {
		s := newSession("bob", created, cutoff.Add(time.Hour))
		s.IdleTimeout, s.LastSeenAt = time.Hour, lastSeen
		return s
	}
	entries := []entry{
		{name: "expired long ago", sess: mk(cutoff.Add(-time.Hour)), deleted: true},
		{name: "expired just before", sess: mk(cutoff.Add(-time.Millisecond)), deleted: true},
		{name: "expires at cutoff", sess: mk(cutoff)},
		{name: "expires after", sess: mk(cutoff.Add(time.Hour))},
		{name: "revoked before", sess: mk(cutoff.Add(time.Hour)), revoke: cutoff.Add(-time.Minute), deleted: true},
		{name: "revoked at cutoff", sess: mk(cutoff.Add(time.Hour)), revoke: cutoff},
		{name: "revoked after", sess: mk(cutoff.Add(time.Hour)), revoke: cutoff.Add(time.Minute)},
		{name: "revoked after it expired", sess: mk(cutoff.Add(-time.Hour)), revoke: cutoff.Add(time.Hour), deleted: true},
		{name: "idle before cutoff", sess: idle(cutoff.Add(-2 * time.Hour)), deleted: true},
		{name: "idle, touched since", sess: idle(cutoff.Add(-2 * time.Hour)), touch: cutoff.Add(-time.Minute)},
	}
	for _, e := range entries {
		if err := s.CreateSession(ctx, e.sess); err != nil {
			t.Fatalf("%s: CreateSession: %v", e.name, err)
		}
		if !e.touch.IsZero() {
			if err := s.TouchSession(ctx, e.sess.ID, e.touch); err != nil {
				t.Fatalf("%s: TouchSession: %v", e.name, err)
			}
		}
		if !e.revoke.IsZero() {
			if _, err := s.RevokeSession(ctx, e.sess.ID, e.revoke, "test"); err != nil {
				t.Fatalf("%s: RevokeSession: %v", e.name, err)
			}
		}
	}

	n, err := s.Purge(ctx, cutoff)
	if err != nil {
		t.Fatalf("Purge: %v", err)
	}
	want := 0
	for _, e := range entries {
		_, err := s.SessionUncached(ctx, e.sess.ID)
		switch {
		case e.deleted:
			want++
			if !errors.Is(err, session.ErrNotFound) {
				t.Errorf("%s: err = %v after purge, want ErrNotFound", e.name, err)
			}
		case err != nil:
			t.Errorf("%s: kept session: %v", e.name, err)
		}
	}
	if n != want {
		t.Errorf("Purge = %d, want %d", n, want)
	}
	if n, err := s.Purge(ctx, cutoff); err != nil || n != 0 {
		t.Errorf("second Purge = %d, %v; want 0, nil", n, err)
	}
}

func TestPurgeConcurrent(t *testing.T) {
	ctx := context.Background()
	url := testenv.DatabaseURL(t)
	a, b := startStore(t, url, testKEK), startStore(t, url, testKEK)
	conn := connect(t, url)
	insert := func(prefix string, n int, endsAt time.Time) {
		t.Helper()
		_, err := conn.Exec(ctx, `INSERT INTO sessions (sid, secret_hash, subject, created_at, expires_at,
			cookie_expires_at, last_seen_at, ends_at)
			SELECT $1::text || i, '\x00', 'bulk', $2, $3, $3, $2, $3 FROM generate_series(1, $4::int) AS i`,
			prefix, endsAt.Add(-8*time.Hour), endsAt, n)
		if err != nil {
			t.Fatal(err)
		}
	}

	// More ended sessions than one batch (1000), so that the two
	// instances' purges overlap.
	const ended, live = 2500, 100
	insert("live-", live, base.Add(time.Hour))
	for round := range 5 {
		insert(fmt.Sprintf("ended-%d-", round), ended, base.Add(-time.Hour))
		var (
			counts [2]int
			errs   [2]error
			wg     sync.WaitGroup
		)
		for i, s := range []*postgres.Store{a, b} {
			wg.Go(func() { counts[i], errs[i] = s.Purge(ctx, base) })
		}
		wg.Wait()
		if errs[0] != nil || errs[1] != nil {
			t.Fatalf("round %d: Purge: %v; %v", round, errs[0], errs[1])
		}
		var left int
		if err := conn.QueryRow(ctx, `SELECT count(*) FROM sessions`).Scan(&left); err != nil {
			t.Fatal(err)
		}
		if counts[0]+counts[1] != ended || left != live {
			t.Errorf("round %d: the purges counted %d + %d and left %d sessions; want %d in all and %d left",
				round, counts[0], counts[1], left, ended, live)
		}
	}
}

// storedKeys generates one key of each algorithm, with times PostgreSQL
// keeps exactly (microseconds).
func storedKeys(t *testing.T) []issuer.StoredKey {
	t.Helper()
	var out []issuer.StoredKey
	for i, alg := range []issuer.Algorithm{issuer.ES256, issuer.EdDSA, issuer.RS256} {
		k, err := issuer.GenerateKey(alg, base.Add(time.Duration(i)*time.Minute+123456*time.Microsecond))
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, issuer.StoredKey{Key: k, ActivatesAt: base.Add(time.Duration(i) * time.Hour)})
	}
	return out
}

func addKeys(t *testing.T, s *postgres.Store, keys []issuer.StoredKey, remove ...string) {
	t.Helper()
	err := s.UpdateKeys(context.Background(), func([]issuer.StoredKey) ([]issuer.StoredKey, []string, error) {
		return keys, remove, nil
	})
	if err != nil {
		t.Fatalf("UpdateKeys: %v", err)
	}
}

func TestKeysRoundTrip(t *testing.T) {
	ctx := context.Background()
	url := testenv.DatabaseURL(t)
	s := startStore(t, url, testKEK)
	want := storedKeys(t)
	addKeys(t, s, want)

	got, err := s.Keys(ctx)
	if err != nil {
		t.Fatalf("Keys: %v", err)
	}
	if len(got) != len(want) {
		t.Fatalf("Keys returned %d keys, want %d", len(got), len(want))
	}
	for i, w := range want {
		g := got[i]
		if g.ID != w.ID || g.Algorithm != w.Algorithm || !g.CreatedAt.Equal(w.CreatedAt) || !g.ActivatesAt.Equal(w.ActivatesAt) {
			t.Errorf("key %d = %s %s created %v activates %v; want %s %s created %v activates %v", i,
				g.ID, g.Algorithm, g.CreatedAt, g.ActivatesAt, w.ID, w.Algorithm, w.CreatedAt, w.ActivatesAt)
		}
		type equaler interface{ Equal(crypto.PrivateKey) bool }
		if p, ok := g.Private.(equaler); !ok || !p.Equal(w.Private) {
			t.Errorf("key %d (%s): the private key did not survive the round trip", i, w.Algorithm)
		}
	}

	// UpdateKeys sees the stored keys and removes what it is told to.
	err = s.UpdateKeys(ctx, func(keys []issuer.StoredKey) ([]issuer.StoredKey, []string, error) {
		if len(keys) != len(want) {
			return nil, nil, fmt.Errorf("UpdateKeys saw %d keys, want %d", len(keys), len(want))
		}
		return nil, []string{want[0].ID}, nil
	})
	if err != nil {
		t.Fatalf("UpdateKeys: %v", err)
	}
	got, err = s.Keys(ctx)
	if err != nil {
		t.Fatalf("Keys: %v", err)
	}
	if len(got) != 2 || got[0].ID != want[1].ID || got[1].ID != want[2].ID {
		t.Errorf("after removing %s: %v", want[0].ID, kids(got))
	}

	// An error from fn changes nothing.
	boom := errors.New("boom")
	err = s.UpdateKeys(ctx, func([]issuer.StoredKey) ([]issuer.StoredKey, []string, error) {
		return storedKeys(t)[:1], []string{want[1].ID}, boom
	})
	if !errors.Is(err, boom) {
		t.Errorf("UpdateKeys = %v, want fn's error", err)
	}
	if again, err := s.Keys(ctx); err != nil || !slices.Equal(kids(again), kids(got)) {
		t.Errorf("after a failed UpdateKeys: %v, %v; want %v", kids(again), err, kids(got))
	}
}

func kids(keys []issuer.StoredKey) []string {
	var out []string
	for _, k := range keys {
		out = append(out, k.ID)
	}
	return out
}

func TestKeysSealed(t *testing.T) {
	ctx := context.Background()
	url := testenv.DatabaseURL(t)
	s := startStore(t, url, testKEK)
	keys := storedKeys(t)
	addKeys(t, s, keys)

	conn := connect(t, url)
	for _, k := range keys {
		der, err := x509.MarshalPKCS8PrivateKey(k.Private)
		if err != nil {
			t.Fatal(err)
		}
		var sealed []byte
		if err := conn.QueryRow(ctx, `SELECT private_key FROM signing_keys WHERE kid = $1`, k.ID).Scan(&sealed); err != nil {
			t.Fatalf("%s: %v", k.Algorithm, err)
		}
		if bytes.Contains(sealed, der) {
			t.Errorf("%s: the stored private_key holds the plaintext PKCS#8 DER", k.Algorithm)
		}
		if len(sealed) < len(der) {
			t.Errorf("%s: sealed key is %d bytes, shorter than its %d-byte DER", k.Algorithm, len(sealed), len(der))
		}
	}
}

func TestKeysWrongKEK(t *testing.T) {
	ctx := context.Background()
	url := testenv.DatabaseURL(t)
	s := startStore(t, url, testKEK)
	keys := storedKeys(t)
	addKeys(t, s, keys)

	otherKEK := bytes.Repeat([]byte{0x99}, 32)
	other := startStore(t, url, otherKEK)
	_, err := other.Keys(ctx)
	if err == nil {
		t.Fatal("Keys with another key-encryption key succeeded")
	}
	msg := err.Error()
	if !strings.Contains(msg, "key-encryption key") {
		t.Errorf("error %q does not say the key-encryption key is wrong", msg)
	}
	if errors.Is(err, session.ErrUnavailable) {
		t.Errorf("a wrong key-encryption key is reported as unavailable: %v", err)
	}
	// Nothing secret, in any of the usual encodings, appears in the message.
	conn := connect(t, url)
	secrets := [][]byte{testKEK, otherKEK}
	for _, k := range keys {
		der, err := x509.MarshalPKCS8PrivateKey(k.Private)
		if err != nil {
			t.Fatal(err)
		}
		var sealed []byte
		if err := conn.QueryRow(ctx, `SELECT private_key FROM signing_keys WHERE kid = $1`, k.ID).Scan(&sealed); err != nil {
			t.Fatal(err)
		}
		secrets = append(secrets, der, sealed)
	}
	for _, secret := range secrets {
		for _, enc := range []string{string(secret), hex.EncodeToString(secret), base64.StdEncoding.EncodeToString(secret),
			base64.RawURLEncoding.EncodeToString(secret), fmt.Sprint(secret)} {
			if strings.Contains(msg, enc[:min(len(enc), 24)]) {
				t.Fatalf("error %q contains key material", msg)
			}
		}
	}

	// UpdateKeys reads the keys first: it must fail too, and change nothing.
	err = other.UpdateKeys(ctx, func([]issuer.StoredKey) ([]issuer.StoredKey, []string, error) {
		return nil, kids(keys), nil
	})
	if err == nil {
		t.Error("UpdateKeys with another key-encryption key succeeded")
	}
	if got, err := s.Keys(ctx); err != nil || len(got) != len(keys) {
		t.Errorf("after the refused UpdateKeys: %d keys, %v; want %d", len(got), err, len(keys))
	}
}

func TestKeysChangedNotifiesOtherInstances(t *testing.T) {
	url := testenv.DatabaseURL(t)
	a, b := startStore(t, url, testKEK), startStore(t, url, testKEK)
	keys := storedKeys(t)
	for i, k := range keys {
		addKeys(t, a, []issuer.StoredKey{k})
		select {
		case <-b.KeysChanged():
		case <-time.After(10 * time.Second):
			t.Fatalf("change %d: instance B was not told within 10s", i)
		}
	}
}

// TestRevocationNoticesReachOtherInstances: a revocation on one instance
// signals RevocationNotices on the others, so that their revocation
// streams look at once; the entry is in the log by then.
func TestRevocationNoticesReachOtherInstances(t *testing.T) {
	ctx := context.Background()
	url := testenv.DatabaseURL(t)
	a, b := startStore(t, url, testKEK), startStore(t, url, testKEK)
	for i, revoke := range []func(sid string) error{
		func(sid string) error { _, err := a.RevokeSession(ctx, sid, base, "admin"); return err },
		func(string) error { _, err := a.RevokeSubject(ctx, "bob", base, "admin"); return err },
	} {
		sess := newSession("bob", base, base.Add(time.Hour))
		if err := a.CreateSession(ctx, sess); err != nil {
			t.Fatal(err)
		}
		select { // drain a notice left by an earlier round
		case <-b.RevocationNotices():
		default:
		}
		if err := revoke(sess.ID); err != nil {
			t.Fatal(err)
		}
		select {
		case <-b.RevocationNotices():
		case <-time.After(5 * time.Second):
			t.Fatalf("round %d: instance B heard of no revocation within 5s", i)
		}
		revs, err := b.Revocations(ctx, 0, 10)
		if err != nil {
			t.Fatal(err)
		}
		if len(revs) != i+1 || revs[i].SID != sess.ID {
			t.Errorf("round %d: B reads the log %+v, want the revocation of %s last", i, revs, sess.ID)
		}
	}
}

// TestSessionCacheIsUsed shows that reads are served from the cache while
// the store listens: a change made behind the store's back (no NOTIFY) is
// not seen. It is what makes TestRevocationReachesOtherInstance meaningful.
func TestSessionCacheIsUsed(t *testing.T) {
	ctx := context.Background()
	url := testenv.DatabaseURL(t)
	s := startStore(t, url, testKEK)
	sess := newSession("alice", base, base.Add(time.Hour))
	if err := s.CreateSession(ctx, sess); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Session(ctx, sess.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := connect(t, url).Exec(ctx, `UPDATE sessions SET subject = 'changed' WHERE sid = $1`, sess.ID); err != nil {
		t.Fatal(err)
	}
	cached, err := s.Session(ctx, sess.ID)
	if err != nil {
		t.Fatal(err)
	}
	if cached.Subject != "alice" {
		t.Errorf("Session read the database (subject %q): the cache is not in use", cached.Subject)
	}
	fresh, err := s.SessionUncached(ctx, sess.ID)
	if err != nil {
		t.Fatal(err)
	}
	if fresh.Subject != "changed" {
		t.Errorf("SessionUncached subject = %q, want the database's", fresh.Subject)
	}
}

// TestRevocationReachesOtherInstance: instance A has a session cached,
// instance B revokes it, and A's very next read must show the revocation.
// Nothing waits between the two: the revocation's NOTIFY must have reached
// A by then. Repeated, since a race would show only sometimes.
func TestRevocationReachesOtherInstance(t *testing.T) {
	ctx := context.Background()
	url := testenv.DatabaseURL(t)
	a, b := startStore(t, url, testKEK), startStore(t, url, testKEK)

	const rounds = 50
	var (
		stale  int
		maxLag time.Duration
	)
	for i := range rounds {
		sess := newSession(fmt.Sprintf("user-%d", i), base, base.Add(time.Hour))
		if err := a.CreateSession(ctx, sess); err != nil {
			t.Fatal(err)
		}
		if got, err := a.Session(ctx, sess.ID); err != nil || !got.RevokedAt.IsZero() {
			t.Fatalf("round %d: A's first read: %+v, %v", i, got, err)
		}
		if _, err := b.RevokeSession(ctx, sess.ID, base.Add(time.Minute), "stolen"); err != nil {
			t.Fatalf("round %d: B revokes: %v", i, err)
		}
		revoked := time.Now()
		got, err := a.Session(ctx, sess.ID)
		if err != nil {
			t.Fatalf("round %d: A's read after the revocation: %v", i, err)
		}
		if !got.RevokedAt.IsZero() {
			continue
		}
		// A read stale: measure how long A takes to catch up.
		stale++
		for got.RevokedAt.IsZero() {
			if time.Since(revoked) > 5*time.Second {
				t.Fatalf("round %d: A still serves the session as live 5s after B revoked it", i)
			}
			time.Sleep(50 * time.Microsecond)
			if got, err = a.Session(ctx, sess.ID); err != nil {
				t.Fatal(err)
			}
		}
		maxLag = max(maxLag, time.Since(revoked))
	}
	if stale > 0 {
		t.Errorf("in %d of %d rounds, A served the revoked session as live right after B revoked it "+
			"(A caught up within %v at most): the NOTIFY had not been processed yet", stale, rounds, maxLag)
	}
}

// TestReadRacingRevocationIsNotCached: a read that started before a
// revocation committed, and returns after the revocation's notification was
// processed, must not put its stale result in the cache. The database is
// made to hold the read (after it took its snapshot) until the test lets
// it go: instance A reads through a view that waits on an advisory lock.
func TestReadRacingRevocationIsNotCached(t *testing.T) {
	reads := map[string]func(s *postgres.Store, ctx context.Context, sid string) (session.Session, error){
		"Session":         (*postgres.Store).Session,
		"SessionUncached": (*postgres.Store).SessionUncached,
	}
	for name, read := range reads {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			url := testenv.DatabaseURL(t)
			b := startStore(t, url, testKEK)
			const lockID = 7
			_, err := connect(t, url).Exec(ctx, `CREATE SCHEMA held;
				CREATE FUNCTION held.gate() RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
				BEGIN
					PERFORM pg_advisory_lock_shared(7);
					PERFORM pg_advisory_unlock_shared(7);
					RETURN true;
				END $$;
				CREATE VIEW held.sessions AS SELECT * FROM public.sessions WHERE held.gate();`)
			if err != nil {
				t.Fatal(err)
			}
			a := open(t, url+"&search_path=held,public", testKEK)
			runStore(t, a)

			sess := newSession("alice", base, base.Add(time.Hour))
			if err := b.CreateSession(ctx, sess); err != nil {
				t.Fatal(err)
			}
			gate := connect(t, url)
			if _, err := gate.Exec(ctx, `SELECT pg_advisory_lock($1)`, lockID); err != nil {
				t.Fatal(err)
			}
			type result struct {
				sess session.Session
				err  error
			}
			done := make(chan result, 1)
			go func() {
				s, err := read(a, ctx, sess.ID)
				done <- result{s, err}
			}()
			waitFor(t, 5*time.Second, "A's read to wait at the gate", func() bool {
				var n int
				err := gate.QueryRow(ctx, `SELECT count(*) FROM pg_locks
					WHERE locktype = 'advisory' AND objid = $1 AND NOT granted`, lockID).Scan(&n)
				return err == nil && n > 0
			})
			gen := a.CacheGeneration()
			if _, err := b.RevokeSession(ctx, sess.ID, base.Add(time.Minute), "stolen"); err != nil {
				t.Fatal(err)
			}
			waitFor(t, 5*time.Second, "A to process the revocation's notification", func() bool {
				return a.CacheGeneration() != gen
			})
			if _, err := gate.Exec(ctx, `SELECT pg_advisory_unlock($1)`, lockID); err != nil {
				t.Fatal(err)
			}
			r := <-done
			if r.err != nil {
				t.Fatalf("A's held read: %v", r.err)
			}
			if !r.sess.RevokedAt.IsZero() {
				t.Fatal("A's held read saw the revocation: the test did not make the read race with it")
			}

			got, err := a.Session(ctx, sess.ID)
			if err != nil {
				t.Fatal(err)
			}
			if got.RevokedAt.IsZero() {
				t.Errorf("after a %s that raced with the revocation, A serves the revoked session as live from its cache", name)
			}
		})
	}
}

// TestUnavailable stops the database under a running store: every
// operation fails with session.ErrUnavailable, Healthy turns false, and all
// works again once the database is back.
func TestUnavailable(t *testing.T) {
	ctx := context.Background()
	pg := testenv.StartPostgres(t)
	s := startStore(t, pg.URL(), testKEK)
	live := newSession("alice", base, base.Add(time.Hour))
	if err := s.CreateSession(ctx, live); err != nil {
		t.Fatal(err)
	}
	addKeys(t, s, storedKeys(t)[:1])
	if !s.Healthy() {
		t.Fatal("Healthy is false with the database up")
	}

	pg.Stop()

	ops := map[string]func() error{
		"CreateSession": func() error { return s.CreateSession(ctx, newSession("bob", base, base.Add(time.Hour))) },
		"Session": func() error {
			_, err := s.Session(ctx, newID()) // never cached
			return err
		},
		"SessionUncached": func() error {
			_, err := s.SessionUncached(ctx, live.ID)
			return err
		},
		"TouchSession": func() error { return s.TouchSession(ctx, live.ID, base.Add(time.Minute)) },
		"RevokeSession": func() error {
			_, err := s.RevokeSession(ctx, live.ID, base.Add(time.Minute), "x")
			return err
		},
		"RevokeSubject": func() error {
			_, err := s.RevokeSubject(ctx, "alice", base.Add(time.Minute), "x")
			return err
		},
		"SessionsBySubject": func() error {
			_, err := s.SessionsBySubject(ctx, "alice", 10)
			return err
		},
		"Purge": func() error {
			_, err := s.Purge(ctx, base)
			return err
		},
		"Keys": func() error {
			_, err := s.Keys(ctx)
			return err
		},
		"UpdateKeys": func() error { return s.UpdateKeys(ctx, nil) },
	}
	names := make([]string, 0, len(ops))
	for name := range ops {
		names = append(names, name)
	}
	slices.Sort(names)
	// Twice: the first calls meet the pool's dead connections, the second
	// ones fail to connect.
	for round := range 2 {
		for _, name := range names {
			if err := ops[name](); !errors.Is(err, session.ErrUnavailable) {
				t.Errorf("round %d: %s with the database down: err = %v, want session.ErrUnavailable", round, name, err)
			}
		}
	}
	waitFor(t, 15*time.Second, "Healthy to turn false", func() bool { return !s.Healthy() })

	pg.Start()
	waitFor(t, 15*time.Second, "CreateSession to work again", func() bool {
		return s.CreateSession(ctx, newSession("carol", base, base.Add(time.Hour))) == nil
	})
	waitFor(t, 15*time.Second, "Healthy to turn true", s.Healthy)
	if got, err := s.Session(ctx, live.ID); err != nil || got.ID != live.ID {
		t.Errorf("Session after the restart: %v", err)
	}
	if _, err := s.Keys(ctx); err != nil {
		t.Errorf("Keys after the restart: %v", err)
	}
	// The listener reconnects too: it says so through KeysChanged.
	waitFor(t, 15*time.Second, "the notification listener to reconnect", func() bool {
		select {
		case <-s.KeysChanged():
			return true
		default:
			return false
		}
	})
}

// waitFor polls cond until it holds, failing t after timeout.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waited %s for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
