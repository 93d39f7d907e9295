# lbcert's front door. `make demo` and `make test` do all their own set-up
# on a fresh Debian machine with Go: they install what they need.

GO       ?= go
PREFIX   ?= /usr/local
DESTDIR  ?=
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -X main.version=$(VERSION)
BIN      := bin/lbcert

# Debian packages the end-to-end tests run for real.
TEST_PKGS := nginx-light haproxy
# Peers for the benchmarks.
BENCH_PKGS := certbot lego

.PHONY: all build test unit e2e demo deps bench bench-deps docs docs-check install lint clean fuzz

all: build

build:
	$(GO) build -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/lbcert

# deps installs the servers the end-to-end tests need. Nothing skips when
# they are missing: this target installs them, or fails saying why.
deps:
	@scripts/apt-ensure nginx:nginx-light haproxy:haproxy

bench-deps: deps
	@scripts/apt-ensure certbot:certbot lego:lego

test: deps
	$(GO) vet ./...
	$(GO) test -count=1 -timeout 20m ./...

unit:
	$(GO) test -count=1 $$($(GO) list ./... | grep -v /internal/e2e)

e2e: deps
	$(GO) test -count=1 -timeout 20m -v ./internal/e2e/

fuzz:
	$(GO) test -run XXX -fuzz FuzzDomain -fuzztime 30s ./internal/names/
	$(GO) test -run XXX -fuzz FuzzParse -fuzztime 30s ./internal/config/

demo: build
	$(GO) run ./internal/demo -lbcert $(BIN)

install: build
	install -d $(DESTDIR)$(PREFIX)/bin
	install -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/lbcert

lint:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed"; exit 1; }
	$(GO) vet ./...

clean:
	rm -rf bin .demo
