package verify

import (
	"context"
	"testing"

	"github.com/tokend/tokend/issuer"
)

// BenchmarkVerify is what a websocket service pays per connection or
// refresh: a tokend token checked against cached keys.
func BenchmarkVerify(b *testing.B) {
	for _, alg := range []issuer.Algorithm{issuer.ES256, issuer.EdDSA, issuer.RS256} {
		b.Run(string(alg), func(b *testing.B) {
			key := newKey(b, alg)
			s := newJWKSServer(b, key)
			v, err := New(b.Context(), Config{JWKSURL: s.url(), Issuer: testIssuer, Audience: testAudience, Now: (&clock{now: t0}).Now})
			if err != nil {
				b.Fatal(err)
			}
			tok := s.mint(b, "SID", t0, `{"role":"editor"}`)
			if _, err := v.Verify(context.Background(), tok); err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			for b.Loop() {
				if _, err := v.Verify(context.Background(), tok); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
