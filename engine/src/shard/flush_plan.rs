//! The order of a flush's or a write-back's metadata writes, as data: a pure planner from a
//! snapshot of what is dirty to an ordered list of steps. No I/O and no shared state: the
//! shard (`flush.rs`) takes the snapshot, asks for the plan and executes it step by step, each
//! step's writes all complete before the next step starts. Tests record what the executor
//! submitted and enumerate the crash states the plan allows (`engine/tests/crash_states.rs`).
//!
//! A **flush** (hard) makes every completed write durable:
//! 1. refcount blocks, then fdatasync of the image (and the external data file): every cluster
//!    an entry below may point at has a durable refcount, and every guest write that completed
//!    before the flush is durable (invariants 1 and 2);
//! 2. a grown or moved refcount table, fdatasync; the header that points at it, fdatasync;
//! 3. the right to write refcount blocks goes back (what this run wrote is durable);
//! 4. L2 tables, fdatasync;
//! 5. L1 entries, fdatasync: a table is durable before the entry that points at it.
//!
//! A **write-back** only puts metadata into the file (a killed process loses nothing it
//! acknowledged) and syncs only where an ordering needs it, since each of its writes may
//! become durable at any moment: refcount blocks are written durably one by one (RWF_DSYNC)
//! unless a sync is due anyway (data that must be durable under the entries, a moved table);
//! L2 chunks are written in place at once (pwrite); an fdatasync separates new L2 tables from
//! the L1 entries that point at them; then the waiting writes complete.
//!
//! With lazy refcounts no refcount block is written (they are written at close), but a flush
//! still syncs first: the data under the entries, and the file's new length.
#![forbid(unsafe_code)]

/// One metadata write into the image file.
pub(crate) struct PlannedWrite {
    /// Host offset in the image file.
    pub host: u64,
    pub bytes: Box<[u8]>,
    /// What is written (a [`crate::meta::class`]), for the overlap check before submission.
    pub class: u8,
}

/// How the writes of one step are submitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WriteMode {
    /// Together through the ring; durable at the next sync.
    Queued,
    /// Together through the ring, each durable when it completes (RWF_DSYNC): a few blocks
    /// made durable without syncing everything else that is dirty in the file.
    Durable,
    /// Small writes into the page cache done at once on the shard thread (pwrite): cheaper
    /// than a trip through the kernel's io_uring workers, which buffered writes take.
    Inline,
}

/// One step of a plan; the executor starts a step once every write of the one before has
/// completed.
pub(crate) enum Step {
    /// Writes to submit together.
    Write {
        mode: WriteMode,
        writes: Vec<PlannedWrite>,
    },
    /// fdatasync of the image file, and of the external data file when `data_file`.
    Sync { data_file: bool },
    /// The writes waiting for this write-back have what they need: complete them (the rest
    /// of the run goes on without holding them).
    Complete,
    /// The refcount blocks (and table) this run wrote are durable: other shards may write
    /// refcount blocks again (`Writable::take_block_writes`).
    EndBlockWrites,
}

/// A grown or moved refcount table and the header that points at it.
pub(crate) struct MovedTable {
    pub table: PlannedWrite,
    pub header: PlannedWrite,
}

/// A snapshot of what one run writes, taken by the shard when the run starts.
pub(crate) struct Dirty {
    /// A flush (durability promised) rather than a write-back.
    pub hard: bool,
    /// Refcounts are written only at close.
    pub lazy_refcounts: bool,
    /// The run holds the right to write refcount blocks (see [`takes_block_right`]) and has
    /// something to write under it; it gives the right back once that is durable.
    pub holds_block_right: bool,
    /// Dirty refcount blocks (only with the right).
    pub refcount_blocks: Vec<PlannedWrite>,
    /// A refcount table that grew or moved (only with the right).
    pub moved_table: Option<MovedTable>,
    /// Whole L2 tables (a flush) or their changed 512-byte chunks (a write-back).
    pub l2: Vec<PlannedWrite>,
    /// L1 entries of new or copied tables.
    pub l1: Vec<PlannedWrite>,
    /// Data under the entries must be durable before they are written (copy-on-write data,
    /// a reused cluster, the file's new length with lazy refcounts).
    pub sync_data_first: bool,
    /// The image has an external data file, synced with the image before the entries.
    pub data_file: bool,
}

/// Whether a run must hold the right to write refcount blocks: a flush always (it proves
/// every reservation so far durable), a write-back when an entry it writes points into a
/// reservation whose refcounts are not durable yet; never with lazy refcounts.
pub(crate) fn takes_block_right(
    hard: bool,
    lazy_refcounts: bool,
    references_undurable: bool,
) -> bool {
    !lazy_refcounts && (hard || references_undurable)
}

/// The steps of a run, in order. See the module documentation for why this order.
pub(crate) fn plan(d: Dirty) -> Vec<Step> {
    assert!(
        d.holds_block_right || (d.refcount_blocks.is_empty() && d.moved_table.is_none()),
        "refcount blocks planned without the right to write them"
    );
    assert!(
        !d.lazy_refcounts || (d.refcount_blocks.is_empty() && d.moved_table.is_none()),
        "refcount blocks planned with lazy refcounts"
    );
    let mut steps = Vec::new();
    let sync_first = d.hard || d.sync_data_first || d.moved_table.is_some();
    if !d.refcount_blocks.is_empty() {
        let mode = if sync_first {
            WriteMode::Queued
        } else {
            WriteMode::Durable
        };
        steps.push(Step::Write {
            mode,
            writes: d.refcount_blocks,
        });
    }
    if sync_first {
        steps.push(Step::Sync {
            data_file: d.data_file,
        });
    }
    if let Some(t) = d.moved_table {
        steps.push(Step::Write {
            mode: WriteMode::Queued,
            writes: vec![t.table],
        });
        steps.push(Step::Sync { data_file: false });
        steps.push(Step::Write {
            mode: WriteMode::Queued,
            writes: vec![t.header],
        });
        steps.push(Step::Sync { data_file: false });
    }
    if d.holds_block_right {
        steps.push(Step::EndBlockWrites);
    }
    if d.hard {
        for writes in [d.l2, d.l1] {
            if !writes.is_empty() {
                steps.push(Step::Write {
                    mode: WriteMode::Queued,
                    writes,
                });
                steps.push(Step::Sync { data_file: false });
            }
        }
    } else {
        if !d.l2.is_empty() {
            steps.push(Step::Write {
                mode: WriteMode::Inline,
                writes: d.l2,
            });
        }
        if !d.l1.is_empty() {
            steps.push(Step::Sync { data_file: false });
            steps.push(Step::Write {
                mode: WriteMode::Inline,
                writes: d.l1,
            });
        }
        steps.push(Step::Complete);
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::class;

    fn w(host: u64, class: u8) -> PlannedWrite {
        PlannedWrite {
            host,
            bytes: vec![0u8; 8].into_boxed_slice(),
            class,
        }
    }

    /// A compact picture of a plan: `R` refcount blocks, `T` table, `H` header, `2` L2, `1`
    /// L1 (`~` prefix: durable writes, `p` prefix: inline writes), `S` sync, `D` sync with
    /// the data file, `E` end of block writes, `C` complete.
    fn picture(steps: &[Step]) -> String {
        steps
            .iter()
            .map(|s| match s {
                Step::Write { mode, writes } => {
                    let c = match writes[0].class {
                        class::REFCOUNT_BLOCK => 'R',
                        class::REFCOUNT_TABLE => 'T',
                        class::ACTIVE_L2 => '2',
                        class::ACTIVE_L1 => '1',
                        _ => 'H',
                    };
                    match mode {
                        WriteMode::Queued => c.to_string(),
                        WriteMode::Durable => format!("~{c}"),
                        WriteMode::Inline => format!("p{c}"),
                    }
                }
                Step::Sync { data_file: true } => "D".into(),
                Step::Sync { data_file: false } => "S".into(),
                Step::Complete => "C".into(),
                Step::EndBlockWrites => "E".into(),
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    struct Case {
        hard: bool,
        lazy: bool,
        right: bool,
        blocks: bool,
        table: bool,
        l2: bool,
        l1: bool,
        sync_first: bool,
        data_file: bool,
    }

    const NOTHING: Case = Case {
        hard: false,
        lazy: false,
        right: false,
        blocks: false,
        table: false,
        l2: false,
        l1: false,
        sync_first: false,
        data_file: false,
    };

    fn run(c: Case) -> String {
        picture(&plan(dirty(&c)))
    }

    fn dirty(c: &Case) -> Dirty {
        Dirty {
            hard: c.hard,
            lazy_refcounts: c.lazy,
            holds_block_right: c.right,
            refcount_blocks: if c.blocks {
                vec![
                    w(0x10000, class::REFCOUNT_BLOCK),
                    w(0x20000, class::REFCOUNT_BLOCK),
                ]
            } else {
                Vec::new()
            },
            moved_table: c.table.then(|| MovedTable {
                table: w(0x30000, class::REFCOUNT_TABLE),
                header: w(0, class::FIXED),
            }),
            l2: if c.l2 {
                vec![w(0x40000, class::ACTIVE_L2)]
            } else {
                Vec::new()
            },
            l1: if c.l1 {
                vec![w(0x50000, class::ACTIVE_L1)]
            } else {
                Vec::new()
            },
            sync_data_first: c.sync_first,
            data_file: c.data_file,
        }
    }

    #[test]
    fn hard_flush_writes_refcounts_then_l2_then_l1_each_made_durable() {
        let plan = run(Case {
            hard: true,
            right: true,
            blocks: true,
            l2: true,
            l1: true,
            ..NOTHING
        });
        assert_eq!(plan, "R S E 2 S 1 S");
    }

    #[test]
    fn hard_flush_syncs_the_external_data_file_before_the_entries() {
        let plan = run(Case {
            hard: true,
            right: true,
            blocks: true,
            l2: true,
            data_file: true,
            ..NOTHING
        });
        assert_eq!(plan, "R D E 2 S");
    }

    #[test]
    fn hard_flush_of_nothing_still_syncs() {
        assert_eq!(
            run(Case {
                hard: true,
                ..NOTHING
            }),
            "S"
        );
        assert_eq!(
            run(Case {
                hard: true,
                data_file: true,
                ..NOTHING
            }),
            "D"
        );
    }

    #[test]
    fn write_back_of_nothing_only_completes() {
        assert_eq!(run(NOTHING), "C");
    }

    #[test]
    fn write_back_without_the_right_writes_entries_in_place_and_syncs_only_before_l1() {
        assert_eq!(
            run(Case {
                l2: true,
                ..NOTHING
            }),
            "p2 C"
        );
        assert_eq!(
            run(Case {
                l2: true,
                l1: true,
                ..NOTHING
            }),
            "p2 S p1 C"
        );
    }

    #[test]
    fn write_back_with_the_right_makes_blocks_durable_one_by_one_before_the_entries() {
        let plan = run(Case {
            right: true,
            blocks: true,
            l2: true,
            ..NOTHING
        });
        assert_eq!(plan, "~R E p2 C");
    }

    #[test]
    fn write_back_over_data_that_must_be_durable_syncs_first() {
        let plan = run(Case {
            right: true,
            blocks: true,
            l2: true,
            sync_first: true,
            data_file: true,
            ..NOTHING
        });
        assert_eq!(plan, "R D E p2 C");
        assert_eq!(
            run(Case {
                l2: true,
                sync_first: true,
                ..NOTHING
            }),
            "S p2 C"
        );
    }

    #[test]
    fn lazy_refcounts_write_no_blocks_but_a_flush_still_syncs_first() {
        let plan = run(Case {
            hard: true,
            lazy: true,
            l2: true,
            l1: true,
            ..NOTHING
        });
        assert_eq!(plan, "S 2 S 1 S");
        assert!(!takes_block_right(true, true, true));
        assert!(!takes_block_right(false, true, true));
    }

    #[test]
    fn moved_table_is_durable_before_the_header_and_both_before_the_right_goes_back() {
        let plan = run(Case {
            hard: true,
            right: true,
            blocks: true,
            table: true,
            l2: true,
            ..NOTHING
        });
        assert_eq!(plan, "R S T S H S E 2 S");
        // A write-back that moves the table syncs instead of writing blocks durably.
        let plan = run(Case {
            right: true,
            blocks: true,
            table: true,
            l2: true,
            ..NOTHING
        });
        assert_eq!(plan, "R S T S H S E p2 C");
    }

    #[test]
    fn the_right_is_taken_by_every_flush_and_by_write_backs_that_need_it() {
        assert!(takes_block_right(true, false, false));
        assert!(takes_block_right(false, false, true));
        assert!(!takes_block_right(false, false, false));
    }

    #[test]
    #[should_panic(expected = "without the right")]
    fn blocks_without_the_right_are_refused() {
        run(Case {
            blocks: true,
            ..NOTHING
        });
    }

    /// Every combination of inputs: whatever is written, the orderings of the module
    /// documentation hold.
    #[test]
    fn every_plan_keeps_the_dependency_order() {
        for bits in 0u32..1 << 9 {
            let b = |i: u32| bits & 1 << i != 0;
            let c = Case {
                hard: b(0),
                lazy: b(1),
                right: b(2),
                blocks: b(3),
                table: b(4),
                l2: b(5),
                l1: b(6),
                sync_first: b(7),
                data_file: b(8),
            };
            if (c.blocks || c.table) && (!c.right || c.lazy) {
                continue;
            }
            let (hard, blocks, table) = (c.hard, c.blocks, c.table);
            let p = picture(&plan(dirty(&c)));
            let steps: Vec<&str> = p.split(' ').collect();
            let pos = |f: &dyn Fn(&str) -> bool| steps.iter().position(|s| f(s));
            let synced_before = |i: usize| steps[..i].iter().any(|s| *s == "S" || *s == "D");
            if let Some(e) = pos(&|s| s.ends_with('2') || s.ends_with('1')) {
                if blocks || table {
                    let r = steps
                        .iter()
                        .rposition(|s| s.ends_with('R') || s.ends_with('T') || s.ends_with('H'))
                        .expect("refcounts written");
                    assert!(r < e, "{p}: refcounts after entries");
                    let durable_writes = steps[r] == "~R";
                    assert!(
                        durable_writes || synced_before(e),
                        "{p}: refcounts not durable before the entries"
                    );
                }
                if hard || c.sync_first {
                    assert!(synced_before(e), "{p}: entries before the data is durable");
                }
            }
            if let (Some(l2), Some(l1)) = (pos(&|s| s.ends_with('2')), pos(&|s| s.ends_with('1'))) {
                let sync_between = steps[l2..l1].contains(&"S");
                assert!(
                    l2 < l1 && sync_between,
                    "{p}: L1 before its tables are durable"
                );
            }
            if table {
                assert!(
                    p.contains("T S H S"),
                    "{p}: header before its table is durable"
                );
            }
            match pos(&|s| s == "E") {
                Some(e) => {
                    assert!(c.right, "{p}: right given back but not held");
                    let last = steps
                        .iter()
                        .rposition(|s| s.ends_with('R') || s.ends_with('T') || s.ends_with('H'));
                    assert!(
                        last.is_none_or(|m| m < e),
                        "{p}: right given back too early"
                    );
                    assert!(
                        steps[..e]
                            .last()
                            .is_none_or(|s| *s != "R" && *s != "T" && *s != "H"),
                        "{p}: right given back before its writes are durable"
                    );
                }
                None => assert!(!c.right, "{p}: right never given back"),
            }
            if hard {
                let last_write = steps.iter().rposition(|s| {
                    s.chars().any(char::is_alphanumeric) && !matches!(*s, "S" | "D" | "E")
                });
                let last_sync = steps.iter().rposition(|s| *s == "S" || *s == "D");
                assert!(
                    last_sync.is_some() && last_write < last_sync,
                    "{p}: flush not durable"
                );
                assert!(!p.contains('C') && !p.contains('p'), "{p}");
            } else {
                assert!(p.ends_with('C'), "{p}: write-back never completes");
            }
        }
    }
}
