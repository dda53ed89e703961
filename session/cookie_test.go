package session

import (
	"bytes"
	"encoding/hex"
	"errors"
	"strings"
	"testing"
	"testing/iotest"
)

const (
	goodSID    = "abcdefghijklmnopqrstuv"                      // 22
	goodSecret = "ABCDEFGHIJKLMNOPQRSTUVWXYZ-_0123456789abcde" // 43
)

func TestCookieConstants(t *testing.T) {
	if len(goodSID) != SIDLength || len(goodSecret) != secretLength {
		t.Fatalf("test fixtures have lengths %d and %d", len(goodSID), len(goodSecret))
	}
	if CookieValueLength != 66 {
		t.Errorf("CookieValueLength = %d, want 66", CookieValueLength)
	}
}

func TestParseCookie(t *testing.T) {
	good := goodSID + "." + goodSecret
	tests := []struct {
		name string
		in   string
		ok   bool
	}{
		{"valid", good, true},
		{"valid all dashes and underscores", strings.Repeat("-", 22) + "." + strings.Repeat("_", 43), true},
		{"empty", "", false},
		{"only a dot", ".", false},
		{"sid only", goodSID, false},
		{"sid and dot", goodSID + ".", false},
		{"secret one short", goodSID + "." + goodSecret[1:], false},
		{"secret one long", good + "A", false},
		{"sid one short, secret one long", goodSID[1:] + "." + goodSecret + "A", false},
		{"sid one long, secret one short", goodSID + "A." + goodSecret[1:], false},
		{"missing dot", goodSID + "A" + goodSecret, false},
		{"dot elsewhere", goodSID[:10] + "." + goodSID[10:] + goodSecret, false},
		{"extra dot in secret", goodSID + "." + goodSecret[:20] + "." + goodSecret[21:], false},
		{"extra dot in sid", goodSID[:5] + "." + goodSID[6:] + "." + goodSecret, false},
		{"standard base64 plus", goodSID[:21] + "+." + goodSecret, false},
		{"standard base64 slash", goodSID + "." + goodSecret[:42] + "/", false},
		{"padding", goodSID[:21] + "=." + goodSecret, false},
		{"space", goodSID + "." + goodSecret[:42] + " ", false},
		{"percent-encoded", goodSID[:19] + "%2E." + goodSecret, false},
		{"non-ASCII", goodSID[:20] + "é." + goodSecret, false},
		{"NUL", goodSID + "." + goodSecret[:42] + "\x00", false},
		{"high byte", "\xff" + goodSID[1:] + "." + goodSecret, false},
		{"quoted", `"` + goodSID[1:] + "." + goodSecret[:42] + `"`, false},
		{"huge", strings.Repeat("A", 1<<20), false},
		{"huge with dot at 22", goodSID + "." + strings.Repeat("A", 1<<16), false},
		{"all dots", strings.Repeat(".", CookieValueLength), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := ParseCookie(tt.in)
			if !tt.ok {
				if !errors.Is(err, ErrInvalid) {
					t.Errorf("ParseCookie err = %v, want ErrInvalid", err)
				}
				if c != (Credentials{}) {
					t.Errorf("credentials = %+v, want zero", c)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseCookie: %v", err)
			}
			if c.String() != tt.in {
				t.Errorf("String() = %q, want %q", c.String(), tt.in)
			}
			if c.SID != tt.in[:SIDLength] || c.Secret != tt.in[SIDLength+1:] {
				t.Errorf("parts = %q, %q", c.SID, c.Secret)
			}
		})
	}
}

func TestValidSID(t *testing.T) {
	tests := []struct {
		in   string
		want bool
	}{
		{goodSID, true},
		{"----------------------", true},
		{"", false},
		{goodSID[1:], false},
		{goodSID + "A", false},
		{goodSID[:21] + ".", false},
		{goodSID[:21] + "=", false},
		{goodSID[:21] + "+", false},
		{goodSID[:20] + "é", false}, // 22 bytes, not 22 base64url chars
	}
	for _, tt := range tests {
		if got := ValidSID(tt.in); got != tt.want {
			t.Errorf("ValidSID(%q) = %v, want %v", tt.in, got, tt.want)
		}
	}
}

func TestNewCredentials(t *testing.T) {
	buf := make([]byte, sidBytes+secretBytes)
	for i := range buf {
		buf[i] = byte(i * 7)
	}
	c, err := newCredentials(bytes.NewReader(buf))
	if err != nil {
		t.Fatal(err)
	}
	if c.SID != "AAcOFRwjKjE4P0ZNVFtiaQ" {
		t.Errorf("SID = %q", c.SID)
	}
	parsed, err := ParseCookie(c.String())
	if err != nil {
		t.Fatalf("ParseCookie(%q): %v", c.String(), err)
	}
	if parsed != c {
		t.Errorf("parsed %+v, want %+v", parsed, c)
	}

	t.Run("short read", func(t *testing.T) {
		if _, err := newCredentials(bytes.NewReader(buf[:sidBytes+secretBytes-1])); err == nil {
			t.Error("want an error from a short random source")
		}
	})
	t.Run("reader error", func(t *testing.T) {
		boom := errors.New("boom")
		if _, err := newCredentials(iotest.ErrReader(boom)); !errors.Is(err, boom) {
			t.Errorf("err = %v, want it to wrap %v", err, boom)
		}
	})
	t.Run("one byte at a time", func(t *testing.T) {
		c2, err := newCredentials(iotest.OneByteReader(bytes.NewReader(buf)))
		if err != nil || c2 != c {
			t.Errorf("got %+v, %v; want %+v", c2, err, c)
		}
	})
}

func TestHashSecret(t *testing.T) {
	// SHA-256("abc") from FIPS 180-2.
	want, _ := hex.DecodeString("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
	if got := HashSecret("abc"); !bytes.Equal(got, want) {
		t.Errorf("HashSecret(abc) = %x, want %x", got, want)
	}
	h := HashSecret(goodSecret)
	tests := []struct {
		name   string
		secret string
		hash   []byte
		want   bool
	}{
		{"match", goodSecret, h, true},
		{"other secret", goodSecret[:42] + "f", h, false},
		{"empty secret", "", h, false},
		{"nil hash", goodSecret, nil, false},
		{"truncated hash", goodSecret, h[:31], false},
		{"extended hash", goodSecret, append(append([]byte(nil), h...), 0), false},
		{"hash of the hash", string(h), h, false},
	}
	for _, tt := range tests {
		if got := secretMatches(tt.secret, tt.hash); got != tt.want {
			t.Errorf("%s: secretMatches = %v, want %v", tt.name, got, tt.want)
		}
	}
}

func FuzzParseCookie(f *testing.F) {
	for _, s := range []string{
		goodSID + "." + goodSecret,
		"",
		".",
		goodSID,
		goodSID + "." + goodSecret + "A",
		goodSID + "A" + goodSecret,
		goodSID + "." + goodSecret[:20] + "." + goodSecret[21:],
		goodSID[:21] + "+." + goodSecret,
		goodSID[:20] + "é." + goodSecret,
		strings.Repeat(".", CookieValueLength),
		strings.Repeat("\xff", CookieValueLength),
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		c, err := ParseCookie(in)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("ParseCookie(%q) error %v is not ErrInvalid", in, err)
			}
			if c != (Credentials{}) {
				t.Fatalf("ParseCookie(%q) returned %+v with an error", in, c)
			}
			return
		}
		if c.String() != in {
			t.Fatalf("ParseCookie(%q).String() = %q", in, c.String())
		}
		if !ValidSID(c.SID) {
			t.Fatalf("ParseCookie(%q) SID %q is not valid", in, c.SID)
		}
		if len(c.Secret) != secretLength || !isBase64URL(c.Secret) {
			t.Fatalf("ParseCookie(%q) secret %q is not 43 base64url chars", in, c.Secret)
		}
	})
}
