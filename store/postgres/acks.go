package postgres

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"
)

// Revocation acknowledgements.
//
// Every instance serves sessions from its cache and drops a session when the
// NOTIFY of its revocation arrives. NOTIFY alone leaves a window: the
// revoking instance can answer its caller before another instance has read
// the notification from its socket, and a client retrying there at once
// would still get a token. So every instance acknowledges each revocation
// after dropping the session (one NOTIFY on tokend_acks, batched), and a
// revocation returns only when every live instance has acknowledged it, or
// after ackTimeout. Instances learn of each other from announcements on
// tokend_instances: each announces itself every announceEvery and when it
// leaves; one not heard from for peerExpiry is no longer waited for.
//
// Revocations are rare and each costs one notification per instance, so the
// protocol is cheap; what it buys is that a revoked session is refused on
// every instance from the moment the revocation call returns.

const (
	ackTimeout    = 500 * time.Millisecond
	announceEvery = 5 * time.Second
	peerExpiry    = 3 * announceEvery
	// maxAckPayload stays under PostgreSQL's 8000-byte NOTIFY limit.
	maxAckPayload = 7000
)

func randomID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// peers tracks the other instances and the acknowledgements awaited.
type peers struct {
	self string

	mu      sync.Mutex
	seen    map[string]time.Time // instance id -> last announcement
	waiting map[string]map[*ackWait]bool
}

func newPeers(self string) *peers {
	return &peers{self: self, seen: make(map[string]time.Time), waiting: make(map[string]map[*ackWait]bool)}
}

// announce records an announcement and reports whether it came from an
// instance not known before (which should hear from us soon, so that it
// waits for our acknowledgements too).
func (p *peers) announce(payload string, now time.Time) bool {
	if len(payload) < 2 || payload[1:] == p.self {
		return false
	}
	id := payload[1:]
	p.mu.Lock()
	defer p.mu.Unlock()
	if payload[0] == '-' {
		delete(p.seen, id)
		// Nobody waits for an instance that left.
		for key, ws := range p.waiting {
			peer, _, _ := strings.Cut(key, " ")
			if peer == id {
				for w := range ws {
					w.done(key)
				}
				delete(p.waiting, key)
			}
		}
		return false
	}
	_, known := p.seen[id]
	p.seen[id] = now
	return !known
}

// live returns the ids of every instance to wait for: this one and the
// peers heard from recently.
func (p *peers) live(now time.Time) []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	ids := []string{p.self}
	for id, t := range p.seen {
		if now.Sub(t) < peerExpiry {
			ids = append(ids, id)
		} else {
			delete(p.seen, id)
		}
	}
	return ids
}

// expectAcks prepares the wait for a revocation of sids. Without a
// notification connection this instance hears no acknowledgements (and uses
// no cache), so it does not wait.
func (s *Store) expectAcks(sids []string) *ackWait {
	if !s.listening.Load() {
		return nil
	}
	return s.peers.expect(sids)
}

// ackWait is one revocation waiting for acknowledgements, keyed by
// "instance sid".
type ackWait struct {
	p       *peers
	pending map[string]bool
	all     chan struct{}
}

// expect registers a wait for every live instance to acknowledge each sid.
// It must be called before the notifications are sent.
func (p *peers) expect(sids []string) *ackWait {
	ids := p.live(time.Now())
	w := &ackWait{p: p, pending: make(map[string]bool, len(ids)*len(sids)), all: make(chan struct{})}
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, id := range ids {
		for _, sid := range sids {
			key := id + " " + sid
			w.pending[key] = true
			if p.waiting[key] == nil {
				p.waiting[key] = make(map[*ackWait]bool)
			}
			p.waiting[key][w] = true
		}
	}
	if len(w.pending) == 0 {
		close(w.all)
	}
	return w
}

// done marks key acknowledged; p.mu is held.
func (w *ackWait) done(key string) {
	if !w.pending[key] {
		return
	}
	delete(w.pending, key)
	if len(w.pending) == 0 {
		close(w.all)
	}
}

// missing lists the instances that have not acknowledged yet.
func (w *ackWait) missing() []string {
	w.p.mu.Lock()
	defer w.p.mu.Unlock()
	var ids []string
	for key := range w.pending {
		id, _, _ := strings.Cut(key, " ")
		if !slices.Contains(ids, id) {
			ids = append(ids, id)
		}
	}
	return ids
}

func (w *ackWait) cancel() {
	if w == nil {
		return
	}
	w.p.mu.Lock()
	defer w.p.mu.Unlock()
	for key := range w.pending {
		delete(w.p.waiting[key], w)
		if len(w.p.waiting[key]) == 0 {
			delete(w.p.waiting, key)
		}
	}
}

// acked records that instance id dropped sid from its cache.
func (p *peers) acked(id, sid string) {
	key := id + " " + sid
	p.mu.Lock()
	defer p.mu.Unlock()
	for w := range p.waiting[key] {
		w.done(key)
	}
	delete(p.waiting, key)
}

// ackPayload handles "id sid sid ...".
func (p *peers) ackPayload(payload string) {
	fields := strings.Fields(payload)
	if len(fields) < 2 {
		return
	}
	for _, sid := range fields[1:] {
		p.acked(fields[0], sid)
	}
}

// awaitAcks waits until every instance acknowledged, ctx ends or ackTimeout
// passes. A missing acknowledgement is logged, not returned: the revocation
// itself is committed, and a silent instance either is gone or stops
// trusting its cache when its notification connection fails.
func (s *Store) awaitAcks(ctx context.Context, w *ackWait) {
	if w == nil {
		return
	}
	t := time.NewTimer(ackTimeout)
	defer t.Stop()
	select {
	case <-w.all:
	case <-ctx.Done():
	case <-t.C:
		s.log.Warn("not every instance acknowledged a revocation in time; they drop the session as soon as the notification reaches them",
			slog.Any("instances", w.missing()), slog.Duration("waited", ackTimeout))
	}
}

// queueAck schedules the acknowledgement of a revocation this instance has
// applied to its cache.
func (s *Store) queueAck(sid string) {
	select {
	case s.ackQueue <- sid:
	default:
		// The queue is full (a revocation of thousands of sessions): the
		// waiting instance times out, which is correct, only slower.
	}
}

// ackLoop sends queued acknowledgements, batching what has accumulated.
func (s *Store) ackLoop(ctx context.Context) {
	for {
		var sid string
		select {
		case <-ctx.Done():
			return
		case sid = <-s.ackQueue:
		}
		var b strings.Builder
		b.WriteString(s.peers.self)
		b.WriteString(" " + sid)
	drain:
		for b.Len() < maxAckPayload-64 {
			select {
			case more := <-s.ackQueue:
				b.WriteString(" " + more)
			default:
				break drain
			}
		}
		actx, cancel := context.WithTimeout(ctx, time.Second)
		_, err := s.pool.Exec(actx, `SELECT pg_notify($1, $2)`, acksChannel, b.String())
		cancel()
		if err != nil && ctx.Err() == nil {
			s.log.Debug("sending a revocation acknowledgement failed", slog.Any("error", scrub(err)))
		}
	}
}

// announceSoon asks announceLoop to announce this instance now.
func (s *Store) announceSoon() {
	select {
	case s.announceNow <- struct{}{}:
	default:
	}
}

// announceLoop announces this instance every announceEvery, and at once
// when asked (on connecting, and when a new peer appears).
func (s *Store) announceLoop(ctx context.Context) {
	t := time.NewTicker(announceEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-s.announceNow:
		}
		actx, cancel := context.WithTimeout(ctx, time.Second)
		_, err := s.pool.Exec(actx, `SELECT pg_notify($1, $2)`, instancesChannel, "+"+s.peers.self)
		cancel()
		if err != nil && ctx.Err() == nil {
			s.log.Debug("announcing this instance failed", slog.Any("error", scrub(err)))
		}
	}
}
