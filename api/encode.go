package api

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strconv"
	"strings"

	"github.com/tokend/tokend/session"
)

// writeJSON marshals v first and only then writes the status and body, so a
// marshalling failure never leaves a partial response.
func writeJSON(w http.ResponseWriter, status int, contentType string, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		status = http.StatusInternalServerError
		contentType = "application/problem+json"
		body = []byte(`{"type":"` + problemTypePrefix + `internal","title":"Internal error","status":500,"code":"internal"}`)
	}
	body = append(body, '\n')
	h := w.Header()
	h.Set("Content-Type", contentType)
	h.Set("Content-Length", strconv.Itoa(len(body)))
	h.Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

// encode writes v as a JSON response.
func encode(w http.ResponseWriter, status int, v any) {
	writeJSON(w, status, "application/json", v)
}

// validator is implemented by request types that check their own shape.
type validator interface {
	validate(v *session.ValidationError)
}

// maxBodyBytes bounds every request body. The largest legitimate body is a
// session with 4 KiB of claims.
const maxBodyBytes = 16 << 10

// decode reads one JSON object of type T from the body: the content type
// must be JSON, unknown fields and trailing data are refused, and every
// failure is an *Error with a detail a client can act on. With optional set,
// an empty body yields the zero T.
func decode[T any](r *http.Request, optional bool) (T, error) {
	var v T
	body, err := io.ReadAll(http.MaxBytesReader(nil, r.Body, maxBodyBytes))
	if err != nil {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			return v, &Error{Status: http.StatusRequestEntityTooLarge, Code: "request_too_large",
				Detail: fmt.Sprintf("The request body must be at most %d bytes.", maxBodyBytes)}
		}
		return v, &Error{Status: http.StatusBadRequest, Code: "invalid_request", Detail: "The request body could not be read."}
	}
	if len(bytes.TrimSpace(body)) == 0 {
		if optional {
			return v, nil
		}
		return v, &Error{Status: http.StatusBadRequest, Code: "invalid_request", Detail: "The request body must be a JSON object."}
	}
	mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if err != nil || (mt != "application/json" && !strings.HasSuffix(mt, "+json")) {
		return v, &Error{Status: http.StatusUnsupportedMediaType, Code: "unsupported_media_type",
			Detail: "The request body must be sent as application/json."}
	}
	if err := decodeJSON(body, &v); err != nil {
		return v, err
	}
	if val, ok := any(&v).(validator); ok {
		var verr session.ValidationError
		val.validate(&verr)
		if err := verr.Err(); err != nil {
			return v, err
		}
	}
	return v, nil
}

// decodeJSON unmarshals exactly one JSON object into v and translates the
// decoder's errors into client-facing ones.
func decodeJSON(body []byte, v any) error {
	if b := bytes.TrimSpace(body); len(b) == 0 || b[0] != '{' {
		return &Error{Status: http.StatusBadRequest, Code: "invalid_request", Detail: "The request body must be a JSON object."}
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return jsonError(err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return &Error{Status: http.StatusBadRequest, Code: "invalid_request",
			Detail: "The request body must contain a single JSON object."}
	}
	return nil
}

func jsonError(err error) error {
	var (
		syntax  *json.SyntaxError
		typeErr *json.UnmarshalTypeError
	)
	switch {
	case errors.As(err, &syntax):
		return &Error{Status: http.StatusBadRequest, Code: "invalid_request",
			Detail: fmt.Sprintf("The request body is not valid JSON (at byte %d).", syntax.Offset)}
	case errors.Is(err, io.ErrUnexpectedEOF):
		return &Error{Status: http.StatusBadRequest, Code: "invalid_request", Detail: "The request body is truncated JSON."}
	case errors.As(err, &typeErr):
		field := typeErr.Field
		if field == "" {
			field = "(body)"
		}
		msg := "must be " + jsonTypeName(typeErr.Type.Kind().String())
		return &Error{Status: http.StatusBadRequest, Code: "invalid_request",
			Detail: fmt.Sprintf("Field %q %s.", field, msg),
			Fields: []session.FieldError{{Field: field, Message: msg}}}
	}
	// encoding/json reports unknown fields only as text, in this documented form.
	if name, ok := strings.CutPrefix(err.Error(), "json: unknown field "); ok {
		field, _ := strconv.Unquote(name)
		return &Error{Status: http.StatusBadRequest, Code: "invalid_request",
			Detail: fmt.Sprintf("Unknown field %s.", name),
			Fields: []session.FieldError{{Field: field, Message: "is not a known field"}}}
	}
	return &Error{Status: http.StatusBadRequest, Code: "invalid_request", Detail: "The request body is not valid JSON."}
}

func jsonTypeName(kind string) string {
	switch kind {
	case "string":
		return "a string"
	case "int", "int8", "int16", "int32", "int64", "uint", "uint8", "uint16", "uint32", "uint64":
		return "an integer within range"
	case "float32", "float64":
		return "a number"
	case "bool":
		return "a boolean"
	case "slice", "array":
		return "an array"
	case "map", "struct":
		return "an object"
	}
	return "of another type"
}
