package main

import (
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/tokend/tokend/api"
	"github.com/tokend/tokend/issuer"
	"github.com/tokend/tokend/store/ratelimit"
)

// setting is one configuration variable. Each has an environment name and a
// mirroring flag; a flag given on the command line wins.
type setting struct {
	env  string
	def  string // shown in -help and README; "" means unset
	help string
}

func (s setting) flag() string {
	return strings.ReplaceAll(strings.ToLower(strings.TrimPrefix(s.env, "TOKEND_")), "_", "-")
}

// settings lists every variable tokend reads. README's configuration table
// documents the same list.
var settings = []setting{
	{"TOKEND_ADDR", "127.0.0.1:8080", "listen address (host:port)"},
	{"TOKEND_DEV", "", "dev mode: cookies without Secure, generated keys; default on only when nothing else is configured and the address is loopback"},
	{"TOKEND_ISSUER", "", "iss of tokens, an absolute URL; required outside dev mode (dev: http://ADDR)"},
	{"TOKEND_AUDIENCE", "", "aud of tokens, comma list; required outside dev mode (dev: tokend-dev)"},
	{"TOKEND_TOKEN_TTL", "10m", "access token lifetime"},
	{"TOKEND_SESSION_TTL", "8h", "default and maximum session life"},
	{"TOKEND_TOKEN_REUSE_WINDOW", "2s", "refreshes of one session within this window share one token instead of each signing a new one (0s: off)"},
	{"TOKEND_SERVICE_KEYS", "", "bearer keys for POST /v1/sessions, comma list; required outside dev mode"},
	{"TOKEND_ADMIN_KEYS", "", "bearer keys for /v1/admin, comma list; required outside dev mode"},
	{"TOKEND_ALLOWED_ORIGINS", "", "browser origins allowed to call the cookie endpoints with credentials, comma list"},
	{"TOKEND_COOKIE_NAME", "tokend_session", "session cookie name"},
	{"TOKEND_COOKIE_PATH", "/v1", "session cookie Path"},
	{"TOKEND_COOKIE_DOMAIN", "", "session cookie Domain (unset: host-only)"},
	{"TOKEND_COOKIE_SAMESITE", "strict", "session cookie SameSite: strict, lax or none"},
	{"TOKEND_SIGNING_ALG", "ES256", "signing algorithm of generated keys: ES256, EdDSA or RS256"},
	{"TOKEND_SIGNING_KEY_FILE", "", "PEM private key to sign with instead of a generated one"},
	{"TOKEND_DATABASE_URL", "", "PostgreSQL URL for sessions and signing keys shared by every instance (unset: in memory, lost on restart)"},
	{"TOKEND_KEY_ENCRYPTION_KEY", "", "base64 of 32 random bytes sealing the signing keys stored in PostgreSQL; required with TOKEND_DATABASE_URL outside dev mode"},
	{"TOKEND_KEY_ROTATION", "24h", "how often a new signing key is introduced (0: only on demand)"},
	{"TOKEND_KEY_PUBLISH_DELAY", "", "how long a new key is in the JWKS before it signs (default: twice TOKEND_JWKS_MAX_AGE, covering stale-while-revalidate)"},
	{"TOKEND_REDIS_URL", "", "Redis for rate limits shared by all instances: redis://host:port/db, rediss:// for TLS, ?addr=host:port (repeatable) for a Cluster, ?master_name=NAME for Sentinel (unset: per-instance limits)"},
	{"TOKEND_RATE_SESSION", "6/min", "token and logout requests per session: N/s, N/min or N/h, optionally 'burst B', or off"},
	{"TOKEND_RATE_IP", "600/min", "token and logout requests per client IP, same syntax"},
	{"TOKEND_RATE_SERVICE", "6000/min", "session creations per service key, same syntax"},
	{"TOKEND_TRUSTED_PROXIES", "", "comma list of CIDR prefixes whose Forwarded / X-Forwarded-For headers name the client IP"},
	{"TOKEND_CLIENT_IP_HEADER", "x-forwarded-for", "the header the trusted proxies write the client address into: x-forwarded-for or forwarded (only that one is read)"},
	{"TOKEND_MAX_INFLIGHT", "auto", "concurrent token and session requests before the excess is shed with 503 (auto: 8 per CPU; 0: no bound)"},
	{"TOKEND_JWKS_MAX_AGE", "5m", "Cache-Control max-age of the JWKS document"},
	{"TOKEND_SESSION_RETENTION", "24h", "how long ended sessions stay visible to admins before they are purged"},
	{"TOKEND_DRAIN_DELAY", "5s", "on shutdown, time between /readyz turning false and the listener closing (dev: 0s)"},
	{"TOKEND_SHUTDOWN_TIMEOUT", "15s", "on shutdown, how long in-flight requests may take to finish"},
	{"TOKEND_LOG_LEVEL", "info", "debug, info, warn or error"},
	{"TOKEND_ACCESS_LOG_RATE", "200", "access-log lines per second at most; beyond, lines are counted and summarised once a second (0: log every request; errors are always logged)"},
	{"TOKEND_LOG_FORMAT", "", "json or text (default: text in dev mode, json otherwise)"},
}

// productionSettings are the variables whose presence means "this is a
// configured deployment": with any of them set, dev mode is off unless
// TOKEND_DEV says otherwise.
var productionSettings = []string{
	"TOKEND_ISSUER", "TOKEND_AUDIENCE", "TOKEND_SERVICE_KEYS", "TOKEND_ADMIN_KEYS",
	"TOKEND_ALLOWED_ORIGINS", "TOKEND_SIGNING_KEY_FILE", "TOKEND_COOKIE_DOMAIN",
}

// config is tokend's whole configuration, validated.
type config struct {
	Addr              string
	Dev               bool
	Issuer            string
	Audience          []string
	TokenTTL          time.Duration
	SessionTTL        time.Duration
	TokenReuseWindow  time.Duration
	ServiceKeys       []string
	AdminKeys         []string
	AllowedOrigins    []string
	CookieName        string
	CookiePath        string
	CookieDomain      string
	CookieSameSite    http.SameSite
	SigningAlg        issuer.Algorithm
	SigningKeyFile    string
	JWKSMaxAge        time.Duration
	SessionRetention  time.Duration
	DrainDelay        time.Duration
	ShutdownTimeout   time.Duration
	LogLevel          string
	LogFormat         string
	AccessLogRate     int
	RedisURL          string
	DatabaseURL       string
	KEK               []byte
	insecureKEK       bool // dev mode made up a fixed key-encryption key
	KeyRotation       time.Duration
	KeyPublishDelay   time.Duration
	RateSession       ratelimit.Limit
	RateIP            ratelimit.Limit
	RateService       ratelimit.Limit
	TrustedProxies    []netip.Prefix
	ClientIPHeader    string
	MaxInflight       int
	generatedAPIKeys  bool // dev mode made up the service and admin keys
	explicitDrainTime bool
}

// loadConfig reads flags and environment, and reports every problem at once.
func loadConfig(args []string, getenv func(string) string, stderr io.Writer) (config, error) {
	fs := flag.NewFlagSet("tokend", flag.ContinueOnError)
	fs.SetOutput(stderr)
	flags := make(map[string]*string, len(settings))
	for _, s := range settings {
		help := fmt.Sprintf("%s (env %s", s.help, s.env)
		if s.def != "" {
			help += ", default " + s.def
		}
		flags[s.env] = fs.String(s.flag(), "", help+")")
	}
	fs.Usage = func() {
		fmt.Fprintln(stderr, "Usage: tokend [flags]\n\nEvery flag mirrors an environment variable; a flag wins over its variable.")
		tw := tabwriter.NewWriter(stderr, 2, 4, 2, ' ', 0)
		for _, s := range settings {
			def := s.def
			if def == "" {
				def = "-"
			}
			fmt.Fprintf(tw, "  -%s\t%s\t%s\t%s\n", s.flag(), s.env, def, s.help)
		}
		tw.Flush()
	}
	if err := fs.Parse(args); err != nil {
		return config{}, err
	}
	if fs.NArg() > 0 {
		return config{}, fmt.Errorf("unexpected arguments: %s", strings.Join(fs.Args(), " "))
	}
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	raw := func(env string) string {
		for _, s := range settings {
			if s.env == env && given[s.flag()] {
				return strings.TrimSpace(*flags[env])
			}
		}
		return strings.TrimSpace(getenv(env))
	}
	value := func(env string) string {
		if v := raw(env); v != "" {
			return v
		}
		for _, s := range settings {
			if s.env == env {
				return s.def
			}
		}
		return ""
	}

	var problems []string
	bad := func(format string, a ...any) { problems = append(problems, fmt.Sprintf(format, a...)) }
	duration := func(env string, min, max time.Duration) time.Duration {
		d, err := time.ParseDuration(value(env))
		switch {
		case err != nil:
			bad("%s=%q is not a duration (e.g. 10m, 90s)", env, value(env))
		case d < min || d > max:
			bad("%s=%s must be between %s and %s", env, d, min, max)
		}
		return d
	}

	c := config{
		Addr:             value("TOKEND_ADDR"),
		Issuer:           value("TOKEND_ISSUER"),
		Audience:         list(value("TOKEND_AUDIENCE")),
		TokenTTL:         duration("TOKEND_TOKEN_TTL", 10*time.Second, 24*time.Hour),
		SessionTTL:       duration("TOKEND_SESSION_TTL", time.Minute, 366*24*time.Hour),
		TokenReuseWindow: duration("TOKEND_TOKEN_REUSE_WINDOW", 0, 10*time.Second),
		ServiceKeys:      list(value("TOKEND_SERVICE_KEYS")),
		AdminKeys:        list(value("TOKEND_ADMIN_KEYS")),
		AllowedOrigins:   list(value("TOKEND_ALLOWED_ORIGINS")),
		CookieName:       value("TOKEND_COOKIE_NAME"),
		CookiePath:       value("TOKEND_COOKIE_PATH"),
		CookieDomain:     value("TOKEND_COOKIE_DOMAIN"),
		SigningKeyFile:   value("TOKEND_SIGNING_KEY_FILE"),
		JWKSMaxAge:       duration("TOKEND_JWKS_MAX_AGE", 0, 24*time.Hour),
		SessionRetention: duration("TOKEND_SESSION_RETENTION", 0, 366*24*time.Hour),
		DrainDelay:       duration("TOKEND_DRAIN_DELAY", 0, 5*time.Minute),
		ShutdownTimeout:  duration("TOKEND_SHUTDOWN_TIMEOUT", 0, 10*time.Minute),
		LogLevel:         strings.ToLower(value("TOKEND_LOG_LEVEL")),
		LogFormat:        strings.ToLower(value("TOKEND_LOG_FORMAT")),
		RedisURL:         value("TOKEND_REDIS_URL"),
		DatabaseURL:      value("TOKEND_DATABASE_URL"),
		KeyRotation:      duration("TOKEND_KEY_ROTATION", 0, 366*24*time.Hour),
	}
	c.explicitDrainTime = raw("TOKEND_DRAIN_DELAY") != ""

	host, _, err := net.SplitHostPort(c.Addr)
	if err != nil {
		bad("TOKEND_ADDR=%q must be host:port", c.Addr)
	}
	loopback := isLoopback(host)
	switch v := raw("TOKEND_DEV"); v {
	case "":
		configured := false
		for _, env := range productionSettings {
			configured = configured || raw(env) != ""
		}
		c.Dev = !configured && loopback
	default:
		b, err := strconv.ParseBool(v)
		if err != nil {
			bad("TOKEND_DEV=%q must be true or false", v)
		}
		c.Dev = b
	}

	if alg, err := issuer.ParseAlgorithm(value("TOKEND_SIGNING_ALG")); err != nil {
		bad("TOKEND_SIGNING_ALG: %v", err)
	} else {
		c.SigningAlg = alg
	}
	switch value("TOKEND_COOKIE_SAMESITE") {
	case "strict":
		c.CookieSameSite = http.SameSiteStrictMode
	case "lax":
		c.CookieSameSite = http.SameSiteLaxMode
	case "none":
		c.CookieSameSite = http.SameSiteNoneMode
		if c.Dev {
			bad("TOKEND_COOKIE_SAMESITE=none needs Secure cookies, which dev mode turns off")
		}
	default:
		bad("TOKEND_COOKIE_SAMESITE=%q must be strict, lax or none", value("TOKEND_COOKIE_SAMESITE"))
	}
	if !validCookieName(c.CookieName) {
		bad("TOKEND_COOKIE_NAME=%q is not a valid cookie name", c.CookieName)
	}
	if !strings.HasPrefix(c.CookiePath, "/") || strings.ContainsAny(c.CookiePath, "; \t") {
		bad("TOKEND_COOKIE_PATH=%q must be a path starting with /", c.CookiePath)
	} else if c.CookiePath != "/" && !strings.HasPrefix("/v1/token", strings.TrimSuffix(c.CookiePath, "/")+"/") {
		bad("TOKEND_COOKIE_PATH=%q must cover /v1/token and /v1/session (use / or /v1)", c.CookiePath)
	}
	if strings.ContainsAny(c.CookieDomain, "; \t/") {
		bad("TOKEND_COOKIE_DOMAIN=%q is not a domain", c.CookieDomain)
	}

	if c.Issuer != "" {
		if u, err := url.Parse(c.Issuer); err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
			bad("TOKEND_ISSUER=%q must be an absolute http(s) URL", c.Issuer)
		}
	} else if !c.Dev {
		bad("TOKEND_ISSUER is required outside dev mode")
	}
	if len(c.Audience) == 0 {
		if !c.Dev {
			bad("TOKEND_AUDIENCE is required outside dev mode")
		}
		c.Audience = []string{"tokend-dev"}
	}
	for _, origin := range c.AllowedOrigins {
		if u, err := url.Parse(origin); err != nil || (u.Scheme != "https" && u.Scheme != "http") ||
			!validOriginHost(u.Host) || u.Path != "" || u.RawQuery != "" || u.User != nil || origin != u.Scheme+"://"+u.Host {
			bad("TOKEND_ALLOWED_ORIGINS: %q must be an origin like https://app.example.com (no path, no wildcard)", origin)
		}
	}
	const minKeyLength = 16
	for env, keys := range map[string][]string{"TOKEND_SERVICE_KEYS": c.ServiceKeys, "TOKEND_ADMIN_KEYS": c.AdminKeys} {
		if len(keys) == 0 && !c.Dev {
			bad("%s is required outside dev mode", env)
		}
		for i, k := range keys {
			if len(k) < minKeyLength {
				bad("%s: key #%d is shorter than %d characters", env, i+1, minKeyLength)
			}
		}
	}
	for _, sk := range c.ServiceKeys {
		for _, ak := range c.AdminKeys {
			if sk == ak {
				bad("TOKEND_SERVICE_KEYS and TOKEND_ADMIN_KEYS must not share a key")
			}
		}
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		bad("TOKEND_LOG_LEVEL=%q must be debug, info, warn or error", c.LogLevel)
	}
	if n, err := strconv.Atoi(value("TOKEND_ACCESS_LOG_RATE")); err != nil || n < 0 {
		bad("TOKEND_ACCESS_LOG_RATE=%q must be a whole number (0: no cap)", value("TOKEND_ACCESS_LOG_RATE"))
	} else {
		c.AccessLogRate = n
	}
	switch c.LogFormat {
	case "":
		c.LogFormat = "json"
		if c.Dev {
			c.LogFormat = "text"
		}
	case "json", "text":
	default:
		bad("TOKEND_LOG_FORMAT=%q must be json or text", c.LogFormat)
	}
	for env, dst := range map[string]*ratelimit.Limit{
		"TOKEND_RATE_SESSION": &c.RateSession, "TOKEND_RATE_IP": &c.RateIP, "TOKEND_RATE_SERVICE": &c.RateService,
	} {
		l, err := ratelimit.Parse(value(env))
		if err != nil {
			bad("%s: %v", env, err)
		}
		*dst = l
	}
	c.KeyPublishDelay = 2 * c.JWKSMaxAge
	if raw("TOKEND_KEY_PUBLISH_DELAY") != "" {
		c.KeyPublishDelay = duration("TOKEND_KEY_PUBLISH_DELAY", 0, 7*24*time.Hour)
	}
	if c.KeyRotation > 0 && c.KeyRotation < time.Minute {
		bad("TOKEND_KEY_ROTATION=%s must be 0 or at least 1m", c.KeyRotation)
	}
	if c.DatabaseURL != "" {
		if u, err := url.Parse(c.DatabaseURL); err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
			bad("TOKEND_DATABASE_URL must be a postgres:// URL")
		}
	}
	switch kek := raw("TOKEND_KEY_ENCRYPTION_KEY"); {
	case kek != "":
		b, err := decodeKEK(kek)
		if err != nil {
			bad("TOKEND_KEY_ENCRYPTION_KEY: %v", err)
		}
		c.KEK = b
	case c.DatabaseURL != "" && c.SigningKeyFile == "" && c.Dev:
		sum := sha256.Sum256([]byte("tokend insecure development key-encryption key"))
		c.KEK, c.insecureKEK = sum[:], true
	case c.DatabaseURL != "" && c.SigningKeyFile == "":
		bad("TOKEND_KEY_ENCRYPTION_KEY is required with TOKEND_DATABASE_URL (generate one with: openssl rand -base64 32)")
	}
	if c.RedisURL != "" {
		if u, err := url.Parse(c.RedisURL); err != nil || (u.Scheme != "redis" && u.Scheme != "rediss") || u.Host == "" {
			bad("TOKEND_REDIS_URL must be a redis:// or rediss:// URL")
		}
	}
	if p, err := api.ParseTrustedProxies(list(value("TOKEND_TRUSTED_PROXIES"))); err != nil {
		bad("TOKEND_TRUSTED_PROXIES: %v", err)
	} else {
		c.TrustedProxies = p
	}
	switch v := strings.ToLower(value("TOKEND_CLIENT_IP_HEADER")); v {
	case "x-forwarded-for":
		c.ClientIPHeader = api.HeaderXForwardedFor
	case "forwarded":
		c.ClientIPHeader = api.HeaderForwarded
	default:
		bad("TOKEND_CLIENT_IP_HEADER=%q must be x-forwarded-for or forwarded", v)
	}
	switch v := value("TOKEND_MAX_INFLIGHT"); v {
	case "auto":
		c.MaxInflight = api.DefaultMaxInflight()
	default:
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 || n > 1_000_000 {
			bad("TOKEND_MAX_INFLIGHT=%q must be auto or a whole number (0: no bound)", v)
		}
		c.MaxInflight = n
	}
	if c.Dev && !c.explicitDrainTime {
		c.DrainDelay = 0
	}
	if len(problems) > 0 {
		return config{}, fmt.Errorf("invalid configuration:\n  - %s", strings.Join(problems, "\n  - "))
	}
	return c, nil
}

// decodeKEK reads 32 bytes in standard or URL-safe base64, padded or not.
func decodeKEK(s string) ([]byte, error) {
	for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.RawStdEncoding, base64.URLEncoding, base64.RawURLEncoding} {
		if b, err := enc.DecodeString(s); err == nil {
			if len(b) != 32 {
				return nil, fmt.Errorf("must decode to 32 bytes, not %d", len(b))
			}
			return b, nil
		}
	}
	return nil, errors.New("is not base64 (generate one with: openssl rand -base64 32)")
}

func list(s string) []string {
	var out []string
	for _, part := range strings.Split(s, ",") {
		if p := strings.TrimSpace(part); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// validOriginHost accepts host or host:port where host is a DNS name or an
// IP literal: no wildcards, no empty labels.
func validOriginHost(hostport string) bool {
	host := hostport
	if h, port, err := net.SplitHostPort(hostport); err == nil {
		if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
			return false
		}
		host = h
	}
	if net.ParseIP(strings.Trim(host, "[]")) != nil {
		return true
	}
	for _, label := range strings.Split(host, ".") {
		if label == "" || len(label) > 63 {
			return false
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-') {
				return false
			}
		}
	}
	return host != ""
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

func validCookieName(name string) bool {
	if name == "" {
		return false
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if c <= ' ' || c >= 0x7f || strings.IndexByte(`()<>@,;:\"/[]?={}`, c) >= 0 {
			return false
		}
	}
	return true
}
