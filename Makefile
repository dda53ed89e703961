GO       ?= go
NODE     ?= node
FUZZTIME ?= 30s

.DEFAULT_GOAL := help
.PHONY: help test fuzz bench run build lint docker clean

help: ## list the targets
	@awk -F ':.*## ' '/^[a-z]+:.*## / { printf "  %-7s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

test: ## start PostgreSQL and Redis if needed, vet, run every test with -race (Chromium drives the browser tests), test the browser client with node, smoke-run the benchmarks, fuzz briefly
	bash scripts/ensure-services.sh
	@command -v $(NODE) >/dev/null 2>&1 || { echo "make test: $(NODE) is missing; the browser client's tests (client/test/) need Node.js 18 or later: sudo apt-get install nodejs" >&2; exit 1; }
	$(NODE) --test client/test/
	$(GO) vet ./...
	$(GO) test -race -count=1 ./...
	$(GO) test -run='^$$' -bench=. -benchtime=1x ./... >/dev/null
	$(MAKE) --no-print-directory fuzz FUZZTIME=5s

# fuzz1 runs one fuzz target. `go test -fuzz` passes silently when no target
# matches, so a renamed or missing target fails here instead.
define fuzz1
	@$(GO) test -list='^$(1)$$' $(2) | grep -qx '$(1)' || { echo "fuzz: no $(1) in $(2)" >&2; exit 1; }
	$(GO) test -run='^$$' -fuzz='^$(1)$$' -fuzztime=$(FUZZTIME) -fuzzminimizetime=5s $(2)
endef

fuzz: ## run each fuzz target for FUZZTIME (default 30s)
	$(call fuzz1,FuzzParseCookie,./session)
	$(call fuzz1,FuzzAppendJSONString,./issuer)
	$(call fuzz1,FuzzDecodeCreateSession,./api)

bench: ## run the benchmarks (BENCHMARKS.md)
	bash scripts/ensure-services.sh
	$(GO) test -run='^$$' -bench=. -benchmem ./...

run: ## run tokend in dev mode
	$(GO) run ./cmd/tokend

build: ## build bin/tokend
	$(GO) build -trimpath -o bin/tokend ./cmd/tokend

lint: ## check formatting and vet
	@out=$$(gofmt -l .); if [ -n "$$out" ]; then echo "gofmt -l: not formatted:" >&2; echo "$$out" >&2; exit 1; fi
	$(GO) vet ./...

docker: ## build the tokend image
	docker build -t tokend .

clean: ## remove build output
	rm -rf bin/ out/
