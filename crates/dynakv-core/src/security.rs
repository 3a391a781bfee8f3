//! Client security as Riak models it: users, sources and grants, part of the cluster state
//! and spread by gossip.
//!
//! - A **user** has a name and, optionally, a password hash (made and checked by the server:
//!   this module stores the string and never sees a password).
//! - A **source** says how users reaching the cluster from an address range authenticate:
//!   `trust` (no password), `password`, or `certificate` (refused until client certificates
//!   are supported). A source names users or `all`.
//! - A **grant** gives permissions (`riak_kv.get`, `riak_kv.put`, ..., `admin`) on `any` bucket
//!   or on one bucket to a user (or `all`).
//! - **enabled**: while false, nothing is checked (and state-changing admin requests need no
//!   credential); while true, every request but `/ping` needs credentials over TLS.
//!
//! Merge (commutative, associative, idempotent, like bucket properties): every entry, and the
//! enabled flag, is last-writer-wins by `(timestamp_ms, node, value)`; a removal is an entry
//! with no value (a tombstone), so it wins over older writes everywhere. Bounds: at most
//! [`MAX_USERS`] users, [`MAX_SOURCES`] sources and [`MAX_GRANTS`] grant entries, checked
//! where a change is made ([`SecurityState::check_room`]) and where one is merged.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// Most users (tombstones included).
pub const MAX_USERS: usize = 1024;
/// Most sources (tombstones included).
pub const MAX_SOURCES: usize = 1024;
/// Most `(user, scope)` grant entries (tombstones included).
pub const MAX_GRANTS: usize = 4096;
/// Longest user name, in bytes.
pub const MAX_USER_NAME_BYTES: usize = 64;
/// Longest stored password hash, in bytes.
pub const MAX_PASSWORD_HASH_BYTES: usize = 512;
/// The user name that means every user, in sources and grants.
pub const ALL_USERS: &str = "all";

/// What a request may need.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Permission {
    Get,
    Put,
    Delete,
    ListKeys,
    ListBuckets,
    GetBucket,
    SetBucket,
    Admin,
    /// Secondary index queries (`riak_kv.index`).
    Index,
}

impl Permission {
    pub const ALL: [Permission; 9] = [
        Permission::Get,
        Permission::Put,
        Permission::Delete,
        Permission::ListKeys,
        Permission::ListBuckets,
        Permission::GetBucket,
        Permission::SetBucket,
        Permission::Admin,
        Permission::Index,
    ];

    /// Riak's name of the permission.
    pub fn name(self) -> &'static str {
        match self {
            Permission::Get => "riak_kv.get",
            Permission::Put => "riak_kv.put",
            Permission::Delete => "riak_kv.delete",
            Permission::ListKeys => "riak_kv.list_keys",
            Permission::ListBuckets => "riak_kv.list_buckets",
            Permission::GetBucket => "riak_kv.get_bucket",
            Permission::SetBucket => "riak_kv.set_bucket",
            Permission::Admin => "admin",
            Permission::Index => "riak_kv.index",
        }
    }

    /// The permission of a Riak name (`riak_kv.get`, ..., `admin`).
    pub fn parse(name: &str) -> Result<Permission, SecurityError> {
        Permission::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| SecurityError::UnknownPermission(name.to_owned()))
    }
}

/// How users from a source authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum SourceMethod {
    Trust,
    Password,
    Certificate,
}

impl SourceMethod {
    pub fn parse(name: &str) -> Result<SourceMethod, SecurityError> {
        match name {
            "trust" => Ok(SourceMethod::Trust),
            "password" => Ok(SourceMethod::Password),
            "certificate" => Ok(SourceMethod::Certificate),
            other => Err(SecurityError::Invalid(format!(
                "unknown source method {other:?}: trust, password or certificate"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SourceMethod::Trust => "trust",
            SourceMethod::Password => "password",
            SourceMethod::Certificate => "certificate",
        }
    }
}

/// An address range: `address/prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Cidr {
    pub address: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// Parse `10.0.0.0/8`, `::1/128` or a bare address (the whole address).
    pub fn parse(text: &str) -> Result<Cidr, SecurityError> {
        let invalid = || SecurityError::Invalid(format!("{text:?} is not an address range"));
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let address: IpAddr = address.parse().map_err(|_| invalid())?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().map_err(|_| invalid())?,
            None => max,
        };
        if prefix > max {
            return Err(invalid());
        }
        Ok(Cidr { address, prefix })
    }

    /// Whether `ip` is in the range (an IPv4-mapped IPv6 address counts as its IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 @ IpAddr::V4(_) => v4,
        };
        match (self.address, ip) {
            (IpAddr::V4(range), IpAddr::V4(ip)) => {
                prefix_match(&range.octets(), &ip.octets(), self.prefix)
            }
            (IpAddr::V6(range), IpAddr::V6(ip)) => {
                prefix_match(&range.octets(), &ip.octets(), self.prefix)
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

fn prefix_match(range: &[u8], ip: &[u8], prefix: u8) -> bool {
    let full = usize::from(prefix / 8);
    let rest = prefix % 8;
    if range.get(..full) != ip.get(..full) {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xff_u8 << (8 - rest);
    match (range.get(full), ip.get(full)) {
        (Some(a), Some(b)) => a & mask == b & mask,
        _ => false,
    }
}

/// Where a grant applies.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Scope {
    Any,
    Bucket(String),
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Any => f.write_str("any"),
            Scope::Bucket(b) => f.write_str(b),
        }
    }
}

/// A last-writer-wins register: `value` `None` is a removal.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Lww<T> {
    pub timestamp_ms: u64,
    pub node: String,
    pub value: Option<T>,
}

impl<T: Clone + Ord> Lww<T> {
    fn merge(&mut self, theirs: &Lww<T>) {
        if (theirs.timestamp_ms, &theirs.node, &theirs.value)
            > (self.timestamp_ms, &self.node, &self.value)
        {
            *self = theirs.clone();
        }
    }
}

/// A user's stored record.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct UserRecord {
    /// The password hash (the server's format), if the user has a password.
    pub password_hash: Option<String>,
}

/// A source's stored record.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SourceRecord {
    pub method: SourceMethod,
}

/// The security part of the cluster state.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SecurityState {
    pub enabled: Option<Lww<bool>>,
    pub users: BTreeMap<String, Lww<UserRecord>>,
    /// Keyed by `(user or "all", range)`.
    #[serde(with = "pairs")]
    pub sources: BTreeMap<(String, Cidr), Lww<SourceRecord>>,
    /// Keyed by `(user or "all", scope)`: the permissions granted there.
    #[serde(with = "pairs")]
    pub grants: BTreeMap<(String, Scope), Lww<BTreeSet<Permission>>>,
}

/// Maps with structured keys as a sequence of `(key, value)` pairs (JSON map keys must be
/// strings).
mod pairs {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::collections::BTreeMap;

    pub fn serialize<K: Serialize, V: Serialize, S: Serializer>(
        map: &BTreeMap<K, V>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(map.iter())
    }

    pub fn deserialize<'de, K, V, D>(deserializer: D) -> Result<BTreeMap<K, V>, D::Error>
    where
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        Vec::<(K, V)>::deserialize(deserializer).map(|pairs| pairs.into_iter().collect())
    }
}

/// Why a security request or change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecurityError {
    #[error(
        "unknown permission {0:?} (riak_kv.get, riak_kv.put, riak_kv.delete, riak_kv.list_keys, riak_kv.list_buckets, riak_kv.get_bucket, riak_kv.set_bucket, admin)"
    )]
    UnknownPermission(String),
    #[error("{0}")]
    Invalid(String),
    #[error("no such user {0:?}")]
    NoSuchUser(String),
    #[error("at most {limit} {what}")]
    Full { what: &'static str, limit: usize },
}

impl SecurityError {
    /// The status a client is answered with (as `RequestError::status`): 404 for a user
    /// that does not exist, 409 when a table is full, 400 for a malformed change.
    pub fn status(&self) -> u16 {
        match self {
            SecurityError::NoSuchUser(_) => 404,
            SecurityError::Full { .. } => 409,
            SecurityError::UnknownPermission(_) | SecurityError::Invalid(_) => 400,
        }
    }
}

/// Who a request comes from, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authentication {
    /// Authenticated as this user.
    User(String),
    /// Refused, with the reason to log (the client gets a generic 401).
    Refused(String),
}

/// What the server must check for a user reaching the cluster from an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceCheck<'a> {
    /// Let the user in (a trust source).
    Trust,
    /// Check the password against this hash.
    Password(&'a str),
    /// The connection must carry a verified client certificate valid for the user's name
    /// (the server checks it: the core knows nothing of TLS). The password is ignored.
    Certificate,
    /// No source allows this user from there.
    Refuse(String),
}

/// Check a user name: non-empty, at most [`MAX_USER_NAME_BYTES`], no `all`, printable ASCII
/// without `:` (Basic credentials split on the first `:`) or `,` (lists of users).
pub fn check_user_name(name: &str) -> Result<(), SecurityError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_USER_NAME_BYTES
        && name != ALL_USERS
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b':' && b != b',');
    if ok {
        Ok(())
    } else {
        Err(SecurityError::Invalid(format!(
            "{name:?} is not a valid user name (1-{MAX_USER_NAME_BYTES} printable ASCII characters, no ':' or ',', not \"all\")"
        )))
    }
}

impl SecurityState {
    /// Whether security is enabled.
    pub fn enabled(&self) -> bool {
        self.enabled.as_ref().and_then(|e| e.value).unwrap_or(false)
    }

    /// A user's record, if the user exists.
    pub fn user(&self, name: &str) -> Option<&UserRecord> {
        self.users.get(name).and_then(|u| u.value.as_ref())
    }

    /// The live users, by name.
    pub fn user_names(&self) -> impl Iterator<Item = &str> {
        self.users
            .iter()
            .filter(|(_, u)| u.value.is_some())
            .map(|(n, _)| n.as_str())
    }

    /// The live sources.
    pub fn live_sources(&self) -> impl Iterator<Item = (&(String, Cidr), &SourceRecord)> {
        self.sources
            .iter()
            .filter_map(|(k, s)| s.value.as_ref().map(|v| (k, v)))
    }

    /// The live grants.
    pub fn live_grants(&self) -> impl Iterator<Item = (&(String, Scope), &BTreeSet<Permission>)> {
        self.grants
            .iter()
            .filter_map(|(k, g)| g.value.as_ref().map(|v| (k, v)))
    }

    /// How `user` must authenticate from `ip`: the most specific range that contains it, among
    /// the user's own sources and those for `all` (the user's own first on equal ranges).
    pub fn source_for(&self, user: &str, ip: IpAddr) -> SourceCheck<'_> {
        let Some(record) = self.user(user) else {
            return SourceCheck::Refuse(format!("no user {user:?}"));
        };
        let best = self
            .live_sources()
            .filter(|((who, range), _)| (who == user || who == ALL_USERS) && range.contains(ip))
            .max_by_key(|((who, range), _)| (range.prefix, who == user));
        match best {
            None => SourceCheck::Refuse(format!("no source lets {user:?} in from {ip}")),
            Some((_, source)) => match source.method {
                SourceMethod::Trust => SourceCheck::Trust,
                SourceMethod::Password => match &record.password_hash {
                    Some(hash) => SourceCheck::Password(hash),
                    None => SourceCheck::Refuse(format!("user {user:?} has no password")),
                },
                SourceMethod::Certificate => SourceCheck::Certificate,
            },
        }
    }

    /// Whether `user` holds `permission` for `bucket` (`None`: a request on no bucket, such
    /// as listing buckets or an admin call, which only grants `on any` cover).
    pub fn permits(&self, user: &str, permission: Permission, bucket: Option<&str>) -> bool {
        let scopes = [
            Some(Scope::Any),
            bucket.map(|b| Scope::Bucket(b.to_owned())),
        ];
        [user, ALL_USERS].iter().any(|who| {
            scopes.iter().flatten().any(|scope| {
                self.grants
                    .get(&((*who).to_owned(), scope.clone()))
                    .and_then(|g| g.value.as_ref())
                    .is_some_and(|perms| perms.contains(&permission))
            })
        })
    }

    /// Whether one more entry of each kind fits (a change that adds one checks first, at the
    /// node that receives it; merges never grow past the bounds either).
    pub fn check_room(&self) -> Result<(), SecurityError> {
        if self.users.len() >= MAX_USERS {
            return Err(SecurityError::Full {
                what: "users",
                limit: MAX_USERS,
            });
        }
        if self.sources.len() >= MAX_SOURCES {
            return Err(SecurityError::Full {
                what: "sources",
                limit: MAX_SOURCES,
            });
        }
        if self.grants.len() >= MAX_GRANTS {
            return Err(SecurityError::Full {
                what: "grants",
                limit: MAX_GRANTS,
            });
        }
        Ok(())
    }

    /// Record a change made here: `value` for `key` in `map`, stamped after whatever the entry
    /// holds (so the change wins over it everywhere, even with a clock behind).
    fn write<K: Ord + Clone, T>(
        map: &mut BTreeMap<K, Lww<T>>,
        key: K,
        value: Option<T>,
        now_ms: u64,
        node: &str,
    ) {
        let timestamp_ms = map
            .get(&key)
            .map_or(now_ms, |e| now_ms.max(e.timestamp_ms.saturating_add(1)));
        map.insert(
            key,
            Lww {
                timestamp_ms,
                node: node.to_owned(),
                value,
            },
        );
    }

    fn check_users_exist(&self, users: &[String]) -> Result<(), SecurityError> {
        if users.is_empty() {
            return Err(SecurityError::Invalid(
                "name at least one user (or all)".into(),
            ));
        }
        match users
            .iter()
            .find(|u| *u != ALL_USERS && self.user(u).is_none())
        {
            Some(missing) => Err(SecurityError::NoSuchUser(missing.clone())),
            None => Ok(()),
        }
    }

    /// Turn checking on or off.
    pub fn set_enabled(&mut self, enabled: bool, now_ms: u64, node: &str) {
        let timestamp_ms = self
            .enabled
            .as_ref()
            .map_or(now_ms, |e| now_ms.max(e.timestamp_ms.saturating_add(1)));
        self.enabled = Some(Lww {
            timestamp_ms,
            node: node.to_owned(),
            value: Some(enabled),
        });
    }

    /// Add a user, or change its password (`None`: no password).
    pub fn put_user(
        &mut self,
        name: &str,
        password_hash: Option<String>,
        now_ms: u64,
        node: &str,
    ) -> Result<(), SecurityError> {
        check_user_name(name)?;
        if password_hash
            .as_ref()
            .is_some_and(|h| h.len() > MAX_PASSWORD_HASH_BYTES)
        {
            return Err(SecurityError::Invalid("password hash too long".into()));
        }
        if !self.users.contains_key(name) {
            self.check_room()?;
        }
        Self::write(
            &mut self.users,
            name.to_owned(),
            Some(UserRecord { password_hash }),
            now_ms,
            node,
        );
        Ok(())
    }

    /// Remove a user (its sources and grants stay, and apply again if it is added again).
    pub fn remove_user(
        &mut self,
        name: &str,
        now_ms: u64,
        node: &str,
    ) -> Result<(), SecurityError> {
        if self.user(name).is_none() {
            return Err(SecurityError::NoSuchUser(name.to_owned()));
        }
        Self::write(&mut self.users, name.to_owned(), None, now_ms, node);
        Ok(())
    }

    /// Let `users` (or `all`) in from `range` with `method`.
    pub fn put_source(
        &mut self,
        users: &[String],
        range: Cidr,
        method: SourceMethod,
        now_ms: u64,
        node: &str,
    ) -> Result<(), SecurityError> {
        self.check_users_exist(users)?;
        for user in users {
            if !self.sources.contains_key(&(user.clone(), range)) {
                self.check_room()?;
            }
            Self::write(
                &mut self.sources,
                (user.clone(), range),
                Some(SourceRecord { method }),
                now_ms,
                node,
            );
        }
        Ok(())
    }

    /// Remove the sources of `users` for exactly `range`.
    pub fn remove_source(&mut self, users: &[String], range: Cidr, now_ms: u64, node: &str) {
        for user in users {
            let key = (user.clone(), range);
            if self.sources.get(&key).is_some_and(|s| s.value.is_some()) {
                Self::write(&mut self.sources, key, None, now_ms, node);
            }
        }
    }

    /// Grant (`add` true) or revoke `permissions` on `scope` for `users`.
    pub fn change_grants(
        &mut self,
        users: &[String],
        scope: &Scope,
        permissions: &BTreeSet<Permission>,
        add: bool,
        now_ms: u64,
        node: &str,
    ) -> Result<(), SecurityError> {
        if add {
            self.check_users_exist(users)?;
        }
        for user in users {
            let key = (user.clone(), scope.clone());
            let mut held = self
                .grants
                .get(&key)
                .and_then(|g| g.value.clone())
                .unwrap_or_default();
            if add {
                if !self.grants.contains_key(&key) {
                    self.check_room()?;
                }
                held.extend(permissions.iter().copied());
            } else {
                held.retain(|p| !permissions.contains(p));
            }
            Self::write(&mut self.grants, key, Some(held), now_ms, node);
        }
        Ok(())
    }

    /// Reconcile with another node's security state (see the module documentation).
    pub fn merge(&mut self, other: &SecurityState) {
        match (&mut self.enabled, &other.enabled) {
            (Some(ours), Some(theirs)) => ours.merge(theirs),
            (None, Some(theirs)) => self.enabled = Some(theirs.clone()),
            (_, None) => {}
        }
        merge_map(&mut self.users, &other.users, MAX_USERS);
        merge_map(&mut self.sources, &other.sources, MAX_SOURCES);
        merge_map(&mut self.grants, &other.grants, MAX_GRANTS);
    }
}

fn merge_map<K: Ord + Clone, T: Clone + Ord>(
    ours: &mut BTreeMap<K, Lww<T>>,
    theirs: &BTreeMap<K, Lww<T>>,
    limit: usize,
) {
    for (key, entry) in theirs {
        if let Some(mine) = ours.get_mut(key) {
            mine.merge(entry);
        } else if ours.len() < limit {
            ours.insert(key.clone(), entry.clone());
        }
    }
}

/// One administrative change of the security state (an operation of the admin API), as a
/// value: the server applies it with [`SecurityChange::apply`], and a node's control plane
/// takes it as a client request (`node::ClientOp::Security`). All or nothing: a refused
/// change leaves the state as it was.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SecurityChange {
    /// Turn authentication and authorization on or off.
    SetEnabled(bool),
    /// Add a user, or replace its password (`password_hash`: a PHC string, or none).
    PutUser {
        name: String,
        password_hash: Option<String>,
    },
    RemoveUser {
        name: String,
    },
    /// Let `users` connect from `range`, authenticating with `method`.
    PutSource {
        users: Vec<String>,
        range: Cidr,
        method: SourceMethod,
    },
    RemoveSource {
        users: Vec<String>,
        range: Cidr,
    },
    /// Grant (`add`) or revoke `permissions` on `scope` for `users`.
    Grants {
        users: Vec<String>,
        scope: Scope,
        permissions: BTreeSet<Permission>,
        add: bool,
    },
}

impl SecurityChange {
    /// Apply the change to `state`, stamped `now_ms` by `node`; a refused change leaves
    /// `state` as it was.
    pub fn apply(
        &self,
        state: &mut SecurityState,
        now_ms: u64,
        node: &str,
    ) -> Result<(), SecurityError> {
        let mut changed = state.clone();
        match self {
            SecurityChange::SetEnabled(enabled) => changed.set_enabled(*enabled, now_ms, node),
            SecurityChange::PutUser {
                name,
                password_hash,
            } => changed.put_user(name, password_hash.clone(), now_ms, node)?,
            SecurityChange::RemoveUser { name } => changed.remove_user(name, now_ms, node)?,
            SecurityChange::PutSource {
                users,
                range,
                method,
            } => changed.put_source(users, *range, *method, now_ms, node)?,
            SecurityChange::RemoveSource { users, range } => {
                changed.remove_source(users, *range, now_ms, node);
            }
            SecurityChange::Grants {
                users,
                scope,
                permissions,
                add,
            } => changed.change_grants(users, scope, permissions, *add, now_ms, node)?,
        }
        *state = changed;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lww<T>(timestamp_ms: u64, value: Option<T>) -> Lww<T> {
        Lww {
            timestamp_ms,
            node: "n1".into(),
            value,
        }
    }

    fn state() -> SecurityState {
        let mut s = SecurityState::default();
        s.users.insert(
            "alice".into(),
            lww(
                1,
                Some(UserRecord {
                    password_hash: Some("h".into()),
                }),
            ),
        );
        s.users.insert(
            "bob".into(),
            lww(
                1,
                Some(UserRecord {
                    password_hash: None,
                }),
            ),
        );
        s
    }

    fn source(s: &mut SecurityState, who: &str, range: &str, method: SourceMethod) {
        s.sources.insert(
            (who.into(), Cidr::parse(range).unwrap()),
            lww(1, Some(SourceRecord { method })),
        );
    }

    #[test]
    fn ranges_match_by_prefix() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let lan = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(lan.contains(ip("10.1.200.3")));
        assert!(!lan.contains(ip("10.2.0.1")));
        assert!(Cidr::parse("10.1.2.0/23").unwrap().contains(ip("10.1.3.9")));
        assert!(!Cidr::parse("10.1.2.0/23").unwrap().contains(ip("10.1.4.9")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(
            Cidr::parse("127.0.0.1")
                .unwrap()
                .contains(ip("::ffff:127.0.0.1"))
        );
        assert!(Cidr::parse("::1/128").unwrap().contains(ip("::1")));
        assert!(!Cidr::parse("::1/128").unwrap().contains(ip("127.0.0.1")));
        for bad in ["10.0.0.0/33", "x/8", "::/129", "10.0.0.0/-1", ""] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_most_specific_source_decides_and_a_users_own_beats_all() {
        let mut s = state();
        let ip = "10.0.0.5".parse().unwrap();
        assert!(matches!(s.source_for("alice", ip), SourceCheck::Refuse(_)));
        source(&mut s, ALL_USERS, "10.0.0.0/8", SourceMethod::Password);
        assert_eq!(s.source_for("alice", ip), SourceCheck::Password("h"));
        source(&mut s, ALL_USERS, "10.0.0.0/24", SourceMethod::Trust);
        assert_eq!(s.source_for("alice", ip), SourceCheck::Trust);
        source(&mut s, "alice", "10.0.0.0/24", SourceMethod::Password);
        assert_eq!(s.source_for("alice", ip), SourceCheck::Password("h"));
        // bob has no password: a password source refuses him.
        source(&mut s, "bob", "10.0.0.0/24", SourceMethod::Password);
        assert!(matches!(s.source_for("bob", ip), SourceCheck::Refuse(_)));
        assert!(matches!(s.source_for("carol", ip), SourceCheck::Refuse(_)));
        source(&mut s, "alice", "10.0.0.5/32", SourceMethod::Certificate);
        assert_eq!(s.source_for("alice", ip), SourceCheck::Certificate);
        // A certificate source needs no password, but still a user.
        source(&mut s, ALL_USERS, "10.0.0.5/32", SourceMethod::Certificate);
        assert_eq!(s.source_for("bob", ip), SourceCheck::Certificate);
        assert!(matches!(s.source_for("carol", ip), SourceCheck::Refuse(_)));
    }

    #[test]
    fn grants_on_any_or_the_bucket_to_the_user_or_all() {
        let mut s = state();
        assert!(!s.permits("alice", Permission::Get, Some("b")));
        s.grants.insert(
            ("alice".into(), Scope::Bucket("b".into())),
            lww(1, Some([Permission::Get].into())),
        );
        assert!(s.permits("alice", Permission::Get, Some("b")));
        assert!(!s.permits("alice", Permission::Get, Some("c")));
        assert!(!s.permits("alice", Permission::Put, Some("b")));
        assert!(!s.permits("alice", Permission::Get, None));
        s.grants.insert(
            (ALL_USERS.into(), Scope::Any),
            lww(1, Some([Permission::Put].into())),
        );
        assert!(s.permits("bob", Permission::Put, Some("z")));
        assert!(s.permits("bob", Permission::Put, None));
        assert!(!s.permits("bob", Permission::Admin, None));
    }

    #[test]
    fn merge_is_commutative_idempotent_and_removals_win_when_newer() {
        let mut a = state();
        let mut b = SecurityState::default();
        b.users.insert("alice".into(), lww(5, None));
        b.enabled = Some(lww(3, Some(true)));
        let mut ab = a.clone();
        ab.merge(&b);
        let mut ba = b.clone();
        ba.merge(&a);
        assert_eq!(ab, ba);
        assert!(ab.user("alice").is_none());
        assert!(ab.user("bob").is_some());
        assert!(ab.enabled());
        let once = ab.clone();
        ab.merge(&b);
        ab.merge(&a);
        assert_eq!(ab, once);
        a.merge(&a.clone());
        assert_eq!(a, state());
    }

    #[test]
    fn the_state_survives_json_and_postcard() {
        let mut s = state();
        source(&mut s, ALL_USERS, "10.0.0.0/8", SourceMethod::Password);
        s.grants.insert(
            ("alice".into(), Scope::Bucket("b".into())),
            lww(1, Some([Permission::Get, Permission::Admin].into())),
        );
        s.enabled = Some(lww(2, Some(true)));
        let json = serde_json::to_vec(&s).unwrap();
        assert_eq!(serde_json::from_slice::<SecurityState>(&json).unwrap(), s);
        let bytes = postcard::to_stdvec(&s).unwrap();
        assert_eq!(postcard::from_bytes::<SecurityState>(&bytes).unwrap(), s);
    }

    #[test]
    fn names_and_permissions_are_checked() {
        for bad in ["", "all", "a:b", "a,b", "a b", &"x".repeat(65)] {
            assert!(check_user_name(bad).is_err(), "{bad:?}");
        }
        check_user_name("alice-1").unwrap();
        assert_eq!(Permission::parse("riak_kv.get"), Ok(Permission::Get));
        assert!(Permission::parse("riak_kv.gett").is_err());
        for p in Permission::ALL {
            assert_eq!(Permission::parse(p.name()), Ok(p));
        }
    }
}
