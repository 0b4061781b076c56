//! Shards whose caches draw from one shared budget ([`CacheBudget`], `ShardConfig::cache_budgets`):
//! reading more L2 tables than the budget holds, every read is right; a shard made once the
//! budget is used up still grows to its fair share, those holding more give tables back as
//! they miss until the budget is within its limit, and a dropped shard gives its bytes back.
//! Images are made by the real `qemu-img`.

use qcow2d_engine::{CacheBudget, Image, OpenOptions, Shard, ShardConfig};
use qcow2d_tests::{convert_raw_to_qcow2, Rng};

/// 1 KiB clusters: an L2 table of 128 entries maps 128 KiB.
const CLUSTER: u64 = 1024;
/// 64 L2 tables of data.
const SIZE: usize = 64 * 128 * 1024;
/// Room for 16 of the 64 tables.
const LIMIT: u64 = 16 * CLUSTER;
/// What each shard's caches hold whatever the budget: 4 tables and 2 decompressed clusters
/// (one qcow2 layer).
const FLOOR: u64 = (4 + 2) * CLUSTER;

/// An image of `SIZE` random bytes (from `seed`) in 1 KiB clusters, made by `qemu-img` in a
/// temporary directory (kept as long as the first value), the bytes, and the image opened.
fn image_of_random_data(seed: u64) -> (tempfile::TempDir, Vec<u8>, Image) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(seed);
    let data: Vec<u8> = (0..SIZE).map(|_| rng.below(256) as u8).collect();
    let raw = dir.path().join("src.raw");
    std::fs::write(&raw, &data).unwrap();
    let img = convert_raw_to_qcow2(
        &raw,
        &dir.path().join("image.qcow2"),
        &format!("cluster_size={CLUSTER}"),
        false,
    );
    let image = Image::open(&img, &OpenOptions::default()).unwrap();
    (dir, data, image)
}

/// Reads `buf.len()` bytes at `offset` through `shard`, waiting for the result.
fn read(shard: &mut Shard, offset: u64, buf: &mut [u8]) {
    let iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: `buf` is neither moved nor touched until the completion is back (waited for
    // below).
    unsafe { shard.submit_read(7, offset, &iov) }.unwrap();
    let mut out = Vec::new();
    while out.is_empty() {
        shard.wait(&mut out);
    }
    assert_eq!(out[0].result, Ok(()), "read at {offset}");
}

/// Reads the whole image through `shard`, 4 KiB at a time, and compares it with `data`.
fn read_all(shard: &mut Shard, data: &[u8]) {
    let mut buf = vec![0u8; 4096];
    for offset in (0..data.len()).step_by(buf.len()) {
        read(shard, offset as u64, &mut buf);
        assert!(
            buf[..] == data[offset..offset + buf.len()],
            "wrong bytes at {offset}"
        );
    }
}

#[test]
fn shards_sharing_a_budget_read_right_within_it() {
    let (_dir, data, image) = image_of_random_data(0x5eed_cac4e);
    let budget = CacheBudget::new(LIMIT);
    let config = ShardConfig {
        cache_budgets: vec![budget.clone()],
        ..ShardConfig::default()
    };
    // Its own limit would hold every table: the budget is what holds it back.
    let mut a = image.new_shard(&config).unwrap();
    assert_eq!(a.cache_capacity_bytes().0, 64 * CLUSTER);
    read_all(&mut a, &data);
    // Alone, the first reader takes the whole budget.
    assert_eq!(a.cache_bytes().0, LIMIT);
    assert_eq!(budget.used_bytes(), LIMIT);

    // A shard made once the budget is used up still grows to its fair share, half of it.
    let mut b = image.new_shard(&config).unwrap();
    assert_eq!(budget.members(), 2);
    read_all(&mut b, &data);
    assert_eq!(b.cache_bytes().0, LIMIT / 2);
    assert_eq!(budget.used_bytes(), used(&a) + used(&b));
    assert!(
        budget.used_bytes() <= 2 * LIMIT + 2 * FLOOR,
        "{} bytes of cache",
        budget.used_bytes()
    );
    // Again: the first gives tables back as it misses, down to its share, and the budget is
    // within its limit again; evicted tables are loaded again, right.
    read_all(&mut a, &data);
    assert_eq!(a.cache_bytes().0, LIMIT / 2);
    read_all(&mut b, &data);
    assert_eq!(b.cache_bytes().0, LIMIT / 2);
    assert_eq!(budget.used_bytes(), LIMIT);
    assert_eq!(budget.used_bytes(), used(&a) + used(&b));

    // A dropped shard gives its bytes back; the other grows into them.
    drop(a);
    assert_eq!(budget.used_bytes(), used(&b));
    assert_eq!(budget.members(), 1);
    read_all(&mut b, &data);
    assert_eq!(b.cache_bytes().0, LIMIT);
    drop(b);
    assert_eq!(budget.used_bytes(), 0);
    assert_eq!(budget.members(), 0);
}

/// Bytes the caches of `s` hold now.
fn used(s: &Shard) -> u64 {
    let (l2, decompressed) = s.cache_bytes();
    l2 + decompressed
}

#[test]
fn shards_that_join_one_by_one_share_the_budget_fairly() {
    let (_dir, data, image) = image_of_random_data(0xfa1e_5a7e);
    let budget = CacheBudget::new(LIMIT);
    let config = ShardConfig {
        cache_budgets: vec![budget.clone()],
        ..ShardConfig::default()
    };
    // Each joins when the others are done reading, and grows to its share (16, 8, then 5 of
    // the 16 tables the budget holds) while the others keep theirs: the budget holds up to
    // twice its limit.
    let mut shards = Vec::new();
    for (n, tables) in [(1, 16), (2, 8), (3, 5)] {
        let mut s = image.new_shard(&config).unwrap();
        read_all(&mut s, &data);
        shards.push(s);
        assert_eq!(budget.members(), n);
        assert_eq!(shards[n as usize - 1].cache_bytes().0, tables * CLUSTER);
    }
    assert_eq!(budget.used_bytes(), 29 * CLUSTER);
    assert!(budget.used_bytes() <= 2 * LIMIT + 3 * FLOOR);
    // As they read again, those above their share give tables back while the budget is over
    // its limit: the first down to its share, the second until the budget is within its
    // limit; the third, at its share, keeps its tables.
    for s in &mut shards {
        read_all(s, &data);
    }
    let held: Vec<u64> = shards.iter().map(|s| s.cache_bytes().0 / CLUSTER).collect();
    assert_eq!(held, [5, 6, 5]);
    assert_eq!(budget.used_bytes(), LIMIT);
    assert_eq!(budget.used_bytes(), shards.iter().map(used).sum::<u64>());
    // Once two are gone, the last grows into the whole budget again.
    let mut last = shards.pop().unwrap();
    drop(shards);
    assert_eq!(budget.members(), 1);
    read_all(&mut last, &data);
    assert_eq!(last.cache_bytes().0, LIMIT);
    drop(last);
    assert_eq!(budget.used_bytes(), 0);
}

#[test]
fn each_shard_of_a_group_draws_from_its_own_budget() {
    let (_dir, data, image) = image_of_random_data(0xb0d9e7);
    let budgets = [CacheBudget::new(LIMIT), CacheBudget::new(2 * LIMIT)];
    let config = ShardConfig {
        cache_budgets: budgets.to_vec(),
        ..ShardConfig::default()
    };
    let mut shards = image.new_shards(&config, 2).unwrap();
    for shard in &mut shards {
        read_all(shard, &data);
    }
    assert_eq!(shards[0].cache_bytes().0, LIMIT);
    assert_eq!(shards[1].cache_bytes().0, 2 * LIMIT);
    for (shard, budget) in shards.iter().zip(&budgets) {
        let (l2, decompressed) = shard.cache_bytes();
        assert_eq!(budget.used_bytes(), l2 + decompressed);
    }
    drop(shards);
    assert!(budgets.iter().all(|b| b.used_bytes() == 0));
}
