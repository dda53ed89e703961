package verify

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tokend/tokend/issuer"
)

// feedServer is a tokend stand-in serving a revocation stream from a log
// the test controls. Each connection sends the entries after its
// Last-Event-ID (or, when dupes is set, from one entry earlier, as a buggy
// server might), then what the test pushes, and ends when the test says.
type feedServer struct {
	srv *httptest.Server

	mu      sync.Mutex
	log     []string // data of entries; the cursor is the index + 1
	resumes []string // Last-Event-ID of each connection
	dupes   bool
	status  int
	silent  bool          // send headers, then nothing at all
	hangUp  chan struct{} // closing it ends the current connections
	pushed  chan struct{}
}

func newFeedServer(t *testing.T) *feedServer {
	f := &feedServer{hangUp: make(chan struct{}), pushed: make(chan struct{}, 100)}
	f.srv = httptest.NewServer(http.HandlerFunc(f.serve))
	t.Cleanup(f.srv.Close)
	return f
}

func (f *feedServer) serve(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != StreamPath || r.Header.Get("Authorization") != "Bearer svc-key" {
		w.Header().Set("Content-Type", "application/problem+json")
		w.WriteHeader(http.StatusUnauthorized)
		fmt.Fprint(w, `{"code":"unauthorized","detail":"The API key is not valid for this endpoint."}`)
		return
	}
	f.mu.Lock()
	f.resumes = append(f.resumes, r.Header.Get("Last-Event-ID"))
	status, silent, dupes, hangUp := f.status, f.silent, f.dupes, f.hangUp
	f.mu.Unlock()
	if status != 0 {
		http.Error(w, "down", status)
		return
	}
	w.Header().Set("Content-Type", "text/event-stream")
	w.WriteHeader(http.StatusOK)
	w.(http.Flusher).Flush()
	if silent {
		select {
		case <-r.Context().Done():
		case <-hangUp:
		}
		return
	}
	after, _ := strconv.Atoi(r.Header.Get("Last-Event-ID"))
	if dupes && after > 0 {
		after--
	}
	fmt.Fprint(w, "retry: 1000\n\n: heartbeat\n\n")
	for {
		f.mu.Lock()
		for ; after < len(f.log); after++ {
			fmt.Fprintf(w, "id: %d\nevent: revocation\ndata: %s\n\n", after+1, f.log[after])
		}
		f.mu.Unlock()
		w.(http.Flusher).Flush()
		select {
		case <-r.Context().Done():
			return
		case <-hangUp:
			return
		case <-f.pushed:
		}
	}
}

// revoke appends a revocation of sid to the log.
func (f *feedServer) revoke(sid string, at time.Time) {
	f.mu.Lock()
	cursor := len(f.log) + 1
	f.log = append(f.log, fmt.Sprintf(`{"cursor":%d,"sid":%q,"subject":"alice","revoked_at":%q,"reason":"admin","tokens_expire_at":%q}`,
		cursor, sid, at.Format(time.RFC3339), at.Add(10*time.Minute).Format(time.RFC3339)))
	f.mu.Unlock()
	for range 10 { // wake every connection
		select {
		case f.pushed <- struct{}{}:
		default:
		}
	}
}

// hangUpAll ends the open connections.
func (f *feedServer) hangUpAll() {
	f.mu.Lock()
	defer f.mu.Unlock()
	close(f.hangUp)
	f.hangUp = make(chan struct{})
}

func (f *feedServer) connections() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.resumes...)
}

// subscription runs Subscribe in the background.
type subscription struct {
	revs      chan Revocation
	connected chan struct{}
	errs      chan error
	done      chan error
	cancel    context.CancelFunc
	stopOnce  sync.Once
	stopErr   error
}

// stop ends the subscription and returns what Subscribe returned.
func (s *subscription) stop(t *testing.T) error {
	t.Helper()
	s.stopOnce.Do(func() {
		s.cancel()
		select {
		case s.stopErr = <-s.done:
		case <-time.After(5 * time.Second):
			t.Error("Subscribe did not return within 5s of its context ending")
		}
	})
	return s.stopErr
}

func subscribe(t *testing.T, v *Verifier, f Feed) *subscription {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	s := &subscription{revs: make(chan Revocation, 100), connected: make(chan struct{}, 100),
		errs: make(chan error, 100), done: make(chan error, 1), cancel: cancel}
	f.OnConnect = func() { s.connected <- struct{}{} }
	f.OnError = func(err error) {
		select {
		case s.errs <- err:
		default:
		}
	}
	if f.MinBackoff == 0 {
		f.MinBackoff, f.MaxBackoff = 10*time.Millisecond, 50*time.Millisecond
	}
	go func() { s.done <- v.Subscribe(ctx, f, func(r Revocation) { s.revs <- r }) }()
	t.Cleanup(func() {
		if err := s.stop(t); err != nil {
			t.Errorf("Subscribe returned %v when its context ended, want nil", err)
		}
	})
	return s
}

func (s *subscription) waitConnected(t *testing.T) {
	t.Helper()
	select {
	case <-s.connected:
	case <-time.After(5 * time.Second):
		t.Fatal("the subscription did not connect within 5s")
	}
}

func (s *subscription) next(t *testing.T) Revocation {
	t.Helper()
	select {
	case r := <-s.revs:
		return r
	case <-time.After(5 * time.Second):
		t.Fatal("no revocation within 5s")
	}
	return Revocation{}
}

func (s *subscription) none(t *testing.T, within time.Duration) {
	t.Helper()
	select {
	case r := <-s.revs:
		t.Fatalf("unexpected revocation %+v", r)
	case <-time.After(within):
	}
}

func TestSubscribeDeliversAndResumes(t *testing.T) {
	key := newKey(t, issuer.ES256)
	js := newJWKSServer(t, key)
	c := &clock{now: t0}
	v := newVerifier(t, js, c)
	fs := newFeedServer(t)
	fs.dupes = true // every reconnection repeats the last entry
	fs.revoke("S1", t0)
	tok2 := js.mint(t, "S2", t0, "")
	if _, err := v.Verify(context.Background(), tok2); err != nil {
		t.Fatal(err)
	}

	sub := subscribe(t, v, Feed{URL: fs.srv.URL + "/", ServiceKey: "svc-key"})
	sub.waitConnected(t)
	// The backlog: a service that starts after a revocation still knows of it.
	if r := sub.next(t); r.SID != "S1" || r.Cursor != 1 || r.Subject != "alice" || r.Reason != "admin" ||
		!r.RevokedAt.Equal(t0) || !r.TokensExpireAt.Equal(t0.Add(10*time.Minute)) {
		t.Fatalf("first revocation = %+v", r)
	}
	fs.revoke("S2", t0)
	if r := sub.next(t); r.SID != "S2" || r.Cursor != 2 {
		t.Fatalf("second revocation = %+v", r)
	}
	// By the time the callback runs, Verify refuses the session.
	_, err := v.Verify(context.Background(), tok2)
	wantKind(t, err, KindRevoked)

	// The connection drops; two revocations happen meanwhile.
	fs.hangUpAll()
	fs.revoke("S3", t0)
	fs.revoke("S4", t0)
	for _, want := range []string{"S3", "S4"} {
		if r := sub.next(t); r.SID != want {
			t.Fatalf("after reconnecting: %+v, want %s", r, want)
		}
	}
	sub.none(t, 100*time.Millisecond) // the repeated entry is not delivered again
	conns := fs.connections()
	if len(conns) < 2 || conns[0] != "" || conns[1] != "2" {
		t.Errorf("Last-Event-ID of the connections = %q, want \"\" then \"2\"", conns)
	}
	select {
	case err := <-sub.errs:
		if !strings.Contains(err.Error(), "ended") {
			t.Errorf("OnError(%v), want the stream's end", err)
		}
	default:
		t.Error("OnError was not called when the stream ended")
	}

	// A new subscription of the same verifier resumes too.
	if err := sub.stop(t); err != nil {
		t.Errorf("Subscribe = %v after its context ended, want nil", err)
	}
	fs.revoke("S5", t0)
	again := subscribe(t, v, Feed{URL: fs.srv.URL, ServiceKey: "svc-key"})
	if r := again.next(t); r.SID != "S5" {
		t.Fatalf("a new subscription got %+v first, want S5", r)
	}
	again.none(t, 50*time.Millisecond)
}

func TestSubscribeRetriesUntilTokendAnswers(t *testing.T) {
	v := newVerifier(t, newJWKSServer(t, newKey(t, issuer.ES256)), &clock{now: t0})
	fs := newFeedServer(t)
	fs.status = http.StatusServiceUnavailable
	fs.revoke("S1", t0)
	sub := subscribe(t, v, Feed{URL: fs.srv.URL, ServiceKey: "svc-key"})
	select {
	case err := <-sub.errs:
		if !strings.Contains(err.Error(), "503") {
			t.Errorf("OnError(%v), want the 503", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no error reported while tokend answers 503")
	}
	fs.mu.Lock()
	fs.status = 0
	fs.mu.Unlock()
	if r := sub.next(t); r.SID != "S1" {
		t.Errorf("got %+v", r)
	}
}

func TestSubscribeReconnectsASilentStream(t *testing.T) {
	v := newVerifier(t, newJWKSServer(t, newKey(t, issuer.ES256)), &clock{now: t0})
	fs := newFeedServer(t)
	fs.silent = true
	sub := subscribe(t, v, Feed{URL: fs.srv.URL, ServiceKey: "svc-key", IdleTimeout: 100 * time.Millisecond})
	sub.waitConnected(t)
	select {
	case err := <-sub.errs:
		if !errors.Is(err, errIdle) {
			t.Errorf("OnError(%v), want the idle timeout", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a silent stream was not given up")
	}
	sub.waitConnected(t) // and opened again
}

func TestSubscribeRefusedKey(t *testing.T) {
	v := newVerifier(t, newJWKSServer(t, newKey(t, issuer.ES256)), &clock{now: t0})
	fs := newFeedServer(t)
	done := make(chan error, 1)
	go func() { done <- v.Subscribe(context.Background(), Feed{URL: fs.srv.URL, ServiceKey: "wrong"}, nil) }()
	select {
	case err := <-done:
		if !errors.Is(err, ErrFeedUnauthorized) || !strings.Contains(err.Error(), "not valid") {
			t.Errorf("Subscribe = %v, want ErrFeedUnauthorized with tokend's detail", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Subscribe keeps retrying a refused key")
	}
}

func TestSubscribeRefusesBadFeeds(t *testing.T) {
	v := newVerifier(t, newJWKSServer(t, newKey(t, issuer.ES256)), &clock{now: t0})
	for _, f := range []Feed{
		{URL: "", ServiceKey: "k"},
		{URL: "tokend:8080", ServiceKey: "k"},
		{URL: "ftp://tokend", ServiceKey: "k"},
		{URL: "http://tokend"},
	} {
		if err := v.Subscribe(context.Background(), f, nil); err == nil {
			t.Errorf("Subscribe(%+v) accepted the feed", f)
		}
	}
}
