package verify

import "strings"

// Kind classifies why a token was refused.
type Kind int

// The kinds of refusal. Services usually answer every kind but Unavailable
// by closing the connection or with 401, and Unavailable with a retry.
const (
	// KindMalformed: not a compact JWS, bad base64 or JSON, a required
	// claim (sub, sid, exp, iat) missing or of the wrong type, or a header
	// this package does not understand (crit).
	KindMalformed Kind = iota + 1
	// KindBadSignature: the signature does not verify, or the token names
	// an algorithm that is not accepted (anything but ES256, EdDSA and
	// RS256, so never "none" or HS256) or not the one its key is for.
	KindBadSignature
	// KindUnknownKey: no key of the key set has the token's kid, even
	// after a refetch (or a refetch was not allowed yet).
	KindUnknownKey
	// KindExpired: exp is in the past, beyond the leeway.
	KindExpired
	// KindNotYetValid: nbf or iat is in the future, beyond the leeway.
	KindNotYetValid
	// KindWrongIssuer: iss is not the configured issuer.
	KindWrongIssuer
	// KindWrongAudience: aud does not contain the configured audience.
	KindWrongAudience
	// KindRevoked: the token's session was revoked (see Subscribe).
	KindRevoked
	// KindUnavailable: no key set could be fetched yet, so nothing can be
	// verified; retry later.
	KindUnavailable
)

var kindNames = map[Kind]string{
	KindMalformed:     "malformed",
	KindBadSignature:  "bad signature",
	KindUnknownKey:    "unknown key",
	KindExpired:       "expired",
	KindNotYetValid:   "not yet valid",
	KindWrongIssuer:   "wrong issuer",
	KindWrongAudience: "wrong audience",
	KindRevoked:       "revoked",
	KindUnavailable:   "keys unavailable",
}

func (k Kind) String() string {
	if n, ok := kindNames[k]; ok {
		return n
	}
	return "unknown"
}

// Error is a refused token: its Kind and a detail for logs. Match kinds
// with errors.Is against the Err... values, or read Kind with errors.As.
type Error struct {
	Kind   Kind
	Detail string
	// Err is the underlying failure, if any (a fetch error, say).
	Err error
}

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("token refused: ")
	b.WriteString(e.Kind.String())
	if e.Detail != "" {
		b.WriteString(": ")
		b.WriteString(e.Detail)
	}
	if e.Err != nil {
		b.WriteString(": ")
		b.WriteString(e.Err.Error())
	}
	return b.String()
}

func (e *Error) Unwrap() error { return e.Err }

// Is reports whether target is the sentinel of e's kind, so that
// errors.Is(err, verify.ErrExpired) works whatever the detail.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Detail == "" && t.Err == nil && t.Kind == e.Kind
}

// Sentinels, one per Kind, for errors.Is.
var (
	ErrMalformed     = &Error{Kind: KindMalformed}
	ErrBadSignature  = &Error{Kind: KindBadSignature}
	ErrUnknownKey    = &Error{Kind: KindUnknownKey}
	ErrExpired       = &Error{Kind: KindExpired}
	ErrNotYetValid   = &Error{Kind: KindNotYetValid}
	ErrWrongIssuer   = &Error{Kind: KindWrongIssuer}
	ErrWrongAudience = &Error{Kind: KindWrongAudience}
	ErrRevoked       = &Error{Kind: KindRevoked}
	ErrUnavailable   = &Error{Kind: KindUnavailable}
)

func refuse(k Kind, detail string) error { return &Error{Kind: k, Detail: detail} }
