package main

import (
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"go.yaml.in/yaml/v4"
)

// TestComposeFileMatchesSettings checks docker-compose.yml as far as this
// repository can without Docker: it is valid YAML, every TOKEND_ variable it
// sets is one tokend reads (and README documents), the instances use the
// binary's own health check, and the proxy is the only trusted peer.
func TestComposeFileMatchesSettings(t *testing.T) {
	raw, err := os.ReadFile("../../docker-compose.yml")
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Services map[string]struct {
			Environment map[string]string `yaml:"environment"`
			Healthcheck struct {
				Test []string `yaml:"test"`
			} `yaml:"healthcheck"`
			Networks map[string]struct {
				IPv4 string `yaml:"ipv4_address"`
			} `yaml:"networks"`
		} `yaml:"services"`
	}
	if err := yaml.Unmarshal(raw, &doc); err != nil {
		t.Fatalf("docker-compose.yml: %v", err)
	}
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	known := map[string]bool{}
	for _, s := range settings {
		known[s.env] = true
	}
	instances := 0
	for name, svc := range doc.Services {
		if !strings.HasPrefix(name, "tokend") {
			continue
		}
		instances++
		for env := range svc.Environment {
			if !known[env] {
				t.Errorf("%s sets %s, which tokend does not read", name, env)
			}
			if !strings.Contains(string(readme), "`"+env+"`") {
				t.Errorf("%s sets %s, which README does not document", name, env)
			}
		}
		if !slices.Equal(svc.Healthcheck.Test, []string{"CMD", "/tokend", "healthcheck"}) {
			t.Errorf("%s health check = %v", name, svc.Healthcheck.Test)
		}
		if got, want := svc.Environment["TOKEND_TRUSTED_PROXIES"], doc.Services["proxy"].Networks["default"].IPv4; got != want || want == "" {
			t.Errorf("%s trusts %q, the proxy is at %q", name, got, want)
		}
	}
	if instances < 2 {
		t.Errorf("%d tokend instances, want two behind the proxy", instances)
	}
	// Every setting is documented in README's configuration table.
	for _, s := range settings {
		if !regexp.MustCompile("\\| `" + s.env + "` \\|").Match(readme) {
			t.Errorf("README's configuration table lacks %s", s.env)
		}
	}
}
