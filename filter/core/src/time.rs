//! Local time without a timezone database in the filter.
//!
//! The control plane compiles, for every IANA timezone a bundle uses, a table of UTC
//! offsets (`[[utc_start_seconds, offset_seconds], ...]`) covering the days ahead; the
//! filter finds the offset for Envoy's clock by binary search. DST transitions are thus
//! exact, and the wasm module carries no tzdb. The table builder
//! ([`offset_table`], feature `tz-compile`) runs in the control plane and in tests.

use std::collections::BTreeMap;

pub const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// Time inputs have minute resolution (`input.rs`, the memo in `policy.rs`).
pub const MINUTE_NS: u64 = 60_000_000_000;

/// UTC offsets of one timezone, sorted by start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetTable {
    entries: Vec<(i64, i32)>,
}

/// Local wall-clock facts for one timezone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalTime {
    /// Index into [`DAYS`].
    pub day: usize,
    /// Minute of the local day, 0..1440.
    pub minute: u32,
}

// === impl OffsetTable ===

impl OffsetTable {
    /// Checks the table: non-empty, strictly increasing starts, offsets within ±18 h.
    pub fn new(entries: Vec<(i64, i32)>) -> Result<Self, String> {
        if entries.is_empty() {
            return Err("offset table is empty".into());
        }
        if entries
            .windows(2)
            .any(|w| matches!(w, [a, b] if a.0 >= b.0))
        {
            return Err("offset table starts are not strictly increasing".into());
        }
        if entries.iter().any(|(_, off)| off.abs() > 18 * 3600) {
            return Err("offset beyond ±18 hours".into());
        }
        Ok(Self { entries })
    }

    pub fn utc() -> Self {
        Self {
            entries: vec![(i64::MIN, 0)],
        }
    }

    /// The offset in force at `unix_s`; before the first entry, the first offset.
    pub fn offset_at(&self, unix_s: i64) -> i32 {
        let idx = self.entries.partition_point(|(start, _)| *start <= unix_s);
        let entry = if idx == 0 {
            self.entries.first()
        } else {
            self.entries.get(idx - 1)
        };
        entry.map_or(0, |(_, offset)| *offset)
    }

    /// The last second the table is known to describe (its last transition).
    pub fn last_start(&self) -> i64 {
        self.entries.last().map_or(i64::MIN, |(start, _)| *start)
    }

    pub fn local(&self, unix_s: i64) -> LocalTime {
        let local = unix_s + i64::from(self.offset_at(unix_s));
        let days = local.div_euclid(86_400);
        LocalTime {
            // 1970-01-01 was a Thursday (index 3).
            day: (days + 3).rem_euclid(7) as usize,
            minute: (local.rem_euclid(86_400) / 60) as u32,
        }
    }

    /// The seconds of the next transition after `unix_s`, if the table has one.
    pub fn next_transition(&self, unix_s: i64) -> Option<i64> {
        let idx = self.entries.partition_point(|(start, _)| *start <= unix_s);
        self.entries.get(idx).map(|(start, _)| *start)
    }
}

// === impl LocalTime ===

impl LocalTime {
    pub fn day_name(&self) -> &'static str {
        DAYS.get(self.day).copied().unwrap_or("mon")
    }

    pub fn prev_day_name(&self) -> &'static str {
        DAYS.get((self.day + 6) % 7).copied().unwrap_or("sun")
    }
}

/// Parses `data.timezones` (`{tz: [[start, offset], ...]}`) into tables; `UTC` is always
/// present.
pub fn tables_from_json(
    value: Option<&serde_json::Value>,
) -> Result<BTreeMap<String, OffsetTable>, String> {
    let mut tables = BTreeMap::new();
    tables.insert("UTC".to_owned(), OffsetTable::utc());
    let Some(value) = value else {
        return Ok(tables);
    };
    let object = value
        .as_object()
        .ok_or("timezones must be an object of offset tables")?;
    for (tz, rows) in object {
        let rows = rows
            .as_array()
            .ok_or_else(|| format!("timezone {tz}: offset table must be an array"))?;
        let mut entries = Vec::with_capacity(rows.len());
        for row in rows {
            let pair = row.as_array().map(Vec::as_slice);
            match pair {
                Some([start, offset]) => {
                    let start = start.as_i64();
                    let offset = offset.as_i64().and_then(|o| i32::try_from(o).ok());
                    match (start, offset) {
                        (Some(s), Some(o)) => entries.push((s, o)),
                        _ => return Err(format!("timezone {tz}: entries are [seconds, offset]")),
                    }
                }
                _ => return Err(format!("timezone {tz}: entries are [seconds, offset]")),
            }
        }
        let table = OffsetTable::new(entries).map_err(|e| format!("timezone {tz}: {e}"))?;
        tables.insert(tz.clone(), table);
    }
    Ok(tables)
}

/// Builds the offset table of an IANA timezone between two instants (seconds).
#[cfg(any(test, feature = "tz-compile"))]
pub fn offset_table(tz: &str, from: i64, to: i64) -> Result<Vec<(i64, i32)>, String> {
    use chrono::{Offset, TimeZone};
    let zone: chrono_tz::Tz = tz
        .parse()
        .map_err(|_| format!("unknown IANA timezone {tz:?}"))?;
    let offset = |t: i64| -> i32 {
        chrono::DateTime::from_timestamp(t, 0)
            .map(|utc| {
                zone.offset_from_utc_datetime(&utc.naive_utc())
                    .fix()
                    .local_minus_utc()
            })
            .unwrap_or(0)
    };
    let mut entries = vec![(from, offset(from))];
    let mut t = from;
    while t < to {
        let next = (t + 3600).min(to);
        let (a, b) = (offset(t), offset(next));
        if a != b {
            // Binary search the first second with the new offset.
            let (mut lo, mut hi) = (t, next);
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if offset(mid) == a {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            entries.push((hi, b));
        }
        t = next;
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(s).unwrap().timestamp()
    }

    #[test]
    fn new_york_dst_2026() {
        let table = OffsetTable::new(
            offset_table(
                "America/New_York",
                ts("2026-01-01T00:00:00Z"),
                ts("2027-01-01T00:00:00Z"),
            )
            .unwrap(),
        )
        .unwrap();
        // Spring forward: 2026-03-08 07:00 UTC (02:00 EST → 03:00 EDT).
        assert_eq!(table.offset_at(ts("2026-03-08T06:59:59Z")), -5 * 3600);
        assert_eq!(table.offset_at(ts("2026-03-08T07:00:00Z")), -4 * 3600);
        // Fall back: 2026-11-01 06:00 UTC (02:00 EDT → 01:00 EST).
        assert_eq!(table.offset_at(ts("2026-11-01T05:59:59Z")), -4 * 3600);
        assert_eq!(table.offset_at(ts("2026-11-01T06:00:00Z")), -5 * 3600);
        let local = table.local(ts("2026-03-09T13:30:00Z"));
        assert_eq!((local.day_name(), local.minute), ("mon", 9 * 60 + 30));
        assert_eq!(local.prev_day_name(), "sun");
    }

    #[test]
    fn unknown_timezone_is_an_error() {
        assert!(offset_table("Mars/Olympus", 0, 10).is_err());
    }

    #[test]
    fn tables_are_validated() {
        assert!(OffsetTable::new(vec![]).is_err());
        assert!(OffsetTable::new(vec![(5, 0), (5, 3600)]).is_err());
        let json = serde_json::json!({"X/Y": [[0, 3600], [100, 7200]]});
        let tables = tables_from_json(Some(&json)).unwrap();
        assert_eq!(tables["X/Y"].offset_at(150), 7200);
        assert_eq!(tables["UTC"].offset_at(150), 0);
        assert!(tables_from_json(Some(&serde_json::json!({"X": [[0]]}))).is_err());
    }
}
