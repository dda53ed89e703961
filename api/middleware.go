package api

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/go-chi/chi/v5/middleware"
)

type ctxKey int

const requestIDKey ctxKey = iota

// requestID returns the id of the request carried by ctx, or "".
func requestID(ctx context.Context) string {
	id, _ := ctx.Value(requestIDKey).(string)
	return id
}

// requestID tags each request with an id, taken from a well-formed inbound
// X-Request-Id (so a proxy's id follows the request) or freshly drawn.
func (s *server) requestID(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id := r.Header.Get("X-Request-Id")
		if !validRequestID(id) {
			var b [8]byte
			_, _ = rand.Read(b[:])
			id = hex.EncodeToString(b[:])
		}
		w.Header().Set("X-Request-Id", id)
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), requestIDKey, id)))
	})
}

func validRequestID(id string) bool {
	if id == "" || len(id) > 64 {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '_' || c == '.' || c == ':') {
			return false
		}
	}
	return true
}

// accessLog writes one line per request. It logs the route pattern, never
// the raw path or query (subjects are personal data), and never a header
// value that could carry a credential.
func (s *server) accessLog(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		s.metrics.inFlight.Inc()
		defer s.metrics.inFlight.Dec()
		ww := middleware.NewWrapResponseWriter(w, r.ProtoMajor)
		next.ServeHTTP(ww, r)
		route := "unmatched"
		if rctx := chi.RouteContext(r.Context()); rctx != nil && rctx.RoutePattern() != "" {
			route = rctx.RoutePattern()
		}
		status := ww.Status()
		if status == 0 {
			status = http.StatusOK
		}
		d := time.Since(start)
		s.metrics.observe(route, r.Method, status, d)
		// 503s are answers by design (shedding, a dependency down) and come
		// in floods; they are logged like any other refusal. Other 5xx are
		// errors.
		level := slog.LevelInfo
		if status >= 500 && status != http.StatusServiceUnavailable {
			level = slog.LevelError
		} else if !s.logSampler.allow(start) {
			return
		}
		s.log.LogAttrs(r.Context(), level, "request",
			slog.String("request_id", requestID(r.Context())),
			slog.String("method", r.Method),
			slog.String("route", route),
			slog.Int("status", status),
			slog.Int("bytes", ww.BytesWritten()),
			slog.Duration("duration", d),
			slog.String("client_ip", clientIP(r, s.trusted, s.cfg.ClientIPHeader).String()),
		)
	})
}

// logSampler caps access-log lines per second, so that a herd does not
// turn into a flood of log lines: beyond the cap, lines are counted, and the
// count is logged once the second is over. Errors are always logged.
type logSampler struct {
	perSecond  int64
	log        *slog.Logger
	mu         sync.Mutex
	second     int64 // unix second being counted
	logged     int64
	suppressed int64
}

func (l *logSampler) allow(now time.Time) bool {
	if l == nil || l.perSecond <= 0 {
		return true
	}
	sec := now.Unix()
	l.mu.Lock()
	if sec != l.second {
		if l.suppressed > 0 {
			l.log.Info("access log sampled", slog.Int64("suppressed", l.suppressed),
				slog.Int64("logged", l.logged), slog.Time("second", time.Unix(l.second, 0)))
		}
		l.second, l.logged, l.suppressed = sec, 0, 0
	}
	ok := l.logged < l.perSecond
	if ok {
		l.logged++
	} else {
		l.suppressed++
	}
	l.mu.Unlock()
	return ok
}

// recoverPanics turns a panic into a logged 500 problem, so one bad request
// cannot take the process down. http.ErrAbortHandler is re-raised: it is how
// a handler asks net/http to drop the connection.
func (s *server) recoverPanics(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			v := recover()
			if v == nil {
				return
			}
			if v == http.ErrAbortHandler {
				panic(v)
			}
			s.log.ErrorContext(r.Context(), "panic serving request",
				slog.String("request_id", requestID(r.Context())),
				slog.String("panic", fmt.Sprint(v)),
				slog.String("stack", string(debug.Stack())))
			s.writeProblem(w, r, problemFor(fmt.Errorf("panic: %v", v)))
		}()
		next.ServeHTTP(w, r)
	})
}

// checkOrigin guards the cookie-authenticated endpoints against cross-site
// use. A request carrying an Origin that is neither allowed nor the service's
// own is refused before it can touch a session; an allowed origin gets the
// CORS headers that let the browser read the answer with credentials.
// Requests without Origin come from non-browser clients or same-origin
// navigations; a browser that says Sec-Fetch-Site: cross-site without an
// Origin is refused too.
func (s *server) checkOrigin(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Add("Vary", "Origin")
		origin := r.Header.Get("Origin")
		if origin == "" {
			if r.Header.Get("Sec-Fetch-Site") == "cross-site" {
				s.fail(w, r, &Error{Status: http.StatusForbidden, Code: "origin_not_allowed",
					Detail: "Cross-site requests must carry an allowed Origin."})
				return
			}
			next.ServeHTTP(w, r)
			return
		}
		if !s.originAllowed(origin, r.Host) {
			s.fail(w, r, &Error{Status: http.StatusForbidden, Code: "origin_not_allowed",
				Detail: "This origin is not allowed to use the session endpoints."})
			return
		}
		h.Set("Access-Control-Allow-Origin", origin)
		h.Set("Access-Control-Allow-Credentials", "true")
		h.Set("Access-Control-Expose-Headers", exposedHeaders)
		next.ServeHTTP(w, r)
	})
}

// exposedHeaders are the response headers a cross-origin client must be able
// to read: Retry-After and the RateLimit fields drive its backoff.
const exposedHeaders = "Retry-After, RateLimit, RateLimit-Policy, X-Request-Id"

func (s *server) originAllowed(origin, host string) bool {
	if s.origins[origin] {
		return true
	}
	u, err := url.Parse(origin)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.Path != "" {
		return false
	}
	return strings.EqualFold(u.Host, host)
}

// requireKey admits requests bearing one of keys as a Bearer token.
func (s *server) requireKey(keys [][32]byte) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			auth := r.Header.Get("Authorization")
			scheme, key, _ := strings.Cut(auth, " ")
			var detail string
			switch {
			case auth == "":
				detail = "An Authorization: Bearer <key> header is required."
			case !strings.EqualFold(scheme, "Bearer") || strings.TrimSpace(key) == "":
				detail = "The Authorization header must have the form 'Bearer <key>'."
			case !keyMatches(strings.TrimSpace(key), keys):
				detail = "The API key is not valid for this endpoint."
			default:
				next.ServeHTTP(w, r)
				return
			}
			s.fail(w, r, &Error{Status: http.StatusUnauthorized, Code: "unauthorized", Detail: detail,
				Header: http.Header{"Www-Authenticate": {`Bearer realm="tokend"`}}})
		})
	}
}
