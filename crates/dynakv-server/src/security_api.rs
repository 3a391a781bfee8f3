//! `/admin/security/...`: the HTTP side of `dynakv admin security ...` (Riak's
//! `riak-admin security` commands). Every change is made on the node that receives it and
//! spread by gossip; all of them need `admin` once security is enabled (see `auth`).
//!
//! - `GET /admin/security`: `{"enabled", "users": [{"name", "password"}], "sources": [{"user",
//!   "cidr", "method"}], "grants": [{"user", "on", "permissions"}]}` (no password hashes).
//! - `POST /admin/security/enable`, `POST /admin/security/disable`.
//! - `POST /admin/security/users` `{"name", "password"}` adds a user or changes its password
//!   (`password` absent or null: none); `DELETE /admin/security/users/{name}`.
//! - `POST /admin/security/sources` `{"users": [..], "cidr", "method"}`;
//!   `POST /admin/security/sources/delete` `{"users": [..], "cidr"}`.
//! - `POST /admin/security/grant` and `/revoke` `{"permissions": [..], "on": "any"|BUCKET,
//!   "users": [..]}`.

use crate::auth::hash_password;
use crate::http::{ApiError, ApiResult, ApiState, AppState, json_response};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{delete, get, post};
use dynakv_core::security::{Cidr, Permission, Scope, SecurityChange, SecurityError, SourceMethod};
use serde::Deserialize;
use serde_json::json;
use std::collections::BTreeSet;

/// The routes, to merge into the client API's router.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/admin/security", get(status))
        .route("/admin/security/enable", post(enable))
        .route("/admin/security/disable", post(disable))
        .route("/admin/security/users", post(put_user))
        .route("/admin/security/users/{name}", delete(remove_user))
        .route("/admin/security/sources", post(put_source))
        .route("/admin/security/sources/delete", post(remove_source))
        .route("/admin/security/grant", post(grant))
        .route("/admin/security/revoke", post(revoke))
}

impl From<SecurityError> for ApiError {
    fn from(e: SecurityError) -> Self {
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
        ApiError::new(status, e.to_string())
    }
}

fn body<'a, T: Deserialize<'a>>(bytes: &'a [u8], shape: &str) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("body must be {shape}: {e}")))
}

fn done(what: &serde_json::Value) -> Response {
    json_response(StatusCode::OK, what)
}

async fn status(State(state): State<AppState>) -> ApiResult {
    let cluster_state = state.cluster.state();
    let security = &cluster_state.security;
    let users: Vec<_> = security
        .users
        .iter()
        .filter_map(|(name, u)| {
            u.value
                .as_ref()
                .map(|u| json!({"name": name, "password": u.password_hash.is_some()}))
        })
        .collect();
    let sources: Vec<_> = security
        .live_sources()
        .map(|((user, cidr), s)| json!({"user": user, "cidr": cidr.to_string(), "method": s.method.name()}))
        .collect();
    let grants: Vec<_> = security
        .live_grants()
        .filter(|(_, perms)| !perms.is_empty())
        .map(|((user, scope), perms)| {
            json!({
                "user": user,
                "on": scope.to_string(),
                "permissions": perms.iter().map(|p| p.name()).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(done(&json!({
        "enabled": security.enabled(),
        "users": users,
        "sources": sources,
        "grants": grants,
    })))
}

async fn enable(State(state): State<AppState>) -> ApiResult {
    state
        .cluster
        .change_security(SecurityChange::SetEnabled(true))
        .await?;
    Ok(done(&json!({"enabled": true})))
}

async fn disable(State(state): State<AppState>) -> ApiResult {
    state
        .cluster
        .change_security(SecurityChange::SetEnabled(false))
        .await?;
    Ok(done(&json!({"enabled": false})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserBody {
    name: String,
    password: Option<String>,
}

async fn put_user(State(state): State<AppState>, bytes: Bytes) -> ApiResult {
    let user: UserBody = body(&bytes, r#"{"name": NAME, "password": PASSWORD}"#)?;
    dynakv_core::security::check_user_name(&user.name)?;
    let hash = match user.password {
        Some(password) => Some(
            tokio::task::spawn_blocking(move || hash_password(&password))
                .await
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
                .map_err(ApiError::bad_request)?,
        ),
        None => None,
    };
    state
        .cluster
        .change_security(SecurityChange::PutUser {
            name: user.name.clone(),
            password_hash: hash,
        })
        .await?;
    Ok(done(&json!({"user": user.name})))
}

async fn remove_user(State(state): State<AppState>, Path(name): Path<String>) -> ApiResult {
    state
        .cluster
        .change_security(SecurityChange::RemoveUser { name: name.clone() })
        .await?;
    Ok(done(&json!({"removed": name})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceBody {
    users: Vec<String>,
    cidr: String,
    method: Option<String>,
}

async fn put_source(State(state): State<AppState>, bytes: Bytes) -> ApiResult {
    let source: SourceBody = body(&bytes, r#"{"users": [..], "cidr": CIDR, "method": METHOD}"#)?;
    let cidr = Cidr::parse(&source.cidr)?;
    let method = SourceMethod::parse(source.method.as_deref().unwrap_or(""))?;
    state
        .cluster
        .change_security(SecurityChange::PutSource {
            users: source.users.clone(),
            range: cidr,
            method,
        })
        .await?;
    Ok(done(
        &json!({"users": source.users, "cidr": cidr.to_string(), "method": method.name()}),
    ))
}

async fn remove_source(State(state): State<AppState>, bytes: Bytes) -> ApiResult {
    let source: SourceBody = body(&bytes, r#"{"users": [..], "cidr": CIDR}"#)?;
    let cidr = Cidr::parse(&source.cidr)?;
    state
        .cluster
        .change_security(SecurityChange::RemoveSource {
            users: source.users.clone(),
            range: cidr,
        })
        .await?;
    Ok(done(
        &json!({"removed": {"users": source.users, "cidr": cidr.to_string()}}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantBody {
    permissions: Vec<String>,
    on: String,
    users: Vec<String>,
}

fn parse_grant(bytes: &[u8]) -> Result<(BTreeSet<Permission>, Scope, Vec<String>), ApiError> {
    let grant: GrantBody = body(
        bytes,
        r#"{"permissions": [..], "on": "any"|BUCKET, "users": [..]}"#,
    )?;
    let permissions = grant
        .permissions
        .iter()
        .map(|p| Permission::parse(p))
        .collect::<Result<BTreeSet<_>, _>>()?;
    if permissions.is_empty() {
        return Err(ApiError::bad_request("name at least one permission"));
    }
    let scope = if grant.on == "any" {
        Scope::Any
    } else if grant.on.is_empty() || grant.on.len() > dynakv_core::limits::MAX_BUCKET_BYTES {
        return Err(ApiError::bad_request("\"on\" is any or a bucket name"));
    } else {
        Scope::Bucket(grant.on)
    };
    Ok((permissions, scope, grant.users))
}

async fn grant(State(state): State<AppState>, bytes: Bytes) -> ApiResult {
    change_grants(&state, &bytes, true).await
}

async fn revoke(State(state): State<AppState>, bytes: Bytes) -> ApiResult {
    change_grants(&state, &bytes, false).await
}

/// Grant (`add`) or revoke the permissions a body names, answered once written.
async fn change_grants(state: &ApiState, bytes: &[u8], add: bool) -> ApiResult {
    let (permissions, scope, users) = parse_grant(bytes)?;
    state
        .cluster
        .change_security(SecurityChange::Grants {
            users: users.clone(),
            scope: scope.clone(),
            permissions: permissions.clone(),
            add,
        })
        .await?;
    let names: Vec<&str> = permissions.iter().map(|p| p.name()).collect();
    let verb = if add { "granted" } else { "revoked" };
    Ok(done(
        &json!({verb: names, "on": scope.to_string(), "users": users}),
    ))
}
