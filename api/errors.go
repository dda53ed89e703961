package api

import (
	"errors"
	"log/slog"
	"net/http"
	"strconv"
	"time"

	"github.com/tokend/tokend/issuer"
	"github.com/tokend/tokend/session"
)

// problemTypePrefix makes each problem code a URI, as RFC 9457 wants for
// "type". Clients match on the code, which is also sent on its own.
const problemTypePrefix = "urn:tokend:problem:"

// Error is a failure the API layer itself detects (bad JSON, missing key,
// refused origin). Domain failures arrive as session errors and are mapped in
// problemFor; anything else is an internal error.
type Error struct {
	Status int
	Code   string
	Detail string
	Fields []session.FieldError
	// Header holds extra response headers, such as Retry-After or Allow.
	Header http.Header
}

func (e *Error) Error() string { return e.Code + ": " + e.Detail }

// problem is the RFC 9457 body.
type problem struct {
	Type      string               `json:"type"`
	Title     string               `json:"title"`
	Status    int                  `json:"status"`
	Detail    string               `json:"detail,omitempty"`
	Instance  string               `json:"instance,omitempty"`
	Code      string               `json:"code"`
	RequestID string               `json:"request_id,omitempty"`
	Errors    []session.FieldError `json:"errors,omitempty"`

	header      http.Header
	clearCookie bool
}

// titles are the short, stable summaries of each problem code.
var titles = map[string]string{
	"invalid_request":        "The request is invalid",
	"unauthorized":           "A valid API key is required",
	"session_invalid":        "No valid session",
	"session_expired":        "The session has expired",
	"session_revoked":        "The session was revoked",
	"origin_not_allowed":     "Origin not allowed",
	"not_found":              "Not found",
	"method_not_allowed":     "Method not allowed",
	"request_too_large":      "Request body too large",
	"unsupported_media_type": "Unsupported media type",
	"rate_limited":           "Too many requests",
	"overloaded":             "The service is overloaded",
	"unavailable":            "A dependency is unavailable",
	"rotation_unavailable":   "Key rotation is not available",
	"not_ready":              "The service is not ready",
	"internal":               "Internal error",
}

// problemFor is the one place where an error becomes a status code and a
// body. What a client may know goes in the body; the rest is logged.
func problemFor(err error) problem {
	var (
		apiErr *Error
		verr   *session.ValidationError
	)
	switch {
	case errors.As(err, &apiErr):
		return problem{Status: apiErr.Status, Code: apiErr.Code, Detail: apiErr.Detail, Errors: apiErr.Fields, header: apiErr.Header}
	case errors.As(err, &verr):
		return problem{Status: http.StatusBadRequest, Code: "invalid_request", Detail: verr.Error(), Errors: verr.Fields}
	case errors.Is(err, session.ErrInvalid):
		return problem{Status: http.StatusUnauthorized, Code: "session_invalid",
			Detail: "The session cookie does not identify a session.", clearCookie: true}
	case errors.Is(err, session.ErrExpired):
		return problem{Status: http.StatusUnauthorized, Code: "session_expired",
			Detail: "The session has ended; sign in again.", clearCookie: true}
	case errors.Is(err, session.ErrRevoked):
		return problem{Status: http.StatusUnauthorized, Code: "session_revoked",
			Detail: "The session was revoked; sign in again.", clearCookie: true}
	case errors.Is(err, session.ErrUnavailable):
		return problem{Status: http.StatusServiceUnavailable, Code: "unavailable",
			Detail: "The session store cannot be reached right now; retry after the number of seconds in Retry-After."}
	case errors.Is(err, issuer.ErrRotationDisabled):
		return problem{Status: http.StatusConflict, Code: "rotation_unavailable",
			Detail: "This instance signs with a fixed key (TOKEND_SIGNING_KEY_FILE); rotate by replacing the file."}
	case errors.Is(err, session.ErrNotFound):
		return problem{Status: http.StatusNotFound, Code: "not_found", Detail: "No session has this id."}
	}
	return problem{Status: http.StatusInternalServerError, Code: "internal",
		Detail: "An internal error occurred; it has been logged."}
}

// fail writes err as a problem+json response. Internal errors are logged with
// the request id; client errors are not, since the access log has them.
func (s *server) fail(w http.ResponseWriter, r *http.Request, err error) {
	p := problemFor(err)
	if p.Code == "unavailable" {
		p.header = retryAfterHeader(s.jitterSeconds(1, int(s.protect.ShedRetryAfter/time.Second)))
		s.log.WarnContext(r.Context(), "dependency unavailable",
			slog.String("request_id", requestID(r.Context())),
			slog.String("route", r.Pattern),
			slog.Any("error", err))
	}
	if p.Status >= 500 && p.Code == "internal" {
		s.log.ErrorContext(r.Context(), "request failed",
			slog.String("request_id", requestID(r.Context())),
			slog.String("route", r.Pattern),
			slog.Any("error", err))
	}
	switch p.Code {
	case "unavailable", "internal":
		s.metrics.storeErrors.WithLabelValues(p.Code).Inc()
	}
	if r.URL.Path == "/v1/token" && r.Method == http.MethodPost {
		s.metrics.refusals.WithLabelValues(p.Code).Inc()
	}
	if p.clearCookie {
		http.SetCookie(w, s.clearCookie())
	}
	s.writeProblem(w, r, p)
}

func (s *server) writeProblem(w http.ResponseWriter, r *http.Request, p problem) {
	p.Type = problemTypePrefix + p.Code
	p.Title = titles[p.Code]
	p.Instance = r.URL.Path
	p.RequestID = requestID(r.Context())
	h := w.Header()
	for k, v := range p.header {
		h[k] = v
	}
	h.Set("Cache-Control", "no-store")
	writeJSON(w, p.Status, "application/problem+json", p)
}

func retryAfterHeader(seconds int) http.Header {
	return http.Header{"Retry-After": {strconv.Itoa(seconds)}}
}
