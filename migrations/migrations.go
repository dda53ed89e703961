// Package migrations holds tokend's PostgreSQL schema as goose SQL
// migrations, embedded in the binary and applied at start-up.
package migrations

import "embed"

// FS holds the migration files, named NNNNN_description.sql.
//
//go:embed *.sql
var FS embed.FS
