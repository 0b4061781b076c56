#!/bin/sh
# A Cloud Hypervisor guest whose disk is served by qcow2d; vhost-user needs shared memory.
exec cloud-hypervisor \
    --cpus boot=4 \
    --memory size=4G,shared=on \
    --kernel ./vmlinux \
    --cmdline "console=hvc0 root=/dev/vda1 rw" \
    --disk vhost_user=true,socket=/run/qcow2d/vm1.sock,num_queues=4,queue_size=128 \
    "$@"
