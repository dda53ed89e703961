package api

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"strconv"
	"time"

	"github.com/tokend/tokend/client"
	"github.com/tokend/tokend/session"
)

// Served with the browser client, client/tokend.js.
const (
	clientJSPath = "/js/tokend.js"
	// clientJSCacheControl lets browsers and CDNs keep the script for a few
	// minutes; after an upgrade the ETag makes revalidation a 304.
	clientJSCacheControl = "public, max-age=300"
)

// handleClientJS serves the browser client. Any origin may load it: apps
// import it as an ES module from their own pages, and browsers fetch module
// scripts with CORS. It is never rate limited or shed: it costs nothing and
// browsers cache it.
func (s *server) handleClientJS() http.HandlerFunc {
	sum := sha256.Sum256(client.JS)
	etag := `"` + base64.RawURLEncoding.EncodeToString(sum[:18]) + `"`
	length := strconv.Itoa(len(client.JS))
	return func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Cache-Control", clientJSCacheControl)
		h.Set("Etag", etag)
		h.Set("Access-Control-Allow-Origin", "*")
		if etagMatches(r.Header.Get("If-None-Match"), etag) {
			w.WriteHeader(http.StatusNotModified)
			return
		}
		h.Set("Content-Type", "text/javascript; charset=utf-8")
		h.Set("Content-Length", length)
		h.Set("X-Content-Type-Options", "nosniff")
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write(client.JS)
	}
}

// devOnly routes to next in dev mode and answers 404, exactly as for an
// unknown path, otherwise. The routes exist in every mode so that the router
// and openapi.yaml list the same operations.
func (s *server) devOnly(next http.Handler) http.Handler {
	if s.cfg.Dev {
		return next
	}
	return s.handleNotFound()
}

// handleDemoPage serves the demo page. Its content security policy admits
// nothing from elsewhere: the page works offline, and proves it.
func (s *server) handleDemoPage() http.HandlerFunc {
	csp := "default-src 'none'; script-src 'self' " + inlineScriptHash(client.DemoPage) +
		"; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
	length := strconv.Itoa(len(client.DemoPage))
	return func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Type", "text/html; charset=utf-8")
		h.Set("Content-Length", length)
		h.Set("Cache-Control", "no-store")
		h.Set("Content-Security-Policy", csp)
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("X-Content-Type-Options", "nosniff")
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write(client.DemoPage)
	}
}

// inlineScriptHash returns the CSP source allowing the page's one inline
// script, or 'unsafe-inline' if the page has none of the expected form.
func inlineScriptHash(page []byte) string {
	const open, end = `<script type="module">`, `</script>`
	i := bytes.Index(page, []byte(open))
	if i < 0 {
		return "'unsafe-inline'"
	}
	body := page[i+len(open):]
	j := bytes.Index(body, []byte(end))
	if j < 0 {
		return "'unsafe-inline'"
	}
	sum := sha256.Sum256(body[:j])
	return "'sha256-" + base64.StdEncoding.EncodeToString(sum[:]) + "'"
}

// devSubject is the subject of demo sessions when the page names none.
const devSubject = "demo"

type devSessionRequest struct {
	Subject    string          `json:"subject"`
	TTLSeconds *int64          `json:"ttl_seconds"`
	Claims     json.RawMessage `json:"claims"`
}

func (req *devSessionRequest) validate(v *session.ValidationError) {
	switch {
	case req.TTLSeconds == nil:
	case *req.TTLSeconds <= 0:
		v.Add("ttl_seconds", "must be a positive integer")
	case *req.TTLSeconds > maxSeconds:
		v.Add("ttl_seconds", "is too large")
	}
}

// handleDevSession gives the demo page a session without an application
// backend: it creates one, as POST /v1/sessions would, and sets the cookie
// itself. The cookie's value never appears in the body, so the page holds
// only the HttpOnly cookie, as a real app would.
func (s *server) handleDevSession() http.HandlerFunc {
	type response struct {
		SID       string    `json:"sid"`
		Subject   string    `json:"subject"`
		CreatedAt time.Time `json:"created_at"`
		ExpiresAt time.Time `json:"expires_at"`
	}
	return func(w http.ResponseWriter, r *http.Request) {
		req, err := decode[devSessionRequest](r, true)
		if err != nil {
			s.fail(w, r, err)
			return
		}
		if req.Subject == "" {
			req.Subject = devSubject
		}
		created, err := s.sessions.Create(r.Context(), session.CreateRequest{
			Subject: req.Subject,
			TTL:     seconds(req.TTLSeconds),
			Claims:  req.Claims,
		})
		if err != nil {
			s.fail(w, r, err)
			return
		}
		s.metrics.created.Inc()
		sess := created.Session
		cookie, _ := s.sessionCookie(created)
		http.SetCookie(w, cookie)
		w.Header().Set("Cache-Control", "no-store")
		encode(w, http.StatusCreated, response{
			SID:       sess.ID,
			Subject:   sess.Subject,
			CreatedAt: timestamp(sess.CreatedAt),
			ExpiresAt: timestamp(sess.ExpiresAt),
		})
	}
}
