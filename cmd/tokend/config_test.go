package main

import (
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

func env(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

func TestConfigDefaultsAreDevMode(t *testing.T) {
	c, err := loadConfig(nil, env(nil), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if !c.Dev || c.Addr != "127.0.0.1:8080" || c.TokenTTL != 10*time.Minute || c.SessionTTL != 8*time.Hour {
		t.Errorf("defaults = %+v", c)
	}
	if c.CookieName != "tokend_session" || c.CookiePath != "/v1" || c.CookieSameSite != http.SameSiteStrictMode {
		t.Errorf("cookie defaults = %q %q %v", c.CookieName, c.CookiePath, c.CookieSameSite)
	}
	if c.DrainDelay != 0 || c.LogFormat != "text" || len(c.Audience) != 1 {
		t.Errorf("dev defaults: drain %s, log %s, audience %v", c.DrainDelay, c.LogFormat, c.Audience)
	}
}

func TestConfigDevMode(t *testing.T) {
	tests := []struct {
		name string
		env  map[string]string
		args []string
		dev  bool
	}{
		{"nothing set", nil, nil, true},
		{"loopback v6", map[string]string{"TOKEND_ADDR": "[::1]:9000"}, nil, true},
		{"public address", map[string]string{"TOKEND_ADDR": "0.0.0.0:8080", "TOKEND_DEV": ""}, nil, false},
		{"explicit true on public address", map[string]string{"TOKEND_ADDR": "0.0.0.0:8080", "TOKEND_DEV": "true"}, nil, true},
		{"flag wins over env", map[string]string{"TOKEND_DEV": "false"}, []string{"-dev=true"}, true},
		{"configured deployment", map[string]string{
			"TOKEND_ISSUER": "https://t.example", "TOKEND_AUDIENCE": "ws",
			"TOKEND_SERVICE_KEYS": "0123456789abcdef", "TOKEND_ADMIN_KEYS": "fedcba9876543210"}, nil, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := loadConfig(tt.args, env(tt.env), io.Discard)
			if tt.env["TOKEND_ADDR"] == "0.0.0.0:8080" && !tt.dev {
				if err == nil || !strings.Contains(err.Error(), "TOKEND_ISSUER is required") {
					t.Fatalf("public address without config: err = %v, want the missing settings", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if c.Dev != tt.dev {
				t.Errorf("Dev = %v, want %v", c.Dev, tt.dev)
			}
		})
	}
}

func TestConfigReportsEveryProblemAtOnce(t *testing.T) {
	_, err := loadConfig(nil, env(map[string]string{
		"TOKEND_ADDR":            "nonsense",
		"TOKEND_DEV":             "maybe",
		"TOKEND_TOKEN_TTL":       "1s",
		"TOKEND_SESSION_TTL":     "soon",
		"TOKEND_COOKIE_SAMESITE": "sometimes",
		"TOKEND_COOKIE_NAME":     "bad name",
		"TOKEND_COOKIE_PATH":     "/api",
		"TOKEND_ALLOWED_ORIGINS": "https://*.example.com,https://ok.example.com,https://app.example.com/path",
		"TOKEND_ISSUER":          "not a url",
		"TOKEND_SERVICE_KEYS":    "same-key-0123456789",
		"TOKEND_ADMIN_KEYS":      "same-key-0123456789",
		"TOKEND_SIGNING_ALG":     "HS256",
		"TOKEND_LOG_LEVEL":       "loud",
	}), io.Discard)
	if err == nil {
		t.Fatal("want an error")
	}
	for _, want := range []string{
		"TOKEND_ADDR", "TOKEND_DEV", "TOKEND_TOKEN_TTL=1s must be between", "TOKEND_SESSION_TTL",
		"TOKEND_COOKIE_SAMESITE", "TOKEND_COOKIE_NAME", "TOKEND_COOKIE_PATH", `"https://*.example.com"`,
		`"https://app.example.com/path"`, "TOKEND_ISSUER", "must not share a key", "TOKEND_SIGNING_ALG",
		"TOKEND_LOG_LEVEL",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not mention %q:\n%v", want, err)
		}
	}
	if strings.Contains(err.Error(), `"https://ok.example.com"`) {
		t.Errorf("a valid origin was reported:\n%v", err)
	}
}

func TestConfigUnexpectedArguments(t *testing.T) {
	if _, err := loadConfig([]string{"serve"}, env(nil), io.Discard); err == nil {
		t.Fatal("want an error for a stray argument")
	}
}

// freeAddr returns a loopback address with a port nobody listens on.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

func TestConfigLoadProtection(t *testing.T) {
	c, err := loadConfig(nil, env(nil), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if got := c.RateSession.String() + " " + c.RateIP.String() + " " + c.RateService.String(); got != "6/min 600/min 6000/min" {
		t.Errorf("default limits = %s", got)
	}
	if c.MaxInflight <= 0 || c.RedisURL != "" || len(c.TrustedProxies) != 0 {
		t.Errorf("defaults: inflight %d, redis %q, proxies %v", c.MaxInflight, c.RedisURL, c.TrustedProxies)
	}

	c, err = loadConfig(nil, env(map[string]string{
		"TOKEND_RATE_SESSION":    "off",
		"TOKEND_RATE_IP":         "20/s burst 50",
		"TOKEND_RATE_SERVICE":    "100/h",
		"TOKEND_TRUSTED_PROXIES": "10.0.0.0/8, 192.0.2.7, 2001:db8::/32",
		"TOKEND_MAX_INFLIGHT":    "0",
		"TOKEND_REDIS_URL":       "redis://127.0.0.1:6379/2",
	}), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if !c.RateSession.Off() || c.RateIP.Rate != 20 || c.RateIP.Burst != 50 || c.RateIP.Period != time.Second ||
		c.RateService.Period != time.Hour || c.MaxInflight != 0 || len(c.TrustedProxies) != 3 {
		t.Errorf("parsed = %+v", c)
	}

	_, err = loadConfig(nil, env(map[string]string{
		"TOKEND_RATE_SESSION":    "lots",
		"TOKEND_RATE_IP":         "5/week",
		"TOKEND_RATE_SERVICE":    "0/min",
		"TOKEND_TRUSTED_PROXIES": "10.0.0.0/33",
		"TOKEND_MAX_INFLIGHT":    "-1",
		"TOKEND_REDIS_URL":       "http://user:hunter2@redis:6379",
	}), io.Discard)
	if err == nil {
		t.Fatal("want an error")
	}
	for _, want := range []string{"TOKEND_RATE_SESSION", "TOKEND_RATE_IP", "TOKEND_RATE_SERVICE",
		"TOKEND_TRUSTED_PROXIES", "TOKEND_MAX_INFLIGHT", "TOKEND_REDIS_URL"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not mention %s:\n%v", want, err)
		}
	}
	if strings.Contains(err.Error(), "hunter2") {
		t.Errorf("the error repeats the Redis password:\n%v", err)
	}
}
