#!/usr/bin/env bash
# Remakes the image seeds of the image_read and check_repair corpora with qemu-img and
# qemu-io: small images of each layout the engine reads, empty and with data (plain,
# compressed with zlib and zstd, zeroed, discarded), with a snapshot, a backing file name, an
# external data file name. The committed corpora hold these seeds plus what fuzzing added
# (minimized). Run from anywhere; writes into fuzz/corpus/.
set -euo pipefail
cd "$(dirname "$0")"
for tool in qemu-img qemu-io; do
    command -v "$tool" >/dev/null || { echo "make-seeds.sh: $tool is missing (Debian: qemu-utils)" >&2; exit 1; }
done
command -v python3 >/dev/null || { echo "make-seeds.sh: python3 is missing (Debian: python3)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

seed() { # name, qemu-img create options, size, then qemu-io commands
    local name=$1 opts=$2 size=$3
    shift 3
    qemu-img create -q -f qcow2 -o "$opts" "$tmp/$name" "$size"
    local args=()
    for c in "$@"; do args+=(-c "$c"); done
    if ((${#args[@]})); then qemu-io -f qcow2 "${args[@]}" "$tmp/$name" >/dev/null; fi
}
compressed() { # name, qemu-img convert options
    qemu-img create -q -f raw "$tmp/src.raw" 64k
    qemu-io -f raw -c 'write -P 0x5a 0 16k' -c 'write -P 0x17 32k 8k' "$tmp/src.raw" >/dev/null
    qemu-img convert -q -c -f raw -O qcow2 -o "$2" "$tmp/src.raw" "$tmp/$1"
}

seed empty-512 cluster_size=512 1M
seed data-512 cluster_size=512 1M 'write -P 0xaa 0 4k' 'write -P 0x55 700k 1536' 'write -z 64k 2k' 'discard 0 1k'
seed v2-512 cluster_size=512,compat=0.10 256k 'write -P 0x11 512 1k'
seed refcount1-512 cluster_size=512,refcount_bits=1 128k 'write -P 0x22 0 2k'
seed refcount64-512 cluster_size=512,refcount_bits=64 128k 'write -P 0x33 1k 1k'
seed lazy-512 cluster_size=512,lazy_refcounts=on 128k 'write -P 0x44 0 1k'
seed extl2-16k cluster_size=16k,extended_l2=on 256k 'write -P 0x66 0 1k' 'write -z 8k 1k'
seed data-4k cluster_size=4k 64k 'write -P 0x77 4k 8k'
compressed zlib-4k cluster_size=4k
compressed zstd-4k cluster_size=4k,compression_type=zstd
qemu-img create -q -f qcow2 -o cluster_size=512 "$tmp/base" 128k
qemu-img create -q -f qcow2 -o cluster_size=512 -b base -F qcow2 "$tmp/backing-512"
qemu-io -f qcow2 -c 'write -P 0x88 0 1k' "$tmp/backing-512" >/dev/null
qemu-img create -q -f qcow2 -o cluster_size=512,data_file="$tmp/data.raw" "$tmp/datafile-512" 64k
# Two L2 entries naming one data cluster, which 1-bit refcounts cannot count: the repair
# widens them.
seed refcount1-shared-512 cluster_size=512,refcount_bits=1 128k 'write -P 0x23 0 512' 'write -P 0x24 2k 512'
python3 - "$tmp/refcount1-shared-512" <<'EOF'
import struct, sys
with open(sys.argv[1], "r+b") as f:
    f.seek(40)
    (l1,) = struct.unpack(">Q", f.read(8))
    f.seek(l1)
    (l2,) = struct.unpack(">Q", f.read(8))
    l2 &= 0x00FFFFFFFFFFFE00
    f.seek(l2)
    first = f.read(8)
    f.seek(l2 + 4 * 8)
    f.write(first)
EOF
seed snapshot-512 cluster_size=512 128k 'write -P 0x99 0 1k'
qemu-img snapshot -c s1 "$tmp/snapshot-512"
qemu-io -f qcow2 -c 'write -P 0x9a 0 512' "$tmp/snapshot-512" >/dev/null

for target in image_read check_repair; do
    mkdir -p "corpus/$target"
    for f in empty-512 data-512 v2-512 refcount1-512 refcount64-512 lazy-512 extl2-16k data-4k \
        zlib-4k zstd-4k backing-512 datafile-512 snapshot-512 refcount1-shared-512; do
        cp "$tmp/$f" "corpus/$target/seed-$f"
    done
done
