//! Record stamps as the Python zae-limiter 0.17 writes them (its table contract, section
//! 2 to 7): times as ISO strings (`2026-11-30T10:28:41Z`), audit ids as monotonic ULIDs,
//! entity incarnations as 16 hex digits. Readers also take the epoch-millisecond numbers
//! this crate wrote before it shared tables with Python.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_dynamodb::types::AttributeValue;
use parking_lot::Mutex;

use super::codec::Item;

/// `ms` (epoch milliseconds) as Python's ISO form: UTC, whole seconds, `Z`.
pub(super) fn iso(ms: i64) -> String {
    let time = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(time).to_string()
}

/// A stored time in epoch milliseconds: an ISO string (Python, and this crate now) or a
/// number (what this crate wrote before).
pub(super) fn time_ms(item: &Item, name: &str) -> Option<i64> {
    match item.get(name)? {
        AttributeValue::S(text) => {
            let time = humantime::parse_rfc3339_weak(text.trim()).ok()?;
            let ms = time.duration_since(UNIX_EPOCH).ok()?.as_millis();
            i64::try_from(ms).ok()
        }
        _ => super::codec::get_i64(item, name),
    }
}

/// A new audit event id: a ULID (26 characters of Crockford base32), strictly increasing
/// within this process as Python's are, so events sort by time on both sides.
pub(super) fn audit_id(now_ms: i64) -> String {
    static GENERATOR: Mutex<Option<ulid::Generator>> = Mutex::new(None);
    let time = UNIX_EPOCH + Duration::from_millis(u64::try_from(now_ms).unwrap_or(0));
    let mut generator = GENERATOR.lock();
    let generator = generator.get_or_insert_with(ulid::Generator::new);
    // The generator refuses only when 2^80 ids fell in one millisecond, or the clock went
    // back; a fresh random id at that time keeps the event (its order may then tie).
    match generator.generate_from_datetime(time) {
        Ok(id) => id.to_string(),
        Err(_) => ulid::Ulid::from_datetime(time.max(SystemTime::now())).to_string(),
    }
}

/// A new entity incarnation (`pinc`): 16 lowercase hex digits, as `secrets.token_hex(8)`.
pub(super) fn incarnation() -> String {
    format!("{:016x}", rand::random::<u64>())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn times_round_trip_in_both_forms() {
        assert_eq!(iso(1_764_498_521_999), "2025-11-30T10:28:41Z");
        let mut item: Item = HashMap::new();
        item.insert(
            "at".into(),
            AttributeValue::S("2025-11-30T10:28:41Z".into()),
        );
        item.insert("old".into(), AttributeValue::N("1764498521000".into()));
        assert_eq!(time_ms(&item, "at"), Some(1_764_498_521_000));
        assert_eq!(time_ms(&item, "old"), Some(1_764_498_521_000));
        assert_eq!(time_ms(&item, "missing"), None);
    }

    #[test]
    fn audit_ids_are_ulids_increasing_within_a_millisecond() {
        let ids: Vec<String> = (0..100).map(|_| audit_id(1_764_498_521_000)).collect();
        assert!(ids
            .iter()
            .all(|id| id.len() == 26 && ulid::Ulid::from_string(id).is_ok()));
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        assert!(audit_id(1_764_498_522_000) > ids[99]);
        let pinc = incarnation();
        assert!(pinc.len() == 16 && pinc.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
