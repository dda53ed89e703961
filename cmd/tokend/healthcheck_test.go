package main

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func TestHealthcheck(t *testing.T) {
	status := http.StatusOK
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/readyz" {
			http.NotFound(w, r)
			return
		}
		w.WriteHeader(status)
	}))
	defer srv.Close()
	addr := strings.TrimPrefix(srv.URL, "http://")
	port := addr[strings.LastIndexByte(addr, ':'):]

	var out bytes.Buffer
	for _, listen := range []string{addr, "0.0.0.0" + port, "[::]" + port, port} {
		out.Reset()
		err := run(context.Background(), []string{"healthcheck"}, env(map[string]string{"TOKEND_ADDR": listen}), &out, &out)
		if err != nil || strings.TrimSpace(out.String()) != "ready" {
			t.Errorf("TOKEND_ADDR=%s, ready: err %v, output %q", listen, err, out.String())
		}
	}

	status = http.StatusServiceUnavailable
	if err := run(context.Background(), []string{"healthcheck"}, env(map[string]string{"TOKEND_ADDR": addr}), &out, &out); err == nil || !strings.Contains(err.Error(), "503") {
		t.Errorf("draining instance: err = %v, want one naming 503", err)
	}
	srv.Close()
	if err := run(context.Background(), []string{"healthcheck"}, env(map[string]string{"TOKEND_ADDR": addr}), &out, &out); err == nil {
		t.Error("nothing listening: want an error")
	}
	if err := run(context.Background(), []string{"healthcheck"}, env(map[string]string{"TOKEND_ADDR": "nonsense"}), &out, &out); err == nil {
		t.Error("bad TOKEND_ADDR: want an error")
	}
}
