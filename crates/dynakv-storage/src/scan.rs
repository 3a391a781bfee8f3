//! The key range of a prefix scan, shared by every engine.
//!
//! A scan asks for keys that start with `prefix`, strictly after `start_after`. Both conditions
//! together are one half-open byte range: from `max(prefix inclusive, start_after exclusive)` up
//! to the prefix's successor (exclusive), or unbounded when the prefix has no successor (it is
//! empty or all `0xFF`). Engines iterate that range in order and stop after `limit` entries, so a
//! scan never reads more than it returns.

use std::ops::Bound;

/// The bounds of a scan, or `None` when the range is empty (then the engine returns nothing).
pub(crate) type ScanRange = (Bound<Vec<u8>>, Bound<Vec<u8>>);

/// The smallest byte string greater than every string that starts with `prefix`, if any.
pub(crate) fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let last_incrementable = prefix.iter().rposition(|&byte| byte != u8::MAX)?;
    let mut successor = prefix[..=last_incrementable].to_vec();
    successor[last_incrementable] += 1;
    Some(successor)
}

/// The key range holding exactly the keys that start with `prefix` and sort strictly after
/// `start_after`; `None` when no key can match.
pub(crate) fn scan_range(prefix: &[u8], start_after: Option<&[u8]>) -> Option<ScanRange> {
    let upper = prefix_successor(prefix);
    let lower = match start_after {
        Some(after) if after >= prefix => {
            if upper.as_deref().is_some_and(|upper| after >= upper) {
                return None;
            }
            Bound::Excluded(after.to_vec())
        }
        _ => Bound::Included(prefix.to_vec()),
    };
    let upper = upper.map_or(Bound::Unbounded, Bound::Excluded);
    Some((lower, upper))
}

/// The capacity to reserve for a scan result: the limit, but never a huge allocation up front.
pub(crate) fn initial_capacity(limit: usize) -> usize {
    const MAX_RESERVED_ENTRIES: usize = 1024;
    limit.min(MAX_RESERVED_ENTRIES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn successor_of_prefixes() {
        assert_eq!(prefix_successor(b""), None);
        assert_eq!(prefix_successor(&[0xFF, 0xFF]), None);
        assert_eq!(prefix_successor(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_successor(&[b'a', 0xFF]), Some(b"b".to_vec()));
        assert_eq!(prefix_successor(&[0x00, 0xFF, 0xFF]), Some(vec![0x01]));
    }

    #[test]
    fn ranges() {
        assert_eq!(
            scan_range(b"ab", None),
            Some((
                Bound::Included(b"ab".to_vec()),
                Bound::Excluded(b"ac".to_vec())
            ))
        );
        // start_after before the prefix: the prefix bound wins.
        assert_eq!(
            scan_range(b"ab", Some(b"aa")),
            Some((
                Bound::Included(b"ab".to_vec()),
                Bound::Excluded(b"ac".to_vec())
            ))
        );
        // start_after inside the prefix.
        assert_eq!(
            scan_range(b"ab", Some(b"abz")),
            Some((
                Bound::Excluded(b"abz".to_vec()),
                Bound::Excluded(b"ac".to_vec())
            ))
        );
        // start_after past the prefix: nothing.
        assert_eq!(scan_range(b"ab", Some(b"ac")), None);
        assert_eq!(scan_range(b"ab", Some(b"b")), None);
        // Empty prefix: everything after start_after.
        assert_eq!(
            scan_range(b"", Some(b"k")),
            Some((Bound::Excluded(b"k".to_vec()), Bound::Unbounded))
        );
        assert_eq!(
            scan_range(&[0xFF], Some(&[0xFF, 0xFF])),
            Some((Bound::Excluded(vec![0xFF, 0xFF]), Bound::Unbounded))
        );
    }
}
