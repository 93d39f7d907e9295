# lbcert's front door. `make demo` and `make test` do all their own set-up
# on a fresh Debian machine with Go: they install what they need.

GO       ?= go
PREFIX   ?= /usr/local
DESTDIR  ?=
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -X main.version=$(VERSION)
BIN      := bin/lbcert

# Debian packages the end-to-end tests run for real.
TEST_PKGS := nginx-light haproxy redis-server redis-sentinel
# Peers for the benchmarks.
BENCH_PKGS := certbot lego

.PHONY: all build test unit e2e demo deps bench bench-deps docs install lint clean fuzz torture

all: build

build:
	$(GO) build -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/lbcert

# deps installs the servers the end-to-end tests need. Nothing skips when
# they are missing: this target installs them, or fails saying why.
deps:
	@internal/testenv/apt-ensure nginx:nginx-light haproxy:haproxy redis-server:redis-server redis-sentinel:redis-sentinel

bench-deps: deps
	@internal/testenv/apt-ensure certbot:certbot lego:lego

# gotest ends a failing run with a summary of what failed (CI may show
# only the end of the output).
test: deps
	$(GO) vet ./...
	GO=$(GO) internal/testenv/gotest -count=1 -timeout 25m ./...

unit:
	$(GO) test -count=1 $$($(GO) list ./... | grep -v /internal/e2e)

e2e: deps
	GO=$(GO) internal/testenv/gotest -count=1 -timeout 25m -v ./internal/e2e/

# torture runs fleet mode's seeded random fault test (TestFleetRandomFaults,
# internal/e2e/fleet_random_test.go) for SEEDS seeds (1..SEEDS) of
# DURATION each, and prints per seed: the nodes, the operation and fault
# counts, the run time and the invariant violations (the table also goes
# to bin/torture.md, for the benchmark page). The seeds are split between
# SHARDS test processes run side by side (each seed's fleet has its own
# ports and directories; two share this machine's two cores, which makes
# the schedule's timing harsher, not gentler). make test runs its short
# mode: 3 seeds of 15 s. Replay one seed with
#   go test -count=1 -run 'TestFleetRandomFaults$$' ./internal/e2e/ -seed N -duration 5m
# (-chaos-keep DIR keeps a failing seed's logs in full).
SEEDS    ?= 20
DURATION ?= 5m
SHARDS   ?= 2
torture: deps
	@mkdir -p bin
	@rm -rf bin/torture.md bin/torture-*.md bin/torture-*.log bin/torture-logs
	@per=$$(( ($(SEEDS) + $(SHARDS) - 1) / $(SHARDS) )); pids=; \
	for i in $$(seq 0 $$(( $(SHARDS) - 1 ))); do \
		from=$$(( i * per + 1 )); n=$$(( $(SEEDS) - i * per )); [ $$n -gt $$per ] && n=$$per; [ $$n -le 0 ] && break; \
		echo "shard $$i: seeds $$from..$$(( from + n - 1 )), log bin/torture-$$i.log"; \
		$(GO) test -count=1 -timeout 6h -v -run 'TestFleetRandomFaults$$' ./internal/e2e/ \
			-seed-from $$from -seeds $$n -duration $(DURATION) -chaos-table $(CURDIR)/bin/torture-$$i.md \
			-chaos-keep $(CURDIR)/bin/torture-logs >bin/torture-$$i.log 2>&1 & pids="$$pids $$!"; \
	done; status=0; for p in $$pids; do wait $$p || status=1; done; \
	cat bin/torture-*.md >bin/torture.md; echo; cat bin/torture.md; \
	grep -h -- '--- FAIL' bin/torture-*.log || true; exit $$status

# bench runs every benchmark of internal/bench in one run, each beside
# its peers where it has them (internal/bench/README.md says what each
# measures and has the figures): the nothing-due renew pass against
# certbot and lego; 200 certificates against certbot and lego loops and
# beside certmagic (same Pebble, same run; a concurrency sweep and one
# order's timeline of each); renew of 200 due lineages beside batch; CPU
# per certificate beside Pebble's; step-ca beside Pebble; a primary CA's
# outage mid-batch; pacing against Let's Encrypt's limits; the nothing-due
# pass at 100,000 and at a million lineages; the deploy step; the nginx
# include file; fleet mode's costs; a node joining a fleet of 100,000
# lineages; staged rollouts; then the renewal-spread simulation and the
# Go benchmarks. One benchmark: go run ./internal/bench -only NAME.
bench: build bench-deps
	@command -v /usr/bin/time >/dev/null || internal/testenv/apt-ensure /usr/bin/time:time
	$(GO) run ./internal/bench -lbcert $(BIN)
	$(GO) test -count=1 -run TestRenewalSpread -v ./internal/renewal/
	$(GO) test -run XXX -bench . -benchmem ./cmd/lbcert/ ./internal/renewal/ ./internal/deploy/

fuzz:
	$(GO) test -run XXX -fuzz FuzzDomain -fuzztime 30s ./internal/names/
	$(GO) test -run XXX -fuzz FuzzParse -fuzztime 30s ./internal/config/
	$(GO) test -run XXX -fuzz FuzzParse -fuzztime 30s ./internal/batch/

demo: build
	$(GO) run ./internal/demo -lbcert $(BIN)

# docs regenerates man/ and completions/ (deterministic: a fixed date)
# from the commands' help: the test that checks them, told to write them.
# The test suite fails when they are stale.
docs:
	$(GO) test -count=1 -run '^TestDocsUpToDate$$' ./cmd/lbcert -update

install: build
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/man/man1 \
		$(DESTDIR)$(PREFIX)/share/bash-completion/completions \
		$(DESTDIR)$(PREFIX)/share/zsh/vendor-completions \
		$(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d
	install -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/lbcert
	install -m 0644 man/*.1 $(DESTDIR)$(PREFIX)/share/man/man1/
	install -m 0644 completions/lbcert.bash $(DESTDIR)$(PREFIX)/share/bash-completion/completions/lbcert
	install -m 0644 completions/_lbcert $(DESTDIR)$(PREFIX)/share/zsh/vendor-completions/_lbcert
	install -m 0644 completions/lbcert.fish $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/lbcert.fish

lint:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed"; exit 1; }
	$(GO) vet ./...

clean:
	rm -rf bin .demo
