package testenv

import (
	"bytes"
	"context"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// DefaultDatabaseURL is the test PostgreSQL that scripts/ensure-services.sh
// provides: a superuser "postgres" with trust auth on 127.0.0.1.
const DefaultDatabaseURL = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"

// adminDatabaseURL returns the URL of a database on the shared test server
// in which the tests may create and drop databases: TEST_DATABASE_URL,
// TOKEND_TEST_DATABASE_URL, or DefaultDatabaseURL.
func adminDatabaseURL() string {
	for _, name := range []string{"TEST_DATABASE_URL", "TOKEND_TEST_DATABASE_URL"} {
		if u := os.Getenv(name); u != "" {
			return u
		}
	}
	return DefaultDatabaseURL
}

// maxIdentifier is PostgreSQL's limit on names (NAMEDATALEN-1); longer
// names are silently truncated, which would cut off the unique suffix.
const maxIdentifier = 63

// DatabaseURL creates an empty database, unique to this run of t, on the
// shared test PostgreSQL, and returns its URL. The database is dropped when
// t ends, with any connection still open to it. It fails t, saying how to
// provide a server, when PostgreSQL does not answer; it never skips.
func DatabaseURL(t testing.TB) string {
	t.Helper()
	admin := adminDatabaseURL()
	u, err := url.Parse(admin)
	if err != nil {
		t.Fatalf("testenv: the test database URL %s is not a URL: %v", redactURL(admin), err)
	}
	name := "tokend_test_" + strings.ToLower(uniqueName(t))
	if len(name) > maxIdentifier {
		// Keep the random suffix ("_" and 12 hex digits): it is what makes
		// the name unique.
		const suffix = 13
		name = name[:maxIdentifier-suffix] + name[len(name)-suffix:]
	}
	ident := pgx.Identifier{name}.Sanitize()

	adminExec(t, admin, "CREATE DATABASE "+ident)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		conn, err := pgx.Connect(ctx, admin)
		if err != nil {
			t.Errorf("testenv: drop database %s: %v", name, err)
			return
		}
		defer conn.Close(context.WithoutCancel(ctx))
		if _, err := conn.Exec(ctx, "DROP DATABASE IF EXISTS "+ident+" WITH (FORCE)"); err != nil {
			t.Errorf("testenv: drop database %s: %v", name, err)
		}
	})
	u.Path = "/" + name
	return u.String()
}

// adminExec runs one statement on the shared test server.
func adminExec(t testing.TB, admin, sql string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, admin)
	if err != nil {
		t.Fatalf("testenv: the test PostgreSQL at %s does not answer (%v). These tests need it and never skip: "+
			"run scripts/ensure-services.sh, or point TEST_DATABASE_URL at a server where you may create databases.",
			redactURL(admin), err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := conn.Exec(ctx, sql); err != nil {
		t.Fatalf("testenv: %s on %s: %v", sql, redactURL(admin), err)
	}
}

// PGServer is a PostgreSQL server owned by one test: its own data directory
// and port, trust auth, no durability. Stop and Start let a test simulate a
// database outage; the shared server is never touched.
type PGServer struct {
	t    testing.TB
	bin  string // directory holding initdb and postgres
	dir  string // owns data/ and the Unix socket
	port int
	cred *syscall.Credential // the postgres user, when running as root

	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{} // closed once cmd has exited and been reaped
}

// StartPostgres initialises a throw-away cluster and starts it on a free
// port of 127.0.0.1. The server is stopped and its files removed when t
// ends. Running as root (as CI does), initdb and postgres run as the user
// postgres, since both refuse to run as root.
func StartPostgres(t testing.TB) *PGServer {
	t.Helper()
	bin := postgresBinDir(t)
	s := &PGServer{t: t, bin: bin, port: FreePort(t)}
	if os.Geteuid() == 0 {
		s.cred = postgresUser(t)
	}
	dir, err := os.MkdirTemp("", "tokend-pg-")
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	s.dir = dir
	// os.TempDir is world-traversable; the directory itself must belong to
	// the user the server runs as.
	if s.cred != nil {
		if err := os.Chown(dir, int(s.cred.Uid), int(s.cred.Gid)); err != nil {
			t.Fatalf("testenv: %v", err)
		}
	}

	out, err := s.command(filepath.Join(bin, "initdb"), "-D", s.dataDir(), "-U", "postgres",
		"-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync").CombinedOutput()
	if err != nil {
		t.Fatalf("testenv: initdb: %v\n%s", err, out)
	}
	t.Cleanup(s.Stop)
	s.Start()
	return s
}

// postgresBinDir finds the directory holding initdb and postgres:
// pg_config --bindir, else the newest /usr/lib/postgresql/N/bin (Debian
// keeps them off PATH), else PATH.
func postgresBinDir(t testing.TB) string {
	t.Helper()
	var candidates []string
	if out, err := exec.Command("pg_config", "--bindir").Output(); err == nil {
		candidates = append(candidates, strings.TrimSpace(string(out)))
	}
	versions, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	slices.SortFunc(versions, func(a, b string) int { return versionOf(b) - versionOf(a) })
	candidates = append(candidates, versions...)
	if p, err := exec.LookPath("initdb"); err == nil {
		if real, err := filepath.EvalSymlinks(p); err == nil {
			p = real
		}
		candidates = append(candidates, filepath.Dir(p))
	}
	for _, dir := range candidates {
		if isFile(filepath.Join(dir, "initdb")) && isFile(filepath.Join(dir, "postgres")) {
			return dir
		}
	}
	t.Fatalf("testenv: no PostgreSQL server binaries (initdb, postgres) found via pg_config, in /usr/lib/postgresql/*/bin " +
		"or on PATH. This test starts and stops its own PostgreSQL and never skips: install the server " +
		"(apt-get install postgresql) or run scripts/ensure-services.sh")
	return ""
}

// versionOf reads N from /usr/lib/postgresql/N/bin.
func versionOf(dir string) int {
	n, _ := strconv.Atoi(filepath.Base(filepath.Dir(dir)))
	return n
}

func isFile(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular()
}

// postgresUser returns the credentials of the user postgres.
func postgresUser(t testing.TB) *syscall.Credential {
	t.Helper()
	u, err := user.Lookup("postgres")
	if err != nil {
		t.Fatalf("testenv: running as root, the throw-away PostgreSQL must run as the user postgres, "+
			"which does not exist (%v); install the server (apt-get install postgresql) or run scripts/ensure-services.sh", err)
	}
	uid, err1 := strconv.ParseUint(u.Uid, 10, 32)
	gid, err2 := strconv.ParseUint(u.Gid, 10, 32)
	if err1 != nil || err2 != nil {
		t.Fatalf("testenv: user postgres has uid %q, gid %q", u.Uid, u.Gid)
	}
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}
}

func (s *PGServer) dataDir() string { return filepath.Join(s.dir, "data") }

// command prepares a PostgreSQL program to run as the server's user.
func (s *PGServer) command(name string, args ...string) *exec.Cmd {
	cmd := exec.Command(name, args...)
	cmd.Dir = s.dir
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "LC_ALL=C"}
	// The server must not outlive a crashed test binary.
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: s.cred, Pdeathsig: syscall.SIGQUIT}
	return cmd
}

// Port is the server's TCP port.
func (s *PGServer) Port() int { return s.port }

// URL is a URL of the database "postgres" on the server, as the superuser.
func (s *PGServer) URL() string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", s.port)
}

// Start (re)starts the server on its port and waits until it accepts
// connections. It fails the test if the server is already running or does
// not come up.
func (s *PGServer) Start() {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd != nil {
		s.t.Fatalf("testenv: PostgreSQL on port %d is already running", s.port)
	}
	out := new(bytes.Buffer)
	cmd := s.command(filepath.Join(s.bin, "postgres"), "-D", s.dataDir(), "-p", strconv.Itoa(s.port),
		"-k", s.dir, "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
		"-c", "full_page_writes=off", "-c", "synchronous_commit=off")
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		s.t.Fatalf("testenv: start postgres: %v", err)
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(exited)
	}()
	s.cmd, s.exited = cmd, exited

	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		conn, err := pgx.Connect(ctx, s.URL())
		if err == nil {
			_ = conn.Close(ctx)
			cancel()
			return
		}
		cancel()
		select {
		case <-exited:
			s.cmd = nil
			s.t.Fatalf("testenv: postgres on port %d exited while starting:\n%s", s.port, out.String())
		default:
		}
		if time.Now().After(deadline) {
			s.stopLocked()
			s.t.Fatalf("testenv: postgres on port %d did not accept connections within 30s: %v\n%s", s.port, err, out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Stop shuts the server down (SIGINT, PostgreSQL's fast shutdown: every
// client connection is ended) and waits until it has exited. It does
// nothing if the server is not running.
func (s *PGServer) Stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stopLocked()
}

func (s *PGServer) stopLocked() {
	if s.cmd == nil {
		return
	}
	_ = s.cmd.Process.Signal(syscall.SIGINT)
	select {
	case <-s.exited:
	case <-time.After(30 * time.Second):
		_ = s.cmd.Process.Signal(syscall.SIGQUIT) // immediate shutdown
		<-s.exited
	}
	s.cmd = nil
}
