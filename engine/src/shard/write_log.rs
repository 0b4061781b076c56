//! The write log, a test hook (`ShardConfig::write_log`): the metadata writes and syncs that
//! a shard's runs and durable refcount writes submitted, in order, with their bytes. `None`
//! in production. The shard's thread records (through its `FlushState`); the test that holds
//! the log takes the steps, from any thread (behind a mutex).

/// Test hook (`ShardConfig::write_log`): what a shard's runs and durable refcount writes
/// submitted to the image file, in order, so that a test can rebuild every file a crash could
/// leave (`engine/tests/crash_states.rs`).
#[doc(hidden)]
#[derive(Debug, Default)]
pub struct WriteLog {
    steps: std::sync::Mutex<Vec<LoggedStep>>,
}

/// One entry of a [`WriteLog`].
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoggedStep {
    /// A run starts: a flush (`hard`) or a write-back.
    RunStart { hard: bool },
    /// Writes submitted together into the image file, (host offset, bytes); the next step
    /// starts only once all completed. With `durable`, each is durable when it completes
    /// (RWF_DSYNC), else only after a later sync.
    Writes {
        durable: bool,
        writes: Vec<(u64, Vec<u8>)>,
    },
    /// fdatasync of the image file (and of the external data file with it).
    Sync,
    /// The run ended, successfully or not.
    RunEnd { ok: bool },
}

impl WriteLog {
    pub(super) fn push(&self, step: LoggedStep) {
        self.steps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(step);
    }

    /// Takes what was recorded so far.
    pub fn take(&self) -> Vec<LoggedStep> {
        std::mem::take(&mut *self.steps.lock().unwrap_or_else(|p| p.into_inner()))
    }
}
