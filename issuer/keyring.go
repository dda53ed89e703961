package issuer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// StoredKey is a signing key and its schedule. A key is published from the
// moment it is stored, signs from ActivatesAt, is retired when a later key
// activates, and is deleted once every token it signed has expired.
type StoredKey struct {
	Key
	ActivatesAt time.Time
}

// KeyStore persists signing keys for a Keyring. Every instance sharing a
// store sees the same keys; the schedule lives in the keys themselves, so
// instances agree on the active key without talking to each other.
type KeyStore interface {
	// Keys returns every stored key.
	Keys(ctx context.Context) ([]StoredKey, error)
	// UpdateKeys calls fn with the stored keys while holding a lock that
	// excludes every other UpdateKeys on the same store (across instances),
	// then adds and deletes what fn returns.
	UpdateKeys(ctx context.Context, fn func(keys []StoredKey) (add []StoredKey, remove []string, err error)) error
}

// KeyringConfig sets the key lifecycle.
type KeyringConfig struct {
	// Algorithm of new keys.
	Algorithm Algorithm
	// Rotation is how often a new key is introduced; zero means only on
	// demand.
	Rotation time.Duration
	// PublishDelay is how long a new key is published before it signs:
	// at least as long as validators may cache the JWKS.
	PublishDelay time.Duration
	// RetireAfter is how long a key stays published after it stopped
	// signing: the token lifetime plus clock leeway.
	RetireAfter time.Duration
}

// KeyState is where a key is in its lifecycle.
type KeyState string

// The lifecycle states.
const (
	KeyNext    KeyState = "next"    // published, not signing yet
	KeyActive  KeyState = "active"  // signing
	KeyRetired KeyState = "retired" // published until its tokens expire
)

// KeyStatus describes one key for admins.
type KeyStatus struct {
	ID          string
	Algorithm   Algorithm
	State       KeyState
	CreatedAt   time.Time
	ActivatesAt time.Time
	// RetiredAt is when a later key took over; zero while none has.
	RetiredAt time.Time
	// RemoveAt is when the key leaves the JWKS; zero while not retired.
	RemoveAt time.Time
}

// ErrRotationDisabled is returned by Rotate on a fixed key set.
var ErrRotationDisabled = errors.New("key rotation is not available with a fixed signing key")

// Keyring keeps an Issuer's keys in step with a KeyStore: it creates the
// first key, rotates on schedule and on demand, switches the active key when
// its time comes and drops retired keys once their tokens are dead.
type Keyring struct {
	iss   *Issuer
	store KeyStore
	cfg   KeyringConfig
	log   *slog.Logger
	now   func() time.Time

	mu      sync.Mutex
	keys    []StoredKey // sorted by ActivatesAt, then ID
	applied string      // fingerprint of the key set last given to iss

	switches atomic.Uint64
}

// NewKeyring returns a keyring; call Init before serving.
func NewKeyring(iss *Issuer, store KeyStore, cfg KeyringConfig, log *slog.Logger, now func() time.Time) *Keyring {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if now == nil {
		now = time.Now
	}
	return &Keyring{iss: iss, store: store, cfg: cfg, log: log, now: now}
}

// Init makes sure the store holds a key that can sign now (creating the
// first one if the store is empty) and loads the key set.
func (k *Keyring) Init(ctx context.Context) error {
	err := k.store.UpdateKeys(ctx, func(keys []StoredKey) ([]StoredKey, []string, error) {
		now := k.now()
		for _, sk := range keys {
			if !sk.ActivatesAt.After(now) {
				return nil, nil, nil
			}
		}
		// No key can sign yet: the first key of an empty store signs at
		// once, since no validator can have cached an older set.
		key, err := GenerateKey(k.cfg.Algorithm, now)
		if err != nil {
			return nil, nil, err
		}
		k.log.Info("created the first signing key", slog.String("kid", key.ID), slog.String("alg", string(key.Algorithm)))
		return []StoredKey{{Key: key, ActivatesAt: now}}, nil, nil
	})
	if err != nil {
		return fmt.Errorf("initialise signing keys: %w", err)
	}
	return k.Load(ctx)
}

// Load reads the stored keys and applies them.
func (k *Keyring) Load(ctx context.Context) error {
	keys, err := k.store.Keys(ctx)
	if err != nil {
		return fmt.Errorf("load signing keys: %w", err)
	}
	sortKeys(keys)
	k.mu.Lock()
	k.keys = keys
	k.mu.Unlock()
	return k.Apply()
}

func sortKeys(keys []StoredKey) {
	slices.SortFunc(keys, func(a, b StoredKey) int {
		if c := a.ActivatesAt.Compare(b.ActivatesAt); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
}

// schedule computes, at now, each key's status, the active key and the
// published set. keys must be sorted.
func (k *Keyring) schedule(keys []StoredKey, now time.Time) (statuses []KeyStatus, active *Key, published []Key, removable []string) {
	activeIdx := -1
	for i, sk := range keys {
		if !sk.ActivatesAt.After(now) {
			activeIdx = i
		}
	}
	if activeIdx < 0 && len(keys) > 0 {
		activeIdx = 0 // nothing has activated yet: sign with the earliest
	}
	for i, sk := range keys {
		st := KeyStatus{ID: sk.ID, Algorithm: sk.Algorithm, CreatedAt: sk.CreatedAt, ActivatesAt: sk.ActivatesAt}
		switch {
		case i == activeIdx:
			st.State = KeyActive
		case i > activeIdx:
			st.State = KeyNext
		default:
			st.State = KeyRetired
			st.RetiredAt = keys[i+1].ActivatesAt
			st.RemoveAt = st.RetiredAt.Add(k.cfg.RetireAfter)
			if !now.Before(st.RemoveAt) {
				removable = append(removable, sk.ID)
				continue
			}
		}
		statuses = append(statuses, st)
		published = append(published, sk.Key)
		if i == activeIdx {
			key := sk.Key
			active = &key
		}
	}
	return statuses, active, published, removable
}

// Apply gives the issuer the key set due now. It is cheap when nothing
// changed, so it can run every second to switch keys on time.
func (k *Keyring) Apply() error {
	k.mu.Lock()
	defer k.mu.Unlock()
	_, active, published, _ := k.schedule(k.keys, k.now())
	var fp strings.Builder
	if active != nil {
		fp.WriteString(active.ID)
	}
	for _, p := range published {
		fp.WriteString("," + p.ID)
	}
	if fp.String() == k.applied {
		return nil
	}
	if err := k.iss.SetKeys(active, published); err != nil {
		return err
	}
	if active != nil && !strings.HasPrefix(k.applied, active.ID+",") {
		if k.applied != "" {
			k.switches.Add(1)
		}
		k.log.Info("signing key in use", slog.String("kid", active.ID), slog.Int("published", len(published)))
	}
	k.applied = fp.String()
	return nil
}

// Switches counts the times the active key changed after the first.
func (k *Keyring) Switches() uint64 { return k.switches.Load() }

// Status lists the published keys, oldest first.
func (k *Keyring) Status() []KeyStatus {
	k.mu.Lock()
	defer k.mu.Unlock()
	st, _, _, _ := k.schedule(k.keys, k.now())
	return st
}

// Rotate introduces a new key that signs after the publish delay. If a key
// is already waiting to sign, it is returned instead: rotating twice in a
// row must not skip a key that validators have not seen yet.
func (k *Keyring) Rotate(ctx context.Context) (KeyStatus, error) {
	var kid string
	err := k.store.UpdateKeys(ctx, func(keys []StoredKey) ([]StoredKey, []string, error) {
		now := k.now()
		for _, sk := range keys {
			if sk.ActivatesAt.After(now) {
				kid = sk.ID
				return nil, nil, nil
			}
		}
		key, err := GenerateKey(k.cfg.Algorithm, now)
		if err != nil {
			return nil, nil, err
		}
		kid = key.ID
		k.log.Info("rotating signing key", slog.String("kid", key.ID),
			slog.Time("activates_at", now.Add(k.cfg.PublishDelay)))
		return []StoredKey{{Key: key, ActivatesAt: now.Add(k.cfg.PublishDelay)}}, nil, nil
	})
	if err != nil {
		return KeyStatus{}, fmt.Errorf("rotate signing key: %w", err)
	}
	if err := k.Load(ctx); err != nil {
		return KeyStatus{}, err
	}
	for _, st := range k.Status() {
		if st.ID == kid {
			return st, nil
		}
	}
	return KeyStatus{}, fmt.Errorf("rotate signing key: key %s vanished", kid)
}

// Maintain performs the scheduled work: a rotation when the newest key is
// older than the rotation period, and deleting keys whose tokens have all
// expired. It is safe to run on every instance; the store's lock makes one
// of them do each change.
func (k *Keyring) Maintain(ctx context.Context) error {
	err := k.store.UpdateKeys(ctx, func(keys []StoredKey) ([]StoredKey, []string, error) {
		sortKeys(keys)
		now := k.now()
		_, _, _, removable := k.schedule(keys, now)
		var add []StoredKey
		if k.cfg.Rotation > 0 && len(keys) > 0 {
			newest := keys[len(keys)-1]
			if !newest.ActivatesAt.After(now) && !now.Before(newest.CreatedAt.Add(k.cfg.Rotation)) {
				key, err := GenerateKey(k.cfg.Algorithm, now)
				if err != nil {
					return nil, nil, err
				}
				k.log.Info("scheduled signing key rotation", slog.String("kid", key.ID),
					slog.Time("activates_at", now.Add(k.cfg.PublishDelay)))
				add = append(add, StoredKey{Key: key, ActivatesAt: now.Add(k.cfg.PublishDelay)})
			}
		}
		for _, id := range removable {
			k.log.Info("removing retired signing key", slog.String("kid", id))
		}
		return add, removable, nil
	})
	if err != nil {
		return fmt.Errorf("maintain signing keys: %w", err)
	}
	return k.Load(ctx)
}

// Run keeps the keyring current until ctx ends: it applies the schedule
// every second, reloads when changed fires (another instance changed the
// keys) and at least every reload interval, and runs Maintain every minute.
func (k *Keyring) Run(ctx context.Context, changed <-chan struct{}, reload time.Duration) {
	if reload <= 0 {
		reload = 30 * time.Second
	}
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	lastLoad, lastMaintain := k.now(), time.Time{}
	for {
		select {
		case <-ctx.Done():
			return
		case <-changed:
			if err := k.Load(ctx); err != nil {
				k.log.Warn("reloading signing keys failed", slog.Any("error", err))
			}
			lastLoad = k.now()
		case <-tick.C:
			now := k.now()
			var err error
			switch {
			case now.Sub(lastMaintain) >= time.Minute:
				err = k.Maintain(ctx)
				lastMaintain, lastLoad = now, now
			case now.Sub(lastLoad) >= reload:
				err = k.Load(ctx)
				lastLoad = now
			default:
				err = k.Apply()
			}
			if err != nil && ctx.Err() == nil {
				k.log.Warn("signing key upkeep failed; keeping the current keys", slog.Any("error", err))
			}
		}
	}
}

// FixedKey is the key administration of an instance that signs with one
// configured key: it reports the key and refuses to rotate.
type FixedKey struct{ Key Key }

// Status reports the one key, active.
func (f FixedKey) Status() []KeyStatus {
	return []KeyStatus{{ID: f.Key.ID, Algorithm: f.Key.Algorithm, State: KeyActive,
		CreatedAt: f.Key.CreatedAt, ActivatesAt: f.Key.CreatedAt}}
}

// Rotate returns ErrRotationDisabled.
func (FixedKey) Rotate(context.Context) (KeyStatus, error) { return KeyStatus{}, ErrRotationDisabled }
