// Package memory is an in-process session store: the default when no
// database is configured. Its contents last as long as the process.
package memory

import (
	"context"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/tokend/tokend/session"
)

// Store keeps sessions in maps guarded by one RWMutex; refreshes only read.
// The revocation log is a slice in cursor order under the same mutex.
type Store struct {
	mu          sync.RWMutex
	sessions    map[string]*session.Session
	bySubject   map[string]map[string]struct{}
	revocations []session.Revocation
	lastCursor  int64
}

// New returns an empty store.
//
// Its revocation log starts at the current time in microseconds rather
// than at zero, so that a validator that followed the log of a previous
// process (and resumes after its last cursor) sees the new entries.
func New() *Store {
	return &Store{
		sessions:   make(map[string]*session.Session),
		bySubject:  make(map[string]map[string]struct{}),
		lastCursor: time.Now().UnixMicro(),
	}
}

var _ session.Store = (*Store)(nil)

// CreateSession implements session.Store.
func (m *Store) CreateSession(_ context.Context, s session.Session) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.sessions[s.ID]; ok {
		return session.ErrConflict
	}
	s.SecretHash = slices.Clone(s.SecretHash)
	s.Claims = slices.Clone(s.Claims)
	m.sessions[s.ID] = &s
	ids := m.bySubject[s.Subject]
	if ids == nil {
		ids = make(map[string]struct{})
		m.bySubject[s.Subject] = ids
	}
	ids[s.ID] = struct{}{}
	return nil
}

// Session implements session.Store. The returned value shares its immutable
// byte slices (secret hash, claims) with the store.
func (m *Store) Session(_ context.Context, sid string) (session.Session, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	s, ok := m.sessions[sid]
	if !ok {
		return session.Session{}, session.ErrNotFound
	}
	return *s, nil
}

// TouchSession implements session.Store.
func (m *Store) TouchSession(_ context.Context, sid string, at time.Time) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	s, ok := m.sessions[sid]
	if !ok {
		return session.ErrNotFound
	}
	if at.After(s.LastSeenAt) {
		s.LastSeenAt = at
	}
	return nil
}

// RevokeSession implements session.Store.
func (m *Store) RevokeSession(_ context.Context, sid string, at time.Time, reason string) (session.Session, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	s, ok := m.sessions[sid]
	if !ok {
		return session.Session{}, session.ErrNotFound
	}
	if s.RevokedAt.IsZero() {
		s.RevokedAt = at
		s.RevokeReason = reason
		m.appendRevocation(s)
	}
	return *s, nil
}

// appendRevocation logs the revocation of s; m.mu is held for writing.
func (m *Store) appendRevocation(s *session.Session) {
	m.lastCursor++
	m.revocations = append(m.revocations, session.Revocation{
		Cursor: m.lastCursor, SID: s.ID, Subject: s.Subject, RevokedAt: s.RevokedAt, Reason: s.RevokeReason,
	})
}

// RevokeSubject implements session.Store.
func (m *Store) RevokeSubject(_ context.Context, subject string, at time.Time, reason string) ([]string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var revoked []string
	for sid := range m.bySubject[subject] {
		s := m.sessions[sid]
		if s.RevokedAt.IsZero() && at.Before(s.Deadline()) {
			s.RevokedAt = at
			s.RevokeReason = reason
			revoked = append(revoked, sid)
		}
	}
	slices.Sort(revoked)
	for _, sid := range revoked {
		m.appendRevocation(m.sessions[sid])
	}
	return revoked, nil
}

// Revocations implements session.Store.
func (m *Store) Revocations(_ context.Context, after int64, limit int) ([]session.Revocation, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if limit < 1 {
		return []session.Revocation{}, nil
	}
	i := sort.Search(len(m.revocations), func(i int) bool { return m.revocations[i].Cursor > after })
	end := min(i+limit, len(m.revocations))
	return slices.Clone(m.revocations[i:end]), nil
}

// PurgeRevocations drops the entries of the revocation log revoked before
// cutoff and returns how many it dropped. Callers pass now minus the token
// TTL and a leeway: every token of those sessions has expired.
func (m *Store) PurgeRevocations(_ context.Context, cutoff time.Time) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	before := len(m.revocations)
	m.revocations = slices.DeleteFunc(m.revocations, func(r session.Revocation) bool { return r.RevokedAt.Before(cutoff) })
	if len(m.revocations) == 0 {
		m.revocations = nil // let the backing array go
	}
	return before - len(m.revocations), nil
}

// SessionsBySubject implements session.Store.
func (m *Store) SessionsBySubject(_ context.Context, subject string, limit int) ([]session.Session, error) {
	m.mu.RLock()
	out := make([]session.Session, 0, len(m.bySubject[subject]))
	for sid := range m.bySubject[subject] {
		out = append(out, *m.sessions[sid])
	}
	m.mu.RUnlock()
	slices.SortFunc(out, func(a, b session.Session) int {
		if c := b.CreatedAt.Compare(a.CreatedAt); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	if len(out) > max(limit, 0) {
		out = out[:max(limit, 0)]
	}
	return out, nil
}

// Purge deletes sessions that ended (expired, idle or revoked) before cutoff and
// returns how many it deleted. Callers pass now minus a retention period, so
// that admins can still look at recently ended sessions.
func (m *Store) Purge(_ context.Context, cutoff time.Time) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	for sid, s := range m.sessions {
		ended := s.Deadline()
		if !s.RevokedAt.IsZero() && s.RevokedAt.Before(ended) {
			ended = s.RevokedAt
		}
		if !ended.Before(cutoff) {
			continue
		}
		delete(m.sessions, sid)
		if ids := m.bySubject[s.Subject]; ids != nil {
			delete(ids, sid)
			if len(ids) == 0 {
				delete(m.bySubject, s.Subject)
			}
		}
		n++
	}
	return n, nil
}

// Len returns the number of stored sessions.
func (m *Store) Len() int {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return len(m.sessions)
}
