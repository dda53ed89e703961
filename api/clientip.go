package api

import (
	"net/http"
	"net/netip"
	"strings"
)

// Client IP headers a trusted proxy may write.
const (
	HeaderXForwardedFor = "X-Forwarded-For"
	HeaderForwarded     = "Forwarded"
)

// clientIP returns the address of the client behind r. It is the socket
// peer, unless the peer is a trusted proxy: then it is the right-most
// address in header (X-Forwarded-For or Forwarded, the one the proxies are
// known to write) that is not itself a trusted proxy. Only that header is
// read: a proxy that appends to X-Forwarded-For but passes Forwarded through
// untouched would otherwise let clients pick their own address there.
// Headers from untrusted peers are never read. If every listed address is
// trusted, the left-most one is the client; if the chain holds something
// that is not an address, the walk stops at the last trusted hop before it.
func clientIP(r *http.Request, trusted []netip.Prefix, header string) netip.Addr {
	peer := peerAddr(r.RemoteAddr)
	if len(trusted) == 0 || !isTrusted(peer, trusted) {
		return peer
	}
	var chain []string
	if header == HeaderForwarded {
		chain = forwardedFor(r.Header.Values(HeaderForwarded))
	} else {
		for _, v := range r.Header.Values(HeaderXForwardedFor) {
			for _, part := range strings.Split(v, ",") {
				chain = append(chain, strings.TrimSpace(part))
			}
		}
	}
	client := peer
	for i := len(chain) - 1; i >= 0; i-- {
		a, ok := parseHop(chain[i])
		if !ok {
			return client
		}
		client = a
		if !isTrusted(a, trusted) {
			return a
		}
	}
	return client
}

func peerAddr(remote string) netip.Addr {
	if ap, err := netip.ParseAddrPort(remote); err == nil {
		return ap.Addr().Unmap()
	}
	a, _ := netip.ParseAddr(remote)
	return a.Unmap()
}

func isTrusted(a netip.Addr, trusted []netip.Prefix) bool {
	if !a.IsValid() {
		return false
	}
	for _, p := range trusted {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// parseHop reads one address of a forwarding chain: an IP, possibly with a
// port, IPv6 possibly in brackets.
func parseHop(s string) (netip.Addr, bool) {
	s = strings.TrimSpace(s)
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return ap.Addr().Unmap(), true
	}
	s = strings.TrimSuffix(strings.TrimPrefix(s, "["), "]")
	a, err := netip.ParseAddr(s)
	if err != nil || a.Zone() != "" {
		return netip.Addr{}, false
	}
	return a.Unmap(), true
}

// forwardedFor extracts the for= values of RFC 7239 Forwarded headers, in
// order. An element without for= yields "" (which parseHop refuses), so that
// a malformed hop stops the walk instead of being skipped.
func forwardedFor(values []string) []string {
	var out []string
	for _, v := range values {
		for _, elem := range splitQuoted(v, ',') {
			found := ""
			for _, pair := range splitQuoted(elem, ';') {
				k, val, ok := strings.Cut(strings.TrimSpace(pair), "=")
				if ok && strings.EqualFold(strings.TrimSpace(k), "for") {
					found = strings.Trim(strings.TrimSpace(val), `"`)
				}
			}
			out = append(out, found)
		}
	}
	return out
}

// splitQuoted splits s at sep outside double quotes.
func splitQuoted(s string, sep byte) []string {
	var parts []string
	quoted, start := false, 0
	for i := 0; i < len(s); i++ {
		switch {
		case s[i] == '\\' && quoted:
			i++
		case s[i] == '"':
			quoted = !quoted
		case s[i] == sep && !quoted:
			parts = append(parts, s[start:i])
			start = i + 1
		}
	}
	return append(parts, s[start:])
}

// ParseTrustedProxies reads a comma list of CIDR prefixes or single
// addresses.
func ParseTrustedProxies(list []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, s := range list {
		if p, err := netip.ParsePrefix(s); err == nil {
			// Peers are compared unmapped, so an IPv4-mapped prefix
			// (::ffff:10.0.0.0/104) must become its IPv4 form to match.
			if p.Addr().Is4In6() && p.Bits() >= 96 {
				p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
			}
			out = append(out, p.Masked())
			continue
		}
		a, err := netip.ParseAddr(s)
		if err != nil || a.Zone() != "" { // "fe80::1%eth0/64" parses as a zone "eth0/64"
			return nil, &invalidProxyError{s}
		}
		out = append(out, netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen()))
	}
	return out, nil
}

type invalidProxyError struct{ value string }

func (e *invalidProxyError) Error() string {
	return "\"" + e.value + "\" is not a CIDR prefix or an IP address"
}
