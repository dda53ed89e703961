package session_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/tokend/tokend/session"
)

// recordingPublisher collects what the service publishes.
type recordingPublisher struct{ got chan []session.Revocation }

func (p recordingPublisher) PublishRevocations(_ context.Context, revs []session.Revocation) {
	p.got <- revs
}

func (p recordingPublisher) next(t *testing.T) []session.Revocation {
	t.Helper()
	select {
	case revs := <-p.got:
		return revs
	case <-time.After(5 * time.Second):
		t.Fatal("nothing was published")
	}
	return nil
}

func (p recordingPublisher) none(t *testing.T) {
	t.Helper()
	select {
	case revs := <-p.got:
		t.Errorf("published %+v, want nothing", revs)
	case <-time.After(50 * time.Millisecond):
	}
}

// closed reports whether ch is closed.
func closed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

func TestRevocationsAreLoggedWokenAndPublished(t *testing.T) {
	pub := recordingPublisher{got: make(chan []session.Revocation, 10)}
	f := newFixture(t, session.Config{TokenTTL: 5 * time.Minute}, session.WithRevocationPublisher(pub))
	ctx := context.Background()
	a := f.create(t, session.CreateRequest{Subject: "alice"})
	b := f.create(t, session.CreateRequest{Subject: "bob"})
	c := f.create(t, session.CreateRequest{Subject: "bob"})

	changed := f.svc.RevocationsChanged()
	if closed(changed) {
		t.Fatal("RevocationsChanged fired before any revocation")
	}
	f.clock.Advance(time.Minute)
	at := f.clock.Now()
	if _, err := f.svc.Revoke(ctx, a.Session.ID, "stolen"); err != nil {
		t.Fatal(err)
	}
	if !closed(changed) {
		t.Error("a revocation did not wake the readers of the log")
	}
	want := session.Revocation{SID: a.Session.ID, Subject: "alice", RevokedAt: at, Reason: "stolen", TokensExpireAt: at.Add(5 * time.Minute)}
	if got := pub.next(t); len(got) != 1 || got[0] != want {
		t.Errorf("published %+v, want %+v", got, want)
	}

	// Revoking again changes nothing: no wake-up, nothing published.
	changed = f.svc.RevocationsChanged()
	if _, err := f.svc.Revoke(ctx, a.Session.ID, "again"); err != nil {
		t.Fatal(err)
	}
	if _, err := f.svc.RevokeSubject(ctx, "nobody", ""); err != nil {
		t.Fatal(err)
	}
	pub.none(t)
	if closed(changed) {
		t.Error("a revocation that revoked nothing woke the readers")
	}

	// A subject-wide revocation, then a logout.
	f.clock.Advance(time.Second)
	subjectAt := f.clock.Now()
	if _, err := f.svc.RevokeSubject(ctx, "bob", "offboarded"); err != nil {
		t.Fatal(err)
	}
	if !closed(changed) {
		t.Error("RevokeSubject did not wake the readers")
	}
	got := pub.next(t)
	wantSIDs := []string{b.Session.ID, c.Session.ID}
	slices.Sort(wantSIDs)
	if len(got) != 2 || got[0].SID != wantSIDs[0] || got[1].SID != wantSIDs[1] ||
		got[0].Reason != "offboarded" || !got[1].RevokedAt.Equal(subjectAt) || !got[1].TokensExpireAt.Equal(subjectAt.Add(5*time.Minute)) {
		t.Errorf("published %+v, want both of bob's sessions", got)
	}
	d := f.create(t, session.CreateRequest{Subject: "dave"})
	if _, err := f.svc.Logout(ctx, d.Credentials.String()); err != nil {
		t.Fatal(err)
	}
	if got := pub.next(t); len(got) != 1 || got[0].SID != d.Session.ID || got[0].Reason != "logout" {
		t.Errorf("published %+v for a logout", got)
	}

	// The log holds the four revocations, in order, with their token expiry.
	log, err := f.svc.Revocations(ctx, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(log) != 4 || log[0].SID != a.Session.ID || log[3].SID != d.Session.ID {
		t.Fatalf("log = %+v", log)
	}
	for _, r := range log {
		if !r.TokensExpireAt.Equal(r.RevokedAt.Add(5 * time.Minute)) {
			t.Errorf("%s: TokensExpireAt %v, want RevokedAt + token TTL", r.SID, r.TokensExpireAt)
		}
	}
	rest, err := f.svc.Revocations(ctx, log[1].Cursor, 1)
	if err != nil || len(rest) != 1 || rest[0] != log[2] {
		t.Errorf("Revocations(after the second, 1) = %+v, %v", rest, err)
	}
}

func TestRevocationsValidates(t *testing.T) {
	f := newFixture(t, session.Config{})
	for _, tc := range []struct {
		after  int64
		limit  int
		fields []string
	}{
		{-1, 0, []string{"after"}},
		{0, -1, []string{"limit"}},
		{0, session.MaxRevocationLimit + 1, []string{"limit"}},
		{-5, 5000, []string{"after", "limit"}},
	} {
		_, err := f.svc.Revocations(context.Background(), tc.after, tc.limit)
		if got := fieldNames(err); !slices.Equal(got, tc.fields) {
			t.Errorf("Revocations(%d, %d): fields %v (%v), want %v", tc.after, tc.limit, got, err, tc.fields)
		}
	}
	if _, err := f.svc.Revocations(context.Background(), 0, session.MaxRevocationLimit); err != nil {
		t.Errorf("the maximum limit: %v", err)
	}
}

func TestNotifyRevocationsWakesEveryReader(t *testing.T) {
	f := newFixture(t, session.Config{})
	a, b := f.svc.RevocationsChanged(), f.svc.RevocationsChanged()
	f.svc.NotifyRevocations()
	if !closed(a) || !closed(b) {
		t.Error("NotifyRevocations did not wake every reader")
	}
	if closed(f.svc.RevocationsChanged()) {
		t.Error("a reader arriving after the notification was woken by it")
	}
}
