package issuer

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/iotest"
	"time"
	"unicode/utf8"

	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"
	"github.com/lestrrat-go/jwx/v2/jwt"
)

var (
	testNow = time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)
	b64     = base64.RawURLEncoding
)

// testKeys generates one key per algorithm once; RSA keys are slow.
var testKeys = sync.OnceValue(func() map[Algorithm][2]Key {
	out := map[Algorithm][2]Key{}
	for _, alg := range []Algorithm{ES256, EdDSA, RS256} {
		var pair [2]Key
		for i := range pair {
			k, err := GenerateKey(alg, testNow)
			if err != nil {
				panic(err)
			}
			pair[i] = k
		}
		out[alg] = pair
	}
	return out
})

// repeatReader yields the same byte forever, for predictable token ids.
type repeatReader byte

func (r repeatReader) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = byte(r)
	}
	return len(p), nil
}

func newIssuer(t *testing.T, aud []string, active *Key, published ...Key) *Issuer {
	t.Helper()
	iss, err := New("https://auth.example.com", aud, WithRandom(repeatReader(0xab)))
	if err != nil {
		t.Fatal(err)
	}
	if err := iss.SetKeys(active, published); err != nil {
		t.Fatal(err)
	}
	return iss
}

// thumbprint computes the RFC 7638 SHA-256 thumbprint from first principles.
func thumbprint(t *testing.T, pub crypto.PublicKey) string {
	t.Helper()
	var doc string
	switch p := pub.(type) {
	case *ecdsa.PublicKey:
		e, err := p.ECDH()
		if err != nil {
			t.Fatal(err)
		}
		raw := e.Bytes() // 0x04 || X || Y
		doc = `{"crv":"P-256","kty":"EC","x":"` + b64.EncodeToString(raw[1:33]) + `","y":"` + b64.EncodeToString(raw[33:]) + `"}`
	case ed25519.PublicKey:
		doc = `{"crv":"Ed25519","kty":"OKP","x":"` + b64.EncodeToString(p) + `"}`
	case *rsa.PublicKey:
		doc = `{"e":"` + b64.EncodeToString(big.NewInt(int64(p.E)).Bytes()) + `","kty":"RSA","n":"` + b64.EncodeToString(p.N.Bytes()) + `"}`
	default:
		t.Fatalf("unexpected key type %T", pub)
	}
	sum := sha256.Sum256([]byte(doc))
	return b64.EncodeToString(sum[:])
}

// splitToken decodes a compact JWS into its header and payload JSON.
func splitToken(t *testing.T, tok string) (header, payload []byte) {
	t.Helper()
	parts := strings.Split(tok, ".")
	if len(parts) != 3 {
		t.Fatalf("token %q has %d parts", tok, len(parts))
	}
	header, err := b64.DecodeString(parts[0])
	if err != nil {
		t.Fatalf("header: %v", err)
	}
	payload, err = b64.DecodeString(parts[1])
	if err != nil {
		t.Fatalf("payload: %v", err)
	}
	if _, err := b64.DecodeString(parts[2]); err != nil {
		t.Fatalf("signature: %v", err)
	}
	return header, payload
}

// decodeObject decodes a JSON object, refusing duplicate or trailing data.
func decodeObject(t *testing.T, data []byte) map[string]any {
	t.Helper()
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		t.Fatalf("%s: not an object", data)
	}
	out := map[string]any{}
	for dec.More() {
		k, err := dec.Token()
		if err != nil {
			t.Fatalf("%s: %v", data, err)
		}
		var v any
		if err := dec.Decode(&v); err != nil {
			t.Fatalf("%s: %v", data, err)
		}
		if _, dup := out[k.(string)]; dup {
			t.Fatalf("%s: duplicate member %q", data, k)
		}
		out[k.(string)] = v
	}
	if _, err := dec.Token(); err != nil {
		t.Fatalf("%s: %v", data, err)
	}
	if dec.More() {
		t.Fatalf("%s: trailing data", data)
	}
	return out
}

func mustJWKS(t *testing.T, iss *Issuer) jwk.Set {
	t.Helper()
	set, err := jwk.Parse(iss.JWKS().Body)
	if err != nil {
		t.Fatalf("jwk.Parse(%s): %v", iss.JWKS().Body, err)
	}
	return set
}

func TestMintVerifies(t *testing.T) {
	for _, alg := range []Algorithm{ES256, EdDSA, RS256} {
		t.Run(string(alg), func(t *testing.T) {
			key := testKeys()[alg][0]
			other := testKeys()[alg][1]
			iss := newIssuer(t, []string{"app"}, &key, key)
			claims := Claims{
				Subject:   "alice",
				SessionID: "sid-123",
				IssuedAt:  testNow.Add(400 * time.Millisecond),
				ExpiresAt: testNow.Add(10 * time.Minute),
				Extra:     json.RawMessage(`{"role":"editor","tenant":{"id":7,"tags":["a","b"]}}`),
			}
			tok, err := iss.Mint(context.Background(), claims)
			if err != nil {
				t.Fatalf("Mint: %v", err)
			}

			// Signature: verified with the published key set.
			set := mustJWKS(t, iss)
			payload, err := jws.Verify([]byte(tok), jws.WithKeySet(set))
			if err != nil {
				t.Fatalf("jws.Verify: %v", err)
			}
			// ...and not with another key of the same kind.
			otherSet, err := jwk.Parse(newIssuer(t, []string{"app"}, &other, other).JWKS().Body)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := jws.Verify([]byte(tok), jws.WithKeySet(otherSet)); err == nil {
				t.Error("token verified with an unrelated key set")
			}
			// A tampered payload fails.
			parts := strings.Split(tok, ".")
			forged := parts[0] + "." + b64.EncodeToString(bytes.Replace(payload, []byte("alice"), []byte("admin"), 1)) + "." + parts[2]
			if _, err := jws.Verify([]byte(forged), jws.WithKeySet(set)); err == nil {
				t.Error("tampered token verified")
			}

			// Header: exactly alg, kid, typ.
			header, rawPayload := splitToken(t, tok)
			if !bytes.Equal(payload, rawPayload) {
				t.Errorf("verified payload differs from the token's")
			}
			wantHeader := map[string]any{"alg": string(alg), "kid": key.ID, "typ": "JWT"}
			if got := decodeObject(t, header); !reflect.DeepEqual(got, wantHeader) {
				t.Errorf("header = %v, want %v", got, wantHeader)
			}

			// Claims: exactly these, nothing else (no nbf).
			jti := b64.EncodeToString(bytes.Repeat([]byte{0xab}, 16))
			want := map[string]any{
				"iss":    "https://auth.example.com",
				"aud":    "app",
				"sub":    "alice",
				"sid":    "sid-123",
				"iat":    json.Number(fmt.Sprint(testNow.Unix())),
				"exp":    json.Number(fmt.Sprint(testNow.Add(10 * time.Minute).Unix())),
				"jti":    jti,
				"role":   "editor",
				"tenant": map[string]any{"id": json.Number("7"), "tags": []any{"a", "b"}},
			}
			if got := decodeObject(t, payload); !reflect.DeepEqual(got, want) {
				t.Errorf("claims = %v, want %v", got, want)
			}

			// A mainstream JWT library accepts it, including validation.
			parsed, err := jwt.Parse([]byte(tok), jwt.WithKeySet(set),
				jwt.WithClock(jwt.ClockFunc(func() time.Time { return testNow.Add(time.Minute) })),
				jwt.WithIssuer("https://auth.example.com"), jwt.WithAudience("app"))
			if err != nil {
				t.Fatalf("jwt.Parse: %v", err)
			}
			if parsed.Subject() != "alice" || parsed.JwtID() != jti ||
				!parsed.IssuedAt().Equal(testNow) || !parsed.Expiration().Equal(testNow.Add(10*time.Minute)) {
				t.Errorf("jwt.Parse claims: sub %q jti %q iat %v exp %v", parsed.Subject(), parsed.JwtID(), parsed.IssuedAt(), parsed.Expiration())
			}
			if sid, _ := parsed.Get("sid"); sid != "sid-123" {
				t.Errorf("sid = %v", sid)
			}
			// After exp, validation refuses it.
			if _, err := jwt.Parse([]byte(tok), jwt.WithKeySet(set),
				jwt.WithClock(jwt.ClockFunc(func() time.Time { return testNow.Add(11 * time.Minute) }))); err == nil {
				t.Error("expired token validated")
			}
		})
	}
}

func TestMintAudienceAndExtra(t *testing.T) {
	key := testKeys()[ES256][0]
	tests := []struct {
		name  string
		aud   []string
		sub   string
		extra string
		want  map[string]any // members beyond iss/iat/exp/jti/sid
	}{
		{
			name: "several audiences are an array",
			aud:  []string{"app", "ws"},
			sub:  "alice",
			want: map[string]any{"aud": []any{"app", "ws"}, "sub": "alice"},
		},
		{
			name:  "empty extra object adds nothing",
			aud:   []string{"app"},
			sub:   "alice",
			extra: `{}`,
			want:  map[string]any{"aud": "app", "sub": "alice"},
		},
		{
			name:  "one extra claim",
			aud:   []string{"app"},
			sub:   "bob",
			extra: `{"a":1}`,
			want:  map[string]any{"aud": "app", "sub": "bob", "a": json.Number("1")},
		},
		{
			name:  "escaped and unicode extra claims",
			aud:   []string{"app"},
			sub:   "bob",
			extra: `{"html":"\u003c/script\u003e","ls":"a\u2028b","q":"\"}\\","uni":"été 🎉","x":{"}":"{"}}`,
			want: map[string]any{"aud": "app", "sub": "bob",
				"html": "</script>", "ls": "a\u2028b", "q": `"}\`, "uni": "été 🎉", "x": map[string]any{"}": "{"}},
		},
		{
			name: "subject needing escapes",
			aud:  []string{"app"},
			sub:  "al\"ice\\\n\r\t\x01\x1f\x7f\u2028\u2029é🎉<>&",
			want: map[string]any{"aud": "app", "sub": "al\"ice\\\n\r\t\x01\x1f\x7f\u2028\u2029é🎉<>&"},
		},
		{
			name: "invalid UTF-8 subject becomes U+FFFD",
			aud:  []string{"app"},
			sub:  "a\xffb\xe2\x82",
			want: map[string]any{"aud": "app", "sub": "a\ufffdb\ufffd\ufffd"},
		},
		{
			name: "audience needing escapes",
			aud:  []string{`a"b`, "<c>"},
			sub:  "s",
			want: map[string]any{"aud": []any{`a"b`, "<c>"}, "sub": "s"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			iss := newIssuer(t, tt.aud, &key, key)
			c := Claims{Subject: tt.sub, SessionID: "sid", IssuedAt: testNow, ExpiresAt: testNow.Add(time.Minute)}
			if tt.extra != "" {
				c.Extra = json.RawMessage(tt.extra)
			}
			tok, err := iss.Mint(context.Background(), c)
			if err != nil {
				t.Fatal(err)
			}
			payload, err := jws.Verify([]byte(tok), jws.WithKeySet(mustJWKS(t, iss)))
			if err != nil {
				t.Fatalf("verify: %v", err)
			}
			if !utf8.Valid(payload) {
				t.Errorf("payload is not valid UTF-8: %q", payload)
			}
			want := map[string]any{
				"iss": "https://auth.example.com", "sid": "sid",
				"iat": json.Number(fmt.Sprint(testNow.Unix())), "exp": json.Number(fmt.Sprint(testNow.Unix() + 60)),
				"jti": b64.EncodeToString(bytes.Repeat([]byte{0xab}, 16)),
			}
			for k, v := range tt.want {
				want[k] = v
			}
			if got := decodeObject(t, payload); !reflect.DeepEqual(got, want) {
				t.Errorf("claims = %v\nwant     %v", got, want)
			}
			if _, err := jwt.Parse([]byte(tok), jwt.WithKeySet(mustJWKS(t, iss)), jwt.WithValidate(false)); err != nil {
				t.Errorf("jwt.Parse: %v", err)
			}
		})
	}
}

func TestMintJTI(t *testing.T) {
	key := testKeys()[EdDSA][0]
	iss, err := New("https://a.example", []string{"x"}) // crypto/rand
	if err != nil {
		t.Fatal(err)
	}
	if err := iss.SetKeys(&key, []Key{key}); err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for range 50 {
		tok, err := iss.Mint(context.Background(), Claims{Subject: "s", SessionID: "x", IssuedAt: testNow, ExpiresAt: testNow.Add(time.Minute)})
		if err != nil {
			t.Fatal(err)
		}
		_, payload := splitToken(t, tok)
		jti, _ := decodeObject(t, payload)["jti"].(string)
		if raw, err := b64.DecodeString(jti); err != nil || len(raw) != 16 {
			t.Fatalf("jti %q is not 16 base64url bytes", jti)
		}
		if seen[jti] {
			t.Fatalf("jti %q repeated", jti)
		}
		seen[jti] = true
	}
}

func TestMintErrors(t *testing.T) {
	t.Run("no key", func(t *testing.T) {
		iss := newIssuer(t, []string{"app"}, nil)
		if _, err := iss.Mint(context.Background(), Claims{Subject: "s"}); !errors.Is(err, ErrNoSigningKey) {
			t.Errorf("err = %v, want ErrNoSigningKey", err)
		}
		if iss.ActiveKeyID() != "" {
			t.Errorf("ActiveKeyID = %q", iss.ActiveKeyID())
		}
	})
	t.Run("published but not active", func(t *testing.T) {
		k := testKeys()[ES256][0]
		iss := newIssuer(t, []string{"app"}, nil, k)
		if _, err := iss.Mint(context.Background(), Claims{Subject: "s"}); !errors.Is(err, ErrNoSigningKey) {
			t.Errorf("err = %v, want ErrNoSigningKey", err)
		}
	})
	t.Run("random source fails", func(t *testing.T) {
		boom := errors.New("boom")
		iss, err := New("https://a.example", []string{"x"}, WithRandom(iotest.ErrReader(boom)))
		if err != nil {
			t.Fatal(err)
		}
		k := testKeys()[ES256][0]
		if err := iss.SetKeys(&k, []Key{k}); err != nil {
			t.Fatal(err)
		}
		if _, err := iss.Mint(context.Background(), Claims{Subject: "s"}); !errors.Is(err, boom) {
			t.Errorf("err = %v, want it to wrap %v", err, boom)
		}
	})
}

func TestNew(t *testing.T) {
	tests := []struct {
		name   string
		issuer string
		aud    []string
		ok     bool
	}{
		{"https", "https://auth.example.com", []string{"a"}, true},
		{"http with port and path", "http://127.0.0.1:8080/tenant", []string{"a", "b"}, true},
		{"empty", "", []string{"a"}, false},
		{"relative", "/auth", []string{"a"}, false},
		{"no scheme", "auth.example.com", []string{"a"}, false},
		{"no host", "https://", []string{"a"}, false},
		{"unparsable", "https://exa mple.com:port", []string{"a"}, false},
		{"no audience", "https://auth.example.com", nil, false},
		{"empty audience list", "https://auth.example.com", []string{}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			iss, err := New(tt.issuer, tt.aud)
			if (err == nil) != tt.ok {
				t.Fatalf("New(%q, %v) err = %v, want ok=%v", tt.issuer, tt.aud, err, tt.ok)
			}
			if !tt.ok {
				return
			}
			if iss.Issuer() != tt.issuer || !slices.Equal(iss.Audience(), tt.aud) {
				t.Errorf("Issuer/Audience = %q %v", iss.Issuer(), iss.Audience())
			}
			if string(iss.JWKS().Body) != `{"keys":[]}` {
				t.Errorf("initial JWKS = %s, want an empty set", iss.JWKS().Body)
			}
		})
	}
	t.Run("audience is copied", func(t *testing.T) {
		aud := []string{"a", "b"}
		iss, err := New("https://x.example", aud)
		if err != nil {
			t.Fatal(err)
		}
		aud[0] = "changed"
		got := iss.Audience()
		got[1] = "changed too"
		if !slices.Equal(iss.Audience(), []string{"a", "b"}) {
			t.Errorf("Audience = %v, want [a b]", iss.Audience())
		}
	})
}

func TestJWKSKeys(t *testing.T) {
	keys := testKeys()
	all := []Key{keys[ES256][0], keys[EdDSA][0], keys[RS256][0]}
	iss := newIssuer(t, []string{"app"}, &all[0], all...)

	var doc struct {
		Keys []map[string]any `json:"keys"`
	}
	if err := json.Unmarshal(iss.JWKS().Body, &doc); err != nil {
		t.Fatal(err)
	}
	if len(doc.Keys) != len(all) {
		t.Fatalf("JWKS has %d keys, want %d", len(doc.Keys), len(all))
	}
	wantKty := map[Algorithm]string{ES256: "EC", EdDSA: "OKP", RS256: "RSA"}
	for i, k := range all {
		got := doc.Keys[i]
		tp := thumbprint(t, k.Private.Public())
		if k.ID != tp {
			t.Errorf("%s: Key.ID %q is not the RFC 7638 thumbprint %q", k.Algorithm, k.ID, tp)
		}
		if got["kid"] != tp || got["alg"] != string(k.Algorithm) || got["use"] != "sig" || got["kty"] != wantKty[k.Algorithm] {
			t.Errorf("%s: published key %v", k.Algorithm, got)
		}
		for _, private := range []string{"d", "p", "q", "dp", "dq", "qi", "k"} {
			if _, ok := got[private]; ok {
				t.Errorf("%s: published key has private member %q", k.Algorithm, private)
			}
		}
	}
	// jwx agrees on the thumbprints and the public parts.
	set := mustJWKS(t, iss)
	for i, k := range all {
		pub, ok := set.Key(i)
		if !ok {
			t.Fatalf("key %d missing", i)
		}
		tp, err := pub.Thumbprint(crypto.SHA256)
		if err != nil {
			t.Fatal(err)
		}
		if b64.EncodeToString(tp) != k.ID {
			t.Errorf("%s: jwx thumbprint differs from kid", k.Algorithm)
		}
		switch pub.(type) {
		case jwk.ECDSAPrivateKey, jwk.OKPPrivateKey, jwk.RSAPrivateKey:
			t.Errorf("%s: published key is a private key", k.Algorithm)
		}
	}
}

func TestJWKSETag(t *testing.T) {
	k1, k2 := testKeys()[ES256][0], testKeys()[ES256][1]
	iss := newIssuer(t, []string{"app"}, nil)
	etagOf := func(doc *JWKS) string {
		sum := sha256.Sum256(doc.Body)
		return `"` + b64.EncodeToString(sum[:16]) + `"`
	}
	empty := iss.JWKS()
	if empty.ETag != etagOf(empty) {
		t.Errorf("ETag %s is not derived from the body", empty.ETag)
	}
	if iss.JWKS() != empty {
		t.Error("JWKS() is not stable between key changes")
	}

	steps := []struct {
		name      string
		active    *Key
		published []Key
		sameAs    string // name of an earlier step with the same published set
	}{
		{"one key", &k1, []Key{k1}, ""},
		{"same key again", &k1, []Key{k1}, "one key"},
		{"same set, no active key", nil, []Key{k1}, "one key"},
		{"rotation: both published", &k2, []Key{k1, k2}, ""},
		{"rotation: old retired", &k2, []Key{k2}, ""},
		{"back to empty", nil, nil, "empty"},
	}
	etags := map[string]string{"empty": empty.ETag}
	bodies := map[string]string{"empty": string(empty.Body)}
	for _, st := range steps {
		if err := iss.SetKeys(st.active, st.published); err != nil {
			t.Fatalf("%s: %v", st.name, err)
		}
		doc := iss.JWKS()
		if doc.ETag != etagOf(doc) {
			t.Errorf("%s: ETag %s is not derived from the body", st.name, doc.ETag)
		}
		if !strings.HasPrefix(doc.ETag, `"`) || !strings.HasSuffix(doc.ETag, `"`) || strings.HasPrefix(doc.ETag, "W/") {
			t.Errorf("%s: ETag %s is not a quoted strong tag", st.name, doc.ETag)
		}
		if st.sameAs != "" {
			if doc.ETag != etags[st.sameAs] || string(doc.Body) != bodies[st.sameAs] {
				t.Errorf("%s: ETag %s differs from %s's %s for the same keys", st.name, doc.ETag, st.sameAs, etags[st.sameAs])
			}
		} else {
			for name, etag := range etags {
				if etag == doc.ETag {
					t.Errorf("%s: ETag %s equals that of %s", st.name, doc.ETag, name)
				}
			}
		}
		etags[st.name], bodies[st.name] = doc.ETag, string(doc.Body)
	}
}

func TestSetKeys(t *testing.T) {
	k1, k2 := testKeys()[ES256][0], testKeys()[EdDSA][0]
	iss := newIssuer(t, []string{"app"}, &k1, k1)
	before := iss.JWKS()

	if err := iss.SetKeys(&k2, []Key{k1}); err == nil {
		t.Fatal("SetKeys accepted an active key that is not published")
	}
	if err := iss.SetKeys(&k2, nil); err == nil {
		t.Fatal("SetKeys accepted an active key with nothing published")
	}
	if iss.ActiveKeyID() != k1.ID || iss.JWKS() != before {
		t.Errorf("a refused SetKeys changed the key set: active %s", iss.ActiveKeyID())
	}

	// The published set is copied.
	published := []Key{k1, k2}
	if err := iss.SetKeys(&k2, published); err != nil {
		t.Fatal(err)
	}
	published[0] = k2
	tok, err := iss.Mint(context.Background(), Claims{Subject: "s", SessionID: "x", IssuedAt: testNow, ExpiresAt: testNow.Add(time.Minute)})
	if err != nil {
		t.Fatal(err)
	}
	header, _ := splitToken(t, tok)
	if h := decodeObject(t, header); h["kid"] != k2.ID || h["alg"] != "EdDSA" {
		t.Errorf("header after rotation = %v", h)
	}
	if iss.ActiveKeyID() != k2.ID {
		t.Errorf("ActiveKeyID = %s, want %s", iss.ActiveKeyID(), k2.ID)
	}
	set := mustJWKS(t, iss)
	if set.Len() != 2 {
		t.Errorf("JWKS has %d keys after the caller changed its slice, want 2", set.Len())
	}
	if _, ok := set.LookupKeyID(k1.ID); !ok {
		t.Error("old key is no longer published")
	}
}

// TestMintDuringRotation mints while the keys change; every token must verify
// against the union of published keys. Run with -race.
func TestMintDuringRotation(t *testing.T) {
	k1, k2 := testKeys()[ES256][0], testKeys()[ES256][1]
	iss := newIssuer(t, []string{"app"}, &k1, k1, k2)
	set := mustJWKS(t, iss)
	var wg sync.WaitGroup
	stop := make(chan struct{})
	wg.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			k := []Key{k1, k2}[i%2]
			if err := iss.SetKeys(&k, []Key{k1, k2}); err != nil {
				t.Error(err)
				return
			}
			_ = iss.JWKS()
		}
	})
	toks := make(chan string, 400)
	for range 4 {
		wg.Go(func() {
			for range 100 {
				tok, err := iss.Mint(context.Background(), Claims{Subject: "s", SessionID: "x", IssuedAt: testNow, ExpiresAt: testNow.Add(time.Minute)})
				if err != nil {
					t.Error(err)
					return
				}
				toks <- tok
			}
		})
	}
	for range 400 {
		tok := <-toks
		if _, err := jws.Verify([]byte(tok), jws.WithKeySet(set)); err != nil {
			t.Fatalf("token minted during rotation does not verify: %v", err)
		}
	}
	close(stop)
	wg.Wait()
}

func pemBlock(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

func TestParsePrivateKeyPEM(t *testing.T) {
	keys := testKeys()
	ec := keys[ES256][0].Private.(*ecdsa.PrivateKey)
	ed := keys[EdDSA][0].Private.(ed25519.PrivateKey)
	rs := keys[RS256][0].Private.(*rsa.PrivateKey)
	pkcs8 := func(k any) []byte {
		der, err := x509.MarshalPKCS8PrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		return pemBlock("PRIVATE KEY", der)
	}
	sec1, err := x509.MarshalECPrivateKey(ec)
	if err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name string
		pem  []byte
		alg  Algorithm
		want Key
	}{
		{"PKCS8 EC P-256", pkcs8(ec), ES256, keys[ES256][0]},
		{"SEC1 EC P-256", pemBlock("EC PRIVATE KEY", sec1), ES256, keys[ES256][0]},
		{"PKCS8 Ed25519", pkcs8(ed), EdDSA, keys[EdDSA][0]},
		{"PKCS8 RSA", pkcs8(rs), RS256, keys[RS256][0]},
		{"PKCS1 RSA", pemBlock("RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(rs)), RS256, keys[RS256][0]},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			created := testNow.Add(time.Hour)
			k, err := ParsePrivateKeyPEM(tt.pem, created)
			if err != nil {
				t.Fatalf("ParsePrivateKeyPEM: %v", err)
			}
			if k.Algorithm != tt.alg || k.ID != tt.want.ID || !k.CreatedAt.Equal(created) {
				t.Errorf("key = %s %s %v, want %s %s", k.Algorithm, k.ID, k.CreatedAt, tt.alg, tt.want.ID)
			}
			if k.ID != thumbprint(t, k.Private.Public()) {
				t.Errorf("kid is not the thumbprint")
			}
			// It signs tokens that verify against its JWKS.
			iss := newIssuer(t, []string{"app"}, &k, k)
			tok, err := iss.Mint(context.Background(), Claims{Subject: "s", SessionID: "x", IssuedAt: testNow, ExpiresAt: testNow.Add(time.Minute)})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := jws.Verify([]byte(tok), jws.WithKeySet(mustJWKS(t, iss))); err != nil {
				t.Errorf("verify: %v", err)
			}
		})
	}

	p384, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	rsa1024, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	pubDER, err := x509.MarshalPKIXPublicKey(ec.Public())
	if err != nil {
		t.Fatal(err)
	}
	bad := []struct {
		name string
		data []byte
	}{
		{"empty", nil},
		{"not PEM", []byte("hello")},
		{"PEM of garbage", pemBlock("PRIVATE KEY", []byte("garbage"))},
		{"truncated PEM", pkcs8(ec)[:60]},
		{"EC P-384", pkcs8(p384)},
		{"RSA 1024", pemBlock("RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(rsa1024))},
		{"public key", pemBlock("PUBLIC KEY", pubDER)},
	}
	for _, tt := range bad {
		t.Run(tt.name, func(t *testing.T) {
			if k, err := ParsePrivateKeyPEM(tt.data, testNow); err == nil {
				t.Errorf("ParsePrivateKeyPEM accepted it: %s %s", k.Algorithm, k.ID)
			}
		})
	}
}

func TestNewKeyChecksType(t *testing.T) {
	keys := testKeys()
	ec, ed, rs := keys[ES256][0].Private, keys[EdDSA][0].Private, keys[RS256][0].Private
	p384, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		alg  Algorithm
		priv crypto.Signer
		ok   bool
	}{
		{ES256, ec, true},
		{EdDSA, ed, true},
		{RS256, rs, true},
		{ES256, ed, false},
		{ES256, rs, false},
		{ES256, p384, false},
		{EdDSA, ec, false},
		{RS256, ec, false},
		{"HS256", ec, false},
	}
	for _, tt := range tests {
		k, err := NewKey(tt.alg, tt.priv, testNow)
		if (err == nil) != tt.ok {
			t.Errorf("NewKey(%s, %T) err = %v, want ok=%v", tt.alg, tt.priv, err, tt.ok)
		}
		if tt.ok && (k.ID != thumbprint(t, tt.priv.Public()) || k.Algorithm != tt.alg) {
			t.Errorf("NewKey(%s) = %s %s", tt.alg, k.Algorithm, k.ID)
		}
	}
	if _, err := GenerateKey("PS256", testNow); err == nil {
		t.Error("GenerateKey(PS256) succeeded")
	}
}

func TestParseAlgorithm(t *testing.T) {
	for _, s := range []string{"ES256", "EdDSA", "RS256"} {
		if a, err := ParseAlgorithm(s); err != nil || string(a) != s {
			t.Errorf("ParseAlgorithm(%q) = %q, %v", s, a, err)
		}
	}
	for _, s := range []string{"", "es256", "EDDSA", "HS256", "none", "PS256", "ES384", " ES256"} {
		if a, err := ParseAlgorithm(s); err == nil {
			t.Errorf("ParseAlgorithm(%q) = %q, want an error", s, a)
		}
	}
}

func TestAppendJSONString(t *testing.T) {
	tests := []struct{ in, want string }{
		{"", `""`},
		{"plain", `"plain"`},
		{`"\`, `"\"\\"`},
		{"\n\r\t", `"\n\r\t"`},
		{"\x00\x01\x1f", `"\u0000\u0001\u001f"`},
		{"\x7f", "\"\x7f\""},
		{"é🎉", `"é🎉"`},
		{"\u2028\u2029", `"\u2028\u2029"`},
		{"a\xffb", `"a\ufffdb"`},
		{"\xe2\x82", `"\ufffd\ufffd"`},
		{"\ufffd", "\"\ufffd\""},
		{"<&>", `"<&>"`},
	}
	for _, tt := range tests {
		if got := string(appendJSONString([]byte("x"), tt.in)); got != "x"+tt.want {
			t.Errorf("appendJSONString(%q) = %s, want x%s", tt.in, got, tt.want)
		}
	}
}

func FuzzAppendJSONString(f *testing.F) {
	for _, s := range []string{"", "alice", `"\`, "\n\r\t\x00\x1f\x7f", "é🎉", "\u2028\u2029", "a\xffb", "\xe2\x82", "\ufffd", "\xed\xa0\x80", "<&>"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		out := appendJSONString([]byte("{"), s)
		if out[0] != '{' {
			t.Fatalf("prefix overwritten: %q", out)
		}
		enc := out[1:]
		if !utf8.Valid(enc) {
			t.Fatalf("appendJSONString(%q) = %q is not valid UTF-8", s, enc)
		}
		if bytes.ContainsAny(enc, "\u2028\u2029") {
			t.Fatalf("appendJSONString(%q) = %q has raw line separators", s, enc)
		}
		for _, c := range enc {
			if c < 0x20 {
				t.Fatalf("appendJSONString(%q) = %q has a raw control byte", s, enc)
			}
		}
		var got string
		if err := json.Unmarshal(enc, &got); err != nil {
			t.Fatalf("appendJSONString(%q) = %q: %v", s, enc, err)
		}
		if utf8.ValidString(s) {
			if got != s {
				t.Fatalf("appendJSONString(%q) decodes to %q", s, got)
			}
			return
		}
		// Invalid UTF-8 decodes as encoding/json's own encoding does.
		std, err := json.Marshal(s)
		if err != nil {
			t.Fatal(err)
		}
		var want string
		if err := json.Unmarshal(std, &want); err != nil {
			t.Fatal(err)
		}
		if got != want {
			t.Fatalf("appendJSONString(%q) decodes to %q, encoding/json to %q", s, got, want)
		}
	})
}
