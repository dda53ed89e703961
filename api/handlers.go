package api

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/tokend/tokend/issuer"
	"github.com/tokend/tokend/session"
)

func (s *server) handleHealthz() http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		encode(w, http.StatusOK, map[string]string{"status": "ok"})
	}
}

func (s *server) handleReadyz() http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if !s.ready() {
			s.fail(w, r, &Error{Status: http.StatusServiceUnavailable, Code: "not_ready",
				Detail: "This instance is draining or starting; use another one."})
			return
		}
		encode(w, http.StatusOK, map[string]string{"status": "ready"})
	}
}

func (s *server) handleNotFound() http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		s.fail(w, r, &Error{Status: http.StatusNotFound, Code: "not_found", Detail: "No such endpoint."})
	}
}

// handleMethodNotAllowed answers 405 with the Allow header listing the
// methods the path does support.
func (s *server) handleMethodNotAllowed(mux *chi.Mux) http.HandlerFunc {
	methods := []string{"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
	return func(w http.ResponseWriter, r *http.Request) {
		var allowed []string
		for _, m := range methods {
			if mux.Match(chi.NewRouteContext(), m, r.URL.Path) {
				allowed = append(allowed, m)
			}
		}
		s.fail(w, r, &Error{Status: http.StatusMethodNotAllowed, Code: "method_not_allowed",
			Detail: fmt.Sprintf("Use %s on this endpoint.", strings.Join(allowed, " or ")),
			Header: http.Header{"Allow": {strings.Join(allowed, ", ")}}})
	}
}

// handleJWKS serves the precomputed key set. Header values are built once
// per document, so the 304 path allocates nothing of its own.
func (s *server) handleJWKS() http.HandlerFunc {
	maxAge := int(s.cfg.JWKSMaxAge.Seconds())
	cacheControl := []string{fmt.Sprintf("public, max-age=%d, stale-while-revalidate=%d, stale-if-error=%d",
		maxAge, maxAge, 24*3600)}
	contentType := []string{"application/jwk-set+json"}
	anyOrigin := []string{"*"}
	type prepared struct {
		doc    *issuer.JWKS
		etag   []string
		length []string
	}
	var cache atomic.Pointer[prepared]
	served, notModified := s.metrics.jwks.WithLabelValues("200"), s.metrics.jwks.WithLabelValues("304")
	return func(w http.ResponseWriter, r *http.Request) {
		doc := s.keys.JWKS()
		p := cache.Load()
		if p == nil || p.doc != doc {
			p = &prepared{doc: doc, etag: []string{doc.ETag}, length: []string{strconv.Itoa(len(doc.Body))}}
			cache.Store(p)
		}
		h := w.Header()
		h["Cache-Control"] = cacheControl
		h["Etag"] = p.etag
		h["Access-Control-Allow-Origin"] = anyOrigin
		if etagMatches(r.Header.Get("If-None-Match"), doc.ETag) {
			notModified.Inc()
			w.WriteHeader(http.StatusNotModified)
			return
		}
		served.Inc()
		h["Content-Type"] = contentType
		h["Content-Length"] = p.length
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write(doc.Body)
	}
}

// etagMatches implements If-None-Match's weak comparison against a strong
// tag: "*", or any listed tag equal to etag with or without W/.
func etagMatches(header, etag string) bool {
	for header != "" {
		var tag string
		tag, header, _ = strings.Cut(header, ",")
		tag = strings.TrimSpace(tag)
		tag = strings.TrimPrefix(tag, "W/")
		if tag == "*" || tag == etag {
			return true
		}
	}
	return false
}

// cookieValue returns the session cookie sent with r.
func (s *server) cookieValue(r *http.Request) (string, error) {
	c, err := r.Cookie(s.cfg.Cookie.Name)
	if err != nil || c.Value == "" {
		return "", &Error{Status: http.StatusUnauthorized, Code: "session_invalid",
			Detail: fmt.Sprintf("No %s cookie was sent.", s.cfg.Cookie.Name)}
	}
	return c.Value, nil
}

func (s *server) newCookie(value string, maxAge int) *http.Cookie {
	c := s.cfg.Cookie
	return &http.Cookie{
		Name: c.Name, Value: value, Path: c.Path, Domain: c.Domain,
		MaxAge: maxAge, Secure: c.Secure, HttpOnly: true, SameSite: c.SameSite,
	}
}

// clearCookie returns a cookie that deletes the session cookie.
func (s *server) clearCookie() *http.Cookie { return s.newCookie("", -1) }

// timestamp renders times in UTC to the second, as every *_at field is.
func timestamp(t time.Time) time.Time { return t.UTC().Truncate(time.Second) }

// optionalTimestamp is timestamp for fields that are absent when t is zero.
func optionalTimestamp(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	ts := timestamp(t)
	return &ts
}

// queryInt reads an optional integer query parameter; 0 when absent.
func queryInt(q url.Values, name string, verr *session.ValidationError) int {
	raw := q.Get(name)
	if raw == "" {
		return 0
	}
	n, err := strconv.Atoi(raw)
	if err != nil {
		verr.Add(name, "must be an integer")
	}
	return n
}

// sessionCookie is the cookie of a newly created session and its max-age.
func (s *server) sessionCookie(created session.Created) (*http.Cookie, int) {
	sess := created.Session
	maxAge := int(sess.CookieExpiresAt.Sub(sess.CreatedAt).Seconds())
	return s.newCookie(created.Credentials.String(), maxAge), maxAge
}

type tokenResponse struct {
	AccessToken      string    `json:"access_token"`
	TokenType        string    `json:"token_type"`
	ExpiresIn        int64     `json:"expires_in"`
	ExpiresAt        time.Time `json:"expires_at"`
	RefreshIn        int64     `json:"refresh_in"`
	RefreshAt        time.Time `json:"refresh_at"`
	SessionExpiresAt time.Time `json:"session_expires_at"`
}

func (s *server) handleToken() http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		cookie, err := s.cookieValue(r)
		if err != nil {
			s.fail(w, r, err)
			return
		}
		tok, err := s.sessions.Refresh(r.Context(), cookie)
		if err != nil {
			s.fail(w, r, err)
			return
		}
		s.metrics.tokens.Inc()
		s.metrics.refreshIn.Observe(tok.Plan.RefreshIn.Seconds())
		w.Header().Set("Cache-Control", "no-store")
		encode(w, http.StatusOK, tokenResponse{
			AccessToken:      tok.AccessToken,
			TokenType:        "Bearer",
			ExpiresIn:        int64(tok.Plan.ExpiresIn().Seconds()),
			ExpiresAt:        timestamp(tok.Plan.ExpiresAt),
			RefreshIn:        int64(tok.Plan.RefreshIn.Seconds()),
			RefreshAt:        timestamp(tok.Plan.RefreshAt()),
			SessionExpiresAt: timestamp(tok.SessionEndsAt),
		})
	}
}

func (s *server) handleLogout() http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		cookie, err := s.cookieValue(r)
		if err != nil {
			s.fail(w, r, err)
			return
		}
		if _, err := s.sessions.Logout(r.Context(), cookie); err != nil {
			s.fail(w, r, err)
			return
		}
		s.metrics.revoked.WithLabelValues("logout").Inc()
		http.SetCookie(w, s.clearCookie())
		w.Header().Set("Cache-Control", "no-store")
		w.WriteHeader(http.StatusNoContent)
	}
}

// handlePreflight answers CORS preflights. checkOrigin has already refused
// origins that are not allowed and set Allow-Origin for those that are.
func (s *server) handlePreflight(method string) http.HandlerFunc {
	maxAge := strconv.Itoa(int(s.cfg.PreflightMaxAge.Seconds()))
	return func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Allow", method+", OPTIONS")
		if r.Header.Get("Origin") != "" && r.Header.Get("Access-Control-Request-Method") != "" {
			h.Set("Access-Control-Allow-Methods", method)
			h.Set("Access-Control-Allow-Headers", "Content-Type")
			h.Set("Access-Control-Max-Age", maxAge)
			h.Add("Vary", "Access-Control-Request-Method")
			h.Add("Vary", "Access-Control-Request-Headers")
		}
		w.WriteHeader(http.StatusNoContent)
	}
}

// maxSeconds bounds durations given in seconds, far above any rule, so that
// converting them to time.Duration cannot overflow.
const maxSeconds = 100 * 365 * 24 * 3600

type createSessionRequest struct {
	Subject            string          `json:"subject"`
	TTLSeconds         *int64          `json:"ttl_seconds"`
	IdleTimeoutSeconds *int64          `json:"idle_timeout_seconds"`
	Claims             json.RawMessage `json:"claims"`
}

func (req *createSessionRequest) validate(v *session.ValidationError) {
	for field, val := range map[string]*int64{"ttl_seconds": req.TTLSeconds, "idle_timeout_seconds": req.IdleTimeoutSeconds} {
		switch {
		case val == nil:
		case *val <= 0:
			v.Add(field, "must be a positive integer")
		case *val > maxSeconds:
			v.Add(field, "is too large")
		}
	}
	slices.SortFunc(v.Fields, func(a, b session.FieldError) int { return strings.Compare(a.Field, b.Field) })
}

func seconds(p *int64) time.Duration {
	if p == nil {
		return 0
	}
	return time.Duration(*p) * time.Second
}

type cookieView struct {
	Name      string `json:"name"`
	Value     string `json:"value"`
	MaxAge    int    `json:"max_age"`
	SetCookie string `json:"set_cookie"`
}

type createSessionResponse struct {
	SID                string          `json:"sid"`
	Subject            string          `json:"subject"`
	CreatedAt          time.Time       `json:"created_at"`
	ExpiresAt          time.Time       `json:"expires_at"`
	IdleTimeoutSeconds int64           `json:"idle_timeout_seconds,omitempty"`
	Claims             json.RawMessage `json:"claims,omitempty"`
	Cookie             cookieView      `json:"cookie"`
}

func (s *server) handleCreateSession() http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		req, err := decode[createSessionRequest](r, false)
		if err != nil {
			s.fail(w, r, err)
			return
		}
		created, err := s.sessions.Create(r.Context(), session.CreateRequest{
			Subject:     req.Subject,
			TTL:         seconds(req.TTLSeconds),
			IdleTimeout: seconds(req.IdleTimeoutSeconds),
			Claims:      req.Claims,
		})
		if err != nil {
			s.fail(w, r, err)
			return
		}
		s.metrics.created.Inc()
		sess := created.Session
		cookie, maxAge := s.sessionCookie(created)
		w.Header().Set("Cache-Control", "no-store")
		encode(w, http.StatusCreated, createSessionResponse{
			SID:                sess.ID,
			Subject:            sess.Subject,
			CreatedAt:          timestamp(sess.CreatedAt),
			ExpiresAt:          timestamp(sess.ExpiresAt),
			IdleTimeoutSeconds: int64(sess.IdleTimeout.Seconds()),
			Claims:             sess.Claims,
			Cookie: cookieView{
				Name:      cookie.Name,
				Value:     cookie.Value,
				MaxAge:    maxAge,
				SetCookie: cookie.String(),
			},
		})
	}
}

// sessionView is a session as admins see it: never the secret or its hash.
type sessionView struct {
	SID                string          `json:"sid"`
	Subject            string          `json:"subject"`
	Status             session.Status  `json:"status"`
	CreatedAt          time.Time       `json:"created_at"`
	ExpiresAt          time.Time       `json:"expires_at"`
	CookieExpiresAt    time.Time       `json:"cookie_expires_at"`
	IdleTimeoutSeconds int64           `json:"idle_timeout_seconds,omitempty"`
	IdleExpiresAt      *time.Time      `json:"idle_expires_at,omitempty"`
	LastSeenAt         time.Time       `json:"last_seen_at"`
	RevokedAt          *time.Time      `json:"revoked_at,omitempty"`
	RevokeReason       string          `json:"revoke_reason,omitempty"`
	Claims             json.RawMessage `json:"claims,omitempty"`
}

func viewSession(sess session.Session, now time.Time) sessionView {
	v := sessionView{
		SID:                sess.ID,
		Subject:            sess.Subject,
		Status:             sess.StatusAt(now),
		CreatedAt:          timestamp(sess.CreatedAt),
		ExpiresAt:          timestamp(sess.ExpiresAt),
		CookieExpiresAt:    timestamp(sess.CookieExpiresAt),
		IdleTimeoutSeconds: int64(sess.IdleTimeout.Seconds()),
		LastSeenAt:         timestamp(sess.LastSeenAt),
		RevokeReason:       sess.RevokeReason,
		Claims:             sess.Claims,
	}
	v.IdleExpiresAt = optionalTimestamp(sess.IdleDeadline())
	v.RevokedAt = optionalTimestamp(sess.RevokedAt)
	return v
}

func (s *server) handleListSessions() http.HandlerFunc {
	type response struct {
		Subject  string        `json:"subject"`
		Sessions []sessionView `json:"sessions"`
	}
	return func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		var verr session.ValidationError
		if !q.Has("subject") {
			verr.Add("subject", "is required")
		}
		limit := queryInt(q, "limit", &verr)
		if err := verr.Err(); err != nil {
			s.fail(w, r, err)
			return
		}
		list, err := s.sessions.List(r.Context(), q.Get("subject"), limit)
		if err != nil {
			s.fail(w, r, err)
			return
		}
		now := s.now()
		resp := response{Subject: q.Get("subject"), Sessions: make([]sessionView, 0, len(list))}
		for _, sess := range list {
			resp.Sessions = append(resp.Sessions, viewSession(sess, now))
		}
		encode(w, http.StatusOK, resp)
	}
}

func (s *server) handleGetSession() http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		sess, err := s.sessions.Get(r.Context(), chi.URLParam(r, "sid"))
		if err != nil {
			s.fail(w, r, err)
			return
		}
		encode(w, http.StatusOK, viewSession(sess, s.now()))
	}
}

func (s *server) handleRevokeSession() http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		sess, err := s.sessions.Revoke(r.Context(), chi.URLParam(r, "sid"), r.URL.Query().Get("reason"))
		if err != nil {
			s.fail(w, r, err)
			return
		}
		s.metrics.revoked.WithLabelValues("admin").Inc()
		encode(w, http.StatusOK, viewSession(sess, s.now()))
	}
}

type revokeSubjectRequest struct {
	Reason string `json:"reason"`
}

func (s *server) handleRevokeSubject() http.HandlerFunc {
	type response struct {
		Subject string   `json:"subject"`
		Revoked int      `json:"revoked"`
		SIDs    []string `json:"sids"`
	}
	return func(w http.ResponseWriter, r *http.Request) {
		subject, err := pathParam(r, "subject")
		if err != nil {
			s.fail(w, r, err)
			return
		}
		req, err := decode[revokeSubjectRequest](r, true)
		if err != nil {
			s.fail(w, r, err)
			return
		}
		sids, err := s.sessions.RevokeSubject(r.Context(), subject, req.Reason)
		if err != nil {
			s.fail(w, r, err)
			return
		}
		if sids == nil {
			sids = []string{}
		}
		s.metrics.revoked.WithLabelValues("subject").Add(float64(len(sids)))
		encode(w, http.StatusOK, response{Subject: subject, Revoked: len(sids), SIDs: sids})
	}
}

// pathParam returns a path parameter, unescaped. chi routes on the escaped
// path when the URL has one (an escaped "/" in a subject, say), and then its
// parameters are still escaped.
func pathParam(r *http.Request, name string) (string, error) {
	v := chi.URLParam(r, name)
	if r.URL.RawPath == "" {
		return v, nil
	}
	u, err := url.PathUnescape(v)
	if err != nil {
		return "", &Error{Status: http.StatusBadRequest, Code: "invalid_request",
			Detail: fmt.Sprintf("The %s in the path is not correctly escaped.", name)}
	}
	return u, nil
}

type keyView struct {
	KID         string          `json:"kid"`
	Alg         string          `json:"alg"`
	State       issuer.KeyState `json:"state"`
	CreatedAt   time.Time       `json:"created_at"`
	ActivatesAt time.Time       `json:"activates_at"`
	RetiredAt   *time.Time      `json:"retired_at,omitempty"`
	RemoveAt    *time.Time      `json:"remove_at,omitempty"`
}

func viewKey(k issuer.KeyStatus) keyView {
	v := keyView{KID: k.ID, Alg: string(k.Algorithm), State: k.State,
		CreatedAt: timestamp(k.CreatedAt), ActivatesAt: timestamp(k.ActivatesAt)}
	v.RetiredAt = optionalTimestamp(k.RetiredAt)
	v.RemoveAt = optionalTimestamp(k.RemoveAt)
	return v
}

func (s *server) noKeyAdmin(w http.ResponseWriter, r *http.Request) bool {
	if s.keyAdmin != nil {
		return false
	}
	s.fail(w, r, &Error{Status: http.StatusNotFound, Code: "not_found", Detail: "Key administration is not configured."})
	return true
}

func (s *server) handleListKeys() http.HandlerFunc {
	type response struct {
		Keys []keyView `json:"keys"`
	}
	return func(w http.ResponseWriter, r *http.Request) {
		if s.noKeyAdmin(w, r) {
			return
		}
		resp := response{Keys: []keyView{}}
		for _, k := range s.keyAdmin.Status() {
			resp.Keys = append(resp.Keys, viewKey(k))
		}
		encode(w, http.StatusOK, resp)
	}
}

func (s *server) handleRotateKeys() http.HandlerFunc {
	type response struct {
		Key keyView `json:"key"`
	}
	return func(w http.ResponseWriter, r *http.Request) {
		if s.noKeyAdmin(w, r) {
			return
		}
		k, err := s.keyAdmin.Rotate(r.Context())
		if err != nil {
			s.fail(w, r, err)
			return
		}
		encode(w, http.StatusOK, response{Key: viewKey(k)})
	}
}
