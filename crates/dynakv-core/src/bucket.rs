//! Bucket properties: replication and conflict-handling settings per bucket.
//!
//! The JSON shape is Riak's (`{"props": {...}}`): quorum values are integers or the symbolic
//! `"one"`, `"quorum"`, `"all"`, `"default"`. Unknown properties and out-of-range values are
//! refused with a clear error and change nothing (the update is validated as a whole before it
//! is applied). `allow_mult` defaults to true: siblings are kept unless a bucket opts out.

use crate::limits;
use crate::storage::Durability;
use serde_json::{Map, Value, json};
use thiserror::Error;

/// A replica count requirement as Riak expresses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quorum {
    One,
    Quorum,
    All,
    /// The bucket's own setting (only meaningful in a request).
    Default,
    Count(u32),
}

impl Quorum {
    /// The number of replies needed out of `n`, with `default` standing for `Default`.
    pub fn resolve(self, n: u32, default: Quorum) -> u32 {
        match self {
            Quorum::One => 1,
            Quorum::Quorum => n / 2 + 1,
            Quorum::All => n,
            Quorum::Default => match default {
                Quorum::Default => n / 2 + 1,
                other => other.resolve(n, Quorum::Quorum),
            },
            Quorum::Count(count) => count,
        }
    }

    /// Parse a JSON value (`2`, `"2"`, `"quorum"`, ...).
    pub fn from_json(value: &Value) -> Option<Quorum> {
        match value {
            Value::Number(n) => n
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Quorum::Count),
            Value::String(s) => Quorum::parse(s),
            _ => None,
        }
    }

    /// Parse a query-string or JSON string value.
    pub fn parse(text: &str) -> Option<Quorum> {
        match text {
            "one" => Some(Quorum::One),
            "quorum" => Some(Quorum::Quorum),
            "all" => Some(Quorum::All),
            "default" => Some(Quorum::Default),
            other => other.parse::<u32>().ok().map(Quorum::Count),
        }
    }

    pub fn to_json(self) -> Value {
        match self {
            Quorum::One => json!("one"),
            Quorum::Quorum => json!("quorum"),
            Quorum::All => json!("all"),
            Quorum::Default => json!("default"),
            Quorum::Count(n) => json!(n),
        }
    }
}

/// Settings of one bucket (Riak's property names, so several independent flags).
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::struct_excessive_bools)]
pub struct BucketProps {
    pub n_val: u32,
    pub r: Quorum,
    pub w: Quorum,
    pub dw: Quorum,
    pub rw: Quorum,
    pub pr: Quorum,
    pub pw: Quorum,
    pub allow_mult: bool,
    pub last_write_wins: bool,
    pub basic_quorum: bool,
    pub notfound_ok: bool,
    pub durability: Durability,
    /// The data type every key of the bucket holds (a bucket type's `datatype` property,
    /// fixed once the type is active); `None` for opaque values.
    pub datatype: Option<crate::crdt::DataTypeKind>,
    /// Time to live of the bucket's values, in seconds (`None`: they do not expire).
    pub ttl_secs: Option<u64>,
}

impl Default for BucketProps {
    fn default() -> Self {
        BucketProps {
            n_val: 3,
            r: Quorum::Quorum,
            w: Quorum::Quorum,
            dw: Quorum::Quorum,
            rw: Quorum::Quorum,
            pr: Quorum::Count(0),
            pw: Quorum::Count(0),
            allow_mult: true,
            last_write_wins: false,
            basic_quorum: false,
            notfound_ok: true,
            durability: Durability::Fsync,
            datatype: None,
            ttl_secs: None,
        }
    }
}

/// The longest time to live a bucket or a value may have: ten years, in seconds.
pub const MAX_TTL_SECS: u64 = 10 * 365 * 24 * 3600;

/// Why a properties update was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PropsError {
    #[error("unknown bucket property {0:?}")]
    Unknown(String),
    #[error("bad value for bucket property {name:?}: {reason}")]
    BadValue { name: String, reason: String },
    #[error("body must be a JSON object of the form {{\"props\": {{...}}}}")]
    Shape,
}

fn bad(name: &str, reason: &str) -> PropsError {
    PropsError::BadValue {
        name: name.to_owned(),
        reason: reason.to_owned(),
    }
}

impl BucketProps {
    /// Riak's JSON form, including the bucket name.
    pub fn to_json(&self, bucket: &str) -> Value {
        let mut out = json!({
            "name": bucket,
            "n_val": self.n_val,
            "r": self.r.to_json(),
            "w": self.w.to_json(),
            "dw": self.dw.to_json(),
            "rw": self.rw.to_json(),
            "pr": self.pr.to_json(),
            "pw": self.pw.to_json(),
            "allow_mult": self.allow_mult,
            "last_write_wins": self.last_write_wins,
            "basic_quorum": self.basic_quorum,
            "notfound_ok": self.notfound_ok,
            "durability": match self.durability {
                Durability::Fsync => "fsync",
                Durability::Buffered => "buffered",
            },
        });
        if let (Some(kind), Some(map)) = (self.datatype, out.as_object_mut()) {
            map.insert("datatype".into(), json!(kind.name()));
        }
        if let (Some(secs), Some(map)) = (self.ttl_secs, out.as_object_mut()) {
            map.insert("ttl_secs".into(), json!(secs));
        }
        out
    }

    /// Apply an update (the inner `props` object). All-or-nothing: on error `self` is unchanged.
    pub fn apply(&mut self, bucket: &str, update: &Map<String, Value>) -> Result<(), PropsError> {
        let mut next = self.clone();
        for (name, value) in update {
            let quorum = |value: &Value| {
                Quorum::from_json(value).ok_or_else(|| {
                    bad(
                        name,
                        "expected a non-negative integer or one of \"one\", \"quorum\", \"all\", \"default\"",
                    )
                })
            };
            let boolean = |value: &Value| {
                value
                    .as_bool()
                    .ok_or_else(|| bad(name, "expected true or false"))
            };
            match name.as_str() {
                "name" => {
                    if value.as_str() != Some(bucket) {
                        return Err(bad(name, "must equal the bucket's name"));
                    }
                }
                "n_val" => {
                    let n = value
                        .as_u64()
                        .filter(|n| (1..=u64::from(limits::MAX_N_VAL)).contains(n))
                        .ok_or_else(|| {
                            bad(
                                name,
                                &format!("expected an integer from 1 to {}", limits::MAX_N_VAL),
                            )
                        })?;
                    next.n_val = u32::try_from(n).unwrap_or(limits::MAX_N_VAL);
                }
                "r" => next.r = quorum(value)?,
                "w" => next.w = quorum(value)?,
                "dw" => next.dw = quorum(value)?,
                "rw" => next.rw = quorum(value)?,
                "pr" => next.pr = quorum(value)?,
                "pw" => next.pw = quorum(value)?,
                "allow_mult" => next.allow_mult = boolean(value)?,
                "last_write_wins" => next.last_write_wins = boolean(value)?,
                "basic_quorum" => next.basic_quorum = boolean(value)?,
                "notfound_ok" => next.notfound_ok = boolean(value)?,
                "durability" => {
                    next.durability = match value.as_str() {
                        Some("fsync") => Durability::Fsync,
                        Some("buffered") => Durability::Buffered,
                        _ => return Err(bad(name, "expected \"fsync\" or \"buffered\"")),
                    }
                }
                "ttl_secs" => {
                    next.ttl_secs = match value.as_u64() {
                        _ if value.is_null() => None,
                        Some(0) => None,
                        Some(secs) if secs <= MAX_TTL_SECS => Some(secs),
                        _ => {
                            return Err(bad(
                                name,
                                &format!("expected seconds from 0 (none) to {MAX_TTL_SECS}"),
                            ));
                        }
                    }
                }
                "datatype" => next.datatype = match value {
                    Value::Null => None,
                    Value::String(name) => {
                        Some(crate::crdt::DataTypeKind::parse(name).ok_or_else(|| {
                            bad(
                                "datatype",
                                "expected one of \"counter\", \"set\", \"map\", \"hll\", \"gset\"",
                            )
                        })?)
                    }
                    _ => return Err(bad(name, "expected a data type name")),
                },
                other => return Err(PropsError::Unknown(other.to_owned())),
            }
        }
        for (name, q) in [
            ("r", next.r),
            ("w", next.w),
            ("dw", next.dw),
            ("rw", next.rw),
            ("pr", next.pr),
            ("pw", next.pw),
        ] {
            if let Quorum::Count(count) = q
                && count > next.n_val
            {
                return Err(bad(
                    name,
                    &format!("{count} is more than n_val {}", next.n_val),
                ));
            }
        }
        if next.last_write_wins && next.allow_mult {
            // Riak refuses this combination too: siblings cannot be kept and dropped at once.
            return Err(bad(
                "last_write_wins",
                "cannot be true while allow_mult is true; set allow_mult to false as well",
            ));
        }
        if next.datatype.is_some() && (next.last_write_wins || !next.allow_mult) {
            // Replicas of a data type merge their versions; dropping one would drop updates.
            return Err(bad(
                "datatype",
                "a data type needs allow_mult true and last_write_wins false",
            ));
        }
        *self = next;
        Ok(())
    }

    /// [`BucketProps::apply`] for one bucket's own properties: its data type is its type's
    /// and cannot be changed bucket by bucket.
    pub fn apply_to_bucket(
        &mut self,
        bucket: &str,
        update: &Map<String, Value>,
    ) -> Result<(), PropsError> {
        if let Some(value) = update.get("datatype") {
            let asked = value.as_str().and_then(crate::crdt::DataTypeKind::parse);
            if asked != self.datatype {
                return Err(bad(
                    "datatype",
                    "is its bucket type's: set it when creating the type",
                ));
            }
        }
        self.apply(bucket, update)
    }

    /// Parse the stored form (the output of `to_json`).
    pub fn from_stored(bucket: &str, value: &Value) -> Result<BucketProps, PropsError> {
        let map = value.as_object().ok_or(PropsError::Shape)?;
        let mut props = BucketProps::default();
        // Stored props were valid when written; `apply` checks combinations only at the end.
        props.apply(bucket, map)?;
        Ok(props)
    }
}

/// Extract the `props` object from a request body.
pub fn props_from_body(body: &[u8]) -> Result<Map<String, Value>, PropsError> {
    let value: Value = serde_json::from_slice(body).map_err(|_| PropsError::Shape)?;
    match value {
        Value::Object(mut outer) => match outer.remove("props") {
            Some(Value::Object(inner)) if outer.is_empty() => Ok(inner),
            _ => Err(PropsError::Shape),
        },
        _ => Err(PropsError::Shape),
    }
}

/// Why a bucket could not get properties of its own.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CustomBucketError {
    #[error(
        "at most {limit} buckets may have their own properties and the cluster has {count}: \
         this change was refused and changed nothing; keep this bucket on the default \
         properties, or use a bucket that already has its own"
    )]
    TooMany { count: usize, limit: usize },
}

/// Whether a properties change (a set or a reset) of `bucket` may be made in `state`: a
/// bucket that has an entry may always change it; a new one needs room under
/// `MAX_CUSTOM_BUCKETS`. Gossip does not take entries past that limit from other nodes, so
/// a change made past it would stay on the node that made it: the node that receives the
/// change checks with this, before it changes anything (the server's HTTP API and the core
/// `Node`).
pub fn check_custom_bucket_room(
    state: &crate::membership::ClusterState,
    bucket: &str,
) -> Result<(), CustomBucketError> {
    let count = state.bucket_props.len();
    let limit = crate::membership::MAX_CUSTOM_BUCKETS;
    if state.bucket_props.contains_key(bucket) || count < limit {
        return Ok(());
    }
    Err(CustomBucketError::TooMany { count, limit })
}

/// Set (with `None`, reset) `bucket`'s properties in the cluster state, as `node` at
/// `now_ms`: the new entry is newer than the one it replaces (its timestamp is past the old
/// one's, and at least `now_ms`; gossip keeps the newest entry), and a change that would make
/// one custom bucket too many is refused and changes nothing ([`check_custom_bucket_room`]).
/// The one rule for the server's HTTP API and `Node`.
///
/// # Errors
/// The cluster has no room for another bucket with its own properties.
pub fn set_props(
    state: &mut crate::membership::ClusterState,
    bucket: &str,
    props: Option<&BucketProps>,
    node: &crate::ring::NodeId,
    now_ms: u64,
) -> Result<(), CustomBucketError> {
    check_custom_bucket_room(state, bucket)?;
    let timestamp_ms = state
        .bucket_props
        .get(bucket)
        .map_or(0, |e| e.timestamp_ms.saturating_add(1))
        .max(now_ms);
    let entry = crate::membership::BucketPropsEntry {
        timestamp_ms,
        node: node.clone(),
        props_json: props.map(|p| p.to_json(bucket).to_string()),
    };
    state.bucket_props.insert(bucket.to_owned(), entry);
    Ok(())
}

/// The cluster state's bucket properties, parsed once per entry (kept by the entry's
/// timestamp; at most `MAX_PARSED_PROPS` parses are kept, then the cache starts over).
#[derive(Debug, Default)]
pub struct PropsCache {
    /// Buckets whose entry holds properties of their own: the entry's version and its parse.
    parsed: std::collections::HashMap<String, (EntryVersion, BucketProps)>,
    /// Bucket types: the type entry's version and its parse.
    types: std::collections::HashMap<String, (EntryVersion, BucketProps)>,
}

/// What identifies one write of an entry: its timestamp and the node that made it (a node
/// never stamps two writes of one entry alike; merges break ties on the node).
type EntryVersion = (u64, crate::ring::NodeId);

impl PropsCache {
    /// `bucket`'s properties when they need no parsing; `None` otherwise (then
    /// [`Self::props`]). See [`Self::props`] for where they come from.
    pub fn cached(
        &self,
        state: &crate::membership::ClusterState,
        bucket: &str,
        defaults: &BucketProps,
    ) -> Option<BucketProps> {
        if let Some(entry) = state.bucket_props.get(bucket)
            && entry.props_json.is_some()
        {
            return match self.parsed.get(bucket) {
                Some(((ts, node), props)) if *ts == entry.timestamp_ms && *node == entry.node => {
                    Some(props.clone())
                }
                _ => None,
            };
        }
        let (bucket_type, _) = crate::bucket_types::split_bucket(bucket);
        let Some(entry) = state.bucket_types.get(bucket_type) else {
            return Some(defaults.clone());
        };
        match self.types.get(bucket_type) {
            Some(((ts, node), props)) if *ts == entry.timestamp_ms && *node == entry.node => {
                Some(props.clone())
            }
            _ => None,
        }
    }

    /// `bucket`'s properties: its entry's when it has properties of its own (a stored
    /// `{"props": ...}`, a full set taken when they were set); else, for a bucket of a type,
    /// the type's; else `defaults` (also for an entry that cannot be read). Parses are kept
    /// by the entry's version (at most `MAX_PARSED_PROPS` of each kind).
    pub fn props(
        &mut self,
        state: &crate::membership::ClusterState,
        bucket: &str,
        defaults: &BucketProps,
    ) -> BucketProps {
        if let Some(props) = self.cached(state, bucket, defaults) {
            return props;
        }
        if let Some(entry) = state.bucket_props.get(bucket)
            && let Some(json) = entry.props_json.as_deref()
        {
            let props = serde_json::from_str::<Value>(json)
                .ok()
                .and_then(|value| BucketProps::from_stored(bucket, &value).ok())
                .unwrap_or_else(|| defaults.clone());
            if self.parsed.len() >= limits::MAX_PARSED_PROPS {
                self.parsed.clear();
            }
            let version = (entry.timestamp_ms, entry.node.clone());
            self.parsed
                .insert(bucket.to_owned(), (version, props.clone()));
            return props;
        }
        let (bucket_type, _) = crate::bucket_types::split_bucket(bucket);
        let Some(entry) = state.bucket_types.get(bucket_type) else {
            return defaults.clone();
        };
        let props = crate::bucket_types::parse(bucket_type, entry, defaults);
        if self.types.len() >= limits::MAX_PARSED_PROPS {
            self.types.clear();
        }
        let version = (entry.timestamp_ms, entry.node.clone());
        self.types
            .insert(bucket_type.to_owned(), (version, props.clone()));
        props
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_validates_all_or_nothing() {
        let mut props = BucketProps::default();
        let update = props_from_body(br#"{"props":{"n_val":2,"bogus":1}}"#).unwrap();
        assert_eq!(
            props.apply("b", &update),
            Err(PropsError::Unknown("bogus".into()))
        );
        assert_eq!(props, BucketProps::default());
        let update = props_from_body(br#"{"props":{"n_val":2,"r":"one","w":2}}"#).unwrap();
        props.apply("b", &update).unwrap();
        assert_eq!(props.n_val, 2);
        assert_eq!(props.r, Quorum::One);
        let update = props_from_body(br#"{"props":{"w":5}}"#).unwrap();
        assert!(props.apply("b", &update).is_err());
        let update = props_from_body(br#"{"props":{"last_write_wins":true}}"#).unwrap();
        assert!(props.apply("b", &update).is_err());
        let update =
            props_from_body(br#"{"props":{"last_write_wins":true,"allow_mult":false}}"#).unwrap();
        props.apply("b", &update).unwrap();
        let stored = props.to_json("b");
        assert_eq!(BucketProps::from_stored("b", &stored).unwrap(), props);
        assert!(props_from_body(b"[]").is_err());
        assert!(props_from_body(b"{\"n_val\":1}").is_err());
    }

    #[test]
    fn quorum_resolution() {
        assert_eq!(Quorum::Quorum.resolve(3, Quorum::Default), 2);
        assert_eq!(Quorum::All.resolve(3, Quorum::Default), 3);
        assert_eq!(Quorum::Default.resolve(3, Quorum::One), 1);
        assert_eq!(Quorum::parse("2"), Some(Quorum::Count(2)));
        assert_eq!(Quorum::parse("x"), None);
    }

    /// A change is stamped past the entry it replaces (a clock behind it cannot make it lose
    /// to the old one in gossip), the cache follows the new entry, and a reset or an
    /// unreadable entry gives the defaults.
    #[test]
    fn set_props_stamps_past_the_old_entry_and_the_cache_follows() {
        use crate::test_support::{id, settled_cluster};
        let mut state = settled_cluster(&["a"], 8);
        let defaults = BucketProps::default();
        let mut cache = PropsCache::default();
        let two = BucketProps {
            n_val: 2,
            ..BucketProps::default()
        };
        set_props(&mut state, "b", Some(&two), &id("a"), 1_000).unwrap();
        assert_eq!(state.bucket_props["b"].timestamp_ms, 1_000);
        assert_eq!(cache.cached(&state, "b", &defaults), None, "not parsed yet");
        assert_eq!(cache.props(&state, "b", &defaults).n_val, 2);
        assert_eq!(
            cache.cached(&state, "b", &defaults).map(|p| p.n_val),
            Some(2)
        );
        // A node whose clock is behind still stamps past the entry it replaces.
        let one = BucketProps {
            n_val: 1,
            ..BucketProps::default()
        };
        set_props(&mut state, "b", Some(&one), &id("a"), 5).unwrap();
        assert_eq!(state.bucket_props["b"].timestamp_ms, 1_001);
        assert_eq!(
            cache.props(&state, "b", &defaults).n_val,
            1,
            "the new entry"
        );
        set_props(&mut state, "b", None, &id("a"), 5).unwrap();
        assert_eq!(cache.props(&state, "b", &defaults), defaults, "reset");
        if let Some(entry) = state.bucket_props.get_mut("b") {
            entry.props_json = Some("{not json".into());
            entry.timestamp_ms += 1;
        }
        assert_eq!(cache.props(&state, "b", &defaults), defaults, "unreadable");
        assert_eq!(cache.props(&state, "none", &defaults), defaults, "no entry");
    }

    #[test]
    fn set_props_refuses_one_custom_bucket_too_many_and_changes_nothing() {
        use crate::test_support::{id, settled_cluster};
        let mut state = settled_cluster(&["a"], 8);
        for i in 0..crate::membership::MAX_CUSTOM_BUCKETS {
            set_props(&mut state, &format!("b{i}"), None, &id("a"), 1).unwrap();
        }
        let before = state.clone();
        let refused = set_props(&mut state, "one-more", None, &id("a"), 1);
        assert!(matches!(refused, Err(CustomBucketError::TooMany { .. })));
        assert_eq!(state, before);
        set_props(&mut state, "b0", None, &id("a"), 1).unwrap();
    }
}
