//! Parsing and printing of the units the command line speaks: byte sizes with binary suffixes
//! (`4k`, `64K`, `2g`, `1MiB`) and durations (`10s`, `500ms`, a bare number is seconds).
//! Pure functions, called from argument parsing and report printing on the main thread.

use std::time::Duration;

/// Parses a byte size: decimal digits, then an optional binary suffix `k`, `m`, `g` or `t`
/// (case-insensitive, optionally followed by `b` or `ib`). `4k` is 4096 bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, suffix) = trimmed.split_at(digits_end);
    if digits.is_empty() {
        return Err(format!(
            "Invalid size {text:?}: expected a number such as 4k or 2g"
        ));
    }
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("Invalid size {text:?}: number too large"))?;
    let suffix = suffix.to_ascii_lowercase();
    let unit_bytes: u64 = match suffix.as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "Invalid size {text:?}: unknown suffix {suffix:?} (use k, m, g or t)"
            ))
        }
    };
    number
        .checked_mul(unit_bytes)
        .ok_or_else(|| format!("Invalid size {text:?}: too large"))
}

/// Parses a duration: decimal digits, then `ms`, `s` or nothing (seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, suffix) = trimmed.split_at(digits_end);
    if digits.is_empty() {
        return Err(format!(
            "Invalid duration {text:?}: expected a number such as 10s or 500ms"
        ));
    }
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("Invalid duration {text:?}: number too large"))?;
    match suffix {
        "" | "s" => Ok(Duration::from_secs(number)),
        "ms" => Ok(Duration::from_millis(number)),
        _ => Err(format!(
            "Invalid duration {text:?}: unknown unit {suffix:?} (use s or ms)"
        )),
    }
}

/// Prints a byte count with the largest binary suffix that divides it exactly (`4096` -> `4k`),
/// the inverse of [`parse_size`] for the sizes people type.
pub fn format_size(bytes: u64) -> String {
    const SUFFIXES: [(u64, &str); 4] = [
        (1 << 40, "t"),
        (1 << 30, "g"),
        (1 << 20, "m"),
        (1 << 10, "k"),
    ];
    for (unit_bytes, suffix) in SUFFIXES {
        if bytes >= unit_bytes && bytes % unit_bytes == 0 {
            return format!("{}{suffix}", bytes / unit_bytes);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_accept_binary_suffixes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("512b"), Ok(512));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("256m"), Ok(256 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("2GB"), Ok(2 << 30));
        assert_eq!(parse_size("1t"), Ok(1 << 40));
        assert_eq!(parse_size(" 8k "), Ok(8192));
        assert_eq!(parse_size("0"), Ok(0));
    }

    #[test]
    fn sizes_reject_garbage() {
        assert!(parse_size("").is_err());
        assert!(parse_size("k").is_err());
        assert!(parse_size("4x").is_err());
        assert!(parse_size("4kk").is_err());
        assert!(parse_size("-4k").is_err());
        assert!(parse_size("1.5g").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(
            parse_size("20000000t").is_err(),
            "overflow must be an error"
        );
    }

    #[test]
    fn durations_accept_s_and_ms() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn durations_reject_garbage() {
        assert!(parse_duration("").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("10m").is_err());
        assert!(parse_duration("1.5s").is_err());
        assert!(parse_duration("10 s").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn sizes_print_back() {
        for text in ["4k", "64k", "1m", "2g", "1t", "512", "4097"] {
            let bytes = parse_size(text).unwrap();
            assert_eq!(format_size(bytes), text);
        }
        assert_eq!(format_size(0), "0");
    }
}
