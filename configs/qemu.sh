#!/bin/sh
# A QEMU guest whose disk is served by qcow2d on /run/qcow2d/vm1.sock.
# vhost-user needs the guest RAM in shared memory (memory-backend-memfd, share=on).
# reconnect lets QEMU reconnect when qcow2d restarts (newer QEMU: reconnect-ms=1000).
exec qemu-system-x86_64 \
    -machine q35,accel=kvm -cpu host -smp 4 -m 4G \
    -object memory-backend-memfd,id=mem,size=4G,share=on -numa node,memdev=mem \
    -chardev socket,id=disk0,path=/run/qcow2d/vm1.sock,reconnect=1 \
    -device vhost-user-blk-pci,chardev=disk0,num-queues=4,bootindex=1 \
    -nographic "$@"
