# qcow2d: the two commands a fresh machine needs.
#   make test    format check, clippy, build, every test (unit, differential, bad images, CLI)
#   make serve   build the release daemon and serve IMAGE (default: a demo image) on SOCKET
#                (writable; READ_ONLY=1 for a read-only export)

CARGO      ?= cargo
SOCKET     ?= /tmp/qcow2d.sock
DEMO_IMAGE := .cache/demo.qcow2
IMAGE      ?= $(DEMO_IMAGE)
READ_ONLY  ?=
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)

.PHONY: all test serve

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
