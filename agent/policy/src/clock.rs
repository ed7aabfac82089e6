//! Wall-clock time as the policy maps carry it. The kernel programs read
//! `CLOCK_TAI` (`bpf_ktime_get_tai_ns`), so time windows follow wall-clock
//! time and an NTP step or a suspended VM cannot stretch an expiry; the
//! policy states Unix times. The offset between the two clocks is read by
//! the agent (`bulkhead::clock::tai_offset_ns`, a `clock_gettime` call) and
//! handed in; everything here is arithmetic (and formatting).

/// Wall-clock time as Unix nanoseconds.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as i64
}

/// The TAI − Unix offset from one reading of each clock (nanoseconds),
/// rounded to whole seconds: the offset is a leap-second count, the rest is
/// the time between the two readings.
pub fn tai_offset_from(tai_ns: i128, unix_ns: i128) -> i64 {
    let d = tai_ns - unix_ns;
    ((d + 500_000_000).div_euclid(1_000_000_000) * 1_000_000_000) as i64
}

/// A policy time (Unix nanoseconds) as the kernel compares it; `none` for
/// no time (`0` for "since ever", `u64::MAX` for "never").
pub fn to_tai(unix_ns: Option<i64>, offset: i64, none: u64) -> u64 {
    match unix_ns {
        Some(t) => t.saturating_add(offset).max(0) as u64,
        None => none,
    }
}

/// `now_unix_ns` on the kernel's clock.
pub fn now_tai(now_unix_ns: i64, offset: i64) -> u64 {
    to_tai(Some(now_unix_ns), offset, 0)
}

/// `CLOCK_TAI` ns → RFC 3339 UTC with nanoseconds (`@<unix ns>` where
/// out of the calendar's range). With offset 0, Unix ns.
pub fn format_ts(tai_ns: u64, tai_offset_ns: i64) -> String {
    let unix = tai_ns as i128 - tai_offset_ns as i128;
    time::OffsetDateTime::from_unix_timestamp_nanos(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("@{unix}"))
}

/// An RFC 3339 time (an event's `ts`, a policy's or an object's time) as
/// Unix ns; `None` when it is not one or is out of range.
pub fn parse_ts(s: &str) -> Option<i64> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .and_then(|t| i64::try_from(t.unix_timestamp_nanos()).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tai_conversion_saturates() {
        assert_eq!(to_tai(None, 37, u64::MAX), u64::MAX);
        assert_eq!(to_tai(Some(100), 37, 0), 137);
        assert_eq!(to_tai(Some(-1000), 37, 0), 0);
        assert_eq!(now_tai(-1000, 37), 0);
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(
            format_ts(37_000_000_000, 37_000_000_000),
            "1970-01-01T00:00:00Z"
        );
        assert_eq!(format_ts(1_500_000_000, 0), "1970-01-01T00:00:01.5Z");
        assert_eq!(format_ts(u64::MAX, 0), "2554-07-21T23:34:33.709551615Z");
    }

    #[test]
    fn the_offset_is_whole_seconds() {
        let s = 1_000_000_000i128;
        assert_eq!(tai_offset_from(37 * s + 1_000, 0), 37_000_000_000);
        assert_eq!(tai_offset_from(37 * s - 1_000, 0), 37_000_000_000);
        assert_eq!(tai_offset_from(5 * s, 5 * s + 2_000), 0);
    }
}
