package api

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/tokend/tokend/session"
)

// FuzzDecodeCreateSession feeds arbitrary bodies and content types through
// decode[createSessionRequest], as handleCreateSession does.
func FuzzDecodeCreateSession(f *testing.F) {
	const jsonType = "application/json"
	seeds := []struct{ body, contentType string }{
		{`{"subject":"alice","ttl_seconds":28800,"idle_timeout_seconds":3600,"claims":{"role":"editor"}}`, jsonType},
		{`{"subject":"alice"}`, "application/json; charset=utf-8"},
		{`{"subject":"alice"}`, "application/problem+json"},
		{`{"subject":"alice"}`, "text/plain"},
		{`{"subject":"alice"}`, ""},
		{`{"subject":"alice"}`, "application/json; charset"},
		{``, jsonType},
		{`   `, jsonType},
		{`{`, jsonType},
		{`{"subject":`, jsonType},
		{`[]`, jsonType},
		{`null`, jsonType},
		{`"alice"`, jsonType},
		{`{"subject":1}`, jsonType},
		{`{"subject":"a","ttl_seconds":1e400}`, jsonType},
		{`{"subject":"a","ttl_seconds":99999999999999999999}`, jsonType},
		{`{"subject":"a","ttl_seconds":3.5}`, jsonType},
		{`{"subject":"a","ttl_seconds":-1,"idle_timeout_seconds":0}`, jsonType},
		{`{"subject":"a","ttl_seconds":3153600001}`, jsonType},
		{`{"subject":"a","ttl_seconds":null,"claims":null}`, jsonType},
		{`{"subject":"a","ttl":60}`, jsonType},
		{`{"subject":"a","Subject":"b"}`, jsonType},
		{`{"subject":"a"} {"subject":"b"}`, jsonType},
		{`{"subject":"a"}]`, jsonType},
		{`{"subject":"a"}` + "\n\t ", jsonType},
		{`{"subject":"a","claims":{"org":{"team":{"ids":[1,[2,{"x":null}]]}},"sub":"x"}}`, jsonType},
		{`{"subject":"a","claims":[1,2]}`, jsonType},
		{`{"subject":"\ud800\u2028` + "\xff" + `"}`, jsonType},
		{`{"subject":"a","claims":"` + strings.Repeat("x", 17<<10) + `"}`, jsonType},
		{strings.Repeat("[", 20000), jsonType},
	}
	for _, s := range seeds {
		f.Add([]byte(s.body), s.contentType)
	}
	f.Fuzz(func(t *testing.T, body []byte, contentType string) {
		r := httptest.NewRequest("POST", "/v1/sessions", bytes.NewReader(body))
		if contentType != "" {
			r.Header.Set("Content-Type", contentType)
		}
		req, err := decode[createSessionRequest](r, false)
		if err != nil {
			var (
				apiErr *Error
				verr   *session.ValidationError
			)
			switch {
			case errors.As(err, &apiErr):
				if apiErr.Status < 400 || apiErr.Status > 499 {
					t.Fatalf("status %d for %q: %v", apiErr.Status, body, err)
				}
				if apiErr.Code == "" || titles[apiErr.Code] == "" || apiErr.Detail == "" {
					t.Fatalf("error without a known code or detail: %+v", apiErr)
				}
			case errors.As(err, &verr):
				if len(verr.Fields) == 0 {
					t.Fatalf("empty validation error for %q", body)
				}
			default:
				t.Fatalf("error %T %v for %q is neither *Error nor *ValidationError", err, err, body)
			}
			if p := problemFor(err); p.Status < 400 || p.Status > 499 {
				t.Fatalf("problemFor maps %v to %d", err, p.Status)
			}
			return
		}

		// Success: the request passed validation and re-encodes.
		for name, v := range map[string]*int64{"ttl_seconds": req.TTLSeconds, "idle_timeout_seconds": req.IdleTimeoutSeconds} {
			if v != nil && (*v <= 0 || *v > maxSeconds) {
				t.Fatalf("%s = %d passed validation", name, *v)
			}
		}
		if len(req.Claims) > 0 && !json.Valid(req.Claims) {
			t.Fatalf("claims %q are not valid JSON", req.Claims)
		}
		out, err := json.Marshal(req)
		if err != nil {
			t.Fatalf("re-encode %+v: %v", req, err)
		}
		if !json.Valid(out) {
			t.Fatalf("re-encoded %q is not valid JSON", out)
		}
		// Decoding the re-encoding gives the same request.
		var again createSessionRequest
		if err := decodeJSON(out, &again); err != nil {
			t.Fatalf("re-decode %s: %v", out, err)
		}
		if again.Subject != req.Subject || !sameInt(again.TTLSeconds, req.TTLSeconds) ||
			!sameInt(again.IdleTimeoutSeconds, req.IdleTimeoutSeconds) || !sameJSON(again.Claims, req.Claims) {
			t.Fatalf("round trip changed %+v into %+v", req, again)
		}
	})
}

func sameInt(a, b *int64) bool {
	if a == nil || b == nil {
		return a == nil && b == nil
	}
	return *a == *b
}

// sameJSON compares raw claims by compact form; absent equals null.
func sameJSON(a, b json.RawMessage) bool {
	norm := func(m json.RawMessage) string {
		if len(m) == 0 {
			return "null"
		}
		var buf bytes.Buffer
		if err := json.Compact(&buf, m); err != nil {
			return "invalid:" + string(m)
		}
		return buf.String()
	}
	return norm(a) == norm(b)
}
