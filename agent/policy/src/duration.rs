//! Durations as the policy file and the command line write them.

/// `90s`, `30m`, `2h`, `7d` → seconds: digits and one unit (`s`, `m`, `h`,
/// `d`), at least one second. The rules of the policy's `max_duration`
/// (README), shared by every flag that takes a duration (`--for`,
/// `--since`, `--audit-retention`), so a duration means one thing
/// everywhere: a bare number is refused (seconds? days?), and so is zero (a
/// bridge open for no time, an empty window, a retention that deletes all).
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let bad = || format!("invalid duration `{text}` (expected e.g. 30m, 2h, 7d)");
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (num, unit) = text.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mul = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(bad()),
    };
    let secs = n.checked_mul(mul).ok_or_else(bad)?;
    if secs == 0 {
        return Err(format!("duration `{text}` must be longer than zero"));
    }
    Ok(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_one_unit_and_are_never_zero() {
        assert_eq!(parse_duration("90s"), Ok(90));
        assert_eq!(parse_duration("30m"), Ok(1800));
        assert_eq!(parse_duration("2h"), Ok(7200));
        assert_eq!(parse_duration("7d"), Ok(604_800));
        assert_eq!(parse_duration("007s"), Ok(7));
        for bad in [
            "", "90", "s", "1.5h", "-1m", "+1m", "1 m", "1hm", "1H", "1w", "m30",
        ] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains("invalid duration"), "{bad}: {e}");
        }
        assert!(
            parse_duration("0s")
                .unwrap_err()
                .contains("longer than zero")
        );
        assert!(parse_duration("0d").is_err());
        // Overflow is an error, not a wrap or a panic.
        assert!(parse_duration("213503982334602d").is_err());
        assert!(parse_duration("99999999999999999999s").is_err());
        assert_eq!(parse_duration("18446744073709551615s"), Ok(u64::MAX));
    }
}
