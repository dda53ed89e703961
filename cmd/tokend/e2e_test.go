package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/MicahParks/keyfunc/v3"
	"github.com/golang-jwt/jwt/v5"
)

// buildBinary compiles cmd/tokend once per test run.
var buildBinary = sync.OnceValues(func() (string, error) {
	dir, err := os.MkdirTemp("", "tokend-e2e-")
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "tokend")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		return "", errors.New(string(out))
	}
	return bin, nil
})

// instance is a running tokend binary.
type instance struct {
	cmd    *exec.Cmd
	base   string
	banner string
	stderr *bytes.Buffer
	done   chan error
}

// startBinary starts the real binary with env and waits until it prints its
// address (dev mode) or answers /healthz.
func startBinary(t *testing.T, env ...string) *instance {
	t.Helper()
	bin, err := buildBinary()
	if err != nil {
		t.Fatalf("build tokend: %v", err)
	}
	cmd := exec.Command(bin)
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME")}, env...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	inst := &instance{cmd: cmd, stderr: new(bytes.Buffer), done: make(chan error, 1)}
	cmd.Stderr = inst.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-inst.done
		if t.Failed() {
			t.Logf("tokend stderr:\n%s", inst.stderr.String())
		}
	})

	lines := make(chan string)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
		inst.done <- cmd.Wait()
	}()
	var banner strings.Builder
	timeout := time.After(30 * time.Second)
	for inst.base == "" || !strings.Contains(banner.String(), "Stop with Ctrl-C.") {
		select {
		case line, ok := <-lines:
			if !ok {
				t.Fatalf("tokend exited before it was ready; stderr:\n%s", inst.stderr.String())
			}
			banner.WriteString(line + "\n")
			if m := regexp.MustCompile(`running at (http://\S+)`).FindStringSubmatch(line); m != nil {
				inst.base = m[1]
			}
		case <-timeout:
			t.Fatalf("tokend printed no banner in 30 s; stdout so far:\n%s", banner.String())
		}
	}
	go func() { // keep draining stdout so the process never blocks on it
		for range lines {
		}
	}()
	inst.banner = banner.String()
	return inst
}

func TestEndToEndDevModeBanner(t *testing.T) {
	inst := startBinary(t, "TOKEND_ADDR=127.0.0.1:0")

	// The banner's curl sequence is what a newcomer copies: run it verbatim.
	var script []string
	for _, line := range strings.Split(inst.banner, "\n") {
		l := strings.TrimSpace(line)
		if strings.HasPrefix(l, "COOKIE=$(curl") || strings.HasPrefix(l, "curl ") {
			script = append(script, l+"; echo")
		}
	}
	if len(script) < 5 {
		t.Fatalf("banner has %d commands, want the 5-step curl sequence:\n%s", len(script), inst.banner)
	}
	if _, err := exec.LookPath("curl"); err != nil {
		t.Fatalf("curl is needed to run the banner's sequence: %v", err)
	}
	out, err := exec.Command("bash", "-c", "set -e\n"+strings.Join(script, "\n")).CombinedOutput()
	if err != nil {
		t.Fatalf("banner sequence failed: %v\n%s", err, out)
	}
	results := strings.Split(strings.TrimSpace(string(out)), "\n")
	// Outputs: the COOKIE= line prints an empty echo; then token, JWKS, revoke, refused token.
	var nonEmpty []string
	for _, r := range results {
		if strings.TrimSpace(r) != "" {
			nonEmpty = append(nonEmpty, r)
		}
	}
	if len(nonEmpty) != 4 {
		t.Fatalf("banner sequence printed %d results, want 4:\n%s", len(nonEmpty), out)
	}
	var tok struct {
		AccessToken string `json:"access_token"`
		TokenType   string `json:"token_type"`
	}
	if err := json.Unmarshal([]byte(nonEmpty[0]), &tok); err != nil || tok.AccessToken == "" || tok.TokenType != "Bearer" {
		t.Fatalf("step 2 did not yield a token: %q (%v)", nonEmpty[0], err)
	}
	claims := verifyWithKeyfunc(t, inst.base, tok.AccessToken, "tokend-dev")
	if claims["sub"] != "alice" {
		t.Errorf("sub = %v, want alice", claims["sub"])
	}
	if !strings.Contains(nonEmpty[2], `"revoked":1`) {
		t.Errorf("step 4 revoked nothing: %s", nonEmpty[2])
	}
	var prob struct {
		Status int    `json:"status"`
		Code   string `json:"code"`
	}
	if err := json.Unmarshal([]byte(nonEmpty[3]), &prob); err != nil || prob.Status != 401 || prob.Code != "session_revoked" {
		t.Errorf("token after revocation: %s, want 401 session_revoked", nonEmpty[3])
	}
}

// verifyWithKeyfunc checks a token the way an independent validator would:
// golang-jwt with keys fetched from the live JWKS by keyfunc.
func verifyWithKeyfunc(t *testing.T, base, token, audience string) jwt.MapClaims {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	kf, err := keyfunc.NewDefaultCtx(ctx, []string{base + "/.well-known/jwks.json"})
	if err != nil {
		t.Fatalf("keyfunc: %v", err)
	}
	claims := jwt.MapClaims{}
	parsed, err := jwt.ParseWithClaims(token, claims, kf.Keyfunc,
		jwt.WithIssuer(base),
		jwt.WithAudience(audience),
		jwt.WithExpirationRequired(),
		jwt.WithIssuedAt(),
		jwt.WithValidMethods([]string{"ES256"}))
	if err != nil || !parsed.Valid {
		t.Fatalf("token does not verify against the live JWKS: %v", err)
	}
	if parsed.Header["typ"] != "JWT" || parsed.Header["kid"] == nil {
		t.Errorf("header = %v, want typ JWT and a kid", parsed.Header)
	}
	for _, c := range []string{"iss", "sub", "aud", "exp", "iat", "jti", "sid"} {
		if _, ok := claims[c]; !ok {
			t.Errorf("claim %s missing: %v", c, claims)
		}
	}
	if _, ok := claims["nbf"]; ok {
		t.Errorf("token carries nbf: %v", claims)
	}
	return claims
}

func TestEndToEndProductionConfig(t *testing.T) {
	const (
		svcKey = "service-key-0123456789"
		admKey = "admin-key-0123456789ab"
	)
	// Outside dev mode nothing is printed, so pick a free port ourselves.
	addr := freeAddr(t)
	inst := startBinaryNoBanner(t, "http://"+addr,
		"TOKEND_ADDR="+addr,
		"TOKEND_ISSUER=https://tokend.test",
		"TOKEND_AUDIENCE=ws,chat",
		"TOKEND_SERVICE_KEYS="+svcKey,
		"TOKEND_ADMIN_KEYS="+admKey,
		"TOKEND_ALLOWED_ORIGINS=https://app.test",
		"TOKEND_DRAIN_DELAY=200ms",
	)
	c := &http.Client{Timeout: 5 * time.Second}

	// Create a session with extra claims.
	body := `{"subject":"bob","ttl_seconds":3600,"claims":{"role":"editor","room":42}}`
	req, _ := http.NewRequest("POST", inst.base+"/v1/sessions", strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+svcKey)
	req.Header.Set("Content-Type", "application/json")
	resp := do(t, c, req, http.StatusCreated)
	var created struct {
		SID    string `json:"sid"`
		Cookie struct {
			Name      string `json:"name"`
			Value     string `json:"value"`
			MaxAge    int    `json:"max_age"`
			SetCookie string `json:"set_cookie"`
		} `json:"cookie"`
	}
	decodeBody(t, resp, &created)
	if created.Cookie.MaxAge != 3600 || !strings.Contains(created.Cookie.SetCookie, "Secure") ||
		!strings.Contains(created.Cookie.SetCookie, "HttpOnly") {
		t.Errorf("cookie = %+v, want Max-Age 3600, Secure, HttpOnly outside dev mode", created.Cookie)
	}

	token := func(origin string, want int) map[string]any {
		req, _ := http.NewRequest("POST", inst.base+"/v1/token", nil)
		req.AddCookie(&http.Cookie{Name: created.Cookie.Name, Value: created.Cookie.Value})
		if origin != "" {
			req.Header.Set("Origin", origin)
		}
		var out map[string]any
		decodeBody(t, do(t, c, req, want), &out)
		return out
	}

	// A disallowed origin never gets a token.
	if got := token("https://evil.test", http.StatusForbidden); got["code"] != "origin_not_allowed" {
		t.Errorf("evil origin: %v", got)
	}
	got := token("https://app.test", http.StatusOK)
	claims := verifyWithKeyfuncIssuer(t, inst.base, got["access_token"].(string), "https://tokend.test", "chat")
	if claims["role"] != "editor" || claims["room"] != float64(42) || claims["sid"] != created.SID {
		t.Errorf("claims = %v, want role, room and sid", claims)
	}

	// An admin revokes the session: the next refresh is refused.
	req, _ = http.NewRequest("DELETE", inst.base+"/v1/admin/sessions/"+created.SID+"?reason=stolen", nil)
	req.Header.Set("Authorization", "Bearer "+admKey)
	do(t, c, req, http.StatusOK).Body.Close()
	if got := token("https://app.test", http.StatusUnauthorized); got["code"] != "session_revoked" {
		t.Errorf("after revocation: %v, want session_revoked", got)
	}

	// SIGTERM: readiness turns false during the drain, then a clean exit 0.
	if err := inst.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-inst.done:
		if err != nil {
			t.Fatalf("exit after SIGTERM: %v, want exit status 0", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("tokend did not exit within 10 s of SIGTERM")
	}
}

func verifyWithKeyfuncIssuer(t *testing.T, base, token, iss, aud string) jwt.MapClaims {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	kf, err := keyfunc.NewDefaultCtx(ctx, []string{base + "/.well-known/jwks.json"})
	if err != nil {
		t.Fatalf("keyfunc: %v", err)
	}
	claims := jwt.MapClaims{}
	if _, err := jwt.ParseWithClaims(token, claims, kf.Keyfunc, jwt.WithIssuer(iss), jwt.WithAudience(aud),
		jwt.WithExpirationRequired(), jwt.WithValidMethods([]string{"ES256"})); err != nil {
		t.Fatalf("token does not verify: %v", err)
	}
	return claims
}

func TestEndToEndRefusesBadConfig(t *testing.T) {
	bin, err := buildBinary()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin)
	cmd.Env = []string{"TOKEND_ADDR=127.0.0.1:0", "TOKEND_SERVICE_KEYS=short", "TOKEND_TOKEN_TTL=forever"}
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 1 {
		t.Fatalf("exit = %v, want status 1; output:\n%s", err, out)
	}
	for _, want := range []string{"TOKEND_TOKEN_TTL", "TOKEND_ISSUER is required", "TOKEND_AUDIENCE is required",
		"TOKEND_ADMIN_KEYS is required", "TOKEND_SERVICE_KEYS: key #1 is shorter"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("output does not mention %q:\n%s", want, out)
		}
	}
}

func startBinaryNoBanner(t *testing.T, base string, env ...string) *instance {
	t.Helper()
	bin, err := buildBinary()
	if err != nil {
		t.Fatalf("build tokend: %v", err)
	}
	cmd := exec.Command(bin)
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH")}, env...)
	inst := &instance{cmd: cmd, base: base, stderr: new(bytes.Buffer), done: make(chan error, 1)}
	cmd.Stdout = io.Discard
	cmd.Stderr = inst.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { inst.done <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		select {
		case <-inst.done:
		case <-time.After(5 * time.Second):
		}
		if t.Failed() {
			t.Logf("tokend stderr:\n%s", inst.stderr.String())
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get(base + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return inst
			}
		}
		select {
		case err := <-inst.done:
			t.Fatalf("tokend exited: %v\n%s", err, inst.stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("tokend not healthy within 30 s")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func do(t *testing.T, c *http.Client, req *http.Request, want int) *http.Response {
	t.Helper()
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", req.Method, req.URL.Path, err)
	}
	if resp.StatusCode != want {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		t.Fatalf("%s %s: status %d, want %d: %s", req.Method, req.URL.Path, resp.StatusCode, want, b)
	}
	return resp
}

func decodeBody(t *testing.T, resp *http.Response, v any) {
	t.Helper()
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		t.Fatalf("decode %s: %v", resp.Request.URL.Path, err)
	}
}
