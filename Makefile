# qcow2d: the two commands a fresh machine needs.
#   make test    format check, clippy, build, every test (unit, differential, bad images, CLI)
#   make serve   build the release daemon and serve IMAGE (default: a demo image) on SOCKET
#                (writable; READ_ONLY=1 for a read-only export)
#   make fuzz    every fuzz target for FUZZ_SECONDS (default 60) each (nightly toolchain and
#                cargo-fuzz; FUZZ_TARGETS to pick some, FUZZ_SANITIZER=none for speed); see
#                fuzz/ and README.md

CARGO      ?= cargo
SOCKET     ?= /tmp/qcow2d.sock
DEMO_IMAGE := .cache/demo.qcow2
IMAGE      ?= $(DEMO_IMAGE)
READ_ONLY  ?=
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= image_read image_ops check_repair chain_request relay config
# Inputs fuzzing finds go to a working corpus outside the repository; the committed corpus
# (fuzz/corpus/<target>) is read as seeds. Images need longer inputs than libFuzzer's default.
FUZZ_WORK  ?= .cache/fuzz
FUZZ_FLAGS ?= -timeout=30 -rss_limit_mb=2048
# The sanitizer the targets are built with (cargo fuzz -s): address by default; none runs the
# image targets about three times as fast (long searches), in a target directory of its own.
# Replay what such a search found under address afterwards (FUZZ_FLAGS="-runs=0").
FUZZ_SANITIZER ?= address
FUZZ_BUILD := -O -s $(FUZZ_SANITIZER) $(if $(filter address,$(FUZZ_SANITIZER)),,--target-dir target/$(FUZZ_SANITIZER))
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)

.PHONY: all test serve fuzz

all: test

test:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) build --workspace --all-targets
	$(CARGO) test --workspace

# A 1 GiB demo image: a recognisable pattern in its first MiB, zlib-compressed data after it,
# the rest unallocated.
$(DEMO_IMAGE):
	mkdir -p $(dir $@)
	rm -f $@.tmp $@.src
	qemu-img create -q -f raw $@.src 64M
	qemu-io -f raw -c 'write -P 0x5a 0 1M' -c 'write -P 0x71 1M 31M' $@.src >/dev/null
	qemu-img convert -c -f raw -O qcow2 $@.src $@.tmp
	qemu-img resize -q -f qcow2 $@.tmp 1G
	rm -f $@.src
	mv $@.tmp $@

serve: $(if $(filter $(DEMO_IMAGE),$(IMAGE)),$(DEMO_IMAGE))
	$(CARGO) build --release -p qcow2d
	$(TARGET_DIR)/release/qcow2d serve --image $(IMAGE) --socket $(SOCKET) $(if $(READ_ONLY),--read-only)

fuzz:
	@$(CARGO) +nightly --version >/dev/null 2>&1 || { echo "make fuzz: the nightly toolchain is missing (rustup toolchain install nightly)" >&2; exit 1; }
	@$(CARGO) fuzz --version >/dev/null 2>&1 || { echo "make fuzz: cargo-fuzz is missing (cargo install cargo-fuzz --locked)" >&2; exit 1; }
	cd fuzz && $(CARGO) +nightly fuzz build $(FUZZ_BUILD)
	set -e; for t in $(FUZZ_TARGETS); do \
		mkdir -p $(FUZZ_WORK)/$$t; \
		case $$t in image_*|check_repair) len=131072;; *) len=4096;; esac; \
		echo "== fuzz $$t for $(FUZZ_SECONDS) s"; \
		(cd fuzz && $(CARGO) +nightly fuzz run $(FUZZ_BUILD) $$t $(abspath $(FUZZ_WORK))/$$t corpus/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -max_len=$$len $(FUZZ_FLAGS)); \
	done
