#!/bin/sh
# /init of the guest test initramfs (built by tests/guest/build-guest.sh).
#
# Runs the workloads named on the kernel command line against /dev/vda, the disk that
# `qcow2d serve` exports over vhost-user-blk, prints one machine-readable line per workload and
# powers the machine off. Kernel command line:
#   qcow2d.test=W1,W2,...   workloads, run in order:
#       fio-verify      fio random writes (4k, libaio, direct, iodepth 32, 2 jobs pinned to the
#                       2 vCPUs so both virtqueues carry I/O), then reads everything back and
#                       checks crc32c; fails if a queue carried no request
#       restart-verify  the same as two fio runs (writes, then a verify-only run), each
#                       announced by a QCOW2D-PHASE line: the host restarts the daemon during
#                       each
#       fs              mkfs.ext4, mount, write files of known content, sync, umount,
#                       e2fsck -fn, mount again and check the content, umount, e2fsck -fn
#       sha256          sha256 of the whole disk (page cache dropped first)
#       read-only       checks that the disk is read-only and that a write fails
#       resize          prints QCOW2D-PHASE name=resize phase=wait, waits (60 s at most) for
#                       /sys/block/vda/size to change (the host resizes the image meanwhile),
#                       then writes 1 MiB of random data at the old end, reads it back with
#                       the page cache dropped, and reports its sha256 and the new size
#       debug-info      prints /proc/interrupts (for debugging by hand)
#   qcow2d.fio_mb=N         MiB written by each of the two fio jobs (default 32)
#   qcow2d.fio_rate=N       IOPS limit of each fio job in the write run of restart-verify
#                           (default none), to make it last long enough to act during it
#   qcow2d.pause=N          restart-verify sleeps N s between its two runs (after a
#                           QCOW2D-PHASE phase=pause line), with no I/O in flight
#
# Output lines (all on the serial console):
#   QCOW2D-BOOT kernel=... disk_bytes=... queues=... ro=... write_cache=...
#   QCOW2D-BEGIN name=W
#   QCOW2D-PHASE name=W phase=P
#   QCOW2D-RESULT name=W status=ok|fail secs=N [sha256=HEX] detail=free text
#   QCOW2D-DONE failures=N
# then `poweroff -f`. A failure to set up the machine itself is reported as
# QCOW2D-RESULT name=setup status=fail.

export PATH=/sbin:/bin:/usr/sbin:/usr/bin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu

failures=0

result() { # name status detail [extra key=value]
    echo "QCOW2D-RESULT name=$1 status=$2 secs=$(($(date +%s) - started))${4:+ $4} detail=$3"
    [ "$2" = ok ] || failures=$((failures + 1))
}

finish() {
    sync
    echo "QCOW2D-DONE failures=$failures"
    sleep 1
    poweroff -f
    # Not reached; if poweroff fails, panic=-1 with -no-reboot ends QEMU.
    exit 1
}

started=$(date +%s)
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || true
mount -t tmpfs tmpfs /tmp
ln -sf /proc/mounts /etc/mtab

TESTS=""
FIO_MB=""
FIO_RATE=""
PAUSE=""
for arg in $(cat /proc/cmdline); do
    case $arg in
    qcow2d.test=*) TESTS=${arg#*=} ;;
    qcow2d.fio_mb=*) FIO_MB=${arg#*=} ;;
    qcow2d.fio_rate=*) FIO_RATE=${arg#*=} ;;
    qcow2d.pause=*) PAUSE=${arg#*=} ;;
    esac
done

while read -r m; do
    if ! out=$(insmod "/lib/modules/$m" 2>&1); then
        result setup fail "insmod $m failed: $out"
        finish
    fi
done </lib/modules/load-order

i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do
    sleep 0.1
    i=$((i + 1))
done
if [ ! -b /dev/vda ]; then
    result setup fail "no /dev/vda after 10 s: the virtio-blk disk did not appear ($(ls /sys/block | tr '\n' ' '))"
    finish
fi
queues=$(ls -d /sys/block/vda/mq/* 2>/dev/null | wc -l)
echo "QCOW2D-BOOT kernel=$(uname -r) disk_bytes=$(($(cat /sys/block/vda/size) * 512))" \
    "queues=$queues ro=$(cat /sys/block/vda/ro)" \
    "write_cache=$(tr ' ' _ </sys/block/vda/queue/write_cache) cpus=$(grep -c ^processor /proc/cpuinfo)"

# Interrupts taken per virtqueue so far, e.g. "virtio0-req.0=12 virtio0-req.1=40" (the MSI-X
# vectors of the request queues, summed over the CPUs): tells which queues carried requests.
queue_irqs() {
    awk '$NF ~ /^virtio[0-9]+-req\.[0-9]+$/ {
        n = 0
        for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i
        printf "%s=%d ", $NF, n
    }' /proc/interrupts
}

# Prints the (first 5) errors the kernel logged about the disk or the file system since the
# last call; prints nothing if there were none.
dmesg_mark=0
io_errors() {
    new=$(dmesg | tail -n +$((dmesg_mark + 1)))
    dmesg_mark=$(dmesg | wc -l)
    echo "$new" | grep -Ei 'I/O error|critical medium|blk_update_request|Buffer I/O|EXT4-fs error|vda.*(error|fail)' | head -n 5
}
io_errors >/dev/null

# fio options shared by the fio workloads: random 4k writes with crc32c verify headers, libaio,
# O_DIRECT, iodepth 32, two jobs each pinned to one vCPU (so each drives its own virtqueue) and
# each on its own MB-sized region of the disk.
fio_common() { # name mib_per_job
    echo --name="$1" --filename=/dev/vda --ioengine=libaio --direct=1 --iodepth=32 \
        --rw=randwrite --bs=4k --size="${2}M" --offset_increment="${2}M" --numjobs=2 \
        --cpus_allowed=0-1 --cpus_allowed_policy=split --verify=crc32c --verify_fatal=1 \
        --verify_state_save=0 --group_reporting
}

# Runs fio with the common options plus $3...; returns non-zero and prints why on failure.
fio_phase() { # name mib_per_job extra...
    n=$1
    m=$2
    shift 2
    # shellcheck disable=SC2046
    fio $(fio_common "$n" "$m") "$@" --output=/tmp/fio.out >/tmp/fio.err 2>&1
    rc=$?
    sed 's/^/fio: /' /tmp/fio.out /tmp/fio.err
    if [ $rc -ne 0 ]; then
        fio_why="fio exited $rc: $(cat /tmp/fio.out /tmp/fio.err | grep -v 'multiple writers may overwrite' |
            grep -Ei '^verify:|^fio: |error|bad magic|fail|err= *[1-9]' | head -n 3 | tr '\n' ' ')"
        return 1
    fi
    errs=$(io_errors)
    if [ -n "$errs" ]; then
        fio_why="kernel logged I/O errors: $(echo "$errs" | tr '\n' ' ')"
        return 1
    fi
    return 0
}

# The queues (virtioN-req.Q) whose interrupt count did not grow between $1 and $2.
idle_queues() {
    idle=""
    for q in $2; do
        k=${q%%=*}
        v=${q#*=}
        b=0
        for p in $1; do [ "${p%%=*}" = "$k" ] && b=${p#*=}; done
        [ "$v" -gt "$b" ] || idle="$idle $k"
    done
    echo "$idle"
}

run_fio() { # name mib_per_job phases
    name=$1
    mb=$2
    before=$(queue_irqs)
    if [ "$3" = one ]; then
        # Write everything, then read it all back and check it, in one fio run.
        fio_phase "$name" "$mb" --do_verify=1 || {
            result "$name" fail "$fio_why"
            return
        }
    else
        # Two fio runs, each announced, so that the host can act during each: the writes, then
        # a second run that only reads back and checks what the first wrote.
        echo "QCOW2D-PHASE name=$name phase=write"
        # shellcheck disable=SC2086
        fio_phase "$name" "$mb" --do_verify=0 ${FIO_RATE:+--rate_iops=$FIO_RATE} || {
            result "$name" fail "write phase: $fio_why"
            return
        }
        if [ -n "$PAUSE" ]; then
            # Nothing in flight: what the host does now can lose only what the daemon holds.
            echo "QCOW2D-PHASE name=$name phase=pause"
            sleep "$PAUSE"
        fi
        echo "QCOW2D-PHASE name=$name phase=verify"
        fio_phase "$name" "$mb" --verify_only=1 || {
            result "$name" fail "verify phase: $fio_why"
            return
        }
    fi
    after=$(queue_irqs)
    idle=$(idle_queues "$before" "$after")
    if [ "$queues" -ge 2 ] && [ -z "$after" ]; then
        result "$name" fail "no per-queue interrupt counters (virtioN-req.Q) in /proc/interrupts"
    elif [ -n "$idle" ]; then
        result "$name" fail "no requests went through$idle (interrupts before: $before after: $after)"
    else
        result "$name" ok "wrote and verified 2 x ${mb} MiB; interrupts per queue: $after" "written_mib=$((2 * mb))"
    fi
}

run_fs() {
    if ! out=$(mkfs.ext4 -F -q /dev/vda 2>&1); then
        result fs fail "mkfs.ext4 failed: $out"
        return
    fi
    if ! out=$(mount -t ext4 /dev/vda /mnt 2>&1); then
        result fs fail "mount failed: $out"
        return
    fi
    mkdir -p /mnt/small
    i=0
    while [ $i -lt 64 ]; do
        seq $((i * 1000)) $((i * 1000 + 999 + i * 37)) >/mnt/small/f$i
        i=$((i + 1))
    done
    dd if=/dev/urandom of=/mnt/big bs=1M count=6 2>/dev/null
    # A file with holes and a block at its end.
    dd if=/dev/urandom of=/mnt/sparse bs=4k count=3 seek=2000 2>/dev/null
    (cd /mnt && sha256sum big sparse small/*) >/tmp/sums
    sync
    if ! out=$(umount /mnt 2>&1); then
        result fs fail "umount failed: $out"
        return
    fi
    if ! out=$(e2fsck -fn /dev/vda 2>&1); then
        result fs fail "e2fsck -fn after writing: $(echo "$out" | tail -n 5 | tr '\n' ' ')"
        return
    fi
    echo 3 >/proc/sys/vm/drop_caches
    if ! out=$(mount -t ext4 -o ro /dev/vda /mnt 2>&1); then
        result fs fail "second mount failed: $out"
        return
    fi
    bad=$(cd /mnt && sha256sum -c /tmp/sums 2>&1 | grep -v ': OK$' | head -n 3)
    umount /mnt
    if [ -n "$bad" ]; then
        result fs fail "files read back differ: $(echo "$bad" | tr '\n' ' ')"
        return
    fi
    if ! out=$(e2fsck -fn /dev/vda 2>&1); then
        result fs fail "e2fsck -fn after remount: $(echo "$out" | tail -n 5 | tr '\n' ' ')"
        return
    fi
    errs=$(io_errors)
    if [ -n "$errs" ]; then
        result fs fail "kernel logged errors: $(echo "$errs" | tr '\n' ' ')"
        return
    fi
    result fs ok "mkfs, $(wc -l </tmp/sums) files written and read back after remount, e2fsck clean"
}

run_sha256() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
    sum=$(sha256sum </dev/vda | cut -d' ' -f1)
    errs=$(io_errors)
    if [ -n "$errs" ]; then
        result sha256 fail "kernel logged I/O errors: $(echo "$errs" | tr '\n' ' ')"
    elif [ ${#sum} -ne 64 ]; then
        result sha256 fail "sha256sum of /dev/vda failed"
    else
        result sha256 ok "sha256 of the whole disk" "sha256=$sum"
    fi
}

run_read_only() {
    ro=$(cat /sys/block/vda/ro)
    if [ "$ro" != 1 ]; then
        result read-only fail "/sys/block/vda/ro is $ro, expected 1"
        return
    fi
    if dd if=/dev/zero of=/dev/vda bs=4k count=1 oflag=direct conv=notrunc 2>/dev/null; then
        result read-only fail "a write to the read-only disk succeeded"
        return
    fi
    result read-only ok "disk is read-only and refuses writes"
}

run_resize() {
    before=$(cat /sys/block/vda/size)
    echo "QCOW2D-PHASE name=resize phase=wait sectors=$before"
    i=0
    while [ "$(cat /sys/block/vda/size)" = "$before" ] && [ $i -lt 600 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    after=$(cat /sys/block/vda/size)
    if [ "$after" = "$before" ]; then
        result resize fail "/sys/block/vda/size stayed at $before sectors for 60 s"
        return
    fi
    # Whole MiBs: the old size is a multiple of 1 MiB in the tests.
    at=$((before / 2048))
    dd if=/dev/urandom of=/tmp/new bs=1M count=1 2>/dev/null
    if ! out=$(dd if=/tmp/new of=/dev/vda bs=1M seek=$at count=1 oflag=direct conv=notrunc 2>&1); then
        result resize fail "writing at the old end ($at MiB) failed: $out"
        return
    fi
    sync
    echo 3 >/proc/sys/vm/drop_caches
    if ! out=$(dd if=/dev/vda of=/tmp/back bs=1M skip=$at count=1 iflag=direct 2>&1); then
        result resize fail "reading at the old end ($at MiB) failed: $out"
        return
    fi
    want=$(sha256sum </tmp/new | cut -d' ' -f1)
    got=$(sha256sum </tmp/back | cut -d' ' -f1)
    errs=$(io_errors)
    if [ "$want" != "$got" ]; then
        result resize fail "1 MiB written at $at MiB read back differently"
    elif [ -n "$errs" ]; then
        result resize fail "kernel logged errors: $(echo "$errs" | tr '\n' ' ')"
    else
        result resize ok "size $before -> $after sectors; 1 MiB written at the old end and read back" \
            "sha256=$want sectors=$after"
    fi
}

[ -n "$TESTS" ] || {
    result setup fail "no qcow2d.test= on the kernel command line"
    finish
}
for t in $(echo "$TESTS" | tr ',' ' '); do
    echo "QCOW2D-BEGIN name=$t"
    started=$(date +%s)
    case $t in
    fio-verify) run_fio fio-verify "${FIO_MB:-32}" one ;;
    restart-verify) run_fio restart-verify "${FIO_MB:-32}" two ;;
    fs) run_fs ;;
    sha256) run_sha256 ;;
    read-only) run_read_only ;;
    resize) run_resize ;;
    debug-info)
        cat /proc/interrupts
        result debug-info ok "printed"
        ;;
    *) result "$t" fail "unknown workload" ;;
    esac
done
finish
