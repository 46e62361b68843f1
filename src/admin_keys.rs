//! `/admin/keys` on the admin listener (admin keys only): create a scoped key (its secret is shown
//! in that answer only), list keys without secrets, revoke, and rotate with a grace period.
//!
//! Revocation and rotation take effect on the answering node at once and on every other node at
//! its next poll of the key table (see [`crate::auth::keys`]); sockets opened with the key close.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use ferry_shards::record::format_rfc3339_millis;

use crate::admin::{AdminCaller, AdminState};
use crate::auth::KeyScope;
use crate::http::error::ApiError;
use crate::http::{parse_json, PathParam};
use crate::store::KeyRow;

/// Longest key name.
const MAX_NAME_LEN: usize = 128;
/// Longest rotation grace.
const MAX_GRACE_S: u64 = 30 * 86_400;

pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/admin/keys", get(list).post(create))
        .route("/admin/keys/{id}", delete(revoke))
        .route("/admin/keys/{id}/rotate", post(rotate))
}

/// A key as the admin API shows it.
#[derive(Debug, Serialize)]
pub struct KeyView {
    pub id: String,
    pub name: String,
    pub scope: String,
    pub created_at: String,
    pub last_used_at: Option<String>,
    /// A rotated key works until then.
    pub expires_at: Option<String>,
    pub revoked_at: Option<String>,
    /// `active`, `expiring` (rotated, within its grace), `expired` or `revoked`.
    pub state: &'static str,
}

impl KeyView {
    fn of(row: KeyRow) -> KeyView {
        let now = ferry_shards::record::now_ms();
        let state = match (row.revoked_at_ms, row.expires_at_ms) {
            (Some(_), _) => "revoked",
            (None, Some(t)) if t <= now => "expired",
            (None, Some(_)) => "expiring",
            (None, None) => "active",
        };
        KeyView {
            id: row.id,
            name: row.name,
            scope: row.scope,
            created_at: format_rfc3339_millis(row.created_at_ms),
            last_used_at: row.last_used_at_ms.map(format_rfc3339_millis),
            expires_at: row.expires_at_ms.map(format_rfc3339_millis),
            revoked_at: row.revoked_at_ms.map(format_rfc3339_millis),
            state,
        }
    }
}

/// A new key: the only answer that ever holds its secret.
#[derive(Debug, Serialize)]
pub struct CreatedView {
    pub id: String,
    pub name: String,
    pub scope: String,
    pub key: String,
    pub created_at: String,
    /// On rotation: the key this one replaces, and when that one stops working.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replaces: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replaced_key_expires_at: Option<String>,
}

impl CreatedView {
    /// The answer to a create (`replaced: None`) or a rotation (the old key).
    fn of(created: crate::auth::keys::CreatedKey, replaced: Option<KeyRow>) -> Response {
        let row = created.row;
        let view = CreatedView {
            id: row.id,
            name: row.name,
            scope: row.scope,
            key: created.key,
            created_at: format_rfc3339_millis(row.created_at_ms),
            replaced_key_expires_at: replaced
                .as_ref()
                .and_then(|old| old.expires_at_ms)
                .map(format_rfc3339_millis),
            replaces: replaced.map(|old| old.id),
        };
        (StatusCode::CREATED, Json(view)).into_response()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    name: String,
    #[serde(default)]
    scope: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RotateBody {
    #[serde(default)]
    grace_s: Option<u64>,
}

fn key_id(id: &str) -> Result<&str, ApiError> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(ApiError::not_found(format!("no key {id:?}")));
    }
    Ok(id)
}

async fn create(
    _: AdminCaller,
    State(state): State<AdminState>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let body: CreateBody = parse_json(&body)?;
    let name = body.name.trim();
    if name.is_empty() || name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
        return Err(ApiError::invalid(format!(
            "name must be 1 to {MAX_NAME_LEN} bytes without control characters"
        )));
    }
    let scope = match body.scope.as_deref() {
        None => KeyScope::Service,
        Some(s) => KeyScope::parse(s)
            .ok_or_else(|| ApiError::invalid("scope must be admin, service or read"))?,
    };
    let created = state.auth.keys.create(name, scope).await?;
    Ok(CreatedView::of(created, None))
}

#[derive(Serialize)]
struct KeysBody {
    keys: Vec<KeyView>,
}

async fn list(_: AdminCaller, State(state): State<AdminState>) -> Result<Response, ApiError> {
    let keys = state.auth.keys.list().await?;
    Ok(Json(KeysBody {
        keys: keys.into_iter().map(KeyView::of).collect(),
    })
    .into_response())
}

async fn revoke(
    _: AdminCaller,
    State(state): State<AdminState>,
    PathParam(id): PathParam,
) -> Result<Json<KeyView>, ApiError> {
    let id = key_id(&id)?;
    let row = state
        .auth
        .keys
        .revoke(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no key {id:?}")))?;
    Ok(Json(KeyView::of(row)))
}

async fn rotate(
    _: AdminCaller,
    State(state): State<AdminState>,
    PathParam(id): PathParam,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let id = key_id(&id)?;
    let body: RotateBody = if body.iter().all(u8::is_ascii_whitespace) {
        RotateBody::default()
    } else {
        parse_json(&body)?
    };
    let grace_s = body.grace_s.unwrap_or(0);
    if grace_s > MAX_GRACE_S {
        return Err(ApiError::invalid(format!(
            "grace_s must be at most {MAX_GRACE_S}"
        )));
    }
    let (old, new) = state
        .auth
        .keys
        .rotate(id, std::time::Duration::from_secs(grace_s))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no key {id:?} in force")))?;
    Ok(CreatedView::of(new, Some(old)))
}
