// Package issuer signs tokend's access tokens and publishes the keys that
// verify them as a JWK Set.
//
// Minting is on the hot path of every refresh, so the protected header of
// each key and the constant part of the claims are encoded once, and a
// token costs little more than its signature.
package issuer

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"strconv"
	"sync/atomic"
	"time"
	"unicode/utf8"
)

// Claims are the per-token values of an access token. The issuer adds iss,
// aud and jti itself.
type Claims struct {
	Subject   string
	SessionID string
	IssuedAt  time.Time
	ExpiresAt time.Time
	// Extra is a JSON object of additional claims, or nil. It must not
	// contain registered claim names; the session package guarantees that.
	Extra json.RawMessage
}

// Issuer mints signed JWTs with the active key of its key set.
type Issuer struct {
	issuer   string
	audience []string
	prefix   []byte // `{"iss":…,"aud":…,`
	random   io.Reader
	keys     atomic.Pointer[keySet]
}

type keySet struct {
	active    *signingKey
	published []Key
	jwks      *JWKS
}

// Option configures an Issuer.
type Option func(*Issuer)

// WithRandom sets the source of token ids (crypto/rand by default).
func WithRandom(r io.Reader) Option { return func(i *Issuer) { i.random = r } }

// New returns an issuer that signs tokens for the given issuer URL and
// audiences. It has no keys until SetKeys is called.
func New(issuer string, audience []string, opts ...Option) (*Issuer, error) {
	u, err := url.Parse(issuer)
	if err != nil || u.Scheme == "" || u.Host == "" {
		return nil, fmt.Errorf("issuer %q must be an absolute URL", issuer)
	}
	if len(audience) == 0 {
		return nil, errors.New("at least one audience is required")
	}
	i := &Issuer{issuer: issuer, audience: append([]string(nil), audience...), random: rand.Reader}
	for _, o := range opts {
		o(i)
	}
	var aud any = i.audience
	if len(i.audience) == 1 {
		aud = i.audience[0]
	}
	head, err := json.Marshal(struct {
		Iss string `json:"iss"`
		Aud any    `json:"aud"`
	}{issuer, aud})
	if err != nil {
		return nil, err
	}
	i.prefix = append(head[:len(head)-1], ',')
	if err := i.SetKeys(nil, nil); err != nil {
		return nil, err
	}
	return i, nil
}

// Issuer returns the iss value of minted tokens.
func (i *Issuer) Issuer() string { return i.issuer }

// Audience returns the aud values of minted tokens.
func (i *Issuer) Audience() []string { return append([]string(nil), i.audience...) }

// SetKeys replaces the key set atomically: active signs from now on (nil:
// none), and published — which should include active — is what the JWKS
// lists. Tokens being minted concurrently finish with the previous key.
func (i *Issuer) SetKeys(active *Key, published []Key) error {
	ks := &keySet{published: append([]Key(nil), published...)}
	if active != nil {
		sk, err := prepare(*active)
		if err != nil {
			return err
		}
		ks.active = sk
		found := false
		for _, k := range published {
			found = found || k.ID == active.ID
		}
		if !found {
			return fmt.Errorf("active key %s is not published", active.ID)
		}
	}
	doc, err := newJWKS(ks.published)
	if err != nil {
		return err
	}
	ks.jwks = doc
	i.keys.Store(ks)
	return nil
}

// JWKS returns the current published key set document. It is immutable and
// shared; callers must not modify it.
func (i *Issuer) JWKS() *JWKS { return i.keys.Load().jwks }

// ActiveKeyID returns the kid that signs new tokens, or "" if none.
func (i *Issuer) ActiveKeyID() string {
	if k := i.keys.Load().active; k != nil {
		return k.ID
	}
	return ""
}

// Mint signs a token carrying c. The header names the active key's alg and
// kid; typ is "JWT".
func (i *Issuer) Mint(_ context.Context, c Claims) (string, error) {
	key := i.keys.Load().active
	if key == nil {
		return "", ErrNoSigningKey
	}
	var jti [16]byte
	if _, err := io.ReadFull(i.random, jti[:]); err != nil {
		return "", fmt.Errorf("token id: %w", err)
	}

	payload := make([]byte, 0, len(i.prefix)+128+len(c.Subject)+len(c.Extra))
	payload = append(payload, i.prefix...)
	payload = append(payload, `"sub":`...)
	payload = appendJSONString(payload, c.Subject)
	payload = append(payload, `,"sid":`...)
	payload = appendJSONString(payload, c.SessionID)
	payload = append(payload, `,"iat":`...)
	payload = strconv.AppendInt(payload, c.IssuedAt.Unix(), 10)
	payload = append(payload, `,"exp":`...)
	payload = strconv.AppendInt(payload, c.ExpiresAt.Unix(), 10)
	payload = append(payload, `,"jti":"`...)
	payload = base64.RawURLEncoding.AppendEncode(payload, jti[:])
	payload = append(payload, '"')
	if len(c.Extra) > 2 { // a non-empty object: splice its members in
		payload = append(payload, ',')
		payload = append(payload, c.Extra[1:]...)
	} else {
		payload = append(payload, '}')
	}

	enc := base64.RawURLEncoding
	out := make([]byte, 0, len(key.headerB64)+1+enc.EncodedLen(len(payload))+1+enc.EncodedLen(512))
	out = append(out, key.headerB64...)
	out = append(out, '.')
	out = enc.AppendEncode(out, payload)
	sig, err := key.signer.Sign(out, key.Private)
	if err != nil {
		return "", fmt.Errorf("sign token: %w", err)
	}
	out = append(out, '.')
	out = enc.AppendEncode(out, sig)
	return string(out), nil
}

// appendJSONString appends s as a JSON string. Invalid UTF-8 becomes U+FFFD,
// as encoding/json does.
func appendJSONString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c >= 0x20 && c != '"' && c != '\\' && c < utf8.RuneSelf {
			i++
			continue
		}
		if c < utf8.RuneSelf {
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hex[r&0xf])
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}
