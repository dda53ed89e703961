package issuer_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tokend/tokend/issuer"
	"github.com/tokend/tokend/store/memory"
)

var start = time.Date(2030, 3, 4, 5, 6, 7, 0, time.UTC)

// clock is a fake time source shared by the keyrings of one test.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

// Set moves the clock to t.
func (c *clock) Set(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = t
}

// instance is one tokend's view of a shared key store.
type instance struct {
	iss  *issuer.Issuer
	ring *issuer.Keyring
}

func newInstance(t *testing.T, store issuer.KeyStore, cfg issuer.KeyringConfig, c *clock) instance {
	t.Helper()
	iss, err := issuer.New("https://tokend.test", []string{"ws"})
	if err != nil {
		t.Fatal(err)
	}
	return instance{iss: iss, ring: issuer.NewKeyring(iss, store, cfg, nil, c.Now)}
}

// published lists the kids in the issuer's JWKS document.
func (in instance) published(t *testing.T) []string {
	t.Helper()
	var doc struct {
		Keys []struct {
			Kid string `json:"kid"`
		} `json:"keys"`
	}
	if err := json.Unmarshal(in.iss.JWKS().Body, &doc); err != nil {
		t.Fatalf("JWKS: %v", err)
	}
	var kids []string
	for _, k := range doc.Keys {
		kids = append(kids, k.Kid)
	}
	slices.Sort(kids)
	return kids
}

// signingKid mints a token and returns the kid in its header.
func (in instance) signingKid(t *testing.T) string {
	t.Helper()
	tok, err := in.iss.Mint(context.Background(), issuer.Claims{Subject: "alice", SessionID: "sid",
		IssuedAt: start, ExpiresAt: start.Add(time.Minute)})
	if err != nil {
		t.Fatalf("Mint: %v", err)
	}
	head, _, _ := strings.Cut(tok, ".")
	raw, err := base64.RawURLEncoding.DecodeString(head)
	if err != nil {
		t.Fatal(err)
	}
	var h struct {
		Kid string `json:"kid"`
	}
	if err := json.Unmarshal(raw, &h); err != nil {
		t.Fatal(err)
	}
	return h.Kid
}

// status returns the keyring's status of kid.
func (in instance) status(t *testing.T, kid string) issuer.KeyStatus {
	t.Helper()
	for _, st := range in.ring.Status() {
		if st.ID == kid {
			return st
		}
	}
	t.Fatalf("key %s is not in the keyring's status %+v", kid, in.ring.Status())
	return issuer.KeyStatus{}
}

func storedKids(t *testing.T, store issuer.KeyStore) []string {
	t.Helper()
	keys, err := store.Keys(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var kids []string
	for _, k := range keys {
		kids = append(kids, k.ID)
	}
	slices.Sort(kids)
	return kids
}

func sorted(kids ...string) []string {
	kids = slices.Clone(kids)
	slices.Sort(kids)
	return kids
}

// agree checks that every instance signs with want and publishes the same
// keys as the first.
func agree(t *testing.T, step, want string, instances ...instance) {
	t.Helper()
	for i, in := range instances {
		if got := in.iss.ActiveKeyID(); got != want {
			t.Errorf("%s: instance %d signs with %s, want %s", step, i, got, want)
		}
		if got, first := in.published(t), instances[0].published(t); !slices.Equal(got, first) {
			t.Errorf("%s: instance %d publishes %v, instance 0 %v", step, i, got, first)
		}
	}
}

func TestKeyringInit(t *testing.T) {
	ctx := context.Background()
	store := memory.NewKeyStore()
	c := &clock{now: start}
	cfg := issuer.KeyringConfig{Algorithm: issuer.ES256, PublishDelay: time.Hour, RetireAfter: time.Hour}
	a := newInstance(t, store, cfg, c)

	if err := a.ring.Init(ctx); err != nil {
		t.Fatalf("Init: %v", err)
	}
	kids := storedKids(t, store)
	if len(kids) != 1 {
		t.Fatalf("after Init the store holds %v, want one key", kids)
	}
	first := kids[0]
	if got := a.iss.ActiveKeyID(); got != first {
		t.Errorf("ActiveKeyID = %q, want the new key %s at once", got, first)
	}
	if st := a.status(t, first); st.State != issuer.KeyActive || !st.ActivatesAt.Equal(start) || st.Algorithm != issuer.ES256 {
		t.Errorf("status = %+v, want an active ES256 key activating now", st)
	}
	if got := a.published(t); !slices.Equal(got, []string{first}) {
		t.Errorf("JWKS lists %v, want [%s]", got, first)
	}

	// Init again, by the same instance later on and by a second instance:
	// the existing key is used, none is added.
	c.Set(start.Add(time.Minute))
	if err := a.ring.Init(ctx); err != nil {
		t.Fatalf("second Init: %v", err)
	}
	b := newInstance(t, store, cfg, c)
	if err := b.ring.Init(ctx); err != nil {
		t.Fatalf("Init of a second instance: %v", err)
	}
	if got := storedKids(t, store); !slices.Equal(got, []string{first}) {
		t.Errorf("after three Inits the store holds %v, want only %s", got, first)
	}
	agree(t, "after Init", first, a, b)
}

func TestKeyringLifecycle(t *testing.T) {
	ctx := context.Background()
	store := memory.NewKeyStore()
	c := &clock{now: start}
	const publishDelay, retireAfter = 10 * time.Minute, 20 * time.Minute
	cfg := issuer.KeyringConfig{Algorithm: issuer.EdDSA, PublishDelay: publishDelay, RetireAfter: retireAfter}
	a, b := newInstance(t, store, cfg, c), newInstance(t, store, cfg, c)
	for _, in := range []instance{a, b} {
		if err := in.ring.Init(ctx); err != nil {
			t.Fatal(err)
		}
	}
	old := a.iss.ActiveKeyID()
	agree(t, "start", old, a, b)

	// Rotate: the new key is published at once but does not sign yet.
	c.Set(start.Add(time.Minute))
	rotatedAt := c.Now()
	next, err := a.ring.Rotate(ctx)
	if err != nil {
		t.Fatalf("Rotate: %v", err)
	}
	if next.ID == old || next.State != issuer.KeyNext || !next.ActivatesAt.Equal(rotatedAt.Add(publishDelay)) {
		t.Errorf("Rotate = %+v, want a new key, next, activating after the publish delay", next)
	}
	if !strings.Contains(string(a.iss.JWKS().Body), next.ID) {
		t.Errorf("JWKS does not publish the next key %s", next.ID)
	}
	if got := a.signingKid(t); got != old {
		t.Errorf("right after Rotate tokens are signed by %s, want still %s", got, old)
	}
	// Instance B has not reloaded yet: it still signs with the old key,
	// which is right, since the new one is not due.
	if err := b.ring.Apply(); err != nil {
		t.Fatal(err)
	}
	if got := b.iss.ActiveKeyID(); got != old {
		t.Errorf("B before reloading signs with %s, want %s", got, old)
	}
	// After B reloads (a NOTIFY or its periodic reload), both agree.
	if err := b.ring.Load(ctx); err != nil {
		t.Fatal(err)
	}
	agree(t, "after Rotate", old, a, b)
	if got, want := b.published(t), sorted(old, next.ID); !slices.Equal(got, want) {
		t.Errorf("B publishes %v, want %v", got, want)
	}

	// Rotating again while a key is pending returns that key.
	again, err := b.ring.Rotate(ctx)
	if err != nil {
		t.Fatalf("second Rotate: %v", err)
	}
	if again.ID != next.ID {
		t.Errorf("second Rotate introduced %s, want the pending %s again", again.ID, next.ID)
	}
	if got := storedKids(t, store); len(got) != 2 {
		t.Errorf("after two Rotates the store holds %v, want two keys", got)
	}

	apply := func(step string, at time.Time) {
		t.Helper()
		c.Set(at)
		for _, in := range []instance{a, b} {
			if err := in.ring.Apply(); err != nil {
				t.Fatalf("%s: Apply: %v", step, err)
			}
		}
	}

	// Just before the publish delay has passed: still the old key.
	apply("just before activation", next.ActivatesAt.Add(-time.Nanosecond))
	agree(t, "just before activation", old, a, b)

	// At activation: the new key signs, the old one is retired but published.
	switchAt := next.ActivatesAt
	apply("at activation", switchAt)
	agree(t, "at activation", next.ID, a, b)
	if got := a.signingKid(t); got != next.ID {
		t.Errorf("after activation tokens are signed by %s, want %s", got, next.ID)
	}
	removeAt := switchAt.Add(retireAfter)
	for name, in := range map[string]instance{"A": a, "B": b} {
		st := in.status(t, old)
		if st.State != issuer.KeyRetired || !st.RetiredAt.Equal(switchAt) || !st.RemoveAt.Equal(removeAt) {
			t.Errorf("%s: old key status = %+v, want retired at %v, removed at %v", name, st, switchAt, removeAt)
		}
		if st := in.status(t, next.ID); st.State != issuer.KeyActive || !st.RetiredAt.IsZero() || !st.RemoveAt.IsZero() {
			t.Errorf("%s: new key status = %+v, want active", name, st)
		}
		if got, want := in.published(t), sorted(old, next.ID); !slices.Equal(got, want) {
			t.Errorf("%s: at activation the JWKS lists %v, want %v", name, got, want)
		}
	}

	// The retired key stays published until RemoveAt, and not a moment
	// longer.
	apply("just before removal", removeAt.Add(-time.Nanosecond))
	agree(t, "just before removal", next.ID, a, b)
	if got, want := a.published(t), sorted(old, next.ID); !slices.Equal(got, want) {
		t.Errorf("just before RemoveAt the JWKS lists %v, want %v", got, want)
	}
	apply("at removal", removeAt)
	agree(t, "at removal", next.ID, a, b)
	if got := a.published(t); !slices.Equal(got, []string{next.ID}) {
		t.Errorf("at RemoveAt the JWKS lists %v, want only %s", got, next.ID)
	}
	if st := a.ring.Status(); len(st) != 1 || st[0].ID != next.ID {
		t.Errorf("at RemoveAt Status = %+v, want only the new key", st)
	}
	// Apply only changes what is served; Maintain deletes the stored key.
	if got := storedKids(t, store); len(got) != 2 {
		t.Errorf("before Maintain the store holds %v, want both keys", got)
	}
	if err := b.ring.Maintain(ctx); err != nil {
		t.Fatalf("Maintain: %v", err)
	}
	if got := storedKids(t, store); !slices.Equal(got, []string{next.ID}) {
		t.Errorf("after Maintain the store holds %v, want only %s", got, next.ID)
	}
	if err := a.ring.Load(ctx); err != nil {
		t.Fatal(err)
	}
	agree(t, "after Maintain", next.ID, a, b)
}

func TestKeyringMaintain(t *testing.T) {
	ctx := context.Background()
	store := memory.NewKeyStore()
	c := &clock{now: start}
	const rotation, publishDelay, retireAfter = 24 * time.Hour, time.Hour, 2 * time.Hour
	cfg := issuer.KeyringConfig{Algorithm: issuer.ES256, Rotation: rotation, PublishDelay: publishDelay, RetireAfter: retireAfter}
	a, b := newInstance(t, store, cfg, c), newInstance(t, store, cfg, c)
	if err := a.ring.Init(ctx); err != nil {
		t.Fatal(err)
	}
	if err := b.ring.Init(ctx); err != nil {
		t.Fatal(err)
	}
	first := a.iss.ActiveKeyID()

	// maintain runs Maintain on both instances at once, as every instance
	// does every minute, at time at.
	maintain := func(step string, at time.Time) {
		t.Helper()
		c.Set(at)
		var wg sync.WaitGroup
		errs := make([]error, 2)
		for i, in := range []instance{a, b} {
			wg.Go(func() { errs[i] = in.ring.Maintain(ctx) })
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			t.Fatalf("%s: Maintain: %v", step, err)
		}
		// Maintain reloads, but the instance that finished first may
		// have loaded before the other's change.
		for _, in := range []instance{a, b} {
			if err := in.ring.Load(ctx); err != nil {
				t.Fatal(err)
			}
		}
	}

	maintain("before the rotation period", start.Add(rotation-time.Nanosecond))
	if got := storedKids(t, store); !slices.Equal(got, []string{first}) {
		t.Fatalf("Maintain before the rotation period: the store holds %v, want only %s", got, first)
	}

	rotatedAt := start.Add(rotation)
	maintain("at the rotation period", rotatedAt)
	kids := storedKids(t, store)
	if len(kids) != 2 {
		t.Fatalf("Maintain at the rotation period (run by two instances): the store holds %v, want two keys", kids)
	}
	second := kids[0]
	if second == first {
		second = kids[1]
	}
	if st := a.status(t, second); st.State != issuer.KeyNext || !st.ActivatesAt.Equal(rotatedAt.Add(publishDelay)) {
		t.Errorf("the scheduled key's status = %+v, want next, activating after the publish delay", st)
	}
	agree(t, "after the scheduled rotation", first, a, b)

	// Nothing more happens while the new key waits, however often Maintain runs.
	maintain("while the new key is pending", rotatedAt.Add(publishDelay-time.Nanosecond))
	if got := storedKids(t, store); len(got) != 2 {
		t.Errorf("Maintain while a key is pending: the store holds %v, want the same two keys", got)
	}
	agree(t, "while the new key is pending", first, a, b)

	switchAt := rotatedAt.Add(publishDelay)
	maintain("at activation", switchAt)
	agree(t, "at activation", second, a, b)

	// The retired key is deleted once RetireAfter has passed since the switch.
	maintain("before the old key may go", switchAt.Add(retireAfter-time.Nanosecond))
	if got := storedKids(t, store); len(got) != 2 {
		t.Errorf("Maintain before RemoveAt: the store holds %v, want both keys", got)
	}
	maintain("when the old key may go", switchAt.Add(retireAfter))
	if got := storedKids(t, store); !slices.Equal(got, []string{second}) {
		t.Errorf("Maintain at RemoveAt: the store holds %v, want only %s", got, second)
	}
	agree(t, "after removal", second, a, b)
	if got := a.published(t); !slices.Equal(got, []string{second}) {
		t.Errorf("after removal the JWKS lists %v, want only %s", got, second)
	}

	// The next rotation is due a rotation period after the second key was
	// created, not after it activated.
	maintain("before the next period", rotatedAt.Add(rotation-time.Nanosecond))
	if got := storedKids(t, store); len(got) != 1 {
		t.Errorf("Maintain before the next period: the store holds %v, want one key", got)
	}
	maintain("at the next period", rotatedAt.Add(rotation))
	if got := storedKids(t, store); len(got) != 2 {
		t.Errorf("Maintain at the next period: the store holds %v, want two keys", got)
	}
	agree(t, "after the next rotation", second, a, b)
}

func TestKeyringRotationDisabledWithoutPeriod(t *testing.T) {
	ctx := context.Background()
	store := memory.NewKeyStore()
	c := &clock{now: start}
	a := newInstance(t, store, issuer.KeyringConfig{Algorithm: issuer.ES256, PublishDelay: time.Hour}, c)
	if err := a.ring.Init(ctx); err != nil {
		t.Fatal(err)
	}
	c.Set(start.Add(365 * 24 * time.Hour))
	if err := a.ring.Maintain(ctx); err != nil {
		t.Fatal(err)
	}
	if got := storedKids(t, store); len(got) != 1 {
		t.Errorf("with Rotation 0, Maintain a year later left %v, want the one key", got)
	}
}

func TestFixedKeyRotate(t *testing.T) {
	k, err := issuer.GenerateKey(issuer.ES256, start)
	if err != nil {
		t.Fatal(err)
	}
	f := issuer.FixedKey{Key: k}
	if _, err := f.Rotate(context.Background()); !errors.Is(err, issuer.ErrRotationDisabled) {
		t.Errorf("FixedKey.Rotate = %v, want ErrRotationDisabled", err)
	}
	if st := f.Status(); len(st) != 1 || st[0].ID != k.ID || st[0].State != issuer.KeyActive {
		t.Errorf("FixedKey.Status = %+v, want the one key, active", st)
	}
}
