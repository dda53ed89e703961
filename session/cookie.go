package session

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"fmt"
	"io"
)

// The cookie value is "<sid>.<secret>": a public session id of 16 random
// bytes and a secret of 32 random bytes, both base64url without padding.
const (
	sidBytes    = 16
	secretBytes = 32
	// SIDLength is the length of an encoded session id.
	SIDLength    = 22 // base64.RawURLEncoding.EncodedLen(sidBytes)
	secretLength = 43 // base64.RawURLEncoding.EncodedLen(secretBytes)
	// CookieValueLength is the exact length of a cookie value.
	CookieValueLength = SIDLength + 1 + secretLength
)

// Credentials are the two parts of a session cookie.
type Credentials struct {
	SID    string
	Secret string
}

// String returns the cookie value.
func (c Credentials) String() string { return c.SID + "." + c.Secret }

// newCredentials draws a fresh sid and secret from r.
func newCredentials(r io.Reader) (Credentials, error) {
	var buf [sidBytes + secretBytes]byte
	if _, err := io.ReadFull(r, buf[:]); err != nil {
		return Credentials{}, fmt.Errorf("read random bytes: %w", err)
	}
	return Credentials{
		SID:    base64.RawURLEncoding.EncodeToString(buf[:sidBytes]),
		Secret: base64.RawURLEncoding.EncodeToString(buf[sidBytes:]),
	}, nil
}

// ParseCookie splits a cookie value into its parts. Anything that is not
// exactly "<22 base64url chars>.<43 base64url chars>" is ErrInvalid.
func ParseCookie(value string) (Credentials, error) {
	if len(value) != CookieValueLength || value[SIDLength] != '.' {
		return Credentials{}, ErrInvalid
	}
	c := Credentials{SID: value[:SIDLength], Secret: value[SIDLength+1:]}
	if !ValidSID(c.SID) || !isBase64URL(c.Secret) {
		return Credentials{}, ErrInvalid
	}
	return c, nil
}

// ValidSID reports whether s has the form of a session id. It says nothing
// about whether such a session exists.
func ValidSID(s string) bool {
	return len(s) == SIDLength && isBase64URL(s)
}

func isBase64URL(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case 'A' <= c && c <= 'Z', 'a' <= c && c <= 'z', '0' <= c && c <= '9', c == '-', c == '_':
		default:
			return false
		}
	}
	return true
}

// HashSecret returns the value stored in place of a secret. The secret holds
// 256 random bits, so a fast hash is enough: there is nothing to brute-force.
func HashSecret(secret string) []byte {
	h := sha256.Sum256([]byte(secret))
	return h[:]
}

// secretMatches compares in constant time.
func secretMatches(secret string, hash []byte) bool {
	h := sha256.Sum256([]byte(secret))
	return subtle.ConstantTimeCompare(h[:], hash) == 1
}
