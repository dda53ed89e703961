package memory

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/tokend/tokend/session"
	"github.com/tokend/tokend/store/storetest"
)

func TestContract(t *testing.T) {
	storetest.Run(t, func(t *testing.T) session.Store { return New() })
}

var base = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)

func newSession(id, subject string, created, expires time.Time) session.Session {
	return session.Session{
		ID: id, Subject: subject, SecretHash: session.HashSecret(id),
		CreatedAt: created, ExpiresAt: expires, CookieExpiresAt: expires, LastSeenAt: created,
	}
}

func TestPurge(t *testing.T) {
	ctx := context.Background()
	cutoff := base
	type entry struct {
		id, subject string
		expires     time.Time
		revokedAt   time.Time // zero: not revoked
		purged      bool
	}
	entries := []entry{
		{id: "expired-long-ago", subject: "alice", expires: cutoff.Add(-time.Hour), purged: true},
		{id: "expired-just-before", subject: "alice", expires: cutoff.Add(-time.Nanosecond), purged: true},
		{id: "expires-at-cutoff", subject: "alice", expires: cutoff},
		{id: "expires-after", subject: "alice", expires: cutoff.Add(time.Hour)},
		{id: "revoked-before", subject: "bob", expires: cutoff.Add(time.Hour), revokedAt: cutoff.Add(-time.Minute), purged: true},
		{id: "revoked-at-cutoff", subject: "bob", expires: cutoff.Add(time.Hour), revokedAt: cutoff},
		{id: "revoked-after", subject: "bob", expires: cutoff.Add(time.Hour), revokedAt: cutoff.Add(time.Minute)},
		{id: "revoked-after-expiry", subject: "carol", expires: cutoff.Add(-time.Hour), revokedAt: cutoff.Add(time.Hour), purged: true},
		{id: "only-session-of-dave", subject: "dave", expires: cutoff.Add(-time.Second), purged: true},
	}
	m := New()
	for _, e := range entries {
		if err := m.CreateSession(ctx, newSession(e.id, e.subject, cutoff.Add(-8*time.Hour), e.expires)); err != nil {
			t.Fatal(err)
		}
		if !e.revokedAt.IsZero() {
			if _, err := m.RevokeSession(ctx, e.id, e.revokedAt, "x"); err != nil {
				t.Fatal(err)
			}
		}
	}
	if m.Len() != len(entries) {
		t.Fatalf("Len = %d before purge, want %d", m.Len(), len(entries))
	}

	n, err := m.Purge(ctx, cutoff)
	if err != nil {
		t.Fatal(err)
	}
	wantPurged := 0
	for _, e := range entries {
		_, err := m.Session(ctx, e.id)
		if e.purged {
			wantPurged++
			if !errors.Is(err, session.ErrNotFound) {
				t.Errorf("%s: Session err = %v, want ErrNotFound after purge", e.id, err)
			}
		} else if err != nil {
			t.Errorf("%s: kept session is gone: %v", e.id, err)
		}
	}
	if n != wantPurged {
		t.Errorf("Purge = %d, want %d", n, wantPurged)
	}
	if m.Len() != len(entries)-wantPurged {
		t.Errorf("Len = %d after purge, want %d", m.Len(), len(entries)-wantPurged)
	}

	// Listings and the subject index forget purged sessions.
	for subject, want := range map[string][]string{
		"alice": {"expires-after", "expires-at-cutoff"},
		"bob":   {"revoked-after", "revoked-at-cutoff"},
		"carol": nil,
		"dave":  nil,
	} {
		list, err := m.SessionsBySubject(ctx, subject, 100)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, s := range list {
			got = append(got, s.ID)
		}
		slices.Sort(got)
		if !slices.Equal(got, want) {
			t.Errorf("SessionsBySubject(%s) = %v, want %v", subject, got, want)
		}
		if ids, ok := m.bySubject[subject]; ok && len(ids) != len(want) {
			t.Errorf("subject index of %s holds %d ids, want %d", subject, len(ids), len(want))
		}
		if want == nil {
			if _, ok := m.bySubject[subject]; ok {
				t.Errorf("subject index still has an entry for %s", subject)
			}
		}
	}

	// A purged id can be used again.
	if err := m.CreateSession(ctx, newSession("expired-long-ago", "erin", base, base.Add(time.Hour))); err != nil {
		t.Errorf("CreateSession with a purged id: %v", err)
	}

	// Purging again with the same cutoff finds nothing.
	if n, err := m.Purge(ctx, cutoff); err != nil || n != 0 {
		t.Errorf("second Purge = %d, %v; want 0", n, err)
	}
}

func TestPurgeEmpty(t *testing.T) {
	n, err := New().Purge(context.Background(), base)
	if err != nil || n != 0 {
		t.Errorf("Purge on an empty store = %d, %v", n, err)
	}
}

func TestLen(t *testing.T) {
	ctx := context.Background()
	m := New()
	if m.Len() != 0 {
		t.Fatalf("new store Len = %d", m.Len())
	}
	for i := range 5 {
		if err := m.CreateSession(ctx, newSession(fmt.Sprint("s", i), "alice", base, base.Add(time.Hour))); err != nil {
			t.Fatal(err)
		}
		if m.Len() != i+1 {
			t.Errorf("Len = %d after %d creates", m.Len(), i+1)
		}
	}
	if err := m.CreateSession(ctx, newSession("s0", "bob", base, base.Add(time.Hour))); !errors.Is(err, session.ErrConflict) {
		t.Fatalf("duplicate create err = %v", err)
	}
	if _, err := m.RevokeSubject(ctx, "alice", base, "x"); err != nil {
		t.Fatal(err)
	}
	if m.Len() != 5 {
		t.Errorf("Len = %d after a conflict and revocations, want 5", m.Len())
	}
}

// TestSessionIsACopy checks that a caller cannot change the store through a
// returned session's fields.
func TestSessionIsACopy(t *testing.T) {
	ctx := context.Background()
	m := New()
	if err := m.CreateSession(ctx, newSession("s", "alice", base, base.Add(time.Hour))); err != nil {
		t.Fatal(err)
	}
	got, _ := m.Session(ctx, "s")
	got.RevokedAt = base
	got.Subject = "mallory"
	got.LastSeenAt = base.Add(time.Hour)
	again, _ := m.Session(ctx, "s")
	if !again.RevokedAt.IsZero() || again.Subject != "alice" || !again.LastSeenAt.Equal(base) {
		t.Errorf("store changed through a returned value: %+v", again)
	}
}
