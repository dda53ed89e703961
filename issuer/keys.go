package issuer

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"
)

// Algorithm is a JWS signature algorithm tokend can sign with.
type Algorithm string

// The supported algorithms. ES256 is the default: small signatures, fast
// signing, supported by every JWT library.
const (
	ES256 Algorithm = "ES256"
	EdDSA Algorithm = "EdDSA"
	RS256 Algorithm = "RS256"
)

// ParseAlgorithm accepts "ES256", "EdDSA" or "RS256".
func ParseAlgorithm(s string) (Algorithm, error) {
	switch a := Algorithm(s); a {
	case ES256, EdDSA, RS256:
		return a, nil
	}
	return "", fmt.Errorf("unsupported signing algorithm %q (want ES256, EdDSA or RS256)", s)
}

// ErrNoSigningKey means the key set has no active key to sign with.
var ErrNoSigningKey = errors.New("no active signing key")

// Key is one signing key: its private part and how it is published.
type Key struct {
	// ID is the key's kid: its RFC 7638 thumbprint, so it is stable and
	// derived from the key itself.
	ID        string
	Algorithm Algorithm
	// Private signs tokens. It is never serialised by this package.
	Private crypto.Signer
	// CreatedAt is informational.
	CreatedAt time.Time
}

// GenerateKey creates a new key for alg from crypto/rand.
func GenerateKey(alg Algorithm, now time.Time) (Key, error) {
	var (
		priv crypto.Signer
		err  error
	)
	switch alg {
	case ES256:
		priv, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case EdDSA:
		_, priv, err = ed25519.GenerateKey(rand.Reader)
	case RS256:
		priv, err = rsa.GenerateKey(rand.Reader, 2048)
	default:
		return Key{}, fmt.Errorf("generate key: unsupported algorithm %q", alg)
	}
	if err != nil {
		return Key{}, fmt.Errorf("generate %s key: %w", alg, err)
	}
	return NewKey(alg, priv, now)
}

// NewKey wraps an existing private key, checking that it suits alg.
func NewKey(alg Algorithm, priv crypto.Signer, createdAt time.Time) (Key, error) {
	if err := checkKeyType(alg, priv); err != nil {
		return Key{}, err
	}
	pub, err := jwk.FromRaw(priv.Public())
	if err != nil {
		return Key{}, fmt.Errorf("public key: %w", err)
	}
	tp, err := pub.Thumbprint(crypto.SHA256)
	if err != nil {
		return Key{}, fmt.Errorf("key thumbprint: %w", err)
	}
	return Key{
		ID:        base64.RawURLEncoding.EncodeToString(tp),
		Algorithm: alg,
		Private:   priv,
		CreatedAt: createdAt,
	}, nil
}

// ParsePrivateKeyPEM reads a PEM-encoded private key (PKCS#8, SEC 1 or
// PKCS#1) and infers its algorithm: EC P-256 → ES256, Ed25519 → EdDSA,
// RSA → RS256.
func ParsePrivateKeyPEM(data []byte, createdAt time.Time) (Key, error) {
	k, err := jwk.ParseKey(data, jwk.WithPEM(true))
	if err != nil {
		return Key{}, fmt.Errorf("parse PEM private key: %w", err)
	}
	var raw any
	if err := k.Raw(&raw); err != nil {
		return Key{}, fmt.Errorf("parse PEM private key: %w", err)
	}
	var alg Algorithm
	switch p := raw.(type) {
	case *ecdsa.PrivateKey:
		alg = ES256
	case ed25519.PrivateKey:
		alg = EdDSA
	case *rsa.PrivateKey:
		alg = RS256
	default:
		return Key{}, fmt.Errorf("parse PEM private key: %T is not a supported private key", p)
	}
	return NewKey(alg, raw.(crypto.Signer), createdAt)
}

func checkKeyType(alg Algorithm, priv crypto.Signer) error {
	switch p := priv.(type) {
	case *ecdsa.PrivateKey:
		if alg == ES256 && p.Curve == elliptic.P256() {
			return nil
		}
	case ed25519.PrivateKey:
		if alg == EdDSA {
			return nil
		}
	case *rsa.PrivateKey:
		if alg == RS256 && p.N.BitLen() >= 2048 {
			return nil
		}
	}
	return fmt.Errorf("a %T cannot sign %s (ES256 needs P-256, RS256 at least 2048 bits)", priv, alg)
}

// signingKey is a Key prepared for the hot path: the JWS signer and the
// encoded protected header are built once.
type signingKey struct {
	Key
	signer    jws.Signer
	headerB64 string // base64url of {"alg":…,"kid":…,"typ":"JWT"}
}

func prepare(k Key) (*signingKey, error) {
	signer, err := jws.NewSigner(jwa.SignatureAlgorithm(k.Algorithm))
	if err != nil {
		return nil, fmt.Errorf("signer for %s: %w", k.Algorithm, err)
	}
	hdr, err := json.Marshal(struct {
		Alg string `json:"alg"`
		Kid string `json:"kid"`
		Typ string `json:"typ"`
	}{string(k.Algorithm), k.ID, "JWT"})
	if err != nil {
		return nil, err
	}
	return &signingKey{Key: k, signer: signer, headerB64: base64.RawURLEncoding.EncodeToString(hdr)}, nil
}

// JWKS is a precomputed JWK Set document, served as is to validators.
type JWKS struct {
	// Body is the JSON document.
	Body []byte
	// ETag is a strong entity tag, quoted, derived from Body.
	ETag string
}

// newJWKS builds the document publishing the public parts of keys.
func newJWKS(keys []Key) (*JWKS, error) {
	set := jwk.NewSet()
	for _, k := range keys {
		pub, err := jwk.FromRaw(k.Private.Public())
		if err != nil {
			return nil, fmt.Errorf("public key %s: %w", k.ID, err)
		}
		for name, v := range map[string]any{
			jwk.KeyIDKey:     k.ID,
			jwk.AlgorithmKey: jwa.SignatureAlgorithm(k.Algorithm),
			jwk.KeyUsageKey:  jwk.ForSignature,
		} {
			if err := pub.Set(name, v); err != nil {
				return nil, fmt.Errorf("public key %s: set %s: %w", k.ID, name, err)
			}
		}
		if err := set.AddKey(pub); err != nil {
			return nil, fmt.Errorf("public key %s: %w", k.ID, err)
		}
	}
	body, err := json.Marshal(set)
	if err != nil {
		return nil, fmt.Errorf("marshal JWKS: %w", err)
	}
	sum := sha256.Sum256(body)
	return &JWKS{Body: body, ETag: `"` + base64.RawURLEncoding.EncodeToString(sum[:16]) + `"`}, nil
}
