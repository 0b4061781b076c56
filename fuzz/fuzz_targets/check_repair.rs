//! `check --repair` on an image whose bytes come from the fuzzer (seeds: small images made by
//! `qemu-img`, some with data, compressed clusters, leaks): no panic, a second check of the
//! repaired image agrees with what the repair reported, and the repair never adds
//! corruptions, nor leaks to an image whose refcounts the first check could not all read.
//! (It may leave some: like
//! `qemu-img check -r all`, it cannot repair an L2 entry with reserved bits set, for one;
//! `engine/tests/fuzz_found.rs` compares such images with QEMU, and replays this target's
//! corpus against `qemu-img check`: too slow a process to run in the fuzzing loop.)

#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2d_fuzz::scratch_file;

fuzz_target!(|data: &[u8]| {
    let path = scratch_file("repair.qcow2", data);
    let Ok(before) = qcow2d_engine::check(&path, false) else {
        return;
    };
    let Ok(repaired) = qcow2d_engine::check(&path, true) else {
        return;
    };
    let again = qcow2d_engine::check(&path, false).expect("the repaired image must be checkable");
    assert_eq!(
        (again.corruptions, again.leaks, again.check_errors),
        (repaired.corruptions, repaired.leaks, repaired.check_errors),
        "a second check disagrees with the repair's own double check\nrepair:\n{repaired}\nagain:\n{again}"
    );
    assert!(
        again.corruptions <= before.corruptions,
        "the repair added corruptions\nbefore:\n{before}\nafter:\n{again}"
    );
    // Where the first check could not read a refcount block (a check error), it judged no
    // COPIED flag of the tables whose refcounts that block holds, as QEMU's does: a rebuild
    // that makes the block readable uncovers them, and is made only where what it leaves
    // (corruptions and leaks) is no more than what the first check found.
    assert!(
        before.check_errors == 0
            || again.corruptions + again.leaks <= before.corruptions + before.leaks,
        "the repair left more errors behind unreadable refcount blocks\nbefore:\n{before}\nafter:\n{again}"
    );
});
