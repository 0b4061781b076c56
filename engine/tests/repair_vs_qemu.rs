//! Side-by-side comparison of `check --repair` with `qemu-img check -r all` on a directory of
//! damaged images (a fuzzer's corpus, for one). Ignored by default: run it with
//!
//! ```text
//! QCOW2D_REPAIR_INPUTS=DIR cargo test -p qcow2d-engine --test repair_vs_qemu -- --ignored --nocapture
//! ```
//!
//! (without the variable it reads `fuzz/corpus/check_repair` and `engine/tests/data/fuzz`).
//! For each input qcow2d checks can open, one copy is repaired by qcow2d and another by QEMU;
//! it prints the corruptions and leaks each side leaves (as `qemu-img check` counts them),
//! marks the inputs where QEMU's repair leaves fewer errors (fewer corruptions, or as many
//! and fewer leaks), apart from those where QEMU's repair stopped ("Check failed": its overlap
//! check refused a write and it marked the image corrupt, rewriting the header's cluster on
//! the way), and fails if qcow2d's repair is
//! inconsistent on any input (a second check disagrees with the repair's own, the repair
//! added corruptions, or QEMU judges qcow2d's repaired image differently from qcow2d).

use qcow2d_tests::{qemu_img_bounded_cmd, require_tool};
use std::path::{Path, PathBuf};

use qcow2d_engine::check;

/// `qemu-img check`'s (corruptions, leaks) of `path`; `None` when it gives no report.
fn qemu_counts(path: &Path) -> Option<(u64, u64)> {
    let out = qemu_img_bounded_cmd()
        .args(["check", "--output=json", "-f", "qcow2"])
        .arg(path)
        .output()
        .expect("cannot run prlimit, timeout and qemu-img (util-linux, coreutils, qemu-utils)");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let n = |k: &str| v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    Some((n("corruptions"), n("leaks")))
}

fn inputs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dirs: Vec<PathBuf> = match std::env::var_os("QCOW2D_REPAIR_INPUTS") {
        Some(d) => std::env::split_paths(&d).collect(),
        None => vec![
            root.join("../fuzz/corpus/check_repair"),
            root.join("tests/data/fuzz"),
        ],
    };
    let mut files = Vec::new();
    for d in dirs {
        let rd = std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        for e in rd {
            let p = e.unwrap().path();
            if p.is_file() {
                files.push(p);
            }
        }
    }
    files.sort();
    files
}

/// What one input gave.
enum Outcome {
    /// qcow2d's check cannot open it (as the fuzz target, the input is skipped).
    Skipped,
    /// QEMU's check cannot open it: nothing to compare with.
    QemuCannotCheck,
    /// qcow2d's repair failed or was inconsistent: why.
    Inconsistent(String),
    /// (qcow2d's result, QEMU's result) as QEMU counts them, and whether QEMU's repair
    /// stopped ("Check failed"); QEMU's result is `None` when its repair left an image it
    /// cannot check.
    Compared((u64, u64), Option<(u64, u64)>, bool),
}

fn compare_one(input: &Path, dir: &Path) -> Outcome {
    let bytes = std::fs::read(input).unwrap();
    let ours = dir.join("ours.img");
    let theirs = dir.join("theirs.img");
    std::fs::write(&ours, &bytes).unwrap();
    std::fs::write(&theirs, &bytes).unwrap();
    let Ok(before) = check(&ours, false) else {
        return Outcome::Skipped;
    };
    if qemu_counts(&theirs).is_none() {
        // A data file or backing file QEMU cannot open, for one.
        return Outcome::QemuCannotCheck;
    }
    let repaired = match check(&ours, true) {
        Ok(r) => r,
        Err(e) => return Outcome::Inconsistent(format!("the repair failed: {e}")),
    };
    if std::env::var_os("QCOW2D_REPAIR_VERBOSE").is_some() {
        println!("{}\n{repaired}", repaired.messages.join("\n"));
    }
    let again = match check(&ours, false) {
        Ok(r) => r,
        Err(e) => return Outcome::Inconsistent(format!("the repaired image fails: {e}")),
    };
    let key = |r: &qcow2d_engine::CheckReport| (r.corruptions, r.leaks, r.check_errors);
    if key(&again) != key(&repaired) {
        return Outcome::Inconsistent(format!(
            "a second check {:?} disagrees with the repair's {:?}",
            key(&again),
            key(&repaired)
        ));
    }
    if again.corruptions > before.corruptions {
        return Outcome::Inconsistent(format!(
            "the repair added corruptions: {} before, {} after",
            before.corruptions, again.corruptions
        ));
    }
    let ours_counts = (again.corruptions, again.leaks);
    let qemu_of_ours = qemu_counts(&ours);
    if qemu_of_ours != Some(ours_counts) {
        return Outcome::Inconsistent(format!(
            "QEMU counts qcow2d's repaired image as {qemu_of_ours:?}, qcow2d as {ours_counts:?}"
        ));
    }
    // Its result is judged by the check that follows, whatever its exit status.
    let out = qemu_img_bounded_cmd()
        .args(["check", "-q", "-r", "all", "-f", "qcow2"])
        .arg(&theirs)
        .output()
        .expect("cannot run prlimit, timeout and qemu-img (util-linux, coreutils, qemu-utils)");
    let stopped = String::from_utf8_lossy(&out.stderr).contains("Check failed");
    Outcome::Compared(ours_counts, qemu_counts(&theirs), stopped)
}

#[test]
#[ignore = "a comparison to run by hand over a corpus of damaged images"]
fn compare_repair_with_qemu() {
    require_tool("qemu-img", "qemu-utils");
    let files = inputs();
    let dir = tempfile::tempdir().unwrap();
    let (mut compared, mut skipped, mut worse, mut better) = (0, 0, 0, 0);
    let (mut qemu_failed, mut qemu_cannot, mut worse_stopped) = (0, 0, 0);
    let mut bad = Vec::new();
    println!("input\tqcow2d(corruptions,leaks)\tqemu(corruptions,leaks)\tverdict");
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        match compare_one(f, dir.path()) {
            Outcome::Skipped => skipped += 1,
            Outcome::QemuCannotCheck => {
                qemu_cannot += 1;
                println!("{name}\t-\t-\tQEMU cannot check it");
            }
            Outcome::Inconsistent(why) => {
                println!("{name}\t-\t-\tINCONSISTENT: {why}");
                bad.push(format!("{name}: {why}"));
            }
            Outcome::Compared(ours, theirs, stopped) => {
                compared += 1;
                let verdict = match theirs {
                    None => {
                        qemu_failed += 1;
                        "qemu's repaired image cannot be checked"
                    }
                    Some(t) if t < ours && stopped => {
                        worse_stopped += 1;
                        "QEMU-fewer, but its repair stopped (Check failed)"
                    }
                    Some(t) if t < ours => {
                        worse += 1;
                        "QEMU-FEWER"
                    }
                    Some(t) if t > ours => {
                        better += 1;
                        "qcow2d-fewer"
                    }
                    Some(_) => "same",
                };
                println!("{name}\t{ours:?}\t{theirs:?}\t{verdict}");
            }
        }
    }
    println!(
        "{} inputs: {compared} compared, {skipped} skipped (qcow2d cannot check them), {qemu_cannot} QEMU cannot check, {} inconsistent; QEMU leaves fewer errors on {worse} (and on {worse_stopped} where its repair stopped), qcow2d on {better}; QEMU's repair left {qemu_failed} uncheckable",
        files.len(),
        bad.len()
    );
    assert!(bad.is_empty(), "inconsistent repairs:\n{}", bad.join("\n"));
}
