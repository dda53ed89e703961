// Command tokend mints short-lived JWTs for browser apps from server-side
// sessions, and publishes the keys that verify them.
//
// With no configuration it runs in dev mode: in-memory sessions, a generated
// ES256 key and generated API keys, printed with a curl sequence to try.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
	stop()
	if errors.Is(err, flag.ErrHelp) {
		return
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "tokend:", err)
		os.Exit(1)
	}
}
