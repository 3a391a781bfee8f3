//! Bucket types (Riak 2.0+): named sets of bucket properties that buckets of the type
//! inherit, kept in the cluster state, spread by gossip and persisted with it.
//!
//! Riak's rules: a type is created (with its properties), then activated once every member
//! knows it (each member marks the types it has seen, and the mark spreads by gossip), and
//! only an active type serves buckets. The `default` type always exists, is always active,
//! and has the built-in default properties (siblings on). Properties may be updated after
//! activation, except the ones Riak fixes then ([`FIXED_AFTER_ACTIVATION`]).
//!
//! A bucket of a type other than `default` is stored, replicated and listed under its
//! internal name, `NUL type NUL bucket` ([`internal_bucket`]); a name a client gives may not
//! contain NUL (`keys::check_bucket`), so the two never meet. A bucket of `default` keeps
//! its own name, as before types existed.

use crate::bucket::{BucketProps, PropsError};
use crate::membership::ClusterState;
use crate::ring::NodeId;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeSet;

/// The type every bucket named without one belongs to.
pub const DEFAULT_TYPE: &str = "default";
/// Most bucket types a cluster holds: a create past it is refused.
pub const MAX_BUCKET_TYPES: usize = 256;
/// Most types merges keep: creates made concurrently on nodes that could not see each other
/// may together pass [`MAX_BUCKET_TYPES`]; merges keep them up to this, and past it keep the
/// first by name (so every node keeps the same ones).
pub const MAX_BUCKET_TYPES_MERGED: usize = 2 * MAX_BUCKET_TYPES;
/// Longest type name, in bytes.
pub const MAX_TYPE_NAME_BYTES: usize = 128;
/// Properties Riak does not let an active type change.
pub const FIXED_AFTER_ACTIVATION: [&str; 3] = ["datatype", "consistent", "write_once"];
/// The character that separates a type from its bucket in an internal bucket name.
const SEPARATOR: char = '\0';

/// A type as last written anywhere in the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketTypeEntry {
    /// The properties' last write (wall clock of `node`); gossip keeps the newest.
    pub timestamp_ms: u64,
    pub node: NodeId,
    /// The type's properties as `BucketProps::to_json` writes them.
    pub props_json: String,
    /// Activated: buckets of the type are served. Never undone (merges keep it).
    pub active: bool,
    /// Members that have the type in their state (grows by gossip; activation needs all).
    pub seen_by: BTreeSet<NodeId>,
}

/// What an operator asks of a type.
#[derive(Debug, Clone, PartialEq)]
pub enum TypeChange {
    /// Make a new type with these properties (an update of the defaults).
    Create {
        name: String,
        props: Map<String, Value>,
    },
    /// Serve buckets of the type (every member must know it).
    Activate { name: String },
    /// Change an existing type's properties.
    Update {
        name: String,
        props: Map<String, Value>,
    },
}

/// Why a type change was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TypeError {
    #[error("invalid bucket type name {0:?}: {1}")]
    BadName(String, &'static str),
    #[error("the bucket type {0:?} already exists")]
    Exists(String),
    #[error("no bucket type named {0:?}")]
    Unknown(String),
    #[error("the bucket type {0:?} is not active")]
    NotActive(String),
    #[error(
        "the bucket type {name:?} is not known to every member yet ({missing} of them have not \
         seen it): activate it once `bucket-type status` says ready"
    )]
    NotReady { name: String, missing: usize },
    #[error("the default bucket type cannot be created, activated or changed")]
    Default,
    #[error("the cluster holds {MAX_BUCKET_TYPES} bucket types, the most it may")]
    TooMany,
    #[error("the property {0:?} cannot change once the type is active")]
    Fixed(String),
    #[error("{0}")]
    Props(#[from] PropsError),
}

impl TypeError {
    /// The HTTP status of the refusal.
    pub fn status(&self) -> u16 {
        match self {
            TypeError::Unknown(_) => 404,
            TypeError::Exists(_) | TypeError::NotReady { .. } | TypeError::Fixed(_) => 409,
            _ => 400,
        }
    }
}

/// Check a type name a client or operator gives.
pub fn check_type_name(name: &str) -> Result<(), TypeError> {
    let bad = |why| Err(TypeError::BadName(name.to_owned(), why));
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_TYPE_NAME_BYTES {
        return bad("longer than 128 bytes");
    }
    if name.chars().any(|c| c.is_control() || c == '/') {
        return bad("control characters and '/' are not allowed");
    }
    Ok(())
}

/// The internal name of `bucket` of `bucket_type`.
pub fn internal_bucket(bucket_type: &str, bucket: &str) -> String {
    if bucket_type == DEFAULT_TYPE {
        bucket.to_owned()
    } else {
        format!("{SEPARATOR}{bucket_type}{SEPARATOR}{bucket}")
    }
}

/// The type and the bucket of an internal bucket name.
pub fn split_bucket(internal: &str) -> (&str, &str) {
    internal
        .strip_prefix(SEPARATOR)
        .and_then(|rest| rest.split_once(SEPARATOR))
        .unwrap_or((DEFAULT_TYPE, internal))
}

/// The buckets of `bucket_type` among internal bucket names, by the names clients use.
pub fn buckets_of(bucket_type: &str, internal: Vec<String>) -> Vec<String> {
    internal
        .into_iter()
        .filter_map(|name| {
            let (t, bucket) = split_bucket(&name);
            (t == bucket_type).then(|| bucket.to_owned())
        })
        .collect()
}

/// The properties of `bucket_type`, active or not (`defaults` for `default`); `None` when
/// there is no such type.
pub fn props_of(
    state: &ClusterState,
    bucket_type: &str,
    defaults: &BucketProps,
) -> Option<BucketProps> {
    if bucket_type == DEFAULT_TYPE {
        return Some(defaults.clone());
    }
    let entry = state.bucket_types.get(bucket_type)?;
    Some(parse(bucket_type, entry, defaults))
}

/// Whether buckets of `bucket_type` are served: `default` always, another once activated.
pub fn is_active(state: &ClusterState, bucket_type: &str) -> bool {
    bucket_type == DEFAULT_TYPE
        || state
            .bucket_types
            .get(bucket_type)
            .is_some_and(|t| t.active)
}

/// The properties of an active `bucket_type` (`defaults` for `default`); `None` when there
/// is no such active type.
pub fn type_props(
    state: &ClusterState,
    bucket_type: &str,
    defaults: &BucketProps,
) -> Option<BucketProps> {
    if !is_active(state, bucket_type) {
        return None;
    }
    props_of(state, bucket_type, defaults)
}

/// A type's properties (its entry, over the built-in defaults for anything it lacks).
pub fn parse(bucket_type: &str, entry: &BucketTypeEntry, defaults: &BucketProps) -> BucketProps {
    serde_json::from_str::<Value>(&entry.props_json)
        .ok()
        .and_then(|value| value.as_object().cloned())
        .and_then(|map| {
            let mut props = defaults.clone();
            props.apply(bucket_type, &without_name(map)).ok()?;
            Some(props)
        })
        .unwrap_or_else(|| defaults.clone())
}

/// A props map without its `name` (which `apply` checks against the bucket's name).
fn without_name(mut map: Map<String, Value>) -> Map<String, Value> {
    map.remove("name");
    map
}

/// Whether the type is known to every valid member of `state` (activation may proceed).
pub fn missing_members(state: &ClusterState, entry: &BucketTypeEntry) -> usize {
    state
        .members
        .values()
        .filter(|m| m.status == crate::membership::MemberStatus::Valid)
        .filter(|m| !entry.seen_by.contains(&m.id))
        .count()
}

/// Apply an operator's change to `state`, as `node` at `now_ms` (the one rule of the
/// server and the simulator's nodes, through the core `Node`).
pub fn apply(
    state: &mut ClusterState,
    change: TypeChange,
    node: &NodeId,
    now_ms: u64,
    defaults: &BucketProps,
) -> Result<(), TypeError> {
    let name = match &change {
        TypeChange::Create { name, .. }
        | TypeChange::Activate { name }
        | TypeChange::Update { name, .. } => name.clone(),
    };
    check_type_name(&name)?;
    if name == DEFAULT_TYPE {
        return Err(TypeError::Default);
    }
    let stamp = |old: Option<&BucketTypeEntry>| {
        old.map_or(0, |e| e.timestamp_ms.saturating_add(1))
            .max(now_ms)
    };
    match change {
        TypeChange::Create { props, .. } => {
            if state.bucket_types.contains_key(&name) {
                return Err(TypeError::Exists(name));
            }
            if state.bucket_types.len() >= MAX_BUCKET_TYPES {
                return Err(TypeError::TooMany);
            }
            refuse_unsupported(&props)?;
            let mut parsed = defaults.clone();
            parsed.apply(&name, &without_name(props))?;
            let entry = BucketTypeEntry {
                timestamp_ms: now_ms,
                node: node.clone(),
                props_json: parsed.to_json(&name).to_string(),
                active: false,
                seen_by: BTreeSet::from([node.clone()]),
            };
            state.bucket_types.insert(name, entry);
        }
        TypeChange::Activate { .. } => {
            let entry = state
                .bucket_types
                .get(&name)
                .ok_or_else(|| TypeError::Unknown(name.clone()))?;
            let missing = missing_members(state, entry);
            if missing > 0 {
                return Err(TypeError::NotReady { name, missing });
            }
            // Only the flag: merges keep it once set, and the properties' own version stays,
            // so an update made elsewhere meanwhile is not overwritten.
            if let Some(entry) = state.bucket_types.get_mut(&name) {
                entry.active = true;
            }
        }
        TypeChange::Update { props, .. } => {
            let entry = state
                .bucket_types
                .get(&name)
                .ok_or_else(|| TypeError::Unknown(name.clone()))?;
            if entry.active
                && let Some(fixed) = props
                    .keys()
                    .find(|k| FIXED_AFTER_ACTIVATION.contains(&k.as_str()))
            {
                return Err(TypeError::Fixed(fixed.clone()));
            }
            refuse_unsupported(&props)?;
            let mut parsed = parse(&name, entry, defaults);
            parsed.apply(&name, &without_name(props))?;
            let timestamp_ms = stamp(Some(entry));
            if let Some(entry) = state.bucket_types.get_mut(&name) {
                entry.props_json = parsed.to_json(&name).to_string();
                entry.timestamp_ms = timestamp_ms;
                entry.node = node.clone();
            }
        }
    }
    Ok(())
}

/// The type properties Riak has and dynakv does not serve yet are refused by name (rather
/// than as unknown properties).
fn refuse_unsupported(props: &Map<String, Value>) -> Result<(), TypeError> {
    for name in ["consistent", "write_once"] {
        let asks = match props.get(name) {
            None | Some(Value::Null | Value::Bool(false)) => false,
            Some(_) => true,
        };
        if asks {
            return Err(TypeError::Props(PropsError::BadValue {
                name: name.to_owned(),
                reason: "not supported by dynakv yet".to_owned(),
            }));
        }
    }
    Ok(())
}

/// Merge a peer's types into `ours`: per type the newest properties (by timestamp, then
/// node), activation kept once made, the union of the members that have seen it; names that
/// are not valid type names are not taken, and past [`MAX_BUCKET_TYPES_MERGED`] the first by
/// name are kept (commutative, associative, idempotent).
pub fn merge(
    ours: &mut std::collections::BTreeMap<String, BucketTypeEntry>,
    theirs: &std::collections::BTreeMap<String, BucketTypeEntry>,
) {
    for (name, their) in theirs {
        if check_type_name(name).is_err() || name == DEFAULT_TYPE {
            continue;
        }
        match ours.get_mut(name) {
            None => {
                ours.insert(name.clone(), their.clone());
            }
            Some(our) => {
                let seen: BTreeSet<NodeId> = our.seen_by.union(&their.seen_by).cloned().collect();
                let active = our.active || their.active;
                if (their.timestamp_ms, &their.node, &their.props_json)
                    > (our.timestamp_ms, &our.node, &our.props_json)
                {
                    *our = their.clone();
                }
                our.seen_by = seen;
                our.active = active;
            }
        }
    }
    while ours.len() > MAX_BUCKET_TYPES_MERGED {
        ours.pop_last();
    }
}

/// Mark every type in `state` as seen by `me`; whether anything changed.
pub fn acknowledge(state: &mut ClusterState, me: &NodeId) -> bool {
    let mut changed = false;
    for entry in state.bucket_types.values_mut() {
        changed |= entry.seen_by.insert(me.clone());
    }
    changed
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::membership::{Member, MemberStatus};

    fn member(name: &str) -> Member {
        Member {
            id: NodeId(name.to_owned()),
            peer_addr: String::new(),
            http_addr: String::new(),
            zone: String::new(),
            status: MemberStatus::Valid,
            version: 1,
            heartbeat: 0,
            public_key: None,
        }
    }

    fn state_with(members: &[&str]) -> ClusterState {
        let mut state = ClusterState::found("c", member(members[0]), 8).unwrap();
        for m in &members[1..] {
            state.members.insert(NodeId((*m).to_owned()), member(m));
        }
        state
    }

    fn props(json: &str) -> Map<String, Value> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn internal_names_round_trip_and_default_keeps_its_names() {
        assert_eq!(internal_bucket("default", "b"), "b");
        assert_eq!(split_bucket("b"), ("default", "b"));
        let typed = internal_bucket("maps", "carts");
        assert_eq!(split_bucket(&typed), ("maps", "carts"));
        assert_ne!(typed, "carts");
        assert!(check_type_name("a/b").is_err() && check_type_name("").is_err());
    }

    #[test]
    fn a_type_is_activated_once_every_member_has_seen_it() {
        let defaults = BucketProps::default();
        let (a, b) = (NodeId("a".into()), NodeId("b".into()));
        let mut on_a = state_with(&["a", "b"]);
        let create = TypeChange::Create {
            name: "t".into(),
            props: props(r#"{"n_val":2,"allow_mult":false}"#),
        };
        apply(&mut on_a, create.clone(), &a, 10, &defaults).unwrap();
        assert_eq!(
            apply(&mut on_a, create, &a, 11, &defaults),
            Err(TypeError::Exists("t".into()))
        );
        // Not served, and not activatable, until b has it.
        assert!(type_props(&on_a, "t", &defaults).is_none());
        let activate = TypeChange::Activate { name: "t".into() };
        assert!(matches!(
            apply(&mut on_a, activate.clone(), &a, 12, &defaults),
            Err(TypeError::NotReady { missing: 1, .. })
        ));
        let mut on_b = state_with(&["a", "b"]);
        merge(&mut on_b.bucket_types, &on_a.bucket_types);
        assert!(acknowledge(&mut on_b, &b));
        assert!(!acknowledge(&mut on_b, &b));
        merge(&mut on_a.bucket_types, &on_b.bucket_types);
        apply(&mut on_a, activate, &a, 13, &defaults).unwrap();
        let served = type_props(&on_a, "t", &defaults).unwrap();
        assert_eq!((served.n_val, served.allow_mult), (2, false));
        // An older update does not undo activation when merged.
        let stale = on_b.bucket_types.clone();
        merge(&mut on_a.bucket_types, &stale);
        assert!(on_a.bucket_types["t"].active);
        // Updates after activation: allowed, except the fixed properties.
        let update = TypeChange::Update {
            name: "t".into(),
            props: props(r#"{"r":1}"#),
        };
        apply(&mut on_a, update, &a, 14, &defaults).unwrap();
        assert_eq!(
            type_props(&on_a, "t", &defaults).unwrap().r,
            crate::bucket::Quorum::Count(1)
        );
        let fixed = TypeChange::Update {
            name: "t".into(),
            props: props(r#"{"datatype":"map"}"#),
        };
        assert_eq!(
            apply(&mut on_a, fixed, &a, 15, &defaults),
            Err(TypeError::Fixed("datatype".into()))
        );
        assert_eq!(
            apply(
                &mut on_a,
                TypeChange::Activate {
                    name: "default".into()
                },
                &a,
                16,
                &defaults
            ),
            Err(TypeError::Default)
        );
    }

    proptest::proptest! {
        /// Merges of type maps built by creates, updates, activations and marks on three
        /// nodes (names from a small set, so they collide) are commutative, associative and
        /// idempotent, the cap included.
        #[test]
        fn merges_are_lawful(ops in proptest::collection::vec((0..3usize, 0..4u8, 0..600u16, 0..3u32), 0..60)) {
            let defaults = BucketProps::default();
            let nodes = ["a", "b", "c"].map(|n| NodeId(n.into()));
            let mut states = [state_with(&["a", "b", "c"]), state_with(&["a", "b", "c"]), state_with(&["a", "b", "c"])];
            for (i, (at, kind, name, n)) in ops.into_iter().enumerate() {
                let name = format!("t{}", name % 40);
                let now = i as u64;
                let change = match kind {
                    0 => TypeChange::Create { name, props: props(&format!(r#"{{"n_val":{}}}"#, n + 1)) },
                    1 => TypeChange::Update { name, props: props(&format!(r#"{{"n_val":{}}}"#, n + 1)) },
                    2 => TypeChange::Activate { name },
                    _ => {
                        acknowledge(&mut states[at], &nodes[at]);
                        let other = states[(at + 1) % 3].bucket_types.clone();
                        merge(&mut states[at].bucket_types, &other);
                        continue;
                    }
                };
                let _ = apply(&mut states[at], change, &nodes[at], now, &defaults);
            }
            let [a, b, c] = states.map(|s| s.bucket_types);
            let m = |x: &std::collections::BTreeMap<String, BucketTypeEntry>, y: &std::collections::BTreeMap<String, BucketTypeEntry>| {
                let mut out = x.clone();
                merge(&mut out, y);
                out
            };
            proptest::prop_assert_eq!(m(&a, &b), m(&b, &a));
            proptest::prop_assert_eq!(m(&m(&a, &b), &c), m(&a, &m(&b, &c)));
            proptest::prop_assert_eq!(m(&a, &a), a.clone());
        }
    }

    #[test]
    fn past_the_cap_every_node_keeps_the_same_types() {
        let entry = |node: &str| BucketTypeEntry {
            timestamp_ms: 1,
            node: NodeId(node.into()),
            props_json: "{}".into(),
            active: false,
            seen_by: BTreeSet::new(),
        };
        let mut a = std::collections::BTreeMap::new();
        let mut b = std::collections::BTreeMap::new();
        for i in 0..MAX_BUCKET_TYPES_MERGED {
            a.insert(format!("a{i:04}"), entry("a"));
            b.insert(format!("b{i:04}"), entry("b"));
        }
        let mut ab = a.clone();
        merge(&mut ab, &b);
        let mut ba = b.clone();
        merge(&mut ba, &a);
        assert_eq!(ab, ba);
        assert_eq!(ab.len(), MAX_BUCKET_TYPES_MERGED);
        // Names no create would accept are not taken from a peer.
        let mut bad = std::collections::BTreeMap::new();
        bad.insert("x/y".to_owned(), entry("c"));
        bad.insert("default".to_owned(), entry("c"));
        let mut ours = std::collections::BTreeMap::new();
        merge(&mut ours, &bad);
        assert!(ours.is_empty());
    }

    #[test]
    fn bad_properties_change_nothing() {
        let defaults = BucketProps::default();
        let a = NodeId("a".into());
        let mut state = state_with(&["a"]);
        for bad in [
            r#"{"bogus":1}"#,
            r#"{"n_val":0}"#,
            r#"{"datatype":"bogus"}"#,
            r#"{"consistent":true}"#,
        ] {
            let create = TypeChange::Create {
                name: "t".into(),
                props: props(bad),
            };
            assert!(
                apply(&mut state, create, &a, 1, &defaults).is_err(),
                "{bad}"
            );
        }
        assert!(state.bucket_types.is_empty());
    }
}
