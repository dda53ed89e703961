// Package client embeds tokend's browser client and its dev-mode demo page,
// so that the binary serves them: client/tokend.js at GET /js/tokend.js (the
// same file is published to npm as @tokend/client) and demo.html at GET / in
// dev mode.
package client

import _ "embed"

// JS is the browser client, an ES module with no dependencies.
//
//go:embed tokend.js
var JS []byte

// DemoPage is the dev-mode demo: a self-contained HTML page (no external
// assets) that starts a session, shows the token's claims and the refresh
// countdown, and revokes the session.
//
//go:embed demo.html
var DemoPage []byte
