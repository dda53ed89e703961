package api

import (
	"net/http"
	"net/netip"
	"strings"
	"testing"
)

func TestClientIP(t *testing.T) {
	trusted := []netip.Prefix{
		netip.MustParsePrefix("10.0.0.0/8"),
		netip.MustParsePrefix("192.168.1.1/32"),
		netip.MustParsePrefix("2001:db8:ffff::/48"),
	}
	type hdr = map[string][]string
	for _, tc := range []struct {
		name    string
		trusted []netip.Prefix
		peer    string
		header  hdr
		want    string // "" means the invalid address
	}{
		{name: "no trusted proxies: peer, whatever the headers say", peer: "203.0.113.7:1234",
			header: hdr{"X-Forwarded-For": {"198.51.100.1"}, "Forwarded": {"for=198.51.100.2"}}, want: "203.0.113.7"},
		{name: "untrusted peer: spoofed X-Forwarded-For ignored", trusted: trusted, peer: "203.0.113.7:1234",
			header: hdr{"X-Forwarded-For": {"198.51.100.1, 10.0.0.2"}}, want: "203.0.113.7"},
		{name: "untrusted peer: spoofed Forwarded ignored", trusted: trusted, peer: "203.0.113.7:1234",
			header: hdr{"Forwarded": {"for=198.51.100.1"}}, want: "203.0.113.7"},
		{name: "trusted peer without headers", trusted: trusted, peer: "10.0.0.1:443", want: "10.0.0.1"},
		{name: "trusted peer: right-most untrusted of X-Forwarded-For", trusted: trusted, peer: "10.0.0.1:443",
			header: hdr{"X-Forwarded-For": {"198.51.100.1, 203.0.113.9"}}, want: "203.0.113.9"},
		{name: "chain of trusted proxies is skipped", trusted: trusted, peer: "10.0.0.1:443",
			header: hdr{"X-Forwarded-For": {"198.51.100.1, 203.0.113.9, 192.168.1.1, 10.0.0.3"}}, want: "203.0.113.9"},
		{name: "all trusted: left-most", trusted: trusted, peer: "10.0.0.1:443",
			header: hdr{"X-Forwarded-For": {"10.0.0.5, 10.0.0.6"}}, want: "10.0.0.5"},
		{name: "garbage hop stops the walk at the last trusted hop", trusted: trusted, peer: "10.0.0.1:443",
			header: hdr{"X-Forwarded-For": {"198.51.100.1, garbage, 10.0.0.2"}}, want: "10.0.0.2"},
		{name: "garbage right-most hop: the peer", trusted: trusted, peer: "10.0.0.1:443",
			header: hdr{"X-Forwarded-For": {"198.51.100.1, unknown"}}, want: "10.0.0.1"},
		{name: "empty hop stops the walk", trusted: trusted, peer: "10.0.0.1:443",
			header: hdr{"X-Forwarded-For": {"198.51.100.1, , 10.0.0.2"}}, want: "10.0.0.2"},
		{name: "X-Forwarded-For over several header lines", trusted: trusted, peer: "10.0.0.1:443",
			header: hdr{"X-Forwarded-For": {"198.51.100.1", "203.0.113.9, 10.0.0.2"}}, want: "203.0.113.9"},
		{name: "X-Forwarded-For with port", trusted: trusted, peer: "10.0.0.1:443",
			header: hdr{"X-Forwarded-For": {"203.0.113.9:5555"}}, want: "203.0.113.9"},
		{name: "X-Forwarded-For bracketed IPv6 with port", trusted: trusted, peer: "10.0.0.1:443",
			header: hdr{"X-Forwarded-For": {"[2001:db8::9]:5555"}}, want: "2001:db8::9"},
		{name: "X-Forwarded-For IPv4-mapped hop is unmapped", trusted: trusted, peer: "10.0.0.1:443",
			header: hdr{"X-Forwarded-For": {"::ffff:198.51.100.3"}}, want: "198.51.100.3"},
		{name: "X-Forwarded-For hop with a zone is garbage", trusted: trusted, peer: "10.0.0.1:443",
			header: hdr{"X-Forwarded-For": {"fe80::1%eth0"}}, want: "10.0.0.1"},
		{name: "a client cannot push its pick past a trusted proxy", trusted: trusted, peer: "10.0.0.1:443",
			header: hdr{"X-Forwarded-For": {"10.0.0.99, 203.0.113.9"}}, want: "203.0.113.9"},

		{name: "Forwarded: simple", trusted: trusted, peer: "10.0.0.1:443",
			header: hdr{"Forwarded": {"for=198.51.100.17"}}, want: "198.51.100.17"},
		{name: "Forwarded configured: X-Forwarded-For is ignored", trusted: trusted, peer: "10.0.0.1:443",
			header: hdr{"Forwarded": {"for=198.51.100.17"}, "X-Forwarded-For": {"203.0.113.9"}}, want: "198.51.100.17"},
		{name: "X-Forwarded-For configured: a client's Forwarded is ignored", trusted: trusted, peer: "10.0.0.1:443",
			header: hdr{"Forwarded": {"for=198.51.100.17"}, "X-Forwarded-For": {"203.0.113.9"}}, want: "203.0.113.9"},
		{name: "X-Forwarded-For configured: Forwarded alone names nobody", trusted: trusted, peer: "10.0.0.1:443",
			header: hdr{"Forwarded": {"for=198.51.100.17"}}, want: "10.0.0.1"},
		{name: "Forwarded: quoted bracketed IPv6 with port", trusted: trusted, peer: "10.0.0.1:443",
			header: hdr{"Forwarded": {`for="[2001:db8::1]:4711"`}}, want: "2001:db8::1"},
		{name: "Forwarded: quoted bracketed IPv6 without port", trusted: trusted, peer: "10.0.0.1:443",
			header: hdr{"Forwarded": {`for="[2001:db8::1]"`}}, want: "2001:db8::1"},
		{name: "Forwarded: quoted IPv4 with port", trusted: trusted, peer: "10.0.0.1:443",
			header: hdr{"Forwarded": {`for="198.51.100.17:8080"`}}, want: "198.51.100.17"},
		{name: "Forwarded: mixed-case parameter name, spaces", trusted: trusted, peer: "10.0.0.1:443",
			header: hdr{"Forwarded": {` FOR = 198.51.100.17 ;Proto=https`}}, want: "198.51.100.17"},
		{name: "Forwarded: other parameters around for", trusted: trusted, peer: "10.0.0.1:443",
			header: hdr{"Forwarded": {"by=10.0.0.1;for=192.0.2.60;proto=http;host=example.com"}}, want: "192.0.2.60"},
		{name: "Forwarded: several elements in one line", trusted: trusted, peer: "10.0.0.1:443",
			header: hdr{"Forwarded": {"for=192.0.2.43, for=198.51.100.17, for=10.0.0.9"}}, want: "198.51.100.17"},
		{name: "Forwarded: several header lines", trusted: trusted, peer: "10.0.0.1:443",
			header: hdr{"Forwarded": {"for=192.0.2.43", `for=198.51.100.17;proto=https, for="10.0.0.9:80"`}}, want: "198.51.100.17"},
		{name: "Forwarded: quoted separators do not split", trusted: trusted, peer: "10.0.0.1:443",
			header: hdr{"Forwarded": {`for=198.51.100.1;host="a,b;c", for=10.0.0.2`}}, want: "198.51.100.1"},
		{name: "Forwarded: a quoted list is not an address", trusted: trusted, peer: "10.0.0.1:443",
			header: hdr{"Forwarded": {`for="198.51.100.1, 203.0.113.1"`}}, want: "10.0.0.1"},
		{name: "Forwarded: obfuscated identifier stops the walk", trusted: trusted, peer: "10.0.0.1:443",
			header: hdr{"Forwarded": {"for=198.51.100.1, for=_hidden, for=10.0.0.2"}}, want: "10.0.0.2"},
		{name: "Forwarded: unknown stops the walk", trusted: trusted, peer: "10.0.0.1:443",
			header: hdr{"Forwarded": {"for=198.51.100.1, for=unknown"}}, want: "10.0.0.1"},
		{name: "Forwarded: element without for stops the walk", trusted: trusted, peer: "10.0.0.1:443",
			header: hdr{"Forwarded": {"for=198.51.100.1, proto=https;by=10.0.0.7"}}, want: "10.0.0.1"},
		{name: "Forwarded: unbracketed quoted IPv6", trusted: trusted, peer: "10.0.0.1:443",
			header: hdr{"Forwarded": {`for="2001:db8::3"`}}, want: "2001:db8::3"},
		{name: "Forwarded: all trusted, left-most", trusted: trusted, peer: "10.0.0.1:443",
			header: hdr{"Forwarded": {`for=10.0.0.5, for="[2001:db8:ffff::5]:1"`}}, want: "10.0.0.5"},

		{name: "IPv6 trusted peer", trusted: trusted, peer: "[2001:db8:ffff::1]:443",
			header: hdr{"X-Forwarded-For": {"2001:db8::7"}}, want: "2001:db8::7"},
		{name: "IPv6 untrusted peer", trusted: trusted, peer: "[2001:db8::1]:443",
			header: hdr{"X-Forwarded-For": {"198.51.100.1"}}, want: "2001:db8::1"},
		{name: "IPv4-mapped IPv6 peer matches an IPv4 prefix", trusted: trusted, peer: "[::ffff:10.0.0.1]:443",
			header: hdr{"X-Forwarded-For": {"198.51.100.1"}}, want: "198.51.100.1"},
		{name: "IPv4-mapped IPv6 peer is reported unmapped", peer: "[::ffff:203.0.113.7]:443", want: "203.0.113.7"},
		{name: "peer without port", trusted: trusted, peer: "10.0.0.1",
			header: hdr{"X-Forwarded-For": {"198.51.100.1"}}, want: "198.51.100.1"},
		{name: "unparsable peer is never trusted", trusted: []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")}, peer: "garbage",
			header: hdr{"X-Forwarded-For": {"198.51.100.1"}}, want: ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := http.NewRequest("POST", "http://tokend.test/v1/token", nil)
			if err != nil {
				t.Fatal(err)
			}
			r.RemoteAddr = tc.peer
			for k, vs := range tc.header {
				for _, v := range vs {
					r.Header.Add(k, v)
				}
			}
			header := HeaderXForwardedFor
			if strings.HasPrefix(tc.name, "Forwarded") {
				header = HeaderForwarded
			}
			got := clientIP(r, tc.trusted, header)
			var want netip.Addr
			if tc.want != "" {
				want = netip.MustParseAddr(tc.want)
			}
			if got != want {
				t.Fatalf("clientIP = %v, want %v", got, want)
			}
		})
	}
}

func TestParseTrustedProxies(t *testing.T) {
	got, err := ParseTrustedProxies([]string{"10.0.0.0/8", "192.168.1.1", "2001:db8::/32", "::ffff:10.1.2.3",
		"172.16.5.4/12", "2001:db8::1", "::ffff:192.168.0.0/112", "::ffff:0:0/96"})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"10.0.0.0/8", "192.168.1.1/32", "2001:db8::/32", "10.1.2.3/32",
		"172.16.0.0/12", "2001:db8::1/128", "192.168.0.0/16", "0.0.0.0/0"}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for i := range want {
		if got[i].String() != want[i] {
			t.Errorf("prefix %d = %v, want %s", i, got[i], want[i])
		}
	}
	if p, err := ParseTrustedProxies(nil); err != nil || len(p) != 0 {
		t.Errorf("empty list: %v, %v", p, err)
	}

	for _, bad := range []string{"10.0.0.0/33", "not-an-ip", "", "10.0.0.1/", "10.0.0", "fe80::1%eth0/64", "fe80::1%eth0", "2001:db8::/129"} {
		_, err := ParseTrustedProxies([]string{"10.0.0.0/8", bad})
		if err == nil {
			t.Errorf("ParseTrustedProxies(%q): no error", bad)
			continue
		}
		if !strings.Contains(err.Error(), `"`+bad+`"`) {
			t.Errorf("ParseTrustedProxies(%q): error %q does not name the value", bad, err)
		}
	}

	// A bare address is trusted exactly; the prefixes really match peers.
	ps, _ := ParseTrustedProxies([]string{"192.168.1.1", "::ffff:10.1.2.3", "::ffff:172.16.0.0/108"})
	r, _ := http.NewRequest("GET", "http://tokend.test/", nil)
	r.Header.Set("X-Forwarded-For", "198.51.100.1")
	for peer, want := range map[string]string{
		"192.168.1.1:1": "198.51.100.1", "192.168.1.2:1": "192.168.1.2",
		"10.1.2.3:1": "198.51.100.1", "[::ffff:10.1.2.3]:1": "198.51.100.1",
		"172.16.9.9:1": "198.51.100.1", "[::ffff:172.16.9.9]:1": "198.51.100.1", "172.32.0.1:1": "172.32.0.1",
	} {
		r.RemoteAddr = peer
		if got := clientIP(r, ps, HeaderXForwardedFor).String(); got != want {
			t.Errorf("peer %s: clientIP %s, want %s", peer, got, want)
		}
	}
}

func TestIPKeyGroupsIPv6By64(t *testing.T) {
	s := &server{}
	key := func(peer string) string {
		r, _ := http.NewRequest("POST", "http://tokend.test/v1/token", nil)
		r.RemoteAddr = peer
		return ipKey(s, r)
	}
	if a, b := key("[2001:db8:1:2::1]:1"), key("[2001:db8:1:2:ffff::9]:1"); a != b || a != "ip:2001:db8:1:2::/64" {
		t.Errorf("same /64: %q and %q, want both ip:2001:db8:1:2::/64", a, b)
	}
	if a, b := key("[2001:db8:1:2::1]:1"), key("[2001:db8:1:3::1]:1"); a == b {
		t.Errorf("different /64s share the key %q", a)
	}
	if a, b := key("192.0.2.1:1"), key("192.0.2.2:1"); a == b || a != "ip:192.0.2.1" {
		t.Errorf("IPv4 keys %q and %q, want one per address", a, b)
	}
	if got := key("[::ffff:192.0.2.1]:1"); got != "ip:192.0.2.1" {
		t.Errorf("IPv4-mapped peer keyed %q, want ip:192.0.2.1", got)
	}
}
