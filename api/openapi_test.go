package api

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/gorillamux"
	"github.com/go-chi/chi/v5"
)

// specPath is openapi.yaml at the repository root, seen from api/.
const specPath = "../openapi.yaml"

func init() {
	// Problems and the key set are JSON under their own media types. kin-openapi
	// falls back to JSON for "+json" types, but say so explicitly: a body the
	// validator cannot decode must never pass as "not validated".
	openapi3filter.RegisterBodyDecoder("application/problem+json", openapi3filter.JSONBodyDecoder)
	openapi3filter.RegisterBodyDecoder("application/jwk-set+json", openapi3filter.JSONBodyDecoder)
}

// loadSpec reads and validates the document.
func loadSpec() (*openapi3.T, error) {
	loader := openapi3.NewLoader()
	doc, err := loader.LoadFromFile(specPath)
	if err != nil {
		return nil, fmt.Errorf("load %s: %w", specPath, err)
	}
	if err := doc.Validate(loader.Context); err != nil {
		return nil, fmt.Errorf("%s is not a valid OpenAPI document: %w", specPath, err)
	}
	return doc, nil
}

// contract checks exchanges against the document.
type contract struct {
	doc    *openapi3.T
	router routers.Router
}

// specContract is built once per test binary: the document, with its
// response objects closed (see closeResponseObjects), and a router over it.
var specContract = sync.OnceValues(func() (*contract, error) {
	doc, err := loadSpec()
	if err != nil {
		return nil, err
	}
	closeResponseObjects(doc)
	// Route on paths alone: the documented server is an example address,
	// while test requests go to an arbitrary host.
	routing := *doc
	routing.Servers = nil
	router, err := gorillamux.NewRouter(&routing)
	if err != nil {
		return nil, fmt.Errorf("router over %s: %w", specPath, err)
	}
	return &contract{doc: doc, router: router}, nil
})

func mustContract(t *testing.T) *contract {
	t.Helper()
	v, err := specContract()
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// closeResponseObjects sets additionalProperties: false on every object
// schema of every response that lists properties and leaves
// additionalProperties unsaid. The document keeps response objects open, so
// that clients tolerate fields added later; the tests close them, so that
// the server never sends a field the document does not describe. Schemas
// that say additionalProperties themselves (claims, JWKs) stay as they are;
// inline allOf members, which only narrow a referenced schema, and anything
// under "not" are left open, since closing them would change what they mean.
func closeResponseObjects(doc *openapi3.T) {
	seen := make(map[*openapi3.Schema]bool)
	visitResponse := func(r *openapi3.ResponseRef) {
		if r == nil || r.Value == nil {
			return
		}
		for _, mt := range r.Value.Content {
			closeObjects(mt.Schema, false, seen)
		}
	}
	for _, item := range doc.Paths.Map() {
		for _, op := range item.Operations() {
			for _, r := range op.Responses.Map() {
				visitResponse(r)
			}
		}
	}
	for _, r := range doc.Components.Responses {
		visitResponse(r)
	}
}

func closeObjects(ref *openapi3.SchemaRef, inlineAllOfMember bool, seen map[*openapi3.Schema]bool) {
	if ref == nil || ref.Value == nil || seen[ref.Value] {
		return
	}
	s := ref.Value
	seen[s] = true
	ap := &s.AdditionalProperties
	if !inlineAllOfMember && len(s.Properties) > 0 && ap.Has == nil && ap.Schema == nil {
		closed := false
		ap.Has = &closed
	}
	for _, p := range s.Properties {
		closeObjects(p, false, seen)
	}
	closeObjects(s.Items, false, seen)
	closeObjects(ap.Schema, false, seen)
	for _, m := range s.AllOf {
		closeObjects(m, m.Ref == "", seen)
	}
	for _, m := range slices.Concat(s.AnyOf, s.OneOf) {
		closeObjects(m, false, seen)
	}
}

// checkResponse validates one exchange against openapi.yaml: the request
// (body re-read through req.GetBody, since the handler consumed it) and the
// response — status documented for the operation, headers, content type and
// body schema. Requests to paths or methods the document does not list must
// get the documented 404 or 405 problem. A request the document calls invalid
// must have been refused with a 4xx.
func checkResponse(t *testing.T, req *http.Request, rec *httptest.ResponseRecorder) {
	t.Helper()
	v := mustContract(t)
	if err := v.validate(req, rec.Code, rec.Header(), rec.Body.Bytes()); err != nil {
		t.Errorf("%s %s → %d does not match %s:\n%v\nbody: %s", req.Method, req.URL.RequestURI(), rec.Code, specPath, err, rec.Body.Bytes())
	}
}

// validate returns why the exchange does not match the document, or nil.
func (v *contract) validate(req *http.Request, status int, header http.Header, body []byte) error {
	ctx := context.Background()
	clone, err := requestCopy(req)
	if err != nil {
		return err
	}
	route, params, err := v.router.FindRoute(clone)
	switch {
	case errors.Is(err, routers.ErrPathNotFound):
		return v.validateUnrouted(clone, "NotFound", http.StatusNotFound, status, header, body)
	case errors.Is(err, routers.ErrMethodNotAllowed):
		return v.validateUnrouted(clone, "MethodNotAllowed", http.StatusMethodNotAllowed, status, header, body)
	case err != nil:
		return fmt.Errorf("find route: %w", err)
	}

	reqInput := &openapi3filter.RequestValidationInput{
		Request:    clone,
		PathParams: params,
		Route:      route,
		Options: &openapi3filter.Options{
			// Authentication is what the handler tests check; here the
			// security requirements only have to be declared.
			AuthenticationFunc: openapi3filter.NoopAuthenticationFunc,
			MultiError:         true,
		},
	}
	if reqErr := openapi3filter.ValidateRequest(ctx, reqInput); reqErr != nil && (status < 400 || status >= 500) {
		return fmt.Errorf("the server answered %d to a request the document says is invalid: %w", status, reqErr)
	}
	return validateResponse(ctx, reqInput, route.Operation.Responses, status, header, body)
}

// validateUnrouted checks the answer to a request no operation describes
// against the component response that documents it.
func (v *contract) validateUnrouted(req *http.Request, component string, wantStatus, status int, header http.Header, body []byte) error {
	if status != wantStatus {
		return fmt.Errorf("%s %s is not in the document, so it must get %d, not %d", req.Method, req.URL.Path, wantStatus, status)
	}
	ref := v.doc.Components.Responses[component]
	if ref == nil {
		return fmt.Errorf("the document has no components.responses.%s", component)
	}
	route := &routers.Route{
		Spec:      v.doc,
		Path:      req.URL.Path,
		Method:    req.Method,
		Operation: &openapi3.Operation{Responses: openapi3.NewResponses(openapi3.WithStatus(wantStatus, ref))},
	}
	reqInput := &openapi3filter.RequestValidationInput{Request: req, Route: route}
	return validateResponse(context.Background(), reqInput, route.Operation.Responses, status, header, body)
}

func validateResponse(ctx context.Context, reqInput *openapi3filter.RequestValidationInput, responses *openapi3.Responses,
	status int, header http.Header, body []byte) error {
	def := responses.Status(status)
	if def == nil || def.Value == nil {
		return fmt.Errorf("status %d is not documented for this operation", status)
	}
	if len(def.Value.Content) == 0 && len(body) != 0 {
		return fmt.Errorf("status %d is documented without a body, but one was sent", status)
	}
	if status == http.StatusNotModified {
		// ValidateResponse skips 304 altogether; check its headers here.
		for name, h := range def.Value.Headers {
			if h.Value != nil && h.Value.Required && header.Get(name) == "" {
				return fmt.Errorf("response header %q missing", name)
			}
		}
		return nil
	}
	resInput := &openapi3filter.ResponseValidationInput{
		RequestValidationInput: reqInput,
		Status:                 status,
		Header:                 header,
		Options:                &openapi3filter.Options{IncludeResponseStatus: true, MultiError: true},
	}
	resInput.SetBodyBytes(body)
	return openapi3filter.ValidateResponse(ctx, resInput)
}

// requestCopy returns req with a fresh body for validation.
func requestCopy(req *http.Request) (*http.Request, error) {
	clone := req.Clone(context.Background())
	clone.Body = http.NoBody
	if req.GetBody != nil {
		b, err := req.GetBody()
		if err != nil {
			return nil, fmt.Errorf("re-read request body: %w", err)
		}
		clone.Body = b
	}
	return clone, nil
}

func TestOpenAPIDocumentIsValid(t *testing.T) {
	doc, err := loadSpec()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(doc.OpenAPI, "3.0.") {
		t.Errorf("openapi = %q, want 3.0.x", doc.OpenAPI)
	}
	// Every error response is a problem, served as application/problem+json
	// with the shared schema.
	for path, item := range doc.Paths.Map() {
		for method, op := range item.Operations() {
			for code, r := range op.Responses.Map() {
				if code < "400" {
					continue
				}
				mt := r.Value.Content.Get("application/problem+json")
				if mt == nil || len(r.Value.Content) != 1 {
					t.Errorf("%s %s %s: an error response must be application/problem+json only", method, path, code)
					continue
				}
				if !schemaUses(mt.Schema, "#/components/schemas/Problem") {
					t.Errorf("%s %s %s: the problem schema does not use #/components/schemas/Problem", method, path, code)
				}
				if r.Value.Headers["X-Request-Id"] == nil || r.Value.Headers["Cache-Control"] == nil {
					t.Errorf("%s %s %s: X-Request-Id and Cache-Control must be documented", method, path, code)
				}
			}
			if op.Security == nil {
				t.Errorf("%s %s: security must be stated, [] for public operations", method, path)
			}
		}
	}
	schemes := doc.Components.SecuritySchemes
	for name, want := range map[string]string{"serviceKey": "bearer", "adminKey": "bearer"} {
		if s := schemes[name]; s == nil || s.Value.Type != "http" || s.Value.Scheme != want {
			t.Errorf("security scheme %s must be http %s", name, want)
		}
	}
	if s := schemes["sessionCookie"]; s == nil || s.Value.Type != "apiKey" || s.Value.In != "cookie" || s.Value.Name != "tokend_session" {
		t.Errorf("security scheme sessionCookie must be an apiKey in the tokend_session cookie")
	}
}

func schemaUses(ref *openapi3.SchemaRef, target string) bool {
	if ref == nil {
		return false
	}
	if ref.Ref == target {
		return true
	}
	return ref.Value != nil && slices.ContainsFunc(ref.Value.AllOf, func(m *openapi3.SchemaRef) bool { return m.Ref == target })
}

// routedOperations lists "METHOD /pattern" for every route of the router.
func routedOperations(t *testing.T) map[string]bool {
	t.Helper()
	mux := newServer(Options{}).router
	routed := make(map[string]bool)
	err := chi.Walk(mux, func(method, route string, _ http.Handler, _ ...func(http.Handler) http.Handler) error {
		routed[method+" "+route] = true
		return nil
	})
	if err != nil {
		t.Fatalf("walk router: %v", err)
	}
	return routed
}

// documentedOperations lists "METHOD /path" for every operation of doc.
func documentedOperations(doc *openapi3.T) map[string]bool {
	documented := make(map[string]bool)
	for path, item := range doc.Paths.Map() {
		for method := range item.Operations() {
			documented[method+" "+path] = true
		}
	}
	return documented
}

// routeDiff returns the routed operations the document lacks and the
// documented operations nothing routes, sorted.
func routeDiff(routed, documented map[string]bool) (undocumented, unrouted []string) {
	for op := range routed {
		if !documented[op] {
			undocumented = append(undocumented, op)
		}
	}
	for op := range documented {
		if !routed[op] {
			unrouted = append(unrouted, op)
		}
	}
	slices.Sort(undocumented)
	slices.Sort(unrouted)
	return undocumented, unrouted
}

func TestOpenAPIRoutesMatchRouter(t *testing.T) {
	doc, err := loadSpec()
	if err != nil {
		t.Fatal(err)
	}
	routed := routedOperations(t)
	documented := documentedOperations(doc)
	if len(routed) == 0 || len(documented) == 0 {
		t.Fatalf("found %d routes and %d documented operations", len(routed), len(documented))
	}
	undocumented, unrouted := routeDiff(routed, documented)
	for _, op := range undocumented {
		t.Errorf("%s is routed but not in %s", op, specPath)
	}
	for _, op := range unrouted {
		t.Errorf("%s is in %s but not routed", op, specPath)
	}

	// The routes the service promises, so that the comparison above cannot
	// pass on two equally wrong lists.
	for _, op := range []string{
		"GET /healthz", "GET /readyz", "GET /.well-known/jwks.json",
		"POST /v1/token", "OPTIONS /v1/token", "DELETE /v1/session", "OPTIONS /v1/session",
		"POST /v1/sessions", "GET /v1/admin/sessions", "GET /v1/admin/sessions/{sid}",
		"DELETE /v1/admin/sessions/{sid}", "POST /v1/admin/subjects/{subject}/revoke",
		"GET /v1/admin/keys", "POST /v1/admin/keys/rotate",
		"GET /v1/revocations", "GET /v1/revocations/stream",
	} {
		if !routed[op] {
			t.Errorf("%s is not routed", op)
		}
		if !documented[op] {
			t.Errorf("%s is not documented", op)
		}
	}
}

func TestRouteDiffReportsBothDirections(t *testing.T) {
	routed := map[string]bool{"GET /a": true, "POST /b": true, "GET /c/{id}": true}
	documented := map[string]bool{"GET /a": true, "GET /b": true, "GET /c/{id}": true, "DELETE /d": true}
	undocumented, unrouted := routeDiff(routed, documented)
	if !slices.Equal(undocumented, []string{"POST /b"}) {
		t.Errorf("undocumented = %v, want [POST /b]", undocumented)
	}
	if !slices.Equal(unrouted, []string{"DELETE /d", "GET /b"}) {
		t.Errorf("unrouted = %v, want [DELETE /d GET /b]", unrouted)
	}
	if u, r := routeDiff(routed, routed); len(u)+len(r) != 0 {
		t.Errorf("identical sets differ: %v %v", u, r)
	}
}

// TestCheckResponseRejectsMismatches feeds the validator exchanges that break
// the document, so that a passing handler test means something.
func TestCheckResponseRejectsMismatches(t *testing.T) {
	v := mustContract(t)
	const (
		sid   = "AAAAAAAAAAAAAAAAAAAAAA"
		stamp = "2026-03-01T12:00:00Z"
	)
	okHeaders := func(kv ...string) http.Header {
		h := http.Header{"X-Request-Id": {"abc"}, "Content-Type": {"application/json"}}
		for i := 0; i+1 < len(kv); i += 2 {
			h.Set(kv[i], kv[i+1])
		}
		return h
	}
	problemHeaders := okHeaders("Content-Type", "application/problem+json", "Cache-Control", "no-store")
	token := `{"access_token":"a.b.c","token_type":"Bearer","expires_in":600,"expires_at":"` + stamp +
		`","refresh_in":420,"refresh_at":"` + stamp + `","session_expires_at":"` + stamp + `"}`
	problem := func(status int, code string) string {
		return fmt.Sprintf(`{"type":"urn:tokend:problem:%s","title":"t","status":%d,"code":%q}`, code, status, code)
	}
	cases := []struct {
		name, method, target, body string
		status                     int
		header                     http.Header
		respBody                   string
		valid                      bool
	}{
		{"healthz ok", "GET", "/healthz", "", 200, okHeaders(), `{"status":"ok"}`, true},
		{"token ok", "POST", "/v1/token", "", 200, okHeaders("Cache-Control", "no-store"), token, true},
		{"undocumented status", "GET", "/healthz", "", 418, okHeaders(), `{"status":"ok"}`, false},
		{"wrong enum", "GET", "/healthz", "", 200, okHeaders(), `{"status":"fine"}`, false},
		{"undocumented field", "GET", "/healthz", "", 200, okHeaders(), `{"status":"ok","debug":1}`, false},
		{"missing X-Request-Id", "GET", "/healthz", "", 200, http.Header{"Content-Type": {"application/json"}}, `{"status":"ok"}`, false},
		{"not JSON", "GET", "/healthz", "", 200, okHeaders(), `status: ok`, false},
		{"wrong content type", "GET", "/healthz", "", 200, okHeaders("Content-Type", "text/plain"), `{"status":"ok"}`, false},
		{"token without Cache-Control", "POST", "/v1/token", "", 200, okHeaders(), token, false},
		{"token missing field", "POST", "/v1/token", "", 200, okHeaders("Cache-Control", "no-store"),
			strings.Replace(token, `"refresh_in":420,`, "", 1), false},
		{"token bad date-time", "POST", "/v1/token", "", 200, okHeaders("Cache-Control", "no-store"),
			strings.Replace(token, `"expires_at":"`+stamp, `"expires_at":"tomorrow`, 1), false},
		{"problem as application/json", "POST", "/v1/token", "", 401, okHeaders("Cache-Control", "no-store"), problem(401, "session_invalid"), false},
		{"problem ok", "POST", "/v1/token", "", 401, problemHeaders, problem(401, "session_invalid"), true},
		{"problem code not for this response", "POST", "/v1/token", "", 401, problemHeaders, problem(401, "unauthorized"), false},
		{"problem status mismatch", "POST", "/v1/token", "", 401, problemHeaders, problem(403, "session_invalid"), false},
		{"unauthorized without WWW-Authenticate", "POST", "/v1/sessions", `{"subject":"a"}`, 401, problemHeaders, problem(401, "unauthorized"), false},
		{"204 with a body", "OPTIONS", "/v1/token", "", 204, okHeaders("Allow", "POST, OPTIONS"), `{}`, false},
		{"logout without Set-Cookie", "DELETE", "/v1/session", "", 204, okHeaders("Cache-Control", "no-store"), "", false},
		{"304 without ETag", "GET", "/.well-known/jwks.json", "", 304, okHeaders("Cache-Control", "public, max-age=1, stale-while-revalidate=1, stale-if-error=1", "Access-Control-Allow-Origin", "*"), "", false},
		{"unknown path answered 200", "GET", "/nope", "", 200, okHeaders(), `{"status":"ok"}`, false},
		{"unknown path 404", "GET", "/nope", "", 404, problemHeaders, problem(404, "not_found"), true},
		{"unrouted method without Allow", "GET", "/v1/token", "", 405, problemHeaders, problem(405, "method_not_allowed"), false},
		{"invalid request accepted", "POST", "/v1/sessions", `{"subject":"a","extra":1}`, 201,
			okHeaders("Cache-Control", "no-store"), `{"sid":"` + sid + `","subject":"a","created_at":"` + stamp + `","expires_at":"` + stamp +
				`","cookie":{"name":"n","value":"` + sid + `.` + strings.Repeat("A", 43) + `","max_age":60,"set_cookie":"x"}}`, false},
		{"session with bad sid", "GET", "/v1/admin/sessions/" + sid, "", 200, okHeaders(), `{"sid":"short","subject":"a","status":"active","created_at":"` + stamp +
			`","expires_at":"` + stamp + `","cookie_expires_at":"` + stamp + `","last_seen_at":"` + stamp + `"}`, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			req := httptest.NewRequest(tc.method, "http://tokend.test"+tc.target, strings.NewReader(tc.body))
			if tc.body != "" {
				req.Header.Set("Content-Type", "application/json")
			}
			req.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(strings.NewReader(tc.body)), nil }
			err := v.validate(req, tc.status, tc.header, []byte(tc.respBody))
			if tc.valid && err != nil {
				t.Errorf("valid exchange refused: %v", err)
			}
			if !tc.valid {
				if err == nil {
					t.Errorf("invalid exchange accepted")
				} else {
					t.Logf("refused as expected: %s", strings.SplitN(err.Error(), "\n", 2)[0])
				}
			}
		})
	}
}
