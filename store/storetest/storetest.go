// Package storetest is the contract every session.Store implementation must
// pass. A store's own tests call Run with a constructor for a fresh, empty
// store:
//
//	func TestContract(t *testing.T) {
//		storetest.Run(t, func(t *testing.T) session.Store { return memory.New() })
//	}
//
// The suite checks what the session.Store documentation promises and little
// more. Times it stores have whole-millisecond precision and are compared
// with time.Time.Equal, so a store may keep them in any location and at
// microsecond precision (as PostgreSQL does).
package storetest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tokend/tokend/session"
)

// base is the reference time of the suite: whole milliseconds, not UTC-only.
var base = time.Date(2031, 7, 9, 14, 30, 15, 123_000_000, time.UTC)

// Run runs the contract suite. newStore must return a new, empty store each
// time it is called; it may register cleanups on t.
func Run(t *testing.T, newStore func(t *testing.T) session.Store) {
	t.Helper()
	tests := []struct {
		name string
		fn   func(t *testing.T, s session.Store)
	}{
		{"CreateGetRoundTrip", testRoundTrip},
		{"CreateCopiesInput", testCreateCopiesInput},
		{"CreateDuplicateID", testDuplicateID},
		{"NotFound", testNotFound},
		{"TouchSession", testTouch},
		{"RevokeSession", testRevokeSession},
		{"RevokeSessionKeepsFirst", testRevokeKeepsFirst},
		{"RevokeSessionEndedSession", testRevokeEnded},
		{"RevokeSubject", testRevokeSubject},
		{"RevokeSubjectUnknown", testRevokeSubjectUnknown},
		{"SessionsBySubject", testSessionsBySubject},
		{"SubjectIsolation", testSubjectIsolation},
		{"ConcurrentCreateSameID", testConcurrentCreate},
		{"ConcurrentTouch", testConcurrentTouch},
		{"ConcurrentRevokeSession", testConcurrentRevoke},
		{"ConcurrentRevokeSubject", testConcurrentRevokeSubject},
		{"ConcurrentMixed", testConcurrentMixed},
		{"RevocationLog", testRevocationLog},
		{"RevocationLogPaging", testRevocationLogPaging},
		{"RevocationLogConcurrentTail", testRevocationLogConcurrentTail},
		{"RevocationLogPurge", testRevocationLogPurge},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.fn(t, newStore(t))
		})
	}
}

// newID returns a fresh id in the form of a real session id.
func newID() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // never fails
	return base64.RawURLEncoding.EncodeToString(b[:])
}

// sample returns a live session of subject created at created.
func sample(subject string, created time.Time) session.Session {
	id := newID()
	return session.Session{
		ID:              id,
		SecretHash:      session.HashSecret("secret-of-" + id),
		Subject:         subject,
		CreatedAt:       created,
		ExpiresAt:       created.Add(8 * time.Hour),
		CookieExpiresAt: created.Add(8 * time.Hour),
		LastSeenAt:      created,
	}
}

func mustCreate(t *testing.T, s session.Store, sess session.Session) {
	t.Helper()
	if err := s.CreateSession(context.Background(), sess); err != nil {
		t.Fatalf("CreateSession(%s): %v", sess.ID, err)
	}
}

func mustGet(t *testing.T, s session.Store, sid string) session.Session {
	t.Helper()
	got, err := s.Session(context.Background(), sid)
	if err != nil {
		t.Fatalf("Session(%s): %v", sid, err)
	}
	return got
}

// diff describes how got differs from want, or returns "".
func diff(got, want session.Session) string {
	var out []string
	add := func(field string, g, w any) { out = append(out, fmt.Sprintf("%s = %v, want %v", field, g, w)) }
	if got.ID != want.ID {
		add("ID", got.ID, want.ID)
	}
	if !bytes.Equal(got.SecretHash, want.SecretHash) {
		add("SecretHash", fmt.Sprintf("%x", got.SecretHash), fmt.Sprintf("%x", want.SecretHash))
	}
	if got.Subject != want.Subject {
		add("Subject", fmt.Sprintf("%q", got.Subject), fmt.Sprintf("%q", want.Subject))
	}
	if !jsonEqual(got.Claims, want.Claims) {
		add("Claims", string(got.Claims), string(want.Claims))
	}
	for _, f := range []struct {
		name string
		g, w time.Time
	}{
		{"CreatedAt", got.CreatedAt, want.CreatedAt},
		{"ExpiresAt", got.ExpiresAt, want.ExpiresAt},
		{"CookieExpiresAt", got.CookieExpiresAt, want.CookieExpiresAt},
		{"LastSeenAt", got.LastSeenAt, want.LastSeenAt},
		{"RevokedAt", got.RevokedAt, want.RevokedAt},
	} {
		if !f.g.Equal(f.w) {
			add(f.name, f.g, f.w)
		}
	}
	if got.IdleTimeout != want.IdleTimeout {
		add("IdleTimeout", got.IdleTimeout, want.IdleTimeout)
	}
	if got.RevokeReason != want.RevokeReason {
		add("RevokeReason", fmt.Sprintf("%q", got.RevokeReason), fmt.Sprintf("%q", want.RevokeReason))
	}
	if len(out) == 0 {
		return ""
	}
	return fmt.Sprint(out)
}

// jsonEqual compares two claim documents by value; nil only equals nil.
func jsonEqual(a, b json.RawMessage) bool {
	if len(a) == 0 || len(b) == 0 {
		return len(a) == 0 && len(b) == 0
	}
	var va, vb any
	if json.Unmarshal(a, &va) != nil || json.Unmarshal(b, &vb) != nil {
		return false
	}
	return reflect.DeepEqual(va, vb)
}

func ids(list []session.Session) []string {
	out := make([]string, len(list))
	for i, s := range list {
		out[i] = s.ID
	}
	return out
}

func sorted(s []string) []string {
	s = slices.Clone(s)
	slices.Sort(s)
	return s
}

func testRoundTrip(t *testing.T, s session.Store) {
	ctx := context.Background()
	minimal := sample("alice", base)

	full := sample("José 山田 \"quoted\" <tag>", base.Add(-time.Hour))
	full.Claims = json.RawMessage(`{"n":{"deep":[1,2.5,"x",null,true]},"role":"editor","uni":"été"}`)
	full.ExpiresAt = base.Add(7 * time.Hour)
	full.CookieExpiresAt = base.Add(6*time.Hour + 500*time.Millisecond)
	full.IdleTimeout = 45 * time.Minute
	full.LastSeenAt = base.Add(-10*time.Minute + 7*time.Millisecond)

	// A session in another location comes back as the same instant.
	zoned := sample("zoned", base.In(time.FixedZone("X", -7*3600)))

	for name, want := range map[string]session.Session{"minimal": minimal, "full": full, "zoned": zoned} {
		t.Run(name, func(t *testing.T) {
			mustCreate(t, s, want)
			got := mustGet(t, s, want.ID)
			if d := diff(got, want); d != "" {
				t.Errorf("round trip: %s", d)
			}
			if !got.RevokedAt.IsZero() || got.RevokeReason != "" {
				t.Errorf("new session is revoked: %v %q", got.RevokedAt, got.RevokeReason)
			}
			if want.Claims == nil && len(got.Claims) != 0 {
				t.Errorf("nil claims came back as %q", got.Claims)
			}
			list, err := s.SessionsBySubject(ctx, want.Subject, 10)
			if err != nil {
				t.Fatal(err)
			}
			if len(list) != 1 {
				t.Fatalf("SessionsBySubject(%q) = %v, want one session", want.Subject, ids(list))
			}
			if d := diff(list[0], want); d != "" {
				t.Errorf("listed session: %s", d)
			}
		})
	}
}

func testCreateCopiesInput(t *testing.T, s session.Store) {
	in := sample("alice", base)
	in.Claims = json.RawMessage(`{"role":"editor"}`)
	want := in
	want.SecretHash = slices.Clone(in.SecretHash)
	want.Claims = slices.Clone(in.Claims)
	mustCreate(t, s, in)
	// The caller reusing its buffers must not change the stored session.
	for i := range in.SecretHash {
		in.SecretHash[i] ^= 0xff
	}
	copy(in.Claims, `{"role":"admin!"}`)
	if d := diff(mustGet(t, s, want.ID), want); d != "" {
		t.Errorf("stored session changed with the caller's slices: %s", d)
	}
}

func testDuplicateID(t *testing.T, s session.Store) {
	ctx := context.Background()
	first := sample("alice", base)
	mustCreate(t, s, first)

	second := sample("mallory", base.Add(time.Minute))
	second.ID = first.ID
	err := s.CreateSession(ctx, second)
	if !errors.Is(err, session.ErrConflict) {
		t.Fatalf("CreateSession with a taken id: err = %v, want ErrConflict", err)
	}
	if d := diff(mustGet(t, s, first.ID), first); d != "" {
		t.Errorf("first session changed by the conflicting create: %s", d)
	}
	list, err := s.SessionsBySubject(ctx, "mallory", 10)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 0 {
		t.Errorf("the refused session is listed under its subject: %v", ids(list))
	}
	list, err = s.SessionsBySubject(ctx, "alice", 10)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 1 {
		t.Errorf("alice has %d sessions after the conflict, want 1", len(list))
	}
}

func testNotFound(t *testing.T, s session.Store) {
	ctx := context.Background()
	mustCreate(t, s, sample("alice", base))
	unknown := newID()
	if _, err := s.Session(ctx, unknown); !errors.Is(err, session.ErrNotFound) {
		t.Errorf("Session(unknown) err = %v, want ErrNotFound", err)
	}
	if err := s.TouchSession(ctx, unknown, base); !errors.Is(err, session.ErrNotFound) {
		t.Errorf("TouchSession(unknown) err = %v, want ErrNotFound", err)
	}
	if _, err := s.RevokeSession(ctx, unknown, base, "x"); !errors.Is(err, session.ErrNotFound) {
		t.Errorf("RevokeSession(unknown) err = %v, want ErrNotFound", err)
	}
	if _, err := s.Session(ctx, ""); !errors.Is(err, session.ErrNotFound) {
		t.Errorf("Session(\"\") err = %v, want ErrNotFound", err)
	}
	// Revoking or touching an unknown id creates nothing.
	if _, err := s.Session(ctx, unknown); !errors.Is(err, session.ErrNotFound) {
		t.Errorf("Session(unknown) after writes err = %v, want ErrNotFound", err)
	}
}

func testTouch(t *testing.T, s session.Store) {
	ctx := context.Background()
	want := sample("alice", base)
	want.IdleTimeout = time.Hour
	other := sample("alice", base)
	mustCreate(t, s, want)
	mustCreate(t, s, other)

	steps := []struct {
		name string
		at   time.Time
		want time.Time
	}{
		{"forward", base.Add(90 * time.Second), base.Add(90 * time.Second)},
		{"same time", base.Add(90 * time.Second), base.Add(90 * time.Second)},
		{"backward is ignored", base.Add(30 * time.Second), base.Add(90 * time.Second)},
		{"forward by a millisecond", base.Add(90*time.Second + time.Millisecond), base.Add(90*time.Second + time.Millisecond)},
		{"far forward", base.Add(5 * time.Hour), base.Add(5 * time.Hour)},
		{"before creation is ignored", base.Add(-time.Hour), base.Add(5 * time.Hour)},
	}
	for _, st := range steps {
		if err := s.TouchSession(ctx, want.ID, st.at); err != nil {
			t.Fatalf("%s: TouchSession: %v", st.name, err)
		}
		want.LastSeenAt = st.want
		if d := diff(mustGet(t, s, want.ID), want); d != "" {
			t.Errorf("%s: %s", st.name, d)
		}
	}
	if d := diff(mustGet(t, s, other.ID), other); d != "" {
		t.Errorf("touch changed another session: %s", d)
	}
}

func testRevokeSession(t *testing.T, s session.Store) {
	ctx := context.Background()
	want := sample("alice", base)
	want.Claims = json.RawMessage(`{"a":1}`)
	other := sample("alice", base)
	mustCreate(t, s, want)
	mustCreate(t, s, other)

	at := base.Add(20*time.Minute + 5*time.Millisecond)
	got, err := s.RevokeSession(ctx, want.ID, at, "stolen laptop")
	if err != nil {
		t.Fatalf("RevokeSession: %v", err)
	}
	want.RevokedAt = at
	want.RevokeReason = "stolen laptop"
	if d := diff(got, want); d != "" {
		t.Errorf("returned session: %s", d)
	}
	if d := diff(mustGet(t, s, want.ID), want); d != "" {
		t.Errorf("stored session: %s", d)
	}
	if st := mustGet(t, s, want.ID).StatusAt(at); st != session.StatusRevoked {
		t.Errorf("status after revoke = %q", st)
	}
	if d := diff(mustGet(t, s, other.ID), other); d != "" {
		t.Errorf("revoke changed another session: %s", d)
	}
}

func testRevokeKeepsFirst(t *testing.T, s session.Store) {
	ctx := context.Background()
	want := sample("alice", base)
	mustCreate(t, s, want)
	first := base.Add(time.Minute)
	if _, err := s.RevokeSession(ctx, want.ID, first, "logout"); err != nil {
		t.Fatal(err)
	}
	want.RevokedAt = first
	want.RevokeReason = "logout"
	for _, at := range []time.Time{base.Add(2 * time.Minute), base.Add(30 * time.Second)} {
		got, err := s.RevokeSession(ctx, want.ID, at, "admin")
		if err != nil {
			t.Fatalf("second RevokeSession: %v", err)
		}
		if d := diff(got, want); d != "" {
			t.Errorf("second revoke at %v returned: %s", at, d)
		}
		if d := diff(mustGet(t, s, want.ID), want); d != "" {
			t.Errorf("second revoke at %v stored: %s", at, d)
		}
	}
	// A session revoked by RevokeSubject is also kept as first revoked.
	if ids, err := s.RevokeSubject(ctx, "alice", base.Add(3*time.Minute), "subject"); err != nil || len(ids) != 0 {
		t.Errorf("RevokeSubject over a revoked session = %v, %v; want none", ids, err)
	}
	if d := diff(mustGet(t, s, want.ID), want); d != "" {
		t.Errorf("after RevokeSubject: %s", d)
	}
}

func testRevokeEnded(t *testing.T, s session.Store) {
	ctx := context.Background()
	want := sample("alice", base)
	mustCreate(t, s, want)
	// RevokeSession marks even a session past its expiry.
	at := want.ExpiresAt.Add(time.Hour)
	got, err := s.RevokeSession(ctx, want.ID, at, "logout")
	if err != nil {
		t.Fatal(err)
	}
	want.RevokedAt = at
	want.RevokeReason = "logout"
	if d := diff(got, want); d != "" {
		t.Errorf("revoke of an expired session: %s", d)
	}
}

func testRevokeSubject(t *testing.T, s session.Store) {
	ctx := context.Background()
	at := base.Add(2 * time.Hour)

	live1 := sample("alice", base)
	live2 := sample("alice", base.Add(time.Minute))
	live2.IdleTimeout = 3 * time.Hour
	lastMs := sample("alice", base) // one millisecond of life left
	lastMs.ExpiresAt = at.Add(time.Millisecond)
	lastMs.CookieExpiresAt = lastMs.ExpiresAt
	revoked := sample("alice", base)
	expired := sample("alice", base.Add(-9*time.Hour)) // expired at base-1h
	endsNow := sample("alice", at.Add(-8*time.Hour))   // expires exactly at `at`
	bob := sample("bob", base)
	aliceLike := sample("alice2", base)
	for _, sess := range []session.Session{live1, live2, lastMs, revoked, expired, endsNow, bob, aliceLike} {
		mustCreate(t, s, sess)
	}
	revokedAt := base.Add(time.Hour)
	if _, err := s.RevokeSession(ctx, revoked.ID, revokedAt, "logout"); err != nil {
		t.Fatal(err)
	}
	revoked.RevokedAt, revoked.RevokeReason = revokedAt, "logout"

	got, err := s.RevokeSubject(ctx, "alice", at, "compromised")
	if err != nil {
		t.Fatalf("RevokeSubject: %v", err)
	}
	wantIDs := sorted([]string{live1.ID, live2.ID, lastMs.ID})
	if !slices.Equal(sorted(got), wantIDs) {
		t.Errorf("RevokeSubject = %v, want %v", sorted(got), wantIDs)
	}
	for _, sess := range []*session.Session{&live1, &live2, &lastMs} {
		sess.RevokedAt, sess.RevokeReason = at, "compromised"
	}
	for name, want := range map[string]session.Session{
		"live1": live1, "live2": live2, "last millisecond": lastMs,
		"already revoked": revoked, "expired": expired, "expired exactly at revocation": endsNow,
		"other subject": bob, "subject with the same prefix": aliceLike,
	} {
		if d := diff(mustGet(t, s, want.ID), want); d != "" {
			t.Errorf("%s: %s", name, d)
		}
	}

	again, err := s.RevokeSubject(ctx, "alice", at.Add(time.Minute), "again")
	if err != nil {
		t.Fatal(err)
	}
	if len(again) != 0 {
		t.Errorf("second RevokeSubject = %v, want none", again)
	}
}

func testRevokeSubjectUnknown(t *testing.T, s session.Store) {
	mustCreate(t, s, sample("alice", base))
	got, err := s.RevokeSubject(context.Background(), "nobody", base, "x")
	if err != nil || len(got) != 0 {
		t.Errorf("RevokeSubject(unknown) = %v, %v; want none, nil", got, err)
	}
}

func testSessionsBySubject(t *testing.T, s session.Store) {
	ctx := context.Background()
	// Created out of order; includes ended sessions, which are listed too.
	offsets := []time.Duration{3, 0, 4, 1, 2, 6, 5}
	var all []session.Session
	for _, off := range offsets {
		sess := sample("alice", base.Add(off*time.Minute))
		if off == 4 {
			sess.ExpiresAt = base.Add(-time.Hour) // already expired
		}
		mustCreate(t, s, sess)
		all = append(all, sess)
	}
	revoked, err := s.RevokeSession(ctx, all[1].ID, base.Add(time.Hour), "logout")
	if err != nil {
		t.Fatal(err)
	}
	all[1] = revoked
	mustCreate(t, s, sample("bob", base.Add(10*time.Minute)))

	newestFirst := slices.Clone(all)
	slices.SortFunc(newestFirst, func(a, b session.Session) int { return b.CreatedAt.Compare(a.CreatedAt) })

	for _, limit := range []int{1, 3, len(all) - 1, len(all), len(all) + 1, 1000} {
		t.Run(fmt.Sprintf("limit %d", limit), func(t *testing.T) {
			got, err := s.SessionsBySubject(ctx, "alice", limit)
			if err != nil {
				t.Fatal(err)
			}
			want := newestFirst[:min(limit, len(newestFirst))]
			if !slices.Equal(ids(got), ids(want)) {
				t.Fatalf("SessionsBySubject(alice, %d) = %v, want %v", limit, ids(got), ids(want))
			}
			for i := range got {
				if d := diff(got[i], want[i]); d != "" {
					t.Errorf("session %d: %s", i, d)
				}
			}
		})
	}
	got, err := s.SessionsBySubject(ctx, "nobody", 10)
	if err != nil || len(got) != 0 {
		t.Errorf("SessionsBySubject(nobody) = %v, %v; want none", ids(got), err)
	}
}

func testSubjectIsolation(t *testing.T, s session.Store) {
	ctx := context.Background()
	// Subjects that a careless query (LIKE, case folding, trimming,
	// prefix match) would confuse.
	subjects := []string{"alice", "Alice", "alice2", "alic", "alice ", "al%", "al_ce", "alice\u00a0", "élise", "e\u0301lise"}
	byID := map[string]string{}
	for i, subj := range subjects {
		for j := 0; j <= i%3; j++ {
			sess := sample(subj, base.Add(time.Duration(i*10+j)*time.Second))
			mustCreate(t, s, sess)
			byID[sess.ID] = subj
		}
	}
	for i, subj := range subjects {
		list, err := s.SessionsBySubject(ctx, subj, 100)
		if err != nil {
			t.Fatal(err)
		}
		if len(list) != i%3+1 {
			t.Errorf("SessionsBySubject(%q) has %d sessions, want %d", subj, len(list), i%3+1)
		}
		for _, sess := range list {
			if sess.Subject != subj || byID[sess.ID] != subj {
				t.Errorf("SessionsBySubject(%q) returned %s of %q", subj, sess.ID, byID[sess.ID])
			}
		}
	}
	// Revoking one subject leaves the look-alikes alone.
	got, err := s.RevokeSubject(ctx, "al%", base.Add(time.Hour), "x")
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range got {
		if byID[id] != "al%" {
			t.Errorf("RevokeSubject(al%%) revoked %s of %q", id, byID[id])
		}
	}
	for id, subj := range byID {
		revoked := !mustGet(t, s, id).RevokedAt.IsZero()
		if revoked != (subj == "al%") {
			t.Errorf("session of %q revoked = %v", subj, revoked)
		}
	}
}

func testConcurrentCreate(t *testing.T, s session.Store) {
	const n = 16
	id := newID()
	var (
		wg        sync.WaitGroup
		mu        sync.Mutex
		ok        []int
		conflicts int
		others    []error
	)
	for i := range n {
		wg.Go(func() {
			sess := sample(fmt.Sprintf("user-%d", i), base)
			sess.ID = id
			err := s.CreateSession(context.Background(), sess)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				ok = append(ok, i)
			case errors.Is(err, session.ErrConflict):
				conflicts++
			default:
				others = append(others, err)
			}
		})
	}
	wg.Wait()
	if len(ok) != 1 || conflicts != n-1 || len(others) != 0 {
		t.Fatalf("concurrent creates of one id: %d succeeded, %d conflicts, errors %v", len(ok), conflicts, others)
	}
	if got := mustGet(t, s, id).Subject; got != fmt.Sprintf("user-%d", ok[0]) {
		t.Errorf("stored subject %q is not the winner's user-%d", got, ok[0])
	}
}

func testConcurrentTouch(t *testing.T, s session.Store) {
	sess := sample("alice", base)
	mustCreate(t, s, sess)
	const n = 32
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Go(func() {
			// Times arrive out of order; the latest must win.
			at := base.Add(time.Duration((i*7)%n+1) * time.Second)
			errs <- s.TouchSession(context.Background(), sess.ID, at)
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("TouchSession: %v", err)
		}
	}
	if got, want := mustGet(t, s, sess.ID).LastSeenAt, base.Add(n*time.Second); !got.Equal(want) {
		t.Errorf("LastSeenAt = %v, want the latest touch %v", got, want)
	}
}

func testConcurrentRevoke(t *testing.T, s session.Store) {
	sess := sample("alice", base)
	mustCreate(t, s, sess)
	const n = 16
	results := make([]session.Session, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			results[i], errs[i] = s.RevokeSession(context.Background(), sess.ID,
				base.Add(time.Duration(i+1)*time.Second), fmt.Sprintf("reason-%d", i))
		})
	}
	wg.Wait()
	stored := mustGet(t, s, sess.ID)
	if stored.RevokedAt.IsZero() {
		t.Fatal("session is not revoked")
	}
	winner := -1
	for i := range n {
		if stored.RevokeReason == fmt.Sprintf("reason-%d", i) {
			winner = i
		}
	}
	if winner < 0 || !stored.RevokedAt.Equal(base.Add(time.Duration(winner+1)*time.Second)) {
		t.Fatalf("stored revocation %v %q is not one of the requests", stored.RevokedAt, stored.RevokeReason)
	}
	for i := range n {
		if errs[i] != nil {
			t.Errorf("RevokeSession %d: %v", i, errs[i])
			continue
		}
		// Every caller sees the single revocation that won.
		if d := diff(results[i], stored); d != "" {
			t.Errorf("RevokeSession %d returned %s", i, d)
		}
	}
}

func testConcurrentRevokeSubject(t *testing.T, s session.Store) {
	const sessions, callers = 20, 8
	want := make([]string, 0, sessions)
	for i := range sessions {
		sess := sample("alice", base.Add(time.Duration(i)*time.Second))
		mustCreate(t, s, sess)
		want = append(want, sess.ID)
	}
	results := make([][]string, callers)
	errs := make([]error, callers)
	var wg sync.WaitGroup
	for i := range callers {
		wg.Go(func() {
			results[i], errs[i] = s.RevokeSubject(context.Background(), "alice", base.Add(time.Hour), fmt.Sprintf("r%d", i))
		})
	}
	wg.Wait()
	var all []string
	for i := range callers {
		if errs[i] != nil {
			t.Fatalf("RevokeSubject %d: %v", i, errs[i])
		}
		all = append(all, results[i]...)
	}
	// Each session is reported revoked by exactly one caller.
	if !slices.Equal(sorted(all), sorted(want)) {
		t.Errorf("concurrent RevokeSubject reported %d ids (%v), want each of %d exactly once", len(all), sorted(all), sessions)
	}
	for i := range callers {
		for _, id := range results[i] {
			if got := mustGet(t, s, id).RevokeReason; got != fmt.Sprintf("r%d", i) {
				t.Errorf("session %s reported by caller %d has reason %q", id, i, got)
			}
		}
	}
}

func testConcurrentMixed(t *testing.T, s session.Store) {
	ctx := context.Background()
	const workers, perWorker = 8, 10
	var wg sync.WaitGroup
	errs := make(chan error, workers*perWorker*5)
	for w := range workers {
		wg.Go(func() {
			subject := fmt.Sprintf("user-%d", w%3)
			for i := range perWorker {
				sess := sample(subject, base.Add(time.Duration(w*perWorker+i)*time.Millisecond))
				if err := s.CreateSession(ctx, sess); err != nil {
					errs <- err
					continue
				}
				if _, err := s.Session(ctx, sess.ID); err != nil {
					errs <- err
				}
				if err := s.TouchSession(ctx, sess.ID, base.Add(time.Minute)); err != nil {
					errs <- err
				}
				if _, err := s.SessionsBySubject(ctx, subject, 5); err != nil {
					errs <- err
				}
				if i%3 == 0 {
					if _, err := s.RevokeSession(ctx, sess.ID, base.Add(time.Hour), "x"); err != nil {
						errs <- err
					}
				}
				if i == perWorker-1 && w%4 == 0 {
					if _, err := s.RevokeSubject(ctx, subject, base.Add(2*time.Hour), "y"); err != nil {
						errs <- err
					}
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("concurrent use: %v", err)
	}
	total := 0
	for i := range 3 {
		list, err := s.SessionsBySubject(ctx, fmt.Sprintf("user-%d", i), workers*perWorker)
		if err != nil {
			t.Fatal(err)
		}
		total += len(list)
		for j := 1; j < len(list); j++ {
			if list[j].CreatedAt.After(list[j-1].CreatedAt) {
				t.Errorf("user-%d: listing not newest first at %d", i, j)
			}
		}
	}
	if total != workers*perWorker {
		t.Errorf("listed %d sessions in all, want %d", total, workers*perWorker)
	}
}

// allRevocations reads the whole revocation log after cursor.
func allRevocations(t *testing.T, s session.Store, after int64) []session.Revocation {
	t.Helper()
	var out []session.Revocation
	for {
		page, err := s.Revocations(context.Background(), after, 3)
		if err != nil {
			t.Fatalf("Revocations(%d, 3): %v", after, err)
		}
		if len(page) == 0 {
			return out
		}
		out = append(out, page...)
		after = page[len(page)-1].Cursor
	}
}

// wantLog checks that log holds exactly the given revocations, in order,
// with strictly increasing positive cursors.
func wantLog(t *testing.T, log []session.Revocation, want []session.Revocation) {
	t.Helper()
	if len(log) != len(want) {
		t.Fatalf("revocation log has %d entries, want %d: %+v", len(log), len(want), log)
	}
	var last int64
	for i, got := range log {
		if got.Cursor <= last {
			t.Errorf("entry %d: cursor %d after %d, want strictly increasing and positive", i, got.Cursor, last)
		}
		last = got.Cursor
		w := want[i]
		if got.SID != w.SID || got.Subject != w.Subject || !got.RevokedAt.Equal(w.RevokedAt) || got.Reason != w.Reason {
			t.Errorf("entry %d = {%s %q %v %q}, want {%s %q %v %q}", i,
				got.SID, got.Subject, got.RevokedAt, got.Reason, w.SID, w.Subject, w.RevokedAt, w.Reason)
		}
		if !got.TokensExpireAt.IsZero() {
			t.Errorf("entry %d: the store set TokensExpireAt = %v; that is the service's to fill in", i, got.TokensExpireAt)
		}
	}
}

func testRevocationLog(t *testing.T, s session.Store) {
	ctx := context.Background()
	if log := allRevocations(t, s, 0); len(log) != 0 {
		t.Fatalf("a new store has revocations: %+v", log)
	}
	one := sample("alice", base)
	a1, a2, a3 := sample("bob", base), sample("bob", base.Add(time.Second)), sample("bob", base.Add(2*time.Second))
	expired := sample("bob", base.Add(-9*time.Hour))
	for _, sess := range []session.Session{one, a1, a2, a3, expired} {
		mustCreate(t, s, sess)
	}
	var want []session.Revocation

	// RevokeSession logs the revocation, once.
	at := base.Add(time.Minute + 7*time.Millisecond)
	if _, err := s.RevokeSession(ctx, one.ID, at, "logout"); err != nil {
		t.Fatal(err)
	}
	want = append(want, session.Revocation{SID: one.ID, Subject: "alice", RevokedAt: at, Reason: "logout"})
	if _, err := s.RevokeSession(ctx, one.ID, at.Add(time.Minute), "admin"); err != nil {
		t.Fatal(err)
	}
	wantLog(t, allRevocations(t, s, 0), want)

	// Revoking nothing logs nothing.
	if _, err := s.RevokeSession(ctx, newID(), at, "x"); !errors.Is(err, session.ErrNotFound) {
		t.Fatalf("RevokeSession(unknown) = %v", err)
	}
	if _, err := s.RevokeSubject(ctx, "nobody", at, "x"); err != nil {
		t.Fatal(err)
	}
	wantLog(t, allRevocations(t, s, 0), want)

	// RevokeSubject logs each session it revoked, and only those: not the
	// one revoked before, not the expired one.
	if _, err := s.RevokeSession(ctx, a2.ID, at, "stolen"); err != nil {
		t.Fatal(err)
	}
	want = append(want, session.Revocation{SID: a2.ID, Subject: "bob", RevokedAt: at, Reason: "stolen"})
	subjectAt := base.Add(time.Hour)
	ids, err := s.RevokeSubject(ctx, "bob", subjectAt, "offboarded")
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(sorted(ids), sorted([]string{a1.ID, a3.ID})) {
		t.Fatalf("RevokeSubject = %v, want %v", sorted(ids), sorted([]string{a1.ID, a3.ID}))
	}
	log := allRevocations(t, s, 0)
	for _, id := range sorted([]string{a1.ID, a3.ID}) {
		want = append(want, session.Revocation{SID: id, Subject: "bob", RevokedAt: subjectAt, Reason: "offboarded"})
	}
	if len(log) != len(want) {
		t.Fatalf("after RevokeSubject the log has %d entries, want %d: %+v", len(log), len(want), log)
	}
	{
		// The order of one RevokeSubject's entries is the store's choice;
		// their cursors must still follow the earlier ones.
		wantLog(t, log[:2], want[:2])
		subjectEntries := slices.Clone(log[2:])
		slices.SortFunc(subjectEntries, func(a, b session.Revocation) int { return strings.Compare(a.SID, b.SID) })
		for i, r := range subjectEntries {
			if r.Cursor <= log[1].Cursor {
				t.Errorf("subject entry %s has cursor %d, not after %d", r.SID, r.Cursor, log[1].Cursor)
			}
			subjectEntries[i].Cursor = log[1].Cursor + int64(i) + 1 // checked above
		}
		wantLog(t, subjectEntries, want[2:])
	}

	// A revocation by RevokeSession after a subject-wide one is logged too.
	late := sample("bob", base)
	mustCreate(t, s, late)
	if _, err := s.RevokeSession(ctx, late.ID, subjectAt.Add(time.Second), "admin"); err != nil {
		t.Fatal(err)
	}
	full := allRevocations(t, s, 0)
	if len(full) != 5 || full[4].SID != late.ID || full[4].Cursor <= full[3].Cursor {
		t.Errorf("after a later revocation the log is %+v, want it last with the greatest cursor", full)
	}
}

func testRevocationLogPaging(t *testing.T, s session.Store) {
	ctx := context.Background()
	var sids []string
	for i := range 7 {
		sess := sample(fmt.Sprintf("user-%d", i), base)
		mustCreate(t, s, sess)
		if _, err := s.RevokeSession(ctx, sess.ID, base.Add(time.Duration(i)*time.Second), "admin"); err != nil {
			t.Fatal(err)
		}
		sids = append(sids, sess.ID)
	}
	all, err := s.Revocations(ctx, 0, 100)
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 7 {
		t.Fatalf("Revocations(0, 100) has %d entries, want 7", len(all))
	}
	for i, r := range all {
		if r.SID != sids[i] {
			t.Errorf("entry %d is %s, want %s (revocation order)", i, r.SID, sids[i])
		}
	}
	for _, tc := range []struct {
		after int64
		limit int
		want  []session.Revocation
	}{
		{0, 1, all[:1]},
		{0, 7, all},
		{all[0].Cursor, 2, all[1:3]},
		{all[2].Cursor, 100, all[3:]},
		{all[6].Cursor, 10, nil},
		{all[6].Cursor + 1000, 10, nil},
		{0, 0, nil},
		{0, -1, nil},
		{all[3].Cursor - 1, 1, all[3:4]}, // a cursor between entries works too
	} {
		got, err := s.Revocations(ctx, tc.after, tc.limit)
		if err != nil {
			t.Fatalf("Revocations(%d, %d): %v", tc.after, tc.limit, err)
		}
		gotCursors := make([]int64, len(got))
		for i := range got {
			gotCursors[i] = got[i].Cursor
		}
		wantCursors := make([]int64, len(tc.want))
		for i := range tc.want {
			wantCursors[i] = tc.want[i].Cursor
		}
		if !slices.Equal(gotCursors, wantCursors) {
			t.Errorf("Revocations(%d, %d) = cursors %v, want %v", tc.after, tc.limit, gotCursors, wantCursors)
		}
	}
}

// testRevocationLogConcurrentTail revokes from many goroutines while a
// reader follows the log the way the feed does, resuming after the last
// cursor it saw: it must see every revocation exactly once. A store whose
// cursors can become visible out of order (a later cursor committed before
// an earlier one) makes the reader skip entries.
func testRevocationLogConcurrentTail(t *testing.T, s session.Store) {
	ctx := context.Background()
	const writers, perWriter = 8, 12
	sessions := make([][]session.Session, writers)
	for w := range writers {
		for i := range perWriter {
			sess := sample(fmt.Sprintf("tail-%d-%d", w, i%3), base)
			mustCreate(t, s, sess)
			sessions[w] = append(sessions[w], sess)
		}
	}
	done := make(chan struct{})
	seen := make(map[string]int)
	var readErr error
	var reader sync.WaitGroup
	reader.Go(func() {
		var after int64
		read := func() bool {
			page, err := s.Revocations(ctx, after, 5)
			if err != nil {
				readErr = err
				return false
			}
			for _, r := range page {
				seen[r.SID]++
				after = r.Cursor
			}
			return len(page) > 0
		}
		for {
			select {
			case <-done:
				for read() {
				}
				return
			default:
				read()
			}
		}
	})
	var wg sync.WaitGroup
	errs := make(chan error, writers*perWriter)
	for w := range writers {
		wg.Go(func() {
			for i, sess := range sessions[w] {
				var err error
				if i%4 == 3 {
					_, err = s.RevokeSubject(ctx, sess.Subject, base.Add(time.Minute), "subject")
				} else {
					_, err = s.RevokeSession(ctx, sess.ID, base.Add(time.Minute), "admin")
				}
				if err != nil {
					errs <- err
				}
			}
		})
	}
	wg.Wait()
	close(done)
	reader.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("revoke: %v", err)
	}
	if readErr != nil {
		t.Fatalf("Revocations: %v", readErr)
	}
	for w := range writers {
		for _, sess := range sessions[w] {
			if n := seen[sess.ID]; n != 1 {
				t.Errorf("the tailing reader saw the revocation of %s %d times, want once", sess.ID, n)
			}
		}
	}
	if log := allRevocations(t, s, 0); len(log) != writers*perWriter {
		t.Errorf("the log has %d entries, want %d", len(log), writers*perWriter)
	}
}

// revocationPurger is implemented by stores that can drop old entries of
// the revocation log (both of tokend's do).
type revocationPurger interface {
	PurgeRevocations(ctx context.Context, cutoff time.Time) (int, error)
}

func testRevocationLogPurge(t *testing.T, s session.Store) {
	p, ok := s.(revocationPurger)
	if !ok {
		t.Skip("the store cannot purge its revocation log")
	}
	ctx := context.Background()
	var sessions []session.Session
	for i := range 4 {
		sess := sample("alice", base)
		mustCreate(t, s, sess)
		sessions = append(sessions, sess)
		if _, err := s.RevokeSession(ctx, sess.ID, base.Add(time.Duration(i)*time.Minute), "admin"); err != nil {
			t.Fatal(err)
		}
	}
	before := allRevocations(t, s, 0)
	n, err := p.PurgeRevocations(ctx, base.Add(2*time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	if n != 2 {
		t.Errorf("PurgeRevocations dropped %d entries, want the 2 revoked before the cutoff", n)
	}
	wantLog(t, allRevocations(t, s, 0), before[2:])
	// The sessions themselves are untouched.
	for _, sess := range sessions {
		if mustGet(t, s, sess.ID).RevokedAt.IsZero() {
			t.Errorf("purging the log changed session %s", sess.ID)
		}
	}
	// Cursors keep growing after a purge, even one that empties the log.
	if _, err := p.PurgeRevocations(ctx, base.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if log := allRevocations(t, s, 0); len(log) != 0 {
		t.Fatalf("after purging everything the log is %+v", log)
	}
	next := sample("alice", base)
	mustCreate(t, s, next)
	if _, err := s.RevokeSession(ctx, next.ID, base.Add(2*time.Hour), "admin"); err != nil {
		t.Fatal(err)
	}
	log := allRevocations(t, s, 0)
	if len(log) != 1 || log[0].Cursor <= before[3].Cursor {
		t.Errorf("after a purge the next entry is %+v, want a cursor above %d", log, before[3].Cursor)
	}
}
