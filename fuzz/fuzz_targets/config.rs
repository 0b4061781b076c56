//! The TOML config file: parse and validate any text without a panic; a config that validates
//! has at least one queue per export, between one shard and one per queue, a serial that
//! fits GET_ID, and a socket and an image for each.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/nonexistent-qcow2d-fuzz/qcow2d.toml");
    if let Ok(config) = qcow2d::config::parse(text, path, 4) {
        for export in &config.exports {
            assert!(export.queues >= 1, "an export without queues validated");
            assert!(
                (1..=usize::from(export.queues)).contains(&export.shards),
                "{} shards for {} queues",
                export.shards,
                export.queues
            );
            assert!(export.serial.len() <= 20, "a serial above 20 bytes");
            assert!(
                !export.socket.as_os_str().is_empty(),
                "an export without a socket"
            );
            assert!(
                !export.image.as_os_str().is_empty(),
                "an export without an image"
            );
        }
    }
});
