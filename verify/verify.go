// Package verify validates tokend's access tokens offline, for websocket
// and API services:
//
//	v, err := verify.New(ctx, verify.Config{JWKSURL: "https://auth.example.com/.well-known/jwks.json",
//		Issuer: "https://auth.example.com", Audience: "realtime"})
//	claims, err := v.Verify(ctx, token)
//
// Keys come from tokend's JWKS through jwx's cache, which refreshes them in
// the background as the document's Cache-Control says (never more often
// than MinRefreshInterval) and keeps serving the last good set while tokend
// cannot be reached. A token naming an unknown kid triggers one refetch,
// at most once per MinRefreshInterval however many such tokens arrive at
// once, so forged kids cannot turn into a flood of JWKS requests.
//
// Only ES256, EdDSA and RS256 are accepted (never "none" or HMAC), and the
// token's alg must be the alg its key is published for. A Verifier serves
// one issuer: its keys come from that issuer's JWKS URL only (the cache is
// keyed by it), and a token is checked against them before its iss is
// even read; use one Verifier per issuer.
//
// Subscribe follows tokend's revocation stream: from then on Verify refuses
// the tokens of revoked sessions until those tokens would have expired
// anyway, and a callback lets the service drop their connections.
package verify

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"
	"golang.org/x/sync/singleflight"
)

// Defaults of Config.
const (
	// DefaultLeeway is the clock skew tolerated on exp, nbf and iat.
	DefaultLeeway = 30 * time.Second
	// MaxLeeway bounds the leeway: tokend keeps revocations for the token
	// TTL plus five minutes, so a longer leeway could accept a revoked
	// session's token after its revocation has left the feed.
	MaxLeeway = 5 * time.Minute
	// DefaultMinRefreshInterval is the least time between two fetches of
	// the key set, whatever triggers them.
	DefaultMinRefreshInterval = 10 * time.Second
	// DefaultFetchTimeout bounds one fetch of the key set.
	DefaultFetchTimeout = 5 * time.Second
)

// Config says which tokens a Verifier accepts.
type Config struct {
	// JWKSURL is tokend's key set, such as
	// https://auth.example.com/.well-known/jwks.json. Empty means Issuer
	// followed by /.well-known/jwks.json.
	JWKSURL string
	// Issuer is the exact iss of accepted tokens (TOKEND_ISSUER).
	Issuer string
	// Audience must be one of the token's aud values (one of
	// TOKEND_AUDIENCE): the name of this service.
	Audience string
	// Leeway is the clock skew tolerated on exp, nbf and iat. Zero means
	// DefaultLeeway, negative means none; at most MaxLeeway.
	Leeway time.Duration
	// MinRefreshInterval is the least time between two fetches of the key
	// set: background refreshes (which otherwise follow the document's
	// Cache-Control max-age) and refetches for unknown kids alike. Zero
	// means DefaultMinRefreshInterval.
	MinRefreshInterval time.Duration
	// HTTPClient fetches the key set; nil means a client with a
	// DefaultFetchTimeout timeout.
	HTTPClient *http.Client
	// Now is the clock; nil means time.Now. For tests.
	Now func() time.Time
}

// Claims are the verified contents of a token.
type Claims struct {
	// Subject is sub: who the session is for.
	Subject string
	// SessionID is sid: the session the token belongs to, as in the
	// revocation feed.
	SessionID string
	ExpiresAt time.Time
	IssuedAt  time.Time
	// ID is jti, unique per token.
	ID string
	// Extra holds every other claim (the session's claims), as
	// encoding/json decodes them.
	Extra map[string]any
}

// Verifier checks tokens against one issuer's keys. It is safe for
// concurrent use.
type Verifier struct {
	url       string
	issuer    string
	audience  string
	leeway    time.Duration
	minFetch  time.Duration
	timeout   time.Duration
	now       func() time.Time
	cache     *jwk.Cache
	verifiers map[string]jws.Verifier

	keys      atomic.Pointer[keySet]
	fetchErr  atomic.Pointer[errorBox]
	flight    singleflight.Group
	fetchMu   sync.Mutex
	lastFetch time.Time // of the last fetch this Verifier asked for

	revoked revokedSet
	feedMu  sync.Mutex
	cursors map[string]int64 // stream URL -> last cursor seen
}

type errorBox struct{ err error }

// keySet is the usable part of one fetched JWKS: kid -> key.
type keySet struct {
	keys map[string]publicKey
}

type publicKey struct {
	alg string
	raw any
}

// accepted are the algorithms tokend signs with, each with the Go key type
// it needs.
var accepted = []jwa.SignatureAlgorithm{jwa.ES256, jwa.EdDSA, jwa.RS256}

// New returns a Verifier for cfg and fetches the key set once, bounded by
// ctx and the fetch timeout. A failed first fetch is not an error: Verify
// fetches again (at most once per MinRefreshInterval) and answers
// ErrUnavailable until a key set arrives, so a service can start while
// tokend is restarting too. Only an invalid cfg is an error.
//
// The Verifier refreshes its keys in the background until ctx ends; pass
// the context that bounds the service's life.
func New(ctx context.Context, cfg Config) (*Verifier, error) {
	var errs []error
	if cfg.JWKSURL == "" && cfg.Issuer != "" {
		cfg.JWKSURL = strings.TrimSuffix(cfg.Issuer, "/") + "/.well-known/jwks.json"
	}
	if u, err := url.Parse(cfg.JWKSURL); err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		errs = append(errs, fmt.Errorf("verify: JWKSURL %q must be an absolute http(s) URL", cfg.JWKSURL))
	}
	if cfg.Issuer == "" {
		errs = append(errs, errors.New("verify: Issuer is required (tokend's TOKEND_ISSUER)"))
	}
	if cfg.Audience == "" {
		errs = append(errs, errors.New("verify: Audience is required (this service's name in TOKEND_AUDIENCE)"))
	}
	switch {
	case cfg.Leeway == 0:
		cfg.Leeway = DefaultLeeway
	case cfg.Leeway < 0:
		cfg.Leeway = 0
	case cfg.Leeway > MaxLeeway:
		errs = append(errs, fmt.Errorf("verify: Leeway %v exceeds %v", cfg.Leeway, MaxLeeway))
	}
	switch {
	case cfg.MinRefreshInterval == 0:
		cfg.MinRefreshInterval = DefaultMinRefreshInterval
	case cfg.MinRefreshInterval < 0:
		errs = append(errs, errors.New("verify: MinRefreshInterval must not be negative"))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if cfg.HTTPClient == nil {
		cfg.HTTPClient = &http.Client{Timeout: DefaultFetchTimeout}
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	v := &Verifier{
		url:       cfg.JWKSURL,
		issuer:    cfg.Issuer,
		audience:  cfg.Audience,
		leeway:    cfg.Leeway,
		minFetch:  cfg.MinRefreshInterval,
		timeout:   DefaultFetchTimeout,
		now:       cfg.Now,
		verifiers: make(map[string]jws.Verifier),
		cursors:   make(map[string]int64),
	}
	if t := cfg.HTTPClient.Timeout; t > 0 && t < v.timeout {
		v.timeout = t
	}
	v.revoked.m = make(map[string]time.Time)
	for _, alg := range accepted {
		jv, err := jws.NewVerifier(alg)
		if err != nil {
			return nil, fmt.Errorf("verify: %s: %w", alg, err)
		}
		v.verifiers[alg.String()] = jv
	}
	// The cache checks every window whether a refresh is due.
	window := min(max(cfg.MinRefreshInterval, time.Second), time.Minute)
	v.cache = jwk.NewCache(ctx, jwk.WithRefreshWindow(window),
		jwk.WithErrSink(jwk.ErrSink(errSink(func(err error) { v.fetchErr.Store(&errorBox{err}) }))))
	if err := v.cache.Register(v.url,
		jwk.WithMinRefreshInterval(cfg.MinRefreshInterval),
		jwk.WithHTTPClient(cfg.HTTPClient),
		jwk.WithPostFetcher(jwk.PostFetchFunc(v.install))); err != nil {
		return nil, fmt.Errorf("verify: %w", err)
	}
	v.fetch(ctx, true)
	return v, nil
}

type errSink func(error)

func (f errSink) Error(err error) { f(err) }

// Leeway returns the clock skew tolerated on exp, nbf and iat.
func (v *Verifier) Leeway() time.Duration { return v.leeway }

// install keeps the usable keys of every key set the cache fetches, in the
// background or on demand, for Verify to read without waiting on the
// cache. A set without a single usable key is refused, and the previous
// one stays.
func (v *Verifier) install(_ string, set jwk.Set) (jwk.Set, error) {
	ks := &keySet{keys: make(map[string]publicKey, set.Len())}
	for i := range set.Len() {
		k, _ := set.Key(i)
		if pk, ok := usable(k); ok {
			ks.keys[k.KeyID()] = pk
		}
	}
	if len(ks.keys) == 0 {
		return nil, errors.New("the key set has no usable key (ES256, EdDSA or RS256, with kid and alg)")
	}
	v.keys.Store(ks)
	v.fetchErr.Store(nil)
	return set, nil
}

// usable converts a published key, if it is one tokend could sign with:
// it names a kid and an accepted alg, is for signatures, and its type fits
// the alg.
func usable(k jwk.Key) (publicKey, bool) {
	alg := k.Algorithm().String()
	if k.KeyID() == "" || (k.KeyUsage() != "" && k.KeyUsage() != string(jwk.ForSignature)) {
		return publicKey{}, false
	}
	raw, err := jwk.PublicRawKeyOf(k)
	if err != nil {
		return publicKey{}, false
	}
	ok := false
	switch p := raw.(type) {
	case *ecdsa.PublicKey:
		ok = alg == jwa.ES256.String() && p.Curve == elliptic.P256()
	case ed25519.PublicKey:
		ok = alg == jwa.EdDSA.String()
	case *rsa.PublicKey:
		ok = alg == jwa.RS256.String() && p.N.BitLen() >= 2048
	}
	return publicKey{alg: alg, raw: raw}, ok
}

// fetch asks the cache for a fresh key set, unless a fetch was asked for
// less than MinRefreshInterval ago (initial: always). Concurrent callers
// share one fetch; each waits at most until its ctx ends or the fetch
// timeout passes.
func (v *Verifier) fetch(ctx context.Context, initial bool) {
	ch := v.flight.DoChan("jwks", func() (any, error) {
		v.fetchMu.Lock()
		if !initial && time.Since(v.lastFetch) < v.minFetch {
			v.fetchMu.Unlock()
			return nil, nil
		}
		v.lastFetch = time.Now()
		v.fetchMu.Unlock()
		// Detached from the caller that started it: the others wait on it.
		fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), v.timeout)
		defer cancel()
		if _, err := v.cache.Refresh(fctx, v.url); err != nil {
			v.fetchErr.Store(&errorBox{err})
		}
		return nil, nil
	})
	t := time.NewTimer(v.timeout)
	defer t.Stop()
	select {
	case <-ch:
	case <-ctx.Done():
	case <-t.C: // a fetch stuck in a client without a timeout
	}
}

// key returns the key named kid, refetching the key set once if it is not
// there.
func (v *Verifier) key(ctx context.Context, kid string) (publicKey, error) {
	if ks := v.keys.Load(); ks != nil {
		if k, ok := ks.keys[kid]; ok {
			return k, nil
		}
	}
	v.fetch(ctx, false)
	ks := v.keys.Load()
	if ks == nil {
		var cause error
		if b := v.fetchErr.Load(); b != nil {
			cause = b.err
		}
		return publicKey{}, &Error{Kind: KindUnavailable, Detail: "no key set could be fetched from " + v.url, Err: cause}
	}
	if k, ok := ks.keys[kid]; ok {
		return k, nil
	}
	return publicKey{}, refuse(KindUnknownKey, fmt.Sprintf("no key has kid %q", kid))
}

// Verify checks token — signature, alg, iss, aud, exp, nbf, iat and
// revocation — and returns its claims. Every refusal is an *Error; match
// it with errors.Is(err, verify.ErrExpired) and the like. ctx bounds the
// wait for a key set refetch.
func (v *Verifier) Verify(ctx context.Context, token string) (Claims, error) {
	head, rest, ok1 := strings.Cut(token, ".")
	payload, sig, ok2 := strings.Cut(rest, ".")
	if !ok1 || !ok2 || strings.Contains(sig, ".") {
		return Claims{}, refuse(KindMalformed, "not a compact JWS (three dot-separated parts)")
	}
	var hdr struct {
		Alg  string          `json:"alg"`
		Kid  string          `json:"kid"`
		Typ  string          `json:"typ"`
		Crit json.RawMessage `json:"crit"`
	}
	if err := decodePart(head, &hdr); err != nil {
		return Claims{}, refuse(KindMalformed, "header: "+err.Error())
	}
	if hdr.Crit != nil {
		return Claims{}, refuse(KindMalformed, "the header has critical extensions")
	}
	if hdr.Typ != "" && !strings.EqualFold(hdr.Typ, "JWT") {
		return Claims{}, refuse(KindMalformed, fmt.Sprintf("typ %q is not JWT", hdr.Typ))
	}
	jv, ok := v.verifiers[hdr.Alg]
	if !ok {
		return Claims{}, refuse(KindBadSignature, fmt.Sprintf("algorithm %q is not accepted (ES256, EdDSA, RS256)", hdr.Alg))
	}
	if hdr.Kid == "" {
		return Claims{}, refuse(KindMalformed, "the header names no kid")
	}
	signature, err := base64.RawURLEncoding.Strict().DecodeString(sig)
	if err != nil {
		return Claims{}, refuse(KindMalformed, "signature is not base64url")
	}
	key, err := v.key(ctx, hdr.Kid)
	if err != nil {
		return Claims{}, err
	}
	if key.alg != hdr.Alg {
		return Claims{}, refuse(KindBadSignature, fmt.Sprintf("key %s is for %s, the token says %s", hdr.Kid, key.alg, hdr.Alg))
	}
	if err := jv.Verify([]byte(token[:len(head)+1+len(payload)]), signature, key.raw); err != nil {
		return Claims{}, refuse(KindBadSignature, "the signature does not verify")
	}
	var raw map[string]any
	if err := decodePart(payload, &raw); err != nil || raw == nil {
		return Claims{}, refuse(KindMalformed, "payload is not a JSON object")
	}
	return v.check(raw)
}

// decodePart decodes one base64url part of a compact JWS as JSON.
func decodePart(part string, into any) error {
	b, err := base64.RawURLEncoding.Strict().DecodeString(part)
	if err != nil {
		return errors.New("not base64url")
	}
	if err := json.Unmarshal(b, into); err != nil {
		return errors.New("not JSON")
	}
	return nil
}

// registered are the claims Claims has fields for; the rest go to Extra.
var registered = map[string]bool{"iss": true, "sub": true, "aud": true, "exp": true, "nbf": true, "iat": true, "jti": true, "sid": true}

// check validates the claims of a token whose signature verified.
func (v *Verifier) check(raw map[string]any) (Claims, error) {
	var c Claims
	str := func(name string, required bool) (string, error) {
		val, present := raw[name]
		s, ok := val.(string)
		if (!present && required) || (present && (!ok || (required && s == ""))) {
			return "", refuse(KindMalformed, fmt.Sprintf("claim %s must be a non-empty string", name))
		}
		return s, nil
	}
	date := func(name string, required bool) (time.Time, error) {
		val, present := raw[name]
		if !present && !required {
			return time.Time{}, nil
		}
		f, ok := val.(float64)
		if !ok || math.IsNaN(f) || f < 0 || f > 1e11 {
			return time.Time{}, refuse(KindMalformed, fmt.Sprintf("claim %s must be a NumericDate", name))
		}
		sec, frac := math.Modf(f)
		return time.Unix(int64(sec), int64(frac*1e9)), nil
	}
	iss, err := str("iss", true)
	if err != nil {
		return Claims{}, err
	}
	if iss != v.issuer {
		return Claims{}, refuse(KindWrongIssuer, fmt.Sprintf("iss %q, want %q", iss, v.issuer))
	}
	var auds []string
	switch a := raw["aud"].(type) {
	case string:
		auds = []string{a}
	case []any:
		for _, x := range a {
			s, ok := x.(string)
			if !ok {
				return Claims{}, refuse(KindMalformed, "claim aud must be a string or an array of strings")
			}
			auds = append(auds, s)
		}
	default:
		return Claims{}, refuse(KindMalformed, "claim aud must be a string or an array of strings")
	}
	found := false
	for _, a := range auds {
		found = found || a == v.audience
	}
	if !found {
		return Claims{}, refuse(KindWrongAudience, fmt.Sprintf("aud %q does not include %q", auds, v.audience))
	}
	if c.Subject, err = str("sub", true); err != nil {
		return Claims{}, err
	}
	if c.SessionID, err = str("sid", true); err != nil {
		return Claims{}, err
	}
	if c.ID, err = str("jti", false); err != nil {
		return Claims{}, err
	}
	if c.ExpiresAt, err = date("exp", true); err != nil {
		return Claims{}, err
	}
	if c.IssuedAt, err = date("iat", true); err != nil {
		return Claims{}, err
	}
	nbf, err := date("nbf", false)
	if err != nil {
		return Claims{}, err
	}
	now := v.now()
	if !now.Before(c.ExpiresAt.Add(v.leeway)) {
		return Claims{}, refuse(KindExpired, fmt.Sprintf("expired at %s", c.ExpiresAt.UTC().Format(time.RFC3339)))
	}
	if c.IssuedAt.After(now.Add(v.leeway)) {
		return Claims{}, refuse(KindNotYetValid, fmt.Sprintf("issued in the future, at %s", c.IssuedAt.UTC().Format(time.RFC3339)))
	}
	if !nbf.IsZero() && nbf.After(now.Add(v.leeway)) {
		return Claims{}, refuse(KindNotYetValid, fmt.Sprintf("not valid before %s", nbf.UTC().Format(time.RFC3339)))
	}
	if v.revoked.has(c.SessionID, now) {
		return Claims{}, refuse(KindRevoked, "session "+c.SessionID+" was revoked")
	}
	for name, val := range raw {
		if !registered[name] {
			if c.Extra == nil {
				c.Extra = make(map[string]any)
			}
			c.Extra[name] = val
		}
	}
	return c, nil
}

// Revocation is one revoked session, as the feed reports it.
type Revocation struct {
	// Cursor is the entry's position in tokend's revocation log.
	Cursor    int64
	SID       string
	Subject   string
	RevokedAt time.Time
	Reason    string
	// TokensExpireAt is when every token of the session has expired.
	TokensExpireAt time.Time
}

// maxTokenTTL is tokend's longest token TTL, assumed for a revocation
// that does not say when its tokens expire.
const maxTokenTTL = 24 * time.Hour

// AddRevocation makes Verify refuse the tokens of r.SID until they would
// have expired anyway (r.TokensExpireAt plus the leeway; without it,
// RevokedAt plus 24 hours, tokend's longest token TTL). Subscribe calls it
// for every revocation; call it yourself for revocations that reach the
// service another way, such as tokend's Redis channel.
func (v *Verifier) AddRevocation(r Revocation) {
	until := r.TokensExpireAt
	if until.IsZero() {
		until = r.RevokedAt.Add(maxTokenTTL)
	}
	v.revoked.add(r.SID, until.Add(v.leeway), v.now())
}

// Revoked reports whether Verify refuses the tokens of session sid as
// revoked.
func (v *Verifier) Revoked(sid string) bool { return v.revoked.has(sid, v.now()) }

// revokedSet holds revoked sessions until their tokens have expired. Its
// size is bounded by the revocations of one token lifetime: entries are
// swept once their time has passed.
type revokedSet struct {
	mu        sync.RWMutex
	m         map[string]time.Time // sid -> refuse its tokens until
	nextSweep time.Time
}

const sweepEvery = time.Minute

func (r *revokedSet) add(sid string, until, now time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !now.Before(r.nextSweep) {
		for k, u := range r.m {
			if !now.Before(u) {
				delete(r.m, k)
			}
		}
		r.nextSweep = now.Add(sweepEvery)
	}
	if !now.Before(until) {
		return // every token of the session has expired already
	}
	if u, ok := r.m[sid]; !ok || until.After(u) {
		r.m[sid] = until
	}
}

func (r *revokedSet) has(sid string, now time.Time) bool {
	r.mu.RLock()
	defer r.mu.RUnlock()
	until, ok := r.m[sid]
	return ok && now.Before(until)
}

func (r *revokedSet) len() int {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return len(r.m)
}
