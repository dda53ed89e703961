package issuer_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jws"

	"github.com/tokend/tokend/issuer"
)

func benchIssuer(b *testing.B, alg issuer.Algorithm) (*issuer.Issuer, issuer.Key) {
	b.Helper()
	now := time.Now()
	key, err := issuer.GenerateKey(alg, now)
	if err != nil {
		b.Fatal(err)
	}
	iss, err := issuer.New("https://tokend.example.com", []string{"realtime"})
	if err != nil {
		b.Fatal(err)
	}
	if err := iss.SetKeys(&key, []issuer.Key{key}); err != nil {
		b.Fatal(err)
	}
	return iss, key
}

func benchClaims() issuer.Claims {
	now := time.Now()
	return issuer.Claims{
		Subject:   "user-1234567",
		SessionID: "AAAAAAAAAAAAAAAAAAAAAA",
		IssuedAt:  now,
		ExpiresAt: now.Add(10 * time.Minute),
		Extra:     json.RawMessage(`{"role":"editor","tenant":"acme"}`),
	}
}

// BenchmarkES256Signature is the floor of the token path: one ES256 signature
// over the signing input of a real token (same header and claims), with the
// signer tokend uses. Every other token benchmark is read as a multiple of it.
func BenchmarkES256Signature(b *testing.B) {
	iss, key := benchIssuer(b, issuer.ES256)
	tok, err := iss.Mint(context.Background(), benchClaims())
	if err != nil {
		b.Fatal(err)
	}
	input := []byte(tok[:strings.LastIndexByte(tok, '.')])
	signer, err := jws.NewSigner(jwa.ES256)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	start := processCPU()
	for b.Loop() {
		if _, err := signer.Sign(input, key.Private); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(processCPU()-start)/float64(b.N), "cpu-ns/op")
}

// processCPU is the CPU time (user + system) this process has used, so that
// signature and token costs compare as CPU per operation.
func processCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkES256SignatureStdlib is the same signature with crypto/ecdsa
// directly, to show what the JWS signer adds.
func BenchmarkES256SignatureStdlib(b *testing.B) {
	iss, key := benchIssuer(b, issuer.ES256)
	tok, err := iss.Mint(context.Background(), benchClaims())
	if err != nil {
		b.Fatal(err)
	}
	input := []byte(tok[:strings.LastIndexByte(tok, '.')])
	priv := key.Private.(*ecdsa.PrivateKey)
	b.ReportAllocs()
	for b.Loop() {
		h := sha256.Sum256(input)
		if _, err := ecdsa.SignASN1(rand.Reader, priv, h[:]); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkMint is Issuer.Mint: claims encoding, token id and signature.
func BenchmarkMint(b *testing.B) {
	for _, alg := range []issuer.Algorithm{issuer.ES256, issuer.EdDSA, issuer.RS256} {
		b.Run(string(alg), func(b *testing.B) {
			iss, _ := benchIssuer(b, alg)
			c := benchClaims()
			ctx := context.Background()
			b.ReportAllocs()
			var n int
			for b.Loop() {
				tok, err := iss.Mint(ctx, c)
				if err != nil {
					b.Fatal(err)
				}
				n += len(tok)
			}
			if n == 0 {
				b.Fatal("no tokens")
			}
		})
	}
}
