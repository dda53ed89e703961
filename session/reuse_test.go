package session_test

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tokend/tokend/issuer"
	"github.com/tokend/tokend/session"
	"github.com/tokend/tokend/store/memory"
)

// countingMinter counts signatures and can hold them until released.
type countingMinter struct {
	inner session.Minter
	calls atomic.Int64
	gate  chan struct{} // when non-nil, Mint waits for it to close
}

func (m *countingMinter) Mint(ctx context.Context, c issuer.Claims) (string, error) {
	m.calls.Add(1)
	if m.gate != nil {
		<-m.gate
	}
	return m.inner.Mint(ctx, c)
}

type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func newReuseService(t *testing.T, window time.Duration) (*session.Service, *countingMinter, *fakeClock, string) {
	t.Helper()
	clock := &fakeClock{t: time.Date(2026, 12, 4, 12, 0, 0, 0, time.UTC)}
	key, err := issuer.GenerateKey(issuer.ES256, clock.Now())
	if err != nil {
		t.Fatal(err)
	}
	iss, err := issuer.New("https://tokend.test", []string{"app"})
	if err != nil {
		t.Fatal(err)
	}
	if err := iss.SetKeys(&key, []issuer.Key{key}); err != nil {
		t.Fatal(err)
	}
	m := &countingMinter{inner: iss}
	svc := session.NewService(memory.New(), m, session.Config{ReuseWindow: window},
		session.WithClock(clock.Now), session.WithJitter(func() float64 { return 0.5 }))
	created, err := svc.Create(context.Background(), session.CreateRequest{Subject: "alice"})
	if err != nil {
		t.Fatal(err)
	}
	return svc, m, clock, created.Credentials.String()
}

func TestRefreshReusesTokenWithinWindow(t *testing.T) {
	ctx := context.Background()
	svc, m, clock, cookie := newReuseService(t, 2*time.Second)
	first, err := svc.Refresh(ctx, cookie)
	if err != nil {
		t.Fatal(err)
	}
	clock.Add(1500 * time.Millisecond)
	second, err := svc.Refresh(ctx, cookie)
	if err != nil {
		t.Fatal(err)
	}
	if second.AccessToken != first.AccessToken {
		t.Error("a refresh within the window signed a new token")
	}
	ra, rb := first.Plan.RefreshAt(), second.Plan.RefreshAt()
	if !second.Plan.ExpiresAt.Equal(first.Plan.ExpiresAt) || rb.After(ra) || rb.Before(ra.Add(-time.Second)) {
		t.Errorf("reused plan moved: first exp %v refresh_at %v, second exp %v refresh_at %v",
			first.Plan.ExpiresAt, first.Plan.RefreshAt(), second.Plan.ExpiresAt, second.Plan.RefreshAt())
	}
	if second.Plan.RefreshIn >= first.Plan.RefreshIn {
		t.Errorf("refresh_in of the reused token = %s, want less than the original %s", second.Plan.RefreshIn, first.Plan.RefreshIn)
	}
	if got := m.calls.Load(); got != 1 {
		t.Errorf("signatures = %d, want 1", got)
	}

	clock.Add(500 * time.Millisecond) // 2s after the first: the window is over
	third, err := svc.Refresh(ctx, cookie)
	if err != nil {
		t.Fatal(err)
	}
	if third.AccessToken == first.AccessToken || m.calls.Load() != 2 {
		t.Errorf("after the window: same token %v, signatures %d", third.AccessToken == first.AccessToken, m.calls.Load())
	}
}

func TestRefreshReuseNeverOutlivesRevocation(t *testing.T) {
	ctx := context.Background()
	svc, _, clock, cookie := newReuseService(t, 2*time.Second)
	tok, err := svc.Refresh(ctx, cookie)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := svc.Revoke(ctx, tok.SessionID, "test"); err != nil {
		t.Fatal(err)
	}
	clock.Add(100 * time.Millisecond)
	if _, err := svc.Refresh(ctx, cookie); err != session.ErrRevoked {
		t.Fatalf("refresh after revocation within the window: err = %v, want ErrRevoked", err)
	}
}

func TestRefreshWithoutReuseSignsEveryTime(t *testing.T) {
	ctx := context.Background()
	svc, m, _, cookie := newReuseService(t, 0)
	a, err := svc.Refresh(ctx, cookie)
	if err != nil {
		t.Fatal(err)
	}
	b, err := svc.Refresh(ctx, cookie)
	if err != nil {
		t.Fatal(err)
	}
	if a.AccessToken == b.AccessToken || m.calls.Load() != 2 {
		t.Errorf("reuse off: same token %v, signatures %d", a.AccessToken == b.AccessToken, m.calls.Load())
	}
}

// Concurrent refreshes of one session wait for one signature.
func TestConcurrentRefreshesShareOneSignature(t *testing.T) {
	ctx := context.Background()
	svc, m, _, cookie := newReuseService(t, 2*time.Second)
	m.gate = make(chan struct{})
	const n = 16
	tokens := make([]string, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			tok, err := svc.Refresh(ctx, cookie)
			tokens[i], errs[i] = tok.AccessToken, err
		})
	}
	// Let the first signature through once it has started; everyone else
	// must be waiting for it or find it remembered.
	for m.calls.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	close(m.gate)
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("refresh %d: %v", i, errs[i])
		}
		if tokens[i] != tokens[0] {
			t.Fatalf("refresh %d got a different token", i)
		}
	}
	if got := m.calls.Load(); got != 1 {
		t.Errorf("signatures = %d, want 1", got)
	}
}

// BenchmarkRefreshOneSessionParallel is many tabs of one session refreshing
// at once, with and without the reuse window: the CPU a reload storm costs.
func BenchmarkRefreshOneSessionParallel(b *testing.B) {
	for _, window := range []time.Duration{0, 2 * time.Second} {
		name := "reuse=off"
		if window > 0 {
			name = "reuse=2s"
		}
		b.Run(name, func(b *testing.B) {
			key, err := issuer.GenerateKey(issuer.ES256, time.Now())
			if err != nil {
				b.Fatal(err)
			}
			iss, err := issuer.New("https://tokend.test", []string{"app"})
			if err != nil {
				b.Fatal(err)
			}
			if err := iss.SetKeys(&key, []issuer.Key{key}); err != nil {
				b.Fatal(err)
			}
			svc := session.NewService(memory.New(), iss, session.Config{ReuseWindow: window})
			created, err := svc.Create(context.Background(), session.CreateRequest{Subject: "alice"})
			if err != nil {
				b.Fatal(err)
			}
			cookie := created.Credentials.String()
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if _, err := svc.Refresh(context.Background(), cookie); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}
