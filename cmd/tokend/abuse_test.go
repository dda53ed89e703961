package main

import (
	"bufio"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tokend/tokend/internal/testenv"
)

// randomSecret returns a distinctive random string, so that finding it in a
// log can only mean it was logged.
func randomSecret(prefix string) string {
	var b [18]byte
	_, _ = rand.Read(b[:])
	return prefix + base64.RawURLEncoding.EncodeToString(b[:])
}

// secretSet is everything that must never appear in a log, by what it is.
type secretSet map[string]string

func (s secretSet) add(what, value string) {
	if value != "" {
		s[what+" "+fmt.Sprint(len(s))] = value
	}
}

// TestLogsHoldNoSecrets runs a scripted sequence of everything a client,
// a backend, an admin or an attacker sends, with debug logging, and scans
// the whole log for session secrets, cookie values, access tokens, service
// and admin keys (valid or near misses), the key-encryption key and the
// passwords in the database and Redis URLs. It runs once in memory and
// once on PostgreSQL, through a database outage, since error paths are
// where credentials leak.
func TestLogsHoldNoSecrets(t *testing.T) {
	t.Run("memory, text log", func(t *testing.T) { logsHoldNoSecrets(t, false) })
	t.Run("postgres, json log", func(t *testing.T) { logsHoldNoSecrets(t, true) })
}

func logsHoldNoSecrets(t *testing.T, withPostgres bool) {
	secrets := secretSet{}
	svcKey, admKey := randomSecret("svc-"), randomSecret("adm-")
	secrets.add("service key", svcKey)
	secrets.add("admin key", admKey)
	kek := make([]byte, 32)
	_, _ = rand.Read(kek)
	secrets.add("KEK", base64.StdEncoding.EncodeToString(kek))
	secrets.add("KEK", base64.RawURLEncoding.EncodeToString(kek))
	secrets.add("KEK", hex.EncodeToString(kek))
	redisPassword := randomSecret("redispw-")
	secrets.add("Redis password", redisPassword)

	env := map[string]string{
		"TOKEND_ISSUER":             "https://tokend.test",
		"TOKEND_AUDIENCE":           "ws",
		"TOKEND_SERVICE_KEYS":       svcKey,
		"TOKEND_ADMIN_KEYS":         admKey,
		"TOKEND_KEY_ENCRYPTION_KEY": base64.StdEncoding.EncodeToString(kek),
		"TOKEND_LOG_LEVEL":          "debug",
		"TOKEND_LOG_FORMAT":         "text",
		"TOKEND_ACCESS_LOG_RATE":    "0",
		"TOKEND_DRAIN_DELAY":        "0s",
		// Nothing listens there: the limiter falls back and says why.
		"TOKEND_REDIS_URL": "redis://:" + redisPassword + "@" + freeAddr(t) + "/0",
	}
	var pg *testenv.PGServer
	if withPostgres {
		pg = testenv.StartPostgres(t)
		// Trust authentication ignores the password, but it is in the URL
		// tokend was given, and so in every error that quotes the URL.
		dbPassword := randomSecret("dbpw-")
		secrets.add("database password", dbPassword)
		u, err := url.Parse(pg.URL())
		if err != nil {
			t.Fatal(err)
		}
		u.User = url.UserPassword("postgres", dbPassword)
		env["TOKEND_DATABASE_URL"] = u.String()
		env["TOKEND_LOG_FORMAT"] = "json"
	}
	p := startInProcess(t, env)

	// call sends a request; any answer will do, JSON or not (/metrics).
	call := func(method, path, bearer, cookie, body string) answer {
		t.Helper()
		a, err := fetch(p.client, p.base, method, path, bearer, cookie, body, "")
		if err != nil && a.status == 0 {
			t.Fatalf("%s %s: %v", method, path, err)
		}
		return a
	}
	type sess struct{ sid, value, cookie string }
	create := func(subject string) sess {
		t.Helper()
		a := call("POST", "/v1/sessions", svcKey, "", fmt.Sprintf(`{"subject":%q,"claims":{"role":"x"}}`, subject))
		c, _ := a.body["cookie"].(map[string]any)
		name, _ := c["name"].(string)
		value, _ := c["value"].(string)
		sid, _ := a.body["sid"].(string)
		if a.status != http.StatusCreated || sid == "" || len(value) <= len(sid) {
			t.Fatalf("create session: %d %v", a.status, a.body)
		}
		secrets.add("cookie value", value)
		secrets.add("session secret", value[len(sid)+1:])
		return sess{sid: sid, value: value, cookie: name + "=" + value}
	}
	var tokens []string
	token := func(s sess) int {
		t.Helper()
		a := call("POST", "/v1/token", "", s.cookie, "")
		if tok, _ := a.body["access_token"].(string); a.status == http.StatusOK && tok != "" {
			tokens = append(tokens, tok)
			secrets.add("access token", tok)
			secrets.add("token signature", tok[strings.LastIndexByte(tok, '.')+1:])
		}
		return a.status
	}

	alice, bob, carol := create("alice"), create("bob"), create("carol")
	for _, s := range []sess{alice, bob, carol, alice} {
		if status := token(s); status != http.StatusOK {
			t.Fatalf("token: %d", status)
		}
	}
	aliceToken := tokens[0]

	// Near misses of every credential: a key with one character changed
	// may be a real key of another system, and a mistyped secret is one
	// character from the real one.
	nearSvc := svcKey[:len(svcKey)-1] + "X"
	nearAdm := admKey[:len(admKey)-1] + "X"
	nearCookie := alice.value[:len(alice.value)-1] + "X"
	if nearCookie == alice.value {
		nearCookie = alice.value[:len(alice.value)-1] + "Y"
	}
	secrets.add("near-miss service key", nearSvc)
	secrets.add("near-miss admin key", nearAdm)
	secrets.add("near-miss cookie value", nearCookie)
	secrets.add("near-miss session secret", nearCookie[len(alice.sid)+1:])
	garbage := randomSecret("garbage-cookie-")
	secrets.add("garbage cookie", garbage)

	script := []struct{ method, path, bearer, cookie, body string }{
		// Wrong keys everywhere.
		{"POST", "/v1/sessions", admKey, "", `{"subject":"mallory"}`},
		{"POST", "/v1/sessions", nearSvc, "", `{"subject":"mallory"}`},
		{"GET", "/v1/admin/sessions/" + bob.sid, svcKey, "", ""},
		{"GET", "/v1/admin/sessions/" + bob.sid, nearAdm, "", ""},
		{"POST", "/v1/admin/keys/rotate", svcKey, "", ""},
		{"GET", "/v1/revocations", admKey, "", ""},
		{"GET", "/v1/admin/sessions?subject=alice", alice.value, "", ""},
		{"GET", "/v1/admin/sessions?subject=alice", aliceToken, "", ""},
		// Garbage and near-miss cookies.
		{"POST", "/v1/token", "", "tokend_session=" + garbage, ""},
		{"POST", "/v1/token", "", "tokend_session=" + nearCookie, ""},
		{"DELETE", "/v1/session", "", "tokend_session=" + nearCookie, ""},
		{"POST", "/v1/token", "", "tokend_session=" + alice.value + alice.value, ""},
		{"POST", "/v1/token", svcKey, "", ""},
		// Credentials where they do not belong: in paths, queries and bodies.
		{"GET", "/v1/admin/sessions/" + alice.value, admKey, "", ""},
		{"GET", "/v1/admin/sessions?subject=" + url.QueryEscape(alice.value), admKey, "", ""},
		{"GET", "/v1/admin/sessions?limit=" + url.QueryEscape(svcKey), admKey, "", ""},
		{"POST", "/v1/sessions", svcKey, "", `{"subject":"x","` + alice.value + `":1}`},
		{"POST", "/v1/sessions", svcKey, "", `{"subject":"x","claims":` + alice.value + `}`},
		{"POST", "/v1/sessions", svcKey, "", `{"subject":"` + admKey},
		{"POST", "/v1/admin/subjects/carol/revoke", admKey, "", `{"reason":"` + svcKey + `"`},
		{"GET", "/v1/token?cookie=" + url.QueryEscape(alice.value), "", "", ""},
		{"PUT", "/v1/token", "", alice.cookie, ""},
		{"GET", "/no/such/" + alice.value, admKey, alice.cookie, ""},
		// The real things: admin views, revocations, logout, rotation.
		{"GET", "/v1/admin/sessions?subject=alice", admKey, "", ""},
		{"GET", "/v1/admin/sessions/" + alice.sid, admKey, "", ""},
		{"GET", "/v1/admin/keys", admKey, "", ""},
		{"POST", "/v1/admin/keys/rotate", admKey, "", ""},
		{"GET", "/v1/revocations", svcKey, "", ""},
		{"DELETE", "/v1/session", "", alice.cookie, ""},
		{"POST", "/v1/token", "", alice.cookie, ""},
		{"DELETE", "/v1/admin/sessions/" + bob.sid + "?reason=stolen", admKey, "", ""},
		{"POST", "/v1/token", "", bob.cookie, ""},
		{"POST", "/v1/admin/subjects/carol/revoke", admKey, "", `{"reason":"offboarded"}`},
		{"POST", "/v1/token", "", carol.cookie, ""},
		{"GET", "/metrics", "", alice.cookie, ""},
	}
	runScript := func() {
		for _, s := range script {
			call(s.method, s.path, s.bearer, s.cookie, s.body)
		}
	}
	runScript()

	if withPostgres {
		// A database outage: every error path, with live credentials in
		// flight.
		dave := create("dave")
		token(dave)
		pg.Stop()
		pollUntil(t, 20*time.Second, "/readyz to turn 503", func() bool {
			token(dave)
			call("POST", "/v1/sessions", svcKey, "", `{"subject":"erin"}`)
			call("DELETE", "/v1/admin/sessions/"+dave.sid, admKey, "", "")
			status, _, _ := p.call("GET", "/readyz", "", nil, "")
			return status == http.StatusServiceUnavailable
		})
		runScript()
		pg.Start()
		pollUntil(t, 30*time.Second, "the database to be back", func() bool {
			return call("POST", "/v1/sessions", svcKey, "", `{"subject":"frank"}`).status == http.StatusCreated
		})
		token(dave)
	}
	p.stop()

	log := p.log.String()
	if n := strings.Count(log, "msg=request ") + strings.Count(log, `"msg":"request"`); n < len(script) {
		t.Fatalf("the log holds %d request lines for %d scripted requests: it cannot be the log of the run", n, len(script))
	}
	if !strings.Contains(log, "redis is not reachable") {
		t.Errorf("the log does not say that Redis is unreachable: the Redis error path went untested")
	}
	if withPostgres && !strings.Contains(log, "PostgreSQL is unreachable") {
		t.Errorf("the log does not report the database outage: the error paths went untested")
	}
	for what, secret := range secrets {
		if i := strings.Index(log, secret); i >= 0 {
			line := log[strings.LastIndexByte(log[:i], '\n')+1:]
			if j := strings.IndexByte(line, '\n'); j >= 0 {
				line = line[:j]
			}
			t.Errorf("the log holds a %s: %s", strings.TrimRight(what, " 0123456789"), line)
		}
	}
	t.Logf("scanned %d log lines (%d bytes) for %d secrets", strings.Count(log, "\n"), len(log), len(secrets))
}

// prodEnv is a production configuration without a database.
func prodEnv() map[string]string {
	return map[string]string{
		"TOKEND_ISSUER":       "https://tokend.test",
		"TOKEND_AUDIENCE":     "ws",
		"TOKEND_SERVICE_KEYS": pgServiceKey,
		"TOKEND_ADMIN_KEYS":   pgAdminKey,
		"TOKEND_DRAIN_DELAY":  "0s",
	}
}

// TestOversizedRequests sends bodies over the 16 KiB limit to every endpoint
// that reads one, and headers over the server's 16 KiB limit: the answers
// are 413 request_too_large and 431.
func TestOversizedRequests(t *testing.T) {
	p := startInProcess(t, prodEnv())
	client := &http.Client{Timeout: 10 * time.Second}

	bodies := []struct {
		name    string
		size    int
		chunked bool
	}{
		{"one byte over", 16<<10 + 1, false},
		{"1 MiB", 1 << 20, false},
		{"64 MiB", 64 << 20, false},
		{"1 MiB chunked", 1 << 20, true},
	}
	endpoints := []struct{ path, key string }{
		{"/v1/sessions", pgServiceKey},
		{"/v1/admin/subjects/alice/revoke", pgAdminKey},
	}
	for _, ep := range endpoints {
		for _, b := range bodies {
			prefix := `{"subject":"alice","reason":"`
			var body io.Reader = io.MultiReader(strings.NewReader(prefix), io.LimitReader(repeatReader('x'), int64(b.size-len(prefix))))
			if b.chunked {
				body = io.NopCloser(body) // no length: sent chunked
			}
			req, _ := http.NewRequest("POST", p.base+ep.path, body)
			if !b.chunked {
				req.ContentLength = int64(b.size)
			}
			req.Header.Set("Authorization", "Bearer "+ep.key)
			req.Header.Set("Content-Type", "application/json")
			resp, err := client.Do(req)
			if err != nil {
				t.Errorf("POST %s with a %s body: %v, want 413", ep.path, b.name, err)
				continue
			}
			raw, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusRequestEntityTooLarge || !strings.Contains(string(raw), `"code":"request_too_large"`) {
				t.Errorf("POST %s with a %s body: %d %s, want 413 request_too_large", ep.path, b.name, resp.StatusCode, raw)
			}
		}
	}

	// Headers: net/http reads MaxHeaderBytes plus 4 KiB of slack before it
	// refuses. 12 KiB passes; 24 KiB is refused before any handler runs.
	for _, tc := range []struct {
		size int
		want int
	}{{12 << 10, http.StatusUnauthorized}, {24 << 10, http.StatusRequestHeaderFieldsTooLarge}, {1 << 20, http.StatusRequestHeaderFieldsTooLarge}} {
		req, _ := http.NewRequest("POST", p.base+"/v1/token", nil)
		req.Header.Set("Cookie", "padding="+strings.Repeat("p", tc.size))
		resp, err := client.Do(req)
		if err != nil {
			t.Errorf("a %d-byte Cookie header: %v, want %d", tc.size, err, tc.want)
			continue
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tc.want {
			t.Errorf("a %d-byte Cookie header: %d, want %d", tc.size, resp.StatusCode, tc.want)
		}
	}
	p.call("GET", "/healthz", "", nil, "") // still serving
}

// repeatReader is an endless stream of one byte.
type repeatReader byte

func (r repeatReader) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = byte(r)
	}
	return len(p), nil
}

// TestSlowClientsAreCutOff plays two slow clients against the server
// settings of run: one trickles its headers (slowloris) and must lose its
// connection when ReadHeaderTimeout (5s) runs out, however busy it keeps
// it; one sends its headers and trickles its body, and is cut off by
// ReadTimeout (10s). Both are timeouts, so the test measures time, with
// wide margins: it checks which of the two timeouts acted, not how
// precisely.
func TestSlowClientsAreCutOff(t *testing.T) {
	p := startInProcess(t, prodEnv())
	addr := strings.TrimPrefix(p.base, "http://")

	// trickle writes head at once, then one line every 250ms, until the
	// connection fails; it reports what it managed to send.
	trickle := func(conn net.Conn, head string, line func(i int) string, sent chan<- int) {
		n := 0
		if _, err := io.WriteString(conn, head); err == nil {
			for ; ; n++ {
				time.Sleep(250 * time.Millisecond)
				if _, err := io.WriteString(conn, line(n)); err != nil {
					break
				}
			}
		}
		sent <- n
	}
	// closedAfter waits for the server to answer or hang up, and returns
	// when that happened and what (if anything) it said.
	closedAfter := func(conn net.Conn, start time.Time) (time.Duration, string, error) {
		_ = conn.SetReadDeadline(start.Add(30 * time.Second))
		raw, err := io.ReadAll(bufio.NewReader(conn))
		if err != nil && !errors.Is(err, syscall.ECONNRESET) {
			return 0, string(raw), err
		}
		return time.Since(start), string(raw), nil
	}

	t.Run("slow headers", func(t *testing.T) {
		t.Parallel()
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		start := time.Now()
		sent := make(chan int, 1)
		go trickle(conn, "POST /v1/token HTTP/1.1\r\nHost: tokend.test\r\n",
			func(i int) string { return fmt.Sprintf("X-Slow-%d: %d\r\n", i, i) }, sent)
		took, said, err := closedAfter(conn, start)
		if err != nil {
			t.Fatalf("the server kept a connection whose headers never ended for 30s: %v", err)
		}
		_ = conn.Close()
		lines := <-sent
		t.Logf("connection closed %s after it opened, %d header lines sent; server said %q", took.Round(10*time.Millisecond), lines, said)
		if took < 4*time.Second || took > 9*time.Second {
			t.Errorf("connection closed after %s, want ReadHeaderTimeout (5s): between 4s and 9s", took)
		}
		if strings.HasPrefix(said, "HTTP/1.1 2") {
			t.Errorf("a request whose headers never ended was served: %q", said)
		}
	})

	t.Run("slow body", func(t *testing.T) {
		t.Parallel()
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		start := time.Now()
		sent := make(chan int, 1)
		head := "POST /v1/sessions HTTP/1.1\r\nHost: tokend.test\r\nAuthorization: Bearer " + pgServiceKey +
			"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"subject\":\"slow\""
		go trickle(conn, head, func(int) string { return " " }, sent)
		took, said, err := closedAfter(conn, start)
		if err != nil {
			t.Fatalf("the server kept a connection whose body never ended for 30s: %v", err)
		}
		_ = conn.Close()
		lines := <-sent
		t.Logf("cut off %s after the connection opened, %d body bytes trickled; server said %q", took.Round(10*time.Millisecond), lines, firstLine(said))
		if took < 9*time.Second || took > 14*time.Second {
			t.Errorf("cut off after %s, want ReadTimeout (10s): between 9s and 14s", took)
		}
		if strings.HasPrefix(said, "HTTP/1.1 2") {
			t.Errorf("a request whose body never ended was served: %q", said)
		}
	})
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\r\n")
	return line
}
