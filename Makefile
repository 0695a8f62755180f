# sidelane: a chained CNI plugin and node agent that captures Istio traffic with eBPF.
# `make help` lists the targets. Tools the tests drive (reference CNI plugins,
# Istio's pilot-agent, kube-apiserver, helm) are built once into $(CACHE).

SHELL    := /bin/bash
GO       ?= go
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
# Expanded once: a commit during a long make must not give the image
# another version than the binaries in it.
VERSION  := $(VERSION)
CACHE    ?= $(HOME)/.cache/sidelane
BIN      := bin
LDFLAGS  := -X github.com/sidelane/sidelane/internal/buildinfo.Version=$(VERSION)
FUZZTIME ?= 100000x

export SIDELANE_CACHE := $(CACHE)
export SIDELANE_BIN   := $(CURDIR)/$(BIN)
export PATH           := $(CACHE)/bin:$(PATH)

.PHONY: help deps deps-check build generate verify lint unit conformance fuzz test chart e2e bench demo tools kube istiod image node-e2e clean

help: ## list targets
	@awk -F':.*## ' '/^[a-z0-9-]+:.*## /{printf "  %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

deps: ## install the apt packages (Debian 12) and mount the bpffs that the tests, the demo and generate need (root; otherwise prints the command)
	hack/install-deps.sh all

# The machine prerequisites of the target being made (DEPS, a group of
# hack/install-deps.sh), checked before the long tool builds (tools, kube:
# ~15 min on a fresh machine) and installed there and then as root on
# Debian. `make tools` or `make kube` alone checks nothing.
DEPS ?=
demo: DEPS = demo
unit conformance e2e chart bench: DEPS = test
test: DEPS = test node
generate: DEPS = generate
image: DEPS = image
node-e2e: DEPS = node
deps-check:
	@$(if $(DEPS),hack/install-deps.sh $(DEPS))
tools kube istiod: | deps-check

build: ## build bin/sidelane-cni and bin/sidelane
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/sidelane-cni ./cmd/sidelane-cni
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/sidelane ./cmd/sidelane

generate: deps-check ## regenerate BPF objects (bpf2go, needs clang) and other generated files
	$(GO) generate ./...

verify: generate ## regenerate and fail if anything committed differs
	git diff --exit-code
	@test -z "$$(git status --porcelain --untracked-files=all)" || { git status --porcelain; echo "verify: generate left untracked files"; exit 1; }

lint: ## gofmt, go vet, and no tracked file over 1 MiB but the generated BPF objects
	hack/check-large-files.sh
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

tools: ## build the reference CNI plugins, cnitool, the noop test plugin and Istio's pilot-agent into $(CACHE)/bin
	hack/install-tools.sh cni istio

istiod: ## build Istio's pilot-discovery (istiod) into $(CACHE)/bin for test/istiod (~17 min the first time on a busy machine)
	hack/install-tools.sh istiod

kube: ## build kube-apiserver and kubectl once into $(CACHE) (~14 min the first time)
	hack/build-kube-apiserver.sh

unit: deps-check build tools kube istiod ## unit tests (privileged ones run as root; some compare with pilot-agent, some start etcd + kube-apiserver)
	$(GO) test -count=1 $$($(GO) list ./... | grep -v -e /conformance -e /charts/ -e /test/e2e -e /test/node)

conformance: deps-check build tools ## CNI and capture conformance in real network namespaces; ends with "N passed, N failed"
	$(GO) test -count=1 -json -timeout 30m ./conformance/ | tee $(BIN)/conformance.json | $(GO) run ./hack/testsummary

fuzz: ## a short, count-based run of every fuzz target in the module (FUZZTIME=100000x)
	FUZZTIME=$(FUZZTIME) hack/fuzz.sh

test: deps-check lint unit conformance e2e node-e2e fuzz chart ## everything CI runs
	@echo "make test: all passed"

chart: deps-check ## helm lint, golden templates, schema and server-side strict dry-run of charts/sidelane
	hack/install-tools.sh helm
	$(GO) test -count=1 -v ./charts/sidelane/test/ 2>&1 | grep -E '^(=== RUN|--- (FAIL|SKIP)|\s+.*_test.go|FAIL|ok|PASS)'; test $${PIPESTATUS[0]} -eq 0

e2e: deps-check build tools kube ## end-to-end: real kube-apiserver, two simulated nodes, real CNI chain, real agents (root)
	$(GO) test -count=1 -json -timeout 15m ./test/e2e/ 2>&1 | $(GO) run ./hack/testsummary -progress -log $(BIN)/e2e.log

bench: deps-check build tools ## side-by-side benchmarks into bench/out/ (QUICK=1: under 3 minutes); needs root
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN)/sidelane-bench ./cmd/sidelane-bench
	$(BIN)/sidelane-bench run $(if $(QUICK),-quick) -out bench/out -bin $(BIN) -tools $(CACHE)/bin
	@cat bench/out/results.md

demo: deps-check build tools kube ## the whole product on one machine: local kube-apiserver, two simulated nodes, agents (eBPF), the story step by step, with a ~80 s quick benchmark (root; FAST=1 leaves the benchmark out)
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN)/sidelane-demo ./cmd/sidelane-demo
	$(if $(FAST),,CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN)/sidelane-bench ./cmd/sidelane-bench)
	$(BIN)/sidelane-demo -bin $(BIN) -tools $(CACHE)/bin $(if $(FAST),-no-bench)

image: deps-check build ## build the Dockerfile without a Docker daemon (mmdebstrap + podman) into $(CACHE)/sidelane-image.tar, tagged as the chart's default image
	VERSION=$(VERSION) hack/build-image.sh

node-e2e: deps-check build tools image ## a real node (kubelet, containerd, runc, controller-manager, scheduler, kube-proxy) in network namespaces; helm install of the chart (root)
	hack/install-tools.sh helm
	hack/build-kube-apiserver.sh node
	hack/build-node-images.sh
	VERSION=$(VERSION)-upgrade TAG_SUFFIX=-upgrade OUT=$(CACHE)/sidelane-image-upgrade.tar hack/build-image.sh
	$(GO) test -count=1 -json -timeout 30m ./test/node/ 2>&1 | $(GO) run ./hack/testsummary -progress -log $(BIN)/node-e2e.log

clean: ## remove build outputs
	rm -rf $(BIN)
