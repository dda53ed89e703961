package api

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/tokend/tokend/session"
)

// RevocationFeed is the revocation log as validators read it;
// *session.Service implements it.
type RevocationFeed interface {
	// Revocations returns up to limit entries after the cursor after.
	Revocations(ctx context.Context, after int64, limit int) ([]session.Revocation, error)
	// RevocationsChanged returns a channel closed at the next revocation
	// the feed hears of.
	RevocationsChanged() <-chan struct{}
}

// Defaults of the revocation stream.
const (
	// DefaultStreamHeartbeat is how often an idle stream sends a comment
	// line, so that proxies and validators can tell a quiet stream from a
	// dead one.
	DefaultStreamHeartbeat = 15 * time.Second
	// DefaultStreamPoll is how often a stream reads the log without being
	// woken, so that revocations made on other instances arrive even when
	// no notification does.
	DefaultStreamPoll = time.Second
)

// streamPage is how many entries the stream reads at a time.
const streamPage = 500

// streamWriteTimeout bounds each write to a stream; a validator that does
// not read for that long is dropped (it resumes with Last-Event-ID).
const streamWriteTimeout = 10 * time.Second

type revocationView struct {
	Cursor         int64     `json:"cursor"`
	SID            string    `json:"sid"`
	Subject        string    `json:"subject"`
	RevokedAt      time.Time `json:"revoked_at"`
	Reason         string    `json:"reason"`
	TokensExpireAt time.Time `json:"tokens_expire_at"`
}

func viewRevocation(r session.Revocation) revocationView {
	return revocationView{
		Cursor:    r.Cursor,
		SID:       r.SID,
		Subject:   r.Subject,
		RevokedAt: timestamp(r.RevokedAt),
		Reason:    r.Reason,
		// Rounded up: a validator must not forget the revocation early.
		TokensExpireAt: timestamp(r.TokensExpireAt.Add(time.Second - time.Nanosecond)),
	}
}

// noFeed answers 404 when no revocation feed is configured.
func (s *server) noFeed(w http.ResponseWriter, r *http.Request) bool {
	if s.feed != nil {
		return false
	}
	s.fail(w, r, &Error{Status: http.StatusNotFound, Code: "not_found", Detail: "The revocation feed is not configured."})
	return true
}

// parseCursor reads a cursor: a non-negative integer.
func parseCursor(raw, field string, verr *session.ValidationError) int64 {
	if raw == "" {
		return 0
	}
	n, err := strconv.ParseInt(strings.TrimSpace(raw), 10, 64)
	if err != nil || n < 0 {
		verr.Add(field, "must be a cursor (a non-negative integer)")
		return 0
	}
	return n
}

func (s *server) handleRevocations() http.HandlerFunc {
	type response struct {
		Revocations []revocationView `json:"revocations"`
		Next        int64            `json:"next"`
	}
	return func(w http.ResponseWriter, r *http.Request) {
		if s.noFeed(w, r) {
			return
		}
		q := r.URL.Query()
		var verr session.ValidationError
		after := parseCursor(q.Get("after"), "after", &verr)
		limit := queryInt(q, "limit", &verr)
		if err := verr.Err(); err != nil {
			s.fail(w, r, err)
			return
		}
		revs, err := s.feed.Revocations(r.Context(), after, limit)
		if err != nil {
			s.fail(w, r, err)
			return
		}
		resp := response{Revocations: make([]revocationView, 0, len(revs)), Next: after}
		for _, rev := range revs {
			resp.Revocations = append(resp.Revocations, viewRevocation(rev))
			resp.Next = rev.Cursor
		}
		w.Header().Set("Cache-Control", "no-store")
		encode(w, http.StatusOK, resp)
	}
}

// handleRevocationStream serves the revocation log as Server-Sent Events:
// one "revocation" event per entry, its cursor as the event id, so that an
// EventSource (or any client sending Last-Event-ID) resumes where it left
// off. The stream starts after Last-Event-ID, else after ?after=, else at
// the start of the retained log, and then follows the log: at once for
// revocations made through this instance (and, with PostgreSQL, announced
// by NOTIFY), within the poll interval otherwise.
func (s *server) handleRevocationStream() http.HandlerFunc {
	heartbeat, poll := s.cfg.StreamHeartbeat, s.cfg.StreamPoll
	return func(w http.ResponseWriter, r *http.Request) {
		if s.noFeed(w, r) {
			return
		}
		var verr session.ValidationError
		after := parseCursor(r.URL.Query().Get("after"), "after", &verr)
		if id := r.Header.Get("Last-Event-ID"); id != "" {
			after = parseCursor(id, "Last-Event-ID", &verr)
		}
		if err := verr.Err(); err != nil {
			s.fail(w, r, err)
			return
		}
		ctx := r.Context()
		// Taken before each read, so that a revocation landing between the
		// read and the wait still wakes the stream.
		changed := s.feed.RevocationsChanged()
		page, err := s.feed.Revocations(ctx, after, streamPage)
		if err != nil {
			// Nothing is sent yet: answer with a problem, and the client
			// retries as it would after any failed connection.
			s.fail(w, r, err)
			return
		}

		// The server's WriteTimeout would cut the stream after a few
		// seconds: each write below sets its own deadline instead.
		rc := http.NewResponseController(w)
		h := w.Header()
		h.Set("Content-Type", "text/event-stream")
		h.Set("Cache-Control", "no-store")
		h.Set("X-Accel-Buffering", "no") // nginx: do not buffer the stream
		w.WriteHeader(http.StatusOK)
		// retry: how long an EventSource waits before reconnecting.
		buf := []byte("retry: 1000\n\n")

		failing := false // the last read of the log failed
		pollTimer := time.NewTicker(poll)
		defer pollTimer.Stop()
		beat := time.NewTicker(heartbeat)
		defer beat.Stop()
		for {
			for _, rev := range page {
				data, err := json.Marshal(viewRevocation(rev))
				if err != nil {
					s.log.ErrorContext(ctx, "encoding a revocation failed", slog.Any("error", err))
					return
				}
				buf = fmt.Appendf(buf, "id: %d\nevent: revocation\ndata: %s\n\n", rev.Cursor, data)
				after = rev.Cursor
			}
			if len(buf) > 0 {
				if !s.streamWrite(rc, w, buf) {
					return
				}
				buf = buf[:0]
			}
			if len(page) == streamPage {
				changed = s.feed.RevocationsChanged()
				page, err = s.feed.Revocations(ctx, after, streamPage)
				if err != nil {
					page = nil // wait, then read again
				}
				failing = err != nil
				continue
			}
			select {
			case <-ctx.Done():
				return
			case <-s.shutdown:
				// The server is shutting down: end the stream so that the
				// drain can finish; the client resumes elsewhere.
				return
			case <-beat.C:
				buf = append(buf, ": heartbeat\n\n"...)
			case <-changed:
			case <-pollTimer.C:
			}
			changed = s.feed.RevocationsChanged()
			page, err = s.feed.Revocations(ctx, after, streamPage)
			if err != nil {
				if !failing && ctx.Err() == nil { // once per outage, not once per poll
					s.log.WarnContext(ctx, "reading the revocation log for a stream failed; retrying",
						slog.String("request_id", requestID(ctx)), slog.Any("error", err))
				}
				page = nil
			}
			failing = err != nil
		}
	}
}

// streamWrite writes and flushes b under its own write deadline and
// reports whether the client is still there. (Test recorders have no
// deadlines; the error is ignored.)
func (s *server) streamWrite(rc *http.ResponseController, w http.ResponseWriter, b []byte) bool {
	_ = rc.SetWriteDeadline(time.Now().Add(streamWriteTimeout))
	if _, err := w.Write(b); err != nil {
		return false
	}
	return rc.Flush() == nil
}
