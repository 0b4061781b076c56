//! Inputs the fuzz targets (`fuzz/`) found, each a named test of the normal suite so that
//! what was fixed stays fixed without the nightly toolchain. The images are the fuzzer's
//! files as found (`tests/data/fuzz/`).

use qcow2d_tests::{create_qcow2_in, qemu_img_cmd};
use std::path::Path;

use qcow2d_engine::check;

/// `qemu-img check`'s (corruptions, leaks) of `path`, whatever its exit status.
/// `image` in a file of its own (the directory goes with the first value).
fn image_file(image: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("image.img");
    std::fs::write(&path, image).unwrap();
    (dir, path)
}

fn qemu_counts(path: &Path) -> (u64, u64) {
    qemu_counts_or_refusal(path).unwrap_or_else(|e| panic!("qemu-img check gave no JSON: {e}"))
}

/// `qemu-img check`'s (corruptions, leaks) of `path`, or why it gave none (QEMU could not
/// open the image).
fn qemu_counts_or_refusal(path: &Path) -> Result<(u64, u64), String> {
    let out = qemu_img_cmd()
        .args(["check", "--output=json", "-f", "qcow2"])
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run qemu-img (is qemu-utils installed?): {e}"));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&out.stderr)))?;
    let n = |k: &str| v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    Ok((n("corruptions"), n("leaks")))
}

/// Repairs a copy of `image` with `check(path, true)`: the repair adds no corruption, a
/// second check agrees with the repair's own, and QEMU's check of the result agrees with
/// qcow2d's. Returns qcow2d's (corruptions, leaks) after the repair.
fn repair_consistent(image: &[u8]) -> (u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours.img");
    std::fs::write(&ours, image).unwrap();
    let before = check(&ours, false).unwrap();
    let repaired = check(&ours, true).unwrap();
    let again = check(&ours, false).unwrap();
    assert_eq!(
        (again.corruptions, again.leaks, again.check_errors),
        (repaired.corruptions, repaired.leaks, repaired.check_errors),
        "a second check disagrees with the repair's\nrepair:\n{repaired}\nagain:\n{again}"
    );
    assert!(
        again.corruptions <= before.corruptions,
        "the repair added corruptions\nbefore:\n{before}\nafter:\n{again}"
    );
    assert_eq!(
        qemu_counts(&ours),
        (again.corruptions, again.leaks),
        "QEMU judges qcow2d's repair differently from qcow2d"
    );
    (again.corruptions, again.leaks)
}

/// [`repair_consistent`], and another copy of `image` repaired with `qemu-img check -r all`:
/// QEMU finds in qcow2d's result what it finds in its own.
fn repair_like_qemu(image: &[u8]) {
    let ours = repair_consistent(image);
    let dir = tempfile::tempdir().unwrap();
    let theirs = dir.path().join("theirs.img");
    std::fs::write(&theirs, image).unwrap();
    let _ = qemu_img_cmd()
        .args(["check", "-q", "-r", "all", "-f", "qcow2"])
        .arg(&theirs)
        .output()
        .expect("cannot run qemu-img (is qemu-utils installed?)");
    assert_eq!(
        ours,
        qemu_counts(&theirs),
        "qcow2d's repair leaves something else than QEMU's"
    );
}

/// A data cluster referenced past the end of the file (so not counted) whose stored
/// refcount is 1 and whose L2 entry has COPIED: the repair judged COPIED by the expected
/// refcount (0), cleared it, and the double check (which reads the stored 1) found a new
/// corruption. QEMU judges it by the stored refcount and leaves the flag.
#[test]
fn repair_keeps_copied_on_a_cluster_past_the_end_of_the_file() {
    repair_like_qemu(include_bytes!("data/fuzz/repair-copied-past-eof.img"));
}

/// L2 entries with reserved bits set: neither QEMU nor qcow2d can repair them; both leave the
/// same errors and fix the same leaks.
#[test]
fn repair_leaves_l2_entries_with_reserved_bits_as_qemu_does() {
    repair_like_qemu(include_bytes!("data/fuzz/repair-reserved-bits.img"));
}

/// A refcount rebuild refused (the new structure would land where references past the end
/// of the file point) after the repair had cleared the COPIED flags of shared clusters by the
/// expected refcounts: the flags then disagreed with the refcounts that stayed, more errors
/// than before. Nothing that depends on the refcounts changes before they are made right
/// now; when some stay wrong, COPIED flags follow the stored refcounts where that is safe
/// and are never set on a cluster that may be shared. (The rebuild is no longer refused
/// here: the new structure goes into clusters of the file nothing references, and fewer
/// errors remain than the 39 and 2 leaks of the refused rebuild; one fewer again since the
/// COPIED flag of an L1 entry naming an invalid table is repaired.)
#[test]
fn refused_rebuild_fixes_copied_flags_only_by_the_stored_refcounts() {
    let (corruptions, leaks) = repair_consistent(include_bytes!(
        "data/fuzz/repair-refused-rebuild-copied.img"
    ));
    assert_eq!((corruptions, leaks), (34, 0));
}

/// A version 3 snapshot table entry without its extra data, and the active L1 table and the
/// refcount table past the end of the file (of 179 bytes), the L1 table where the file would
/// grow to: the repair wrote the table again at the end of the file, then could not give it
/// refcounts (the rebuild was refused), a new corruption; then it left the table and the
/// refcounts, 5 corruptions, as QEMU leaves them (its repair stops at its overlap check).
/// It now grows the file past the L1 table, where it counts, writes the snapshot table and
/// the new refcount structure around it, and the image ends clean.
#[test]
fn snapshot_table_and_refcounts_written_past_a_table_the_file_grows_over() {
    let found = repair_consistent(include_bytes!(
        "data/fuzz/repair-refused-rebuild-snapshot-table.img"
    ));
    assert_eq!(found, (0, 0));
}

/// An active L1 entry with flags and no offset makes the header's cluster an L2 table; the
/// repair cleared unknown autoclear bits (bytes of that table) after its final check, so its
/// report and a fresh check disagreed. Header writes now come before the final check.
#[test]
fn repair_reports_the_header_it_wrote() {
    repair_consistent(include_bytes!("data/fuzz/repair-header-in-l2-table.img"));
}

/// References past the end of the file far beyond where a new refcount structure goes: the
/// rebuild was refused for any such reference; it is refused now only for one that the new
/// structure could reach, and the repair ends where QEMU's does.
#[test]
fn rebuild_despite_references_far_past_the_end_of_the_file() {
    repair_like_qemu(include_bytes!(
        "data/fuzz/repair-rebuild-past-eof-reference.img"
    ));
}

/// Snapshot table entries without their extra data, and references past the end of the
/// file far beyond the file: the table was left as it was whenever any reference pointed past
/// the end of the file; it is written again now when neither it nor a new refcount structure
/// after it can reach them, and the repair ends where QEMU's does.
#[test]
fn rewrite_the_snapshot_table_despite_references_far_past_the_end_of_the_file() {
    repair_like_qemu(include_bytes!(
        "data/fuzz/repair-snapshot-table-past-eof-reference.img"
    ));
}

/// A snapshot table that itself runs past the end of the file: its own region counted as a
/// reference past the end of the file, so the repair would neither write the table again
/// (which stops referencing that region) nor rebuild the refcounts. The new table now goes
/// past the old one, and the repair ends where QEMU's does.
#[test]
fn rewrite_a_snapshot_table_that_runs_past_the_end_of_the_file() {
    repair_like_qemu(include_bytes!(
        "data/fuzz/repair-snapshot-table-past-eof.img"
    ));
}

/// A header declaring an active L1 table of 2.4 million entries in a file of 81 KiB: the
/// check allocated, zeroed and walked the whole table (twice per check) though every entry
/// past the end of the file reads as zero. It now reads only the entries the file holds;
/// QEMU judges the repaired image as qcow2d does. The refcount rebuild, refused while the
/// table ran over every place a new structure could go (2520 corruptions left), now grows
/// the file past the table, which then counts: 1957 remain. (QEMU's own repair of this
/// image stops at its overlap check, "Check failed", leaving 1424 corruptions: most of the
/// rest are L2 entries in tables that share clusters with other metadata, which qcow2d
/// never rewrites.)
#[test]
fn repair_an_l1_table_running_far_past_the_end_of_the_file() {
    let found = repair_consistent(include_bytes!("data/fuzz/check-l1-table-past-eof.img"));
    assert_eq!(found, (1957, 0));
}

/// The same image: its first check finds more messages than a report keeps, and the line
/// saying what the repair did to the refcounts (then why it refused) was dropped from the
/// report. The repair's own lines keep their room.
#[test]
fn repair_reports_what_it_does_behind_many_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("image.img");
    std::fs::write(
        &path,
        include_bytes!("data/fuzz/check-l1-table-past-eof.img"),
    )
    .unwrap();
    let before = check(&path, false).unwrap();
    assert!(
        before.messages.last().unwrap().starts_with("... and "),
        "{:?}",
        before.messages.last()
    );
    let repaired = check(&path, true).unwrap();
    assert_says(&repaired, "Growing the file to");
}

/// A header declaring a refcount table of 11009 clusters (5.4 MiB) in a file of 1 KiB: as
/// above, only the entries the file holds are read. The file (1025 bytes) ends inside a
/// sector: the active L1 table, 32 bytes at 0x600, ends less than a cluster past the end
/// QEMU sees (the length rounded up to whole sectors) and is counted, not a reference past
/// the end that stops the rebuild, so the repair leaves no error. (QEMU's own repair of this
/// image leaves 11016 corruptions.)
#[test]
fn repair_a_refcount_table_running_far_past_the_end_of_the_file() {
    let found = repair_consistent(include_bytes!(
        "data/fuzz/check-refcount-table-past-eof.img"
    ));
    assert_eq!(found, (0, 0));
}

/// Refcount blocks the first check cannot read (18 check errors, as in QEMU's), and 124 L2
/// entries with reserved bits and COPIED in L2 tables that share clusters with the refcount
/// table and data clusters. A rebuild of the refcounts uncovers COPIED flags the first check
/// could not judge (QEMU's skips the tables whose refcount it cannot read); the repair does
/// not rewrite those tables over what else their clusters hold, so the flags would stay: 709
/// corruptions after the repair where the check found 649. The repair rehearses the rebuild
/// (nothing written), finds it ends worse, and leaves the refcount structure as it is: 649
/// corruptions and the 18 check errors stay. (QEMU writes the tables in place and leaves 586
/// corruptions.)
#[test]
fn repair_uncovers_copied_flags_behind_unreadable_refcount_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("image.img");
    std::fs::write(
        &path,
        include_bytes!("data/fuzz/repair-uncovers-copied-flags.img"),
    )
    .unwrap();
    let before = check(&path, false).unwrap();
    assert_eq!(
        (before.corruptions, before.check_errors),
        (649, 18),
        "{before}"
    );
    let repaired = check(&path, true).unwrap();
    let again = check(&path, false).unwrap();
    assert_eq!(
        (again.corruptions, again.leaks, again.check_errors),
        (repaired.corruptions, repaired.leaks, repaired.check_errors),
    );
    assert_eq!(
        (again.corruptions, again.leaks, again.check_errors),
        (649, 0, 18)
    );
    assert_says(&repaired, "Not rebuilding the refcount structure: with the refcount blocks the check cannot read rebuilt, 709 corruptions");
    assert_eq!(qemu_counts(&path), (649, 0));
}

/// The same class, found by the `check_repair` fuzz target: 5 refcount blocks the check
/// cannot read, an active L1 table of 2.4 million entries over them, and L2 tables inside
/// that L1 table which data clusters also point into. The rebuild (after growing the file
/// past the L1 table) left 18961 corruptions where the check found 18346: 1593 COPIED flags
/// of data clusters behind the unreadable blocks, in a table the repair does not rewrite.
/// Rehearsed, the rebuild is refused now, and the repair ends with what the check found.
/// (QEMU's repair writes into the header's cluster until its overlap check stops it: 9148
/// corruptions and the 5 check errors.)
#[test]
fn repair_never_ends_worse_behind_unreadable_refcount_blocks() {
    let image =
        include_bytes!("data/fuzz/repair-rebuild-uncovers-copied-flags-in-shared-tables.img");
    let (_dir, path) = image_file(image);
    let before = check(&path, false).unwrap();
    assert_eq!(
        (before.corruptions, before.leaks, before.check_errors),
        (18346, 0, 5)
    );
    let found = repair_consistent(image);
    assert_eq!(found, (18346, 0));
}

/// L1 entries with COPIED pointing at invalid L2 tables (unaligned, or past the end of the
/// file) whose refcount is 0: the repair skipped those entries altogether, since it never
/// rewrites such tables, and left their flags, more corruptions than before. Like QEMU, it now
/// repairs the L1 entry's flag and still leaves the table.
#[test]
fn repair_copied_flags_of_l1_entries_naming_invalid_tables() {
    repair_like_qemu(include_bytes!(
        "data/fuzz/repair-copied-on-l1-entries-of-invalid-tables.img"
    ));
}

/// The active L1 table at offset 0 covers the header's refcount table offset (its entry 6)
/// and size. A rebuild of the refcount structure writes the new table's offset into that L1
/// entry: the new table is walked as an L2 table too, its entries as data clusters, and every
/// new refcount block is referenced twice. QEMU's repair rebuilds anyway and adds
/// corruptions: 14 become 21 in the first image (which has no refcount table; an L1 and an L2
/// entry point just past the end of the file, where the new structure goes), 118 become 122
/// in the second (found by the `check_repair` fuzz target as a repair that adds
/// corruptions). qcow2d's repair says why it does not rebuild there and leaves what it found.
#[test]
fn repair_does_not_rebuild_refcounts_whose_offset_an_l1_entry_holds() {
    let images: [(&[u8], u64); 2] = [
        (
            include_bytes!("data/fuzz/repair-new-refcount-table-where-an-entry-points.img"),
            14,
        ),
        (
            include_bytes!("data/fuzz/repair-l1-over-refcount-table-fields.img"),
            118,
        ),
    ];
    for (image, corruptions) in images {
        let (dir, path) = image_file(image);
        let before = check(&path, false).unwrap();
        let repaired = check(&path, true).unwrap();
        assert_says(
            &repaired,
            "Not rebuilding the refcount structure: the active L1 table at 0x0 covers",
        );
        let again = check(&path, false).unwrap();
        assert_eq!(
            (again.corruptions, again.leaks, again.check_errors),
            (repaired.corruptions, repaired.leaks, repaired.check_errors),
        );
        assert_eq!(
            (before.corruptions, again.corruptions),
            (corruptions, corruptions)
        );
        assert_eq!(qemu_counts(&path), (again.corruptions, again.leaks));
        let theirs = dir.path().join("theirs.img");
        std::fs::write(&theirs, image).unwrap();
        let _ = qemu_img_cmd()
            .args(["check", "-q", "-r", "all", "-f", "qcow2"])
            .arg(&theirs)
            .output()
            .expect("cannot run qemu-img (is qemu-utils installed?)");
        assert!(
            qemu_counts(&theirs).0 > corruptions,
            "QEMU's repair rebuilds there"
        );
    }
}

/// Found by the `check_repair` fuzz target: the L1 table of snapshot 0 covers the header's
/// refcount table offset and size. The repair wrote the snapshot table again at 64 MiB (to
/// complete its entry) and then could not rebuild the refcounts around it: 62 corruptions
/// became 163 (after QEMU's repair, 168). The table is written again only where the refcount
/// repair after it can be made: rehearsed, the rebuild through that L1 table leaves 9
/// corruptions (58 without it), and is made.
#[test]
fn repair_writes_the_snapshot_table_only_where_refcounts_can_be_rebuilt_around_it() {
    let (corruptions, _) = repair_consistent(include_bytes!(
        "data/fuzz/repair-snapshot-l1-over-refcount-table-fields.img"
    ));
    assert_eq!(corruptions, 9);
}

/// Found by the `check_repair` fuzz target: the L1 table of snapshot 0 lies at offset 0 and
/// covers the header's refcount table offset and size (its entry 6), and the refcount
/// structure must be rebuilt. The repair refused any rebuild there and left the 116
/// corruptions and 11 leaks it found, where QEMU's repair rebuilds and leaves 79 and 1.
/// Rehearsed against the repair without it, the rebuild through that table (which changes
/// only what the snapshot reads of the image's own refcount table) ends with fewer errors,
/// and is made: fewer corruptions than QEMU leaves.
#[test]
fn repair_rebuilds_through_a_snapshot_l1_table_over_the_header_where_that_ends_better() {
    let image =
        include_bytes!("data/fuzz/repair-rebuild-through-a-snapshot-l1-over-the-header.img");
    let (dir, path) = image_file(image);
    let repaired = check(&path, true).unwrap();
    assert!(
        repaired.messages.iter().any(|m| m
            .starts_with("The L1 table of snapshot table entry 0 covers")
            && m.ends_with("; rebuilding through it")),
        "{:?}",
        repaired.messages
    );
    let ours = repair_consistent(image);
    assert_eq!(ours, (75, 2));
    let theirs = dir.path().join("theirs.img");
    std::fs::write(&theirs, image).unwrap();
    let _ = qemu_img_cmd()
        .args(["check", "-q", "-r", "all", "-f", "qcow2"])
        .arg(&theirs)
        .output()
        .expect("cannot run qemu-img (is qemu-utils installed?)");
    let qemu = qemu_counts(&theirs);
    assert!(ours.0 < qemu.0, "qcow2d leaves {ours:?}, QEMU {qemu:?}");
}

/// Found by replaying the `check_repair` corpus against `qemu-img check`: after the repair,
/// qcow2d counted 212 corruptions where QEMU counts 211 in the same file. The file (1049
/// bytes) ends inside a sector, and QEMU sees its length rounded up to whole sectors: the
/// active L1 table, 32 bytes at 0x600, ends less than a cluster past that end and is counted,
/// where qcow2d judged it against the unrounded length and reported it past the end.
#[test]
fn repaired_image_counted_like_qemu() {
    repair_consistent(include_bytes!("data/fuzz/repair-counted-unlike-qemu.img"));
}

/// Found by the `check_repair` fuzz target: a fresh check of the repaired image counted 570
/// corruptions where the repair's own double check counted 571. The snapshot table shares
/// clusters with L2 tables; clearing a COPIED flag in one cleared the top bit of a snapshot's
/// L1 size (0x80000000, too large, became 0), and the double check still walked the table the
/// repair had read at the start. It reads the table from the file again now.
#[test]
fn repair_double_check_agrees_with_a_fresh_check() {
    repair_consistent(include_bytes!(
        "data/fuzz/repair-double-check-unlike-a-fresh-check.img"
    ));
}

/// Found by replaying an input the `check_repair` fuzz target found against `qemu-img check`:
/// after qcow2d's repair, QEMU counted 9674 corruptions in the file where qcow2d counted 9673.
/// A reference reaches less than a cluster past the end of the file, so QEMU counts the
/// cluster after the end; a refcount block there is inside what it counts, not "outside
/// image": its reference is past the end of the file (one corruption) and its refcount is not
/// 1 (another). qcow2d judged the block by the file's clusters alone and counted one.
#[test]
fn repaired_image_counted_like_qemu_2() {
    repair_consistent(include_bytes!("data/fuzz/repair-counted-unlike-qemu-2.img"));
}

/// Found by replaying inputs the `check_repair` fuzz target found against `qemu-img check`:
/// images of 512-byte clusters with hundreds of references past the end of the file and L1
/// entries with reserved bits set. After qcow2d's repair, QEMU counts more corruptions in the
/// file than qcow2d's check does: 2518 against 2517, 26057 against 24012, 12762 against
/// 12570, 20460 against 20386, 61742 against 59935. Several active L1 entries name the same
/// L2 table: QEMU checks its COPIED flags once per L1 entry and counts its errors each time,
/// where qcow2d counted them once.
#[test]
fn repaired_images_with_references_past_eof_counted_like_qemu() {
    let images: [(&str, &[u8]); 5] = [
        (
            "1",
            include_bytes!("data/fuzz/repair-past-eof-counted-unlike-qemu-1.img"),
        ),
        (
            "2",
            include_bytes!("data/fuzz/repair-past-eof-counted-unlike-qemu-2.img"),
        ),
        (
            "3",
            include_bytes!("data/fuzz/repair-past-eof-counted-unlike-qemu-3.img"),
        ),
        (
            "4",
            include_bytes!("data/fuzz/repair-past-eof-counted-unlike-qemu-4.img"),
        ),
        (
            "5",
            include_bytes!("data/fuzz/repair-past-eof-counted-unlike-qemu-5.img"),
        ),
    ];
    let failed: Vec<&str> = images
        .iter()
        .filter(|(_, image)| std::panic::catch_unwind(|| repair_consistent(image)).is_err())
        .map(|(name, _)| *name)
        .collect();
    assert!(
        failed.is_empty(),
        "images {failed:?} are judged differently"
    );
}

/// Every image of the `check_repair` fuzz target's corpus (`fuzz/corpus/check_repair/`)
/// that the check takes: what the fuzz target asserts (the repair agrees with a second
/// check, adds no corruption, and where the first check could not read every refcount
/// block, leaves no more corruptions and leaks than it found), and QEMU judges
/// the repaired image as qcow2d does. `qemu-img` is too slow a process to run in the fuzzing
/// loop, so the corpus meets it here.
#[test]
fn repair_the_check_repair_corpus_as_qemu_judges_it() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/check_repair");
    let mut files: Vec<_> = std::fs::read_dir(&corpus)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", corpus.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(
        files.len() >= 10,
        "{} holds too few images",
        corpus.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("image.img");
    let mut repaired_images = 0;
    let mut failures = Vec::new();
    for file in files {
        let name = file.display();
        std::fs::copy(&file, &path).unwrap();
        if names_other_files(&std::fs::read(&path).unwrap()) {
            continue; // QEMU would need them; the corpus does not hold them.
        }
        if qemu_counts_or_refusal(&path).is_err() {
            continue; // QEMU does not open it (qcow2d may): nothing to compare with.
        }
        let Ok(before) = check(&path, false) else {
            continue;
        };
        let Ok(repaired) = check(&path, true) else {
            continue;
        };
        let again = check(&path, false).unwrap();
        let ours = (again.corruptions, again.leaks);
        if (again.corruptions, again.leaks, again.check_errors)
            != (repaired.corruptions, repaired.leaks, repaired.check_errors)
        {
            failures.push(format!(
                "{name}: a second check disagrees with the repair's"
            ));
        } else if again.corruptions > before.corruptions {
            failures.push(format!("{name}: the repair added corruptions"));
        } else if before.check_errors > 0
            && again.corruptions + again.leaks > before.corruptions + before.leaks
        {
            failures.push(format!(
                "{name}: the repair left more errors behind unreadable refcount blocks"
            ));
        } else if qemu_counts(&path) != ours {
            failures.push(format!(
                "{name}: QEMU judges qcow2d's repair, {ours:?}, as {:?}",
                qemu_counts(&path)
            ));
        }
        repaired_images += 1;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        repaired_images >= 10,
        "only {repaired_images} images repaired"
    );
}

/// Whether a QCOW2 header names a backing file or (version 3) an external data file.
fn names_other_files(image: &[u8]) -> bool {
    let be64 = |at: usize| {
        image
            .get(at..at + 8)
            .map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap()))
    };
    let be32 = |at: usize| {
        image
            .get(at..at + 4)
            .map_or(0, |b| u32::from_be_bytes(b.try_into().unwrap()))
    };
    let backing = be64(8) != 0;
    let data_file = be32(4) >= 3 && be64(72) & (1 << 2) != 0;
    backing || data_file
}

/// A version 3 snapshot table entry without its extra data, and an L2 table named just past
/// the end of the file: writing the table again at the end of the file would have grown the
/// file over that reference, so the repair left the table. It now goes into a cluster nothing
/// references (here a leaked one), as QEMU's does, and the repair ends where QEMU's does.
#[test]
fn rewrite_the_snapshot_table_into_a_free_cluster() {
    let (corruptions, leaks) = repair_consistent(include_bytes!(
        "data/fuzz/repair-snapshot-table-into-free-cluster.img"
    ));
    assert_eq!((corruptions, leaks), (1, 0));
    repair_like_qemu(include_bytes!(
        "data/fuzz/repair-snapshot-table-into-free-cluster.img"
    ));
}

/// An active L1 entry with flags and no offset makes the header's cluster an L2 table, so
/// the header's refcount table offset is walked as a data cluster. A rebuild points the
/// header at the new table, which moved that reference: the repair left a leak (the old
/// table's cluster) and a corruption (the new one's). It now counts again after a rebuild
/// and fixes what moved in place: 8 corruptions remain, where QEMU's repair leaves 9.
#[test]
fn repair_counts_again_after_a_rebuild_moved_a_reference() {
    let found = repair_consistent(include_bytes!(
        "data/fuzz/repair-rebuild-moves-a-header-reference.img"
    ));
    assert_eq!(found, (8, 0));
}

extern "C" fn ignore_signal(_: libc::c_int) {}

/// Signals arriving while a blocking operation waits (libFuzzer's timer found it; in the
/// daemon SIGHUP, SIGTERM or a profiler's signals do the same): io_uring_enter returns the
/// count it submitted when a signal ends the wait, before the completion is there. A wait
/// taken as done then failed a clean close ("io_uring returned no completion").
#[test]
fn blocking_io_survives_signals_during_the_wait() {
    use qcow2d_engine::io::BlockingReader;
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    // SAFETY: a handler that does nothing, installed without SA_RESTART so that waits are
    // interrupted; SIGUSR2 is not used by anything else in this test binary.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = ignore_signal as *const () as usize;
        libc::sigemptyset(&mut action.sa_mask);
        assert_eq!(
            libc::sigaction(libc::SIGUSR2, &action, std::ptr::null_mut()),
            0
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(dir.path().join("f"))
        .unwrap();
    let fd = file.as_raw_fd();
    // SAFETY: pthread_self has no preconditions.
    let target = unsafe { libc::pthread_self() };
    let stop = Arc::new(AtomicBool::new(false));
    let signaller = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: `target` is the test thread, alive until it sets `stop` and joins
                // this thread.
                unsafe { libc::pthread_kill(target, libc::SIGUSR2) };
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
        })
    };
    let mut reader = BlockingReader::new().unwrap();
    let block = vec![0x5au8; 64 << 10];
    let mut back = vec![0u8; 64 << 10];
    let mut failure = None;
    for i in 0..2000u64 {
        let offset = (i % 64) * (64 << 10);
        let done = reader
            .write_all_at(fd, &block, offset)
            .and_then(|()| reader.fdatasync(fd))
            .and_then(|()| reader.read_exact_at(fd, &mut back, offset));
        if let Err(e) = done {
            failure = Some(format!("operation {i}: {e}"));
            break;
        }
        assert!(back == block, "operation {i}: read back other bytes");
    }
    stop.store(true, Ordering::Relaxed);
    signaller.join().unwrap();
    assert_eq!(failure, None, "a signal broke a blocking operation");
}

/// Two shards of a 512-byte-cluster image: writes, then a discard and a flush in one batch,
/// then writes; the final `flush_blocking` of the first shard never returned (most runs).
/// The second shard's durable refcount writes, started after its last reservation, held the
/// right to write refcount blocks once its requests were done; `in_flight()` said 0, nobody
/// polled it any more, and the first shard's flush waited for the right forever. Found by
/// `fuzz/image_ops` (its input, decoded: layout 0, two shards, three batches). Fails after a
/// minute instead of hanging.
#[test]
fn two_shards_flush_after_discard_and_flush() {
    use qcow2d_engine::{Image, OpenOptions, ShardConfig};
    let dir = tempfile::tempdir().unwrap();
    let path = create_qcow2_in(dir.path(), "a.qcow2", "cluster_size=512", "2M");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let opts = OpenOptions {
            read_only: false,
            ..OpenOptions::default()
        };
        let image = Image::open(&path, &opts).unwrap();
        let mut shards = image.new_shards(&ShardConfig::default(), 2).unwrap();
        let sectors = 4096u64;
        // (shard, kind, first sector, sectors): 0 write, 1 discard, 2 read.
        let batches: [&[(usize, u8, u64, u64)]; 3] = [
            &[(0, 0, 22359, 87), (1, 0, 10954, 133)],
            &[(0, 1, 62208, 2101)],
            &[(0, 0, 17224, 17), (1, 2, 0, 1)],
        ];
        let mut out = Vec::new();
        for (b, batch) in batches.iter().enumerate() {
            let mut bufs = Vec::new();
            for (i, &(s, kind, sector, count)) in batch.iter().enumerate() {
                let start = sector % sectors;
                let count = count.clamp(1, sectors - start);
                let (off, len) = (start * 512, count * 512);
                let mut buf = vec![0x5au8; len as usize];
                let iov = [libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: buf.len(),
                }];
                let token = i as u64;
                match kind {
                    // SAFETY: `buf` is kept in `bufs` until the batch is drained.
                    0 => unsafe { shards[s].submit_write(token, off, &iov) }.unwrap(),
                    1 => shards[s].submit_discard(token, off, len).unwrap(),
                    // SAFETY: as above.
                    _ => unsafe { shards[s].submit_read(token, off, &iov) }.unwrap(),
                }
                bufs.push(buf);
            }
            if b == 1 {
                shards[0].submit_flush(u64::MAX).unwrap();
            }
            while shards.iter().any(|s| s.in_flight() > 0) {
                for s in shards.iter_mut() {
                    s.poll(&mut out);
                }
                std::thread::yield_now();
            }
            assert!(out.drain(..).all(|c| c.result.is_ok()));
        }
        for s in &mut shards {
            s.flush_blocking().unwrap();
            s.release_reserved();
        }
        drop(shards);
        image.close().unwrap();
        let _ = tx.send(());
    });
    rx.recv_timeout(std::time::Duration::from_secs(60))
        .expect("the flushes did not end within a minute");
}

/// Found by the repair comparison over the `image_read` corpus: an active L1 table at offset
/// 0 (its entries are the header's first 32 bytes) with 1-bit refcounts, whose reference to
/// the header's cluster overflows, so that cluster counted 1, as if nothing shared it. Once a
/// repair that grows the file made the refcounts right, the COPIED fix set the flag of L1
/// entry 3, the virtual size: the repaired header was invalid and the repair failed. The
/// header's cluster is never written as an L1 or L2 table now: 32792 corruptions become 19
/// (QEMU's repair leaves 17).
#[test]
fn repair_never_writes_a_copied_flag_into_the_header() {
    let found = repair_consistent(include_bytes!(
        "data/fuzz/repair-copied-flag-in-the-header.img"
    ));
    assert_eq!(found, (19, 0));
}

/// An active L1 entry with flags and no offset makes the header's cluster an L2 table, whose
/// entries (the header's fields) name the active L1 table and the refcount table as data
/// clusters. Reads take that L1 entry as unallocated, so those are no guest data; the repair
/// took them as other users of the L1 table's cluster and left 8 wrong COPIED flags of L1
/// entries there (40 corruptions; QEMU's repair leaves 34). It discounts them now, fixes the
/// flags, and leaves 32.
#[test]
fn repair_copied_flags_in_an_l1_table_the_header_names() {
    let image = include_bytes!("data/fuzz/repair-l1-table-named-by-the-header-as-l2-table.img");
    let (_dir, path) = image_file(image);
    let before = check(&path, false).unwrap();
    assert_eq!((before.corruptions, before.leaks), (43, 6));
    assert_eq!(repair_consistent(image), (32, 0));
}

/// Found by the repair comparison: 2-bit refcounts, and L2 tables in the refcount table's
/// cluster (0x200) and others that more references name than 2 bits count. The count stopped
/// at 3, equal to the L1 entries naming the table, so the repair took the tables as theirs
/// alone and cleared COPIED flags in them, over the refcount table (1316 corruptions became
/// 1286). A cluster whose count overflowed is never taken as one table's alone now, and the
/// repair leaves those tables as they are.
#[test]
fn repair_never_writes_a_table_in_a_cluster_whose_count_overflowed() {
    let image = include_bytes!("data/fuzz/repair-l2-table-in-an-overflowed-cluster.img");
    let (_dir, path) = image_file(image);
    assert_eq!(check(&path, false).unwrap().corruptions, 1316);
    let repaired = check(&path, true).unwrap();
    assert!(
        repaired.messages.iter().any(|m| m
            == "Not rewriting the L2 table at 0x200: its cluster is also used by other metadata"),
        "{:?}",
        repaired.messages
    );
    assert_eq!(repair_consistent(image), (1316, 0));
}

/// Made after the `check_repair` fuzz target found repairs that grow the file past regions
/// that ran past its end and then leave more corruptions (the inputs were not kept): 1-bit
/// refcounts, no free cluster in the file, an L2 table that both active L1 entries name, and
/// in it five entries naming the cluster just past the end of the file (and one the refcount
/// block, which makes the structure be rebuilt). The new structure goes past the end, so the
/// file grew over that cluster, which then counted ten references: nine overflow the 1-bit
/// refcount, and its refcount of 1 wants COPIED flags in a table the repair does not rewrite
/// (shared): 14 corruptions became 22, and the rehearsed rebuild was refused. The L2 table
/// named twice overflows the width already: the repair widens the refcounts to 16 bits, where
/// every count fits, and leaves the image clean (QEMU's repair leaves the 14).
#[test]
fn repair_widens_refcounts_that_references_overflow_where_the_file_grows() {
    let image = include_bytes!("data/fuzz/repair-grown-refcounts-overflow.img");
    let (_dir, path) = image_file(image);
    let before = check(&path, false).unwrap();
    assert_eq!((before.corruptions, before.leaks), (14, 0), "{before}");
    assert_widened(&path);
    assert_eq!(repair_consistent(image), (0, 0));
}

/// The repair of the image at `path` widens its 1-bit refcounts to 16 bits.
fn assert_widened(path: &Path) {
    let repaired = check(path, true).unwrap();
    assert_says(&repaired, "Widened the refcounts from 1 to 16 bits");
}

/// `report` has a message that begins with `start`.
fn assert_says(report: &check::CheckReport, start: &str) {
    assert!(
        report.messages.iter().any(|m| m.starts_with(start)),
        "no message begins with {start:?}: {:#?}",
        report.messages
    );
}

/// The same with 2- and 4-bit refcounts, made by hand: an L2 table that also names itself as a
/// data cluster (so the repair does not rewrite it), and in it 10 (24) entries with COPIED
/// naming the cluster just past the end of the file, whose stored refcount is 1. Grown over
/// it, the file counted it 10 (24) times: the count overflowed the width, and the flags, right
/// while the stored refcount was 1, were wrong at the maximum; 14 corruptions became 17, 28
/// became 33. Rehearsed, the rebuild is refused now. (QEMU's repair counts fewer errors, 10
/// and 12, by writing its new refcount block into that cluster, where the 10 (24) entries
/// point: guest data there would overwrite refcounts.)
#[test]
fn repair_does_not_grow_the_file_where_references_overflow_2_and_4_bit_refcounts() {
    let images: [(&[u8], u64, u64); 2] = [
        (
            include_bytes!("data/fuzz/repair-grown-refcounts-overflow-2bit.img"),
            14,
            17,
        ),
        (
            include_bytes!("data/fuzz/repair-grown-refcounts-overflow-4bit.img"),
            28,
            33,
        ),
    ];
    assert_rebuild_refused(&images);
}

/// Found by the `check_repair` fuzz target (minimized): 1-bit refcounts, a refcount
/// structure to rebuild, a snapshot table to write again (an entry without its extra data)
/// and many references past the end of the file. The repair grew the file (to 64, 96 and 8
/// MiB) so that the new structures went clear of them; counted there, their clusters
/// overflowed the 1-bit refcounts, and 251 corruptions became 255, 172 became 173, 45 became
/// 48. Rehearsed, the rebuild was refused and the repair left what the check found. In
/// the last two, references overflow the width already: the repair widens the refcounts to
/// 16 bits now, and leaves 81 and 31 corruptions. In the first, the header's cluster is used
/// by other metadata, which the new width in the header would change: not widened, the
/// rebuild is refused as before. (QEMU's repair stops at its overlap check, "Check failed",
/// and leaves images its check cannot read, "File too large", but for the last one.)
#[test]
fn repair_does_not_grow_the_file_where_found_references_overflow() {
    assert_rebuild_refused(&[(
        include_bytes!("data/fuzz/repair-grown-refcounts-overflow-found.img"),
        251,
        255,
    )]);
    let widened: [(&[u8], u64, u64); 2] = [
        (
            include_bytes!("data/fuzz/repair-grown-refcounts-overflow-found-2.img"),
            172,
            81,
        ),
        (
            include_bytes!("data/fuzz/repair-grown-refcounts-overflow-found-3.img"),
            45,
            31,
        ),
    ];
    for (image, found, left) in widened {
        let (_dir, path) = image_file(image);
        assert_eq!(check(&path, false).unwrap().corruptions, found);
        assert_widened(&path);
        assert_eq!(repair_consistent(image), (left, 0));
    }
}

/// Made by hand while looking for repairs that add corruptions without growing the file:
/// 2-bit refcounts, an L2 table that names itself as a data cluster (so the repair does not
/// rewrite it), with COPIED set there and on two entries naming one data cluster, whose
/// stored refcounts say 1. The refcounts fixed in place (2 for both clusters) made the
/// three flags wrong in a table the repair leaves: 2 corruptions became 3. Such an in-place
/// repair is rehearsed now, and refused. (QEMU's repair rewrites the table anyway and ends
/// clean.)
#[test]
fn repair_does_not_fix_refcounts_in_place_where_flags_it_cannot_fix_would_turn_wrong() {
    let image = include_bytes!("data/fuzz/repair-in-place-copied-in-a-shared-table.img");
    let (_dir, path) = image_file(image);
    let before = check(&path, false).unwrap();
    assert_eq!((before.corruptions, before.leaks), (2, 0), "{before}");
    let repaired = check(&path, true).unwrap();
    assert_says(&repaired, "Not repairing the refcounts: rehearsed, the repair would leave 3 corruptions where the check found 2");
    assert_eq!(repair_consistent(image), (2, 0));
}

/// Each image (with the corruptions its check finds, and those the repair with a rebuilt
/// refcount structure would leave) is repaired without the rebuild, which the report says
/// was rehearsed and refused, and ends with what the check found.
fn assert_rebuild_refused(images: &[(&[u8], u64, u64)]) {
    for &(image, found, rehearsed) in images {
        let (_dir, path) = image_file(image);
        let before = check(&path, false).unwrap();
        assert_eq!((before.corruptions, before.leaks), (found, 0), "{before}");
        let repaired = check(&path, true).unwrap();
        let refusal = format!("Not rebuilding the refcount structure: rehearsed, the repair with a new one would leave {rehearsed} corruptions where the check found {found}");
        assert!(
            repaired.messages.contains(&refusal),
            "{:?}",
            repaired.messages
        );
        assert_eq!(repair_consistent(image), (found, 0));
    }
}
