package api

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/getkin/kin-openapi/openapi3filter"

	"github.com/tokend/tokend/issuer"
	"github.com/tokend/tokend/session"
	"github.com/tokend/tokend/store/memory"
)

func init() {
	// The stream is text; its events are checked by the tests themselves.
	openapi3filter.RegisterBodyDecoder("text/event-stream", openapi3filter.PlainBodyDecoder)
}

type revocationPage struct {
	Revocations []revocationView `json:"revocations"`
	Next        int64            `json:"next"`
}

func (e *env) revocations(t *testing.T, query string) revocationPage {
	t.Helper()
	rec := e.do(t, "GET", "/v1/revocations"+query, "", bearer(testServiceKey)...)
	wantStatus(t, rec, http.StatusOK)
	wantHeader(t, rec, "Cache-Control", "no-store")
	return decodeAs[revocationPage](t, rec)
}

// revokeThree revokes three sessions, one of each kind, and returns their
// sids in order: an admin revocation, a logout and a subject-wide one.
func (e *env) revokeThree(t *testing.T) []string {
	t.Helper()
	admin := e.createSession(t, `{"subject":"alice"}`)
	logout := e.createSession(t, `{"subject":"alice"}`)
	subject := e.createSession(t, `{"subject":"bob"}`)
	e.clock.Advance(time.Minute)
	wantStatus(t, e.do(t, "DELETE", "/v1/admin/sessions/"+admin.SID+"?reason=stolen", "", bearer(testAdminKey)...), http.StatusOK)
	e.clock.Advance(time.Second)
	wantStatus(t, e.do(t, "DELETE", "/v1/session", "", withCookie(logout.Cookie.Value)...), http.StatusNoContent)
	e.clock.Advance(time.Second)
	wantStatus(t, e.do(t, "POST", "/v1/admin/subjects/bob/revoke", "", bearer(testAdminKey)...), http.StatusOK)
	return []string{admin.SID, logout.SID, subject.SID}
}

func TestRevocationsList(t *testing.T) {
	e := newEnv(t)
	if page := e.revocations(t, ""); len(page.Revocations) != 0 || page.Next != 0 {
		t.Fatalf("empty log = %+v", page)
	}
	sids := e.revokeThree(t)
	// A repeated revocation is not logged again.
	wantStatus(t, e.do(t, "DELETE", "/v1/admin/sessions/"+sids[0], "", bearer(testAdminKey)...), http.StatusOK)

	page := e.revocations(t, "")
	want := []struct {
		sid, subject, reason string
		at                   time.Time
	}{
		{sids[0], "alice", "stolen", t0.Add(time.Minute)},
		{sids[1], "alice", "logout", t0.Add(time.Minute + time.Second)},
		{sids[2], "bob", "admin", t0.Add(time.Minute + 2*time.Second)},
	}
	if len(page.Revocations) != len(want) {
		t.Fatalf("log = %+v, want %d entries", page.Revocations, len(want))
	}
	for i, w := range want {
		got := page.Revocations[i]
		if got.SID != w.sid || got.Subject != w.subject || got.Reason != w.reason || !got.RevokedAt.Equal(w.at) {
			t.Errorf("entry %d = %+v, want %+v", i, got, w)
		}
		if !got.TokensExpireAt.Equal(w.at.Add(tokenTTL)) {
			t.Errorf("entry %d: tokens_expire_at = %v, want revoked_at + token TTL = %v", i, got.TokensExpireAt, w.at.Add(tokenTTL))
		}
		if i > 0 && got.Cursor <= page.Revocations[i-1].Cursor {
			t.Errorf("cursors not increasing: %d after %d", got.Cursor, page.Revocations[i-1].Cursor)
		}
	}
	if page.Next != page.Revocations[2].Cursor {
		t.Errorf("next = %d, want the last cursor %d", page.Next, page.Revocations[2].Cursor)
	}

	// Paging: after and limit.
	first := e.revocations(t, "?limit=1")
	if len(first.Revocations) != 1 || first.Revocations[0].SID != sids[0] || first.Next != first.Revocations[0].Cursor {
		t.Errorf("limit=1 = %+v", first)
	}
	rest := e.revocations(t, "?after="+strconv.FormatInt(first.Next, 10)+"&limit=100")
	if len(rest.Revocations) != 2 || rest.Revocations[0].SID != sids[1] || rest.Revocations[1].SID != sids[2] {
		t.Errorf("after the first = %+v", rest)
	}
	// Caught up: nothing more, and next stays where it was.
	end := e.revocations(t, "?after="+strconv.FormatInt(page.Next, 10))
	if len(end.Revocations) != 0 || end.Next != page.Next {
		t.Errorf("after the end = %+v, want none and next %d", end, page.Next)
	}
}

func TestRevocationsRefused(t *testing.T) {
	e := newEnv(t)
	for _, tc := range []struct {
		name, target string
		headers      []string
		status       int
		code         string
		fields       []string
	}{
		{"no key", "/v1/revocations", nil, 401, "unauthorized", nil},
		{"admin key", "/v1/revocations", bearer(testAdminKey), 401, "unauthorized", nil},
		{"stream without key", "/v1/revocations/stream", nil, 401, "unauthorized", nil},
		{"stream with admin key", "/v1/revocations/stream", bearer(testAdminKey), 401, "unauthorized", nil},
		{"cursor not a number", "/v1/revocations?after=abc", bearer(testServiceKey), 400, "invalid_request", []string{"after"}},
		{"negative cursor", "/v1/revocations?after=-1", bearer(testServiceKey), 400, "invalid_request", []string{"after"}},
		{"cursor too large", "/v1/revocations?after=99999999999999999999", bearer(testServiceKey), 400, "invalid_request", []string{"after"}},
		{"limit too large", "/v1/revocations?limit=1001", bearer(testServiceKey), 400, "invalid_request", []string{"limit"}},
		{"negative limit", "/v1/revocations?limit=-5", bearer(testServiceKey), 400, "invalid_request", []string{"limit"}},
		{"limit not a number", "/v1/revocations?limit=x&after=y", bearer(testServiceKey), 400, "invalid_request", []string{"after", "limit"}},
		{"stream cursor not a number", "/v1/revocations/stream?after=1.5", bearer(testServiceKey), 400, "invalid_request", []string{"after"}},
		{"stream bad Last-Event-ID", "/v1/revocations/stream", append(bearer(testServiceKey), "Last-Event-ID", "abc"),
			400, "invalid_request", []string{"Last-Event-ID"}},
		{"stream negative Last-Event-ID", "/v1/revocations/stream", append(bearer(testServiceKey), "Last-Event-ID", "-3"),
			400, "invalid_request", []string{"Last-Event-ID"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := wantProblem(t, e.do(t, "GET", tc.target, "", tc.headers...), tc.status, tc.code)
			if tc.fields != nil && strings.Join(p.fields(), ",") != strings.Join(tc.fields, ",") {
				t.Errorf("fields = %v, want %v", p.fields(), tc.fields)
			}
		})
	}
}

// unavailableFeed is a revocation log whose store is down.
type unavailableFeed struct{ changed chan struct{} }

func (unavailableFeed) Revocations(context.Context, int64, int) ([]session.Revocation, error) {
	return nil, fmt.Errorf("read revocations: %w: %s", session.ErrUnavailable, leak)
}

func (f unavailableFeed) RevocationsChanged() <-chan struct{} { return f.changed }

func TestRevocationsStoreUnavailable(t *testing.T) {
	e := newEnv(t, withSessions(func(svc *session.Service) Sessions {
		return struct {
			Sessions
			RevocationFeed
		}{svc, unavailableFeed{}}
	}))
	for _, target := range []string{"/v1/revocations", "/v1/revocations/stream"} {
		rec := e.do(t, "GET", target, "", bearer(testServiceKey)...)
		wantProblem(t, rec, http.StatusServiceUnavailable, "unavailable")
		wantNoLeak(t, rec)
	}
}

func TestRevocationsNotConfigured(t *testing.T) {
	e := newEnv(t, withSessions(func(svc *session.Service) Sessions { return faultySessions{} }))
	for _, target := range []string{"/v1/revocations", "/v1/revocations/stream"} {
		wantProblem(t, e.do(t, "GET", target, "", bearer(testServiceKey)...), http.StatusNotFound, "not_found")
	}
}

// sseEvent is one Server-Sent Event.
type sseEvent struct {
	id, event, data string
	comment         bool
}

// parseSSE splits a stream into its events and comments.
func parseSSE(t *testing.T, body string) []sseEvent {
	t.Helper()
	var (
		out []sseEvent
		cur sseEvent
		any bool
	)
	for _, line := range strings.Split(body, "\n") {
		switch {
		case line == "":
			if any {
				out = append(out, cur)
			}
			cur, any = sseEvent{}, false
		case strings.HasPrefix(line, ":"):
			out = append(out, sseEvent{comment: true, data: strings.TrimSpace(line[1:])})
		default:
			name, value, _ := strings.Cut(line, ": ")
			switch name {
			case "id":
				cur.id = value
			case "event":
				cur.event = value
			case "data":
				cur.data = value
			case "retry":
				cur.event = "retry"
				cur.data = value
			default:
				t.Errorf("unknown SSE field in %q", line)
			}
			any = true
		}
	}
	return out
}

// revocationEvents keeps the revocation events of a stream and checks each.
func revocationEvents(t *testing.T, events []sseEvent) []revocationView {
	t.Helper()
	var out []revocationView
	for _, ev := range events {
		if ev.event != "revocation" {
			continue
		}
		var v revocationView
		if err := json.Unmarshal([]byte(ev.data), &v); err != nil {
			t.Fatalf("event data %q: %v", ev.data, err)
		}
		if ev.id != strconv.FormatInt(v.Cursor, 10) {
			t.Errorf("event id %q, cursor %d: the id must be the cursor", ev.id, v.Cursor)
		}
		out = append(out, v)
	}
	return out
}

// TestRevocationStreamResumes reads the backlog of the stream: a request
// whose client has already gone gets the entries after its starting cursor
// and the stream ends.
func TestRevocationStreamResumes(t *testing.T) {
	e := newEnv(t)
	sids := e.revokeThree(t)
	all := e.revocations(t, "").Revocations

	stream := func(t *testing.T, target string, headers ...string) []revocationView {
		t.Helper()
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		req := newRequest("GET", target, "", append(bearer(testServiceKey), headers...)...).WithContext(ctx)
		rec := e.serve(t, req)
		wantStatus(t, rec, http.StatusOK)
		wantHeader(t, rec, "Content-Type", "text/event-stream")
		wantHeader(t, rec, "Cache-Control", "no-store")
		events := parseSSE(t, rec.Body.String())
		if len(events) == 0 || events[0].event != "retry" || events[0].data != "1000" {
			t.Errorf("stream does not start with retry: 1000: %+v", events)
		}
		return revocationEvents(t, events)
	}
	sidsOf := func(vs []revocationView) string {
		var out []string
		for _, v := range vs {
			out = append(out, v.SID)
		}
		return strings.Join(out, ",")
	}
	cursor := func(i int) string { return strconv.FormatInt(all[i].Cursor, 10) }

	if got := stream(t, "/v1/revocations/stream"); sidsOf(got) != strings.Join(sids, ",") {
		t.Errorf("from the start: %s, want %v", sidsOf(got), sids)
	} else if got[0] != all[0] {
		t.Errorf("event %+v differs from the listed entry %+v", got[0], all[0])
	}
	if got := stream(t, "/v1/revocations/stream?after="+cursor(0)); sidsOf(got) != strings.Join(sids[1:], ",") {
		t.Errorf("after the first: %s", sidsOf(got))
	}
	// Last-Event-ID wins over ?after=, as an EventSource reconnecting to
	// the URL it was opened with needs.
	if got := stream(t, "/v1/revocations/stream?after=0", "Last-Event-ID", cursor(1)); sidsOf(got) != sids[2] {
		t.Errorf("Last-Event-ID after the second: %s, want %s", sidsOf(got), sids[2])
	}
	if got := stream(t, "/v1/revocations/stream", "Last-Event-ID", cursor(2)); len(got) != 0 {
		t.Errorf("caught up: %s, want nothing", sidsOf(got))
	}
}

// streamServer is a real HTTP server over the API with timeouts far
// shorter than a stream's life, as cmd/tokend configures them.
type streamServer struct {
	url      string
	svc      *session.Service
	shutdown chan struct{}
	srv      *httptest.Server
}

func newStreamServer(t *testing.T, heartbeat time.Duration) *streamServer {
	t.Helper()
	key, err := issuer.GenerateKey(issuer.ES256, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	iss, err := issuer.New(testIssuer, []string{testAudience})
	if err != nil {
		t.Fatal(err)
	}
	if err := iss.SetKeys(&key, []issuer.Key{key}); err != nil {
		t.Fatal(err)
	}
	svc := session.NewService(memory.New(), iss, session.Config{TokenTTL: tokenTTL})
	st := &streamServer{svc: svc, shutdown: make(chan struct{})}
	h := NewServer(Options{
		Logger:   slog.New(slog.DiscardHandler),
		Sessions: svc,
		Keys:     iss,
		Config: Config{
			ServiceKeys:     []string{testServiceKey},
			AdminKeys:       []string{testAdminKey},
			StreamHeartbeat: heartbeat,
			// Long, so that only wake-ups can explain a prompt event.
			StreamPoll: time.Hour,
		},
		Shutdown: st.shutdown,
	})
	st.srv = httptest.NewUnstartedServer(h)
	st.srv.Config.ReadTimeout = 300 * time.Millisecond
	st.srv.Config.WriteTimeout = 300 * time.Millisecond
	st.srv.Start()
	t.Cleanup(st.srv.Close)
	st.url = st.srv.URL
	return st
}

// open starts a stream and returns a channel of its events, closed when
// the stream ends.
func (st *streamServer) open(t *testing.T, lastEventID string) <-chan sseEvent {
	t.Helper()
	req, err := http.NewRequest("GET", st.url+"/v1/revocations/stream", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+testServiceKey)
	if lastEventID != "" {
		req.Header.Set("Last-Event-ID", lastEventID)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	resp, err := http.DefaultClient.Do(req.WithContext(ctx))
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("stream: %d %s", resp.StatusCode, b)
	}
	events := make(chan sseEvent, 100)
	go func() {
		defer close(events)
		defer resp.Body.Close()
		sc := bufio.NewScanner(resp.Body)
		var block strings.Builder
		for sc.Scan() {
			block.WriteString(sc.Text() + "\n")
			if sc.Text() == "" {
				for _, ev := range parseSSE(t, block.String()) {
					events <- ev
				}
				block.Reset()
			}
		}
	}()
	return events
}

func next(t *testing.T, events <-chan sseEvent, within time.Duration, what string) sseEvent {
	t.Helper()
	select {
	case ev, ok := <-events:
		if !ok {
			t.Fatalf("the stream ended while waiting for %s", what)
		}
		return ev
	case <-time.After(within):
		t.Fatalf("no %s within %v", what, within)
	}
	return sseEvent{}
}

func (st *streamServer) revoke(t *testing.T, subject string) string {
	t.Helper()
	created, err := st.svc.Create(context.Background(), session.CreateRequest{Subject: subject})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.svc.Revoke(context.Background(), created.Session.ID, ""); err != nil {
		t.Fatal(err)
	}
	return created.Session.ID
}

// TestRevocationStreamLive follows a stream over a real server whose read
// and write timeouts are much shorter than the stream: revocations arrive
// at once (the poll interval is an hour), heartbeats keep coming, and the
// stream outlives both timeouts and ends when the server shuts down.
func TestRevocationStreamLive(t *testing.T) {
	st := newStreamServer(t, 100*time.Millisecond)
	events := st.open(t, "")
	if ev := next(t, events, 5*time.Second, "retry"); ev.event != "retry" {
		t.Fatalf("first event = %+v, want retry", ev)
	}
	waitRevocation := func(sid string) revocationView {
		t.Helper()
		deadline := time.After(2 * time.Second)
		for {
			select {
			case ev, ok := <-events:
				if !ok {
					t.Fatalf("the stream ended while waiting for %s", sid)
				}
				if ev.comment {
					continue
				}
				got := revocationEvents(t, []sseEvent{ev})
				if len(got) != 1 || got[0].SID != sid {
					t.Fatalf("event %+v, want the revocation of %s", ev, sid)
				}
				return got[0]
			case <-deadline:
				t.Fatalf("the revocation of %s did not arrive within 2s", sid)
			}
		}
	}

	sid := st.revoke(t, "alice")
	start := time.Now()
	first := waitRevocation(sid)
	if d := time.Since(start); d > time.Second {
		t.Errorf("revocation took %v to arrive", d)
	}

	// Outlive the server's read and write timeouts (300ms), with
	// heartbeats in between.
	beats := 0
	for end := time.After(900 * time.Millisecond); beats >= 0; {
		select {
		case ev, ok := <-events:
			if !ok {
				t.Fatalf("the stream ended after %d heartbeats, within the server's timeouts", beats)
			}
			if !ev.comment || ev.data != "heartbeat" {
				t.Fatalf("unexpected event while idle: %+v", ev)
			}
			beats++
		case <-end:
			if beats < 3 {
				t.Errorf("%d heartbeats in 900ms at 100ms intervals", beats)
			}
			beats = -1
		}
	}
	second := waitRevocation(st.revoke(t, "bob"))
	if second.Cursor <= first.Cursor {
		t.Errorf("cursor %d after %d", second.Cursor, first.Cursor)
	}

	// A new stream resuming after the first event gets only the second.
	resumed := st.open(t, strconv.FormatInt(first.Cursor, 10))
	next(t, resumed, 5*time.Second, "retry")
	var got []revocationView
	for len(got) == 0 {
		ev := next(t, resumed, 2*time.Second, "the missed revocation")
		got = revocationEvents(t, []sseEvent{ev})
	}
	if got[0].SID != second.SID {
		t.Errorf("resumed stream sent %s, want %s", got[0].SID, second.SID)
	}

	// Shutdown ends both streams (http.Server.Shutdown waits for them).
	close(st.shutdown)
	for _, ch := range []<-chan sseEvent{events, resumed} {
		deadline := time.After(2 * time.Second)
	drain:
		for {
			select {
			case _, ok := <-ch:
				if !ok {
					break drain
				}
			case <-deadline:
				t.Fatal("a stream did not end within 2s of shutdown")
			}
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := st.srv.Config.Shutdown(ctx); err != nil && !errors.Is(err, net.ErrClosed) {
		t.Errorf("Shutdown: %v", err)
	}
}
