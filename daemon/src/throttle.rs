//! I/O limits: leaky buckets with bursts, shared by the exports of a throttle group, with the
//! semantics of QEMU's throttle groups (`util/throttle.c`).
//!
//! What it owns: the limits of a group ([`Limits`], six buckets: bytes and operations per
//! second, in total, for reads and for writes, each with an optional burst), the buckets' levels
//! ([`ThrottleGroup`]) and, per export, which group it belongs to now ([`ExportThrottle`]).
//!
//! Threads. Groups are made and changed by the supervisor (main) thread, from the command
//! line, the config file, the control socket or a reload. The worker threads of a limited
//! export call [`ThrottleGroup::reserve`] once per read or write: it takes the group's mutex
//! (shared by the workers of every export in the group, held for a few arithmetic operations)
//! and answers how long the request must wait. An export without limits never takes it: its
//! workers check one generation counter per request and find nothing to do.
//!
//! Semantics, per bucket (as QEMU's): the level leaks at `avg` units per second; a request may
//! start while the level is at most the bucket size (`max * max_length` with a burst, otherwise
//! a tenth of a second at the average rate), and adds its units (bytes, or one operation) to
//! the level. With a burst longer than one second a second level leaks at the burst rate `max`
//! and may exceed a tenth of a second at that rate, so a burst runs at `max` at most. A read is
//! checked against the total and read buckets, a write (or write-zeroes) against the total and
//! write buckets; flushes, discards and GET_ID are not limited (QEMU limits reads and writes).
//!
//! One difference in mechanism, none in rate: QEMU accounts a request when it starts and queues
//! the others of the group round robin; here a request is accounted when the worker takes it
//! from its queue, and told when it may start (the moment the levels before it have leaked to
//! the bucket size). Requests of a group are thus served in the order they were taken, and a
//! worker holds at most one waiting request (it takes no more from its queues meanwhile), so
//! the exports of a group with requests waiting take turns, as in QEMU.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

/// Largest rate or burst rate, as QEMU's `THROTTLE_VALUE_MAX`.
pub const VALUE_MAX: u64 = 1_000_000_000_000_000;

/// The six buckets, in the order of [`Limits::buckets`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bucket {
    /// Bytes per second, reads and writes.
    BpsTotal,
    /// Bytes per second, reads.
    BpsRead,
    /// Bytes per second, writes.
    BpsWrite,
    /// Operations per second, reads and writes.
    IopsTotal,
    /// Operations per second, reads.
    IopsRead,
    /// Operations per second, writes.
    IopsWrite,
}

impl Bucket {
    /// Every bucket, in index order.
    pub const ALL: [Bucket; 6] = [
        Bucket::BpsTotal,
        Bucket::BpsRead,
        Bucket::BpsWrite,
        Bucket::IopsTotal,
        Bucket::IopsRead,
        Bucket::IopsWrite,
    ];

    /// The key of its rate (`iops_total`); its burst is `<key>_max`, the burst's length in
    /// seconds `<key>_max_length`.
    pub fn key(self) -> &'static str {
        match self {
            Bucket::BpsTotal => "bps_total",
            Bucket::BpsRead => "bps_read",
            Bucket::BpsWrite => "bps_write",
            Bucket::IopsTotal => "iops_total",
            Bucket::IopsRead => "iops_read",
            Bucket::IopsWrite => "iops_write",
        }
    }

    fn applies_to(self, write: bool) -> bool {
        match self {
            Bucket::BpsTotal | Bucket::IopsTotal => true,
            Bucket::BpsRead | Bucket::IopsRead => !write,
            Bucket::BpsWrite | Bucket::IopsWrite => write,
        }
    }

    fn counts_bytes(self) -> bool {
        matches!(self, Bucket::BpsTotal | Bucket::BpsRead | Bucket::BpsWrite)
    }
}

/// The `(key, value)` pairs of `$source`, a value with one field per limit key named as the key
/// (`iops_total`, `iops_total_max`, `iops_total_max_length`, ...): the command line's limit
/// flags and a config file's limit keys are read through this one list.
macro_rules! limit_fields {
    ($source:expr) => {
        $crate::throttle::limit_fields!(@ $source;
            iops_total iops_total_max iops_total_max_length
            iops_read iops_read_max iops_read_max_length
            iops_write iops_write_max iops_write_max_length
            bps_total bps_total_max bps_total_max_length
            bps_read bps_read_max bps_read_max_length
            bps_write bps_write_max bps_write_max_length)
    };
    (@ $source:expr; $($key:ident)*) => {
        [$((stringify!($key), $source.$key)),*]
    };
}
pub(crate) use limit_fields;

/// The limit of one bucket: 0 means none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BucketLimit {
    /// Average rate (units per second).
    pub avg: u64,
    /// Burst rate (units per second); 0: bursts of a tenth of a second at `avg`.
    pub max: u64,
    /// How long (seconds) a burst at `max` may last; 0 means the default, 1.
    pub max_length: u64,
}

impl BucketLimit {
    fn burst_length(self) -> u64 {
        self.max_length.max(1)
    }
}

/// The limits of a throttle group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Indexed by `Bucket as usize`.
    pub buckets: [BucketLimit; 6],
}

impl Limits {
    /// No limit at all.
    pub fn is_none(&self) -> bool {
        self.buckets.iter().all(|b| b.avg == 0)
    }

    /// The limit of `bucket`.
    pub fn bucket(&self, bucket: Bucket) -> BucketLimit {
        self.buckets[bucket as usize]
    }

    /// Sets one value by key: `iops_total`, `iops_total_max`, `iops_total_max_length`, ...
    pub fn set(&mut self, key: &str, value: u64) -> Result<(), String> {
        for bucket in Bucket::ALL {
            let b = &mut self.buckets[bucket as usize];
            let base = bucket.key();
            let Some(rest) = key.strip_prefix(base) else {
                continue;
            };
            match rest {
                "" => b.avg = value,
                "_max" => b.max = value,
                "_max_length" => b.max_length = value,
                _ => continue,
            }
            return Ok(());
        }
        Err(format!("Unknown limit {key:?}"))
    }

    /// Every value set (non-zero), by key, in bucket order.
    pub fn entries(&self) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for bucket in Bucket::ALL {
            let b = self.bucket(bucket);
            for (suffix, value) in [("", b.avg), ("_max", b.max), ("_max_length", b.max_length)] {
                if value != 0 {
                    out.push((format!("{}{suffix}", bucket.key()), value));
                }
            }
        }
        out
    }

    /// The limits as a JSON object of their non-zero keys.
    pub fn to_json(self) -> serde_json::Value {
        let map = self
            .entries()
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::from(v)))
            .collect::<serde_json::Map<_, _>>();
        serde_json::Value::Object(map)
    }

    /// Limits from a JSON object of keys and non-negative integers.
    pub fn from_json(value: &serde_json::Value) -> Result<Limits, String> {
        let serde_json::Value::Object(map) = value else {
            return Err("Limits must be a JSON object".into());
        };
        let mut limits = Limits::default();
        for (key, v) in map {
            let n = v
                .as_u64()
                .ok_or_else(|| format!("Limit {key:?} must be a non-negative integer"))?;
            limits.set(key, n)?;
        }
        limits.validate()?;
        Ok(limits)
    }

    /// Checks the limits as QEMU does (`throttle_is_valid`, `throttle_conflicting`).
    pub fn validate(&self) -> Result<(), String> {
        let b = |bucket: Bucket| self.bucket(bucket);
        for (total, read, write, what) in [
            (Bucket::BpsTotal, Bucket::BpsRead, Bucket::BpsWrite, "bps"),
            (
                Bucket::IopsTotal,
                Bucket::IopsRead,
                Bucket::IopsWrite,
                "iops",
            ),
        ] {
            if b(total).avg != 0 && (b(read).avg != 0 || b(write).avg != 0) {
                return Err(format!(
                    "{what}_total cannot be used together with {what}_read or {what}_write"
                ));
            }
            if b(total).max != 0 && (b(read).max != 0 || b(write).max != 0) {
                return Err(format!(
                    "{what}_total_max cannot be used together with {what}_read_max or \
                     {what}_write_max"
                ));
            }
        }
        for bucket in Bucket::ALL {
            let l = b(bucket);
            let key = bucket.key();
            if l.avg > VALUE_MAX || l.max > VALUE_MAX {
                return Err(format!("{key} and {key}_max must be at most {VALUE_MAX}"));
            }
            if l.max_length > 1 && l.max == 0 {
                return Err(format!("{key}_max_length needs {key}_max"));
            }
            if l.max != 0 && l.burst_length() > VALUE_MAX / l.max {
                return Err(format!("{key}_max_length is too long for {key}_max"));
            }
            if l.max != 0 && l.avg == 0 {
                return Err(format!("{key}_max needs {key}"));
            }
            if l.max != 0 && l.max < l.avg {
                return Err(format!("{key}_max cannot be lower than {key}"));
            }
        }
        Ok(())
    }
}

/// The levels of one bucket.
#[derive(Clone, Copy, Debug, Default)]
struct Level {
    level: f64,
    burst_level: f64,
}

struct GroupState {
    limits: Limits,
    levels: [Level; 6],
    previous_leak: Instant,
}

impl GroupState {
    fn leak(&mut self, now: Instant) {
        let delta = now.saturating_duration_since(self.previous_leak).as_nanos() as f64;
        if delta <= 0.0 {
            return;
        }
        self.previous_leak = now;
        for (level, limit) in self.levels.iter_mut().zip(&self.limits.buckets) {
            level.level = (level.level - limit.avg as f64 * delta / 1e9).max(0.0);
            if limit.burst_length() > 1 {
                level.burst_level = (level.burst_level - limit.max as f64 * delta / 1e9).max(0.0);
            }
        }
    }

    /// Nanoseconds until the bucket lets a request start (QEMU's `throttle_compute_wait`).
    fn wait_ns(limit: BucketLimit, level: Level) -> f64 {
        if limit.avg == 0 {
            return 0.0;
        }
        let (bucket_size, burst_bucket_size) = if limit.max == 0 {
            (limit.avg as f64 / 10.0, 0.0)
        } else {
            (
                limit.max as f64 * limit.burst_length() as f64,
                limit.max as f64 / 10.0,
            )
        };
        let extra = level.level - bucket_size;
        if extra > 0.0 {
            return extra * 1e9 / limit.avg as f64;
        }
        if limit.burst_length() > 1 {
            let extra = level.burst_level - burst_bucket_size;
            if extra > 0.0 {
                return extra * 1e9 / limit.max as f64;
            }
        }
        0.0
    }
}

/// A throttle group: limits and the levels of their buckets, shared by its exports.
pub struct ThrottleGroup {
    /// `None` for the private group of an export without `group`.
    name: Option<String>,
    state: Mutex<GroupState>,
}

impl std::fmt::Debug for ThrottleGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThrottleGroup")
            .field("name", &self.name)
            .field("limits", &self.limits())
            .finish()
    }
}

impl ThrottleGroup {
    /// A group with `limits` and empty buckets.
    pub fn new(name: Option<String>, limits: Limits) -> Self {
        ThrottleGroup {
            name,
            state: Mutex::new(GroupState {
                limits,
                levels: [Level::default(); 6],
                previous_leak: Instant::now(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, GroupState> {
        // The state is a few numbers, consistent between any two statements.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The group's name, if it has one.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The group's limits.
    pub fn limits(&self) -> Limits {
        self.lock().limits
    }

    /// Replaces the limits; the buckets start empty (as QEMU's `throttle_config`).
    pub fn set_limits(&self, limits: Limits) {
        let mut state = self.lock();
        state.limits = limits;
        state.levels = [Level::default(); 6];
        state.previous_leak = Instant::now();
    }

    /// Accounts a read (`write` false) or write of `bytes` taken at `now`, and returns how
    /// many nanoseconds it must wait before it starts (0: at once).
    pub fn reserve(&self, write: bool, bytes: u64, now: Instant) -> u64 {
        let mut state = self.lock();
        state.leak(now);
        let mut wait: f64 = 0.0;
        for bucket in Bucket::ALL {
            if bucket.applies_to(write) {
                let i = bucket as usize;
                wait = wait.max(GroupState::wait_ns(
                    state.limits.buckets[i],
                    state.levels[i],
                ));
            }
        }
        for bucket in Bucket::ALL {
            if !bucket.applies_to(write) {
                continue;
            }
            let units = if bucket.counts_bytes() {
                bytes as f64
            } else {
                1.0
            };
            let i = bucket as usize;
            let burst = state.limits.buckets[i].burst_length() > 1;
            let level = &mut state.levels[i];
            level.level += units;
            if burst {
                level.burst_level += units;
            }
        }
        // A wait of a day is as good as forever; it keeps the cast in range.
        wait.min(86_400e9) as u64
    }
}

/// Which group an export is in now: read by its workers, changed by the supervisor.
#[derive(Debug, Default)]
pub struct ExportThrottle {
    /// Bumped on every change, so workers notice with one load per request.
    generation: AtomicU64,
    group: Mutex<Option<Arc<ThrottleGroup>>>,
}

impl ExportThrottle {
    /// In `group` (or unlimited with `None`).
    pub fn new(group: Option<Arc<ThrottleGroup>>) -> Self {
        let cell = ExportThrottle::default();
        cell.set(group);
        cell
    }

    /// Moves the export to `group` (or lifts its limits with `None`).
    pub fn set(&self, group: Option<Arc<ThrottleGroup>>) {
        *self.group.lock().unwrap_or_else(PoisonError::into_inner) = group;
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The group now.
    pub fn group(&self) -> Option<Arc<ThrottleGroup>> {
        self.group
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Changes so far.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// A worker's view of its export's [`ExportThrottle`]: the group, looked up again only when
/// the generation moved.
pub struct WorkerThrottle {
    cell: Arc<ExportThrottle>,
    seen: u64,
    group: Option<Arc<ThrottleGroup>>,
}

impl WorkerThrottle {
    /// Follows `cell`.
    pub fn new(cell: Arc<ExportThrottle>) -> Self {
        WorkerThrottle {
            cell,
            seen: u64::MAX,
            group: None,
        }
    }

    /// How many nanoseconds a read or write of `bytes` taken now must wait (0 without limits:
    /// one load and two compares).
    #[inline]
    pub fn admit(&mut self, write: bool, bytes: u64) -> u64 {
        let generation = self.cell.generation();
        if generation != self.seen {
            self.seen = generation;
            self.group = self.cell.group();
        }
        match &self.group {
            None => 0,
            Some(group) => group.reserve(write, bytes, Instant::now()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits(pairs: &[(&str, u64)]) -> Limits {
        let mut l = Limits::default();
        for (k, v) in pairs {
            l.set(k, *v).unwrap();
        }
        l
    }

    /// Simulates a client that always has a request waiting: returns how many start within
    /// `seconds`.
    fn started_within(group: &ThrottleGroup, write: bool, bytes: u64, seconds: u64) -> u64 {
        let start = Instant::now();
        let mut now = start;
        let mut n = 0;
        loop {
            let wait = group.reserve(write, bytes, now);
            now += Duration::from_nanos(wait);
            if now.duration_since(start) >= Duration::from_secs(seconds) {
                return n;
            }
            n += 1;
        }
    }

    #[test]
    fn keys_round_trip_and_unknown_keys_are_refused() {
        let l = limits(&[
            ("iops_total", 500),
            ("iops_total_max", 1000),
            ("iops_total_max_length", 3),
            ("bps_write", 1 << 20),
        ]);
        assert_eq!(l.bucket(Bucket::IopsTotal).max_length, 3);
        let json = l.to_json();
        assert_eq!(json["iops_total_max"], 1000);
        assert_eq!(Limits::from_json(&json).unwrap(), l);
        assert!(Limits::default().set("iops", 1).is_err());
        assert!(Limits::default().set("iops_total_maximum", 1).is_err());
        assert!(Limits::from_json(&serde_json::json!({"iops_total": -1})).is_err());
        assert!(Limits::default().is_none() && !l.is_none());
    }

    #[test]
    fn invalid_combinations_are_refused_as_qemu_does() {
        for bad in [
            &[("iops_total", 10), ("iops_read", 5)][..],
            &[("bps_total", 10), ("bps_write", 5)],
            &[("iops_total", 10), ("iops_total_max", 5)],
            &[("iops_total_max", 50)],
            &[("iops_total", 10), ("iops_total_max_length", 5)],
            &[("bps_read", VALUE_MAX + 1)],
            &[
                ("bps_read", 10),
                ("bps_read_max", VALUE_MAX),
                ("bps_read_max_length", 2),
            ],
        ] {
            assert!(limits(bad).validate().is_err(), "{bad:?}");
        }
        limits(&[("iops_read", 10), ("iops_write", 5), ("bps_total", 100)])
            .validate()
            .unwrap();
    }

    #[test]
    fn the_average_rate_holds_after_a_tenth_of_a_second_of_burst() {
        let group = ThrottleGroup::new(None, limits(&[("iops_total", 500)]));
        let n = started_within(&group, false, 4096, 10);
        // 5000 at the rate, plus the bucket (50) and the first request.
        assert!((5050..=5052).contains(&n), "{n}");
        let group = ThrottleGroup::new(None, limits(&[("bps_write", 1 << 20)]));
        let n = started_within(&group, true, 64 << 10, 10);
        assert!((160..=163).contains(&n), "{n}");
        // Reads are not limited by a write bucket.
        assert_eq!(group.reserve(false, 1 << 30, Instant::now()), 0);
    }

    #[test]
    fn a_burst_runs_at_its_rate_for_its_length_then_the_average_holds() {
        let group = ThrottleGroup::new(
            None,
            limits(&[
                ("iops_total", 100),
                ("iops_total_max", 1000),
                ("iops_total_max_length", 2),
            ]),
        );
        // About 2 s at 1000/s at most (bucket of 2000), then 100/s.
        let first = started_within(&group, false, 512, 1);
        assert!((950..=1110).contains(&first), "{first}");
        let group2 = ThrottleGroup::new(None, group.limits());
        let ten = started_within(&group2, false, 512, 10);
        assert!(
            (2000 + 1000 - 10..=2000 + 1000 + 110).contains(&ten),
            "{ten}"
        );
    }

    #[test]
    fn new_limits_start_with_empty_buckets() {
        let group = ThrottleGroup::new(None, limits(&[("iops_total", 10)]));
        let now = Instant::now();
        for _ in 0..5 {
            group.reserve(false, 512, now);
        }
        assert!(group.reserve(false, 512, now) > 0);
        group.set_limits(limits(&[("iops_total", 20)]));
        assert_eq!(group.reserve(false, 512, Instant::now()), 0);
    }

    #[test]
    fn workers_follow_their_exports_group() {
        let cell = Arc::new(ExportThrottle::new(None));
        let mut w = WorkerThrottle::new(Arc::clone(&cell));
        assert_eq!(w.admit(false, 512), 0);
        cell.set(Some(Arc::new(ThrottleGroup::new(
            None,
            limits(&[("iops_total", 1)]),
        ))));
        assert_eq!(
            w.admit(false, 512),
            0,
            "the bucket holds a tenth of a second"
        );
        assert!(w.admit(false, 512) > 0);
        cell.set(None);
        assert_eq!(w.admit(false, 512), 0);
    }
}

/// How the cost per request quoted in README.md was measured:
/// `cargo test --release -p qcow2d --lib -- --ignored --nocapture throttle_cost`.
#[cfg(test)]
mod cost {
    use super::*;
    use std::hint::black_box;

    #[test]
    #[ignore = "a measurement, not a check"]
    fn throttle_cost() {
        let mut w = WorkerThrottle::new(Arc::new(ExportThrottle::new(None)));
        let n = 100_000_000u64;
        let t = Instant::now();
        for _ in 0..n {
            black_box(w.admit(black_box(false), black_box(4096)));
        }
        let ns = t.elapsed().as_nanos() as f64 / n as f64;
        eprintln!("an export without limits: {ns:.2} ns per request");
    }
}
