package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/coder/websocket/wsjson"

	"github.com/tokend/tokend/api"
	"github.com/tokend/tokend/examples/wsserver/realtime"
	"github.com/tokend/tokend/internal/testenv"
	"github.com/tokend/tokend/issuer"
	"github.com/tokend/tokend/session"
	"github.com/tokend/tokend/store/memory"
)

func TestLoadConfig(t *testing.T) {
	env := map[string]string{"TOKEND_URL": "https://auth.test/", "TOKEND_SERVICE_KEY": "k", "WSSERVER_ORIGINS": "app.test, *.app.test"}
	c, err := loadConfig(nil, func(k string) string { return env[k] }, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.tokendURL != "https://auth.test" || c.jwksURL != "https://auth.test/.well-known/jwks.json" ||
		c.issuer != "https://auth.test" || c.audience != "tokend-dev" || c.addr != "127.0.0.1:8090" ||
		strings.Join(c.origins, "|") != "app.test|*.app.test" {
		t.Errorf("config = %+v", c)
	}
	c, err = loadConfig([]string{"-audience", "rt", "-issuer", "https://iss.test"}, func(k string) string { return env[k] }, io.Discard)
	if err != nil || c.audience != "rt" || c.issuer != "https://iss.test" {
		t.Errorf("flags: %+v, %v", c, err)
	}
	if _, err := loadConfig(nil, func(string) string { return "" }, io.Discard); err == nil || !strings.Contains(err.Error(), "service key") {
		t.Errorf("without a service key: %v", err)
	}
}

const (
	serviceKey = "svc-key-0123456789abcdef"
	adminKey   = "adm-key-0123456789abcdef"
	issuerURL  = "https://tokend.test"
)

// TestRun runs the command against a tokend built from its packages: a
// token authenticates a socket, and revoking the session closes it.
func TestRun(t *testing.T) {
	key, err := issuer.GenerateKey(issuer.ES256, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	iss, err := issuer.New(issuerURL, []string{"rt"})
	if err != nil {
		t.Fatal(err)
	}
	if err := iss.SetKeys(&key, []issuer.Key{key}); err != nil {
		t.Fatal(err)
	}
	sessions := session.NewService(memory.New(), iss, session.Config{})
	tokend := httptest.NewServer(api.NewServer(api.Options{Sessions: sessions, Keys: iss,
		Config: api.Config{Cookie: api.Cookie{Name: "tokend_session", Path: "/v1"},
			ServiceKeys: []string{serviceKey}, AdminKeys: []string{adminKey}}}))
	t.Cleanup(tokend.Close)

	addr := "127.0.0.1:" + strconv.Itoa(testenv.FreePort(t))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	var logs lockedBuffer
	go func() {
		done <- run(ctx, []string{"-addr", addr, "-tokend-url", tokend.URL, "-issuer", issuerURL,
			"-audience", "rt", "-service-key", serviceKey}, func(string) string { return "" }, &logs)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("run: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("run did not return within 10s of its context ending")
		}
	})
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if strings.Contains(logs.String(), "following tokend's revocation stream") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("wsserver did not follow the revocation stream within 10s:\n%s", logs.String())
		}
	}

	var created struct {
		SID    string `json:"sid"`
		Cookie struct{ Name, Value string }
	}
	call(t, "POST", tokend.URL+"/v1/sessions", serviceKey, `{"subject":"alice"}`, nil, &created)
	var tok struct {
		AccessToken string `json:"access_token"`
	}
	call(t, "POST", tokend.URL+"/v1/token", "", "", &http.Cookie{Name: created.Cookie.Name, Value: created.Cookie.Value}, &tok)

	dctx, dcancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer dcancel()
	conn, _, err := websocket.Dial(dctx, "ws://"+addr+"/ws", &websocket.DialOptions{
		Subprotocols: []string{realtime.Subprotocol, realtime.BearerPrefix + tok.AccessToken}})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.CloseNow()
	var ready struct{ Type, Sid string }
	if err := wsjson.Read(dctx, conn, &ready); err != nil || ready.Type != "ready" || ready.Sid != created.SID {
		t.Fatalf("ready = %+v, %v", ready, err)
	}
	call(t, "DELETE", tokend.URL+"/v1/admin/sessions/"+created.SID, adminKey, "", nil, nil)
	_, _, err = conn.Read(dctx)
	var ce websocket.CloseError
	if !errors.As(err, &ce) || ce.Code != realtime.CloseSessionRevoked {
		t.Errorf("after the revocation: %v, want close code %d", err, realtime.CloseSessionRevoked)
	}
}

func call(t *testing.T, method, url, bearer, body string, cookie *http.Cookie, out any) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if bearer != "" {
		req.Header.Set("Authorization", "Bearer "+bearer)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	if cookie != nil {
		req.AddCookie(cookie)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	if resp.StatusCode >= 300 {
		t.Fatalf("%s %s: %d %s", method, url, resp.StatusCode, raw)
	}
	if out != nil {
		if err := json.Unmarshal(raw, out); err != nil {
			t.Fatalf("%s %s: %v", method, url, err)
		}
	}
}

// lockedBuffer collects the command's log while the test reads it.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
