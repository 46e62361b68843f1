//! Authentication: who is calling, from `Authorization: Bearer <credential>` (HTTP), the
//! `token` parameter (WebSocket, SSE), or the phoenix client's token subprotocol.
//!
//! - API keys ([`keys`]): hashed under a pepper, cached, scoped `admin | service | read`,
//!   revocable and rotatable at run time.
//! - End-user tokens ([`jwt`]): JWTs, enabled by `jwt_secret` (HS256), `jwt_public_key` (RS256,
//!   PEM text or a path to a PEM file) or `auth.jwt_jwks_url` (an identity provider's key set).
//!   Claim `sub` is the participant id, `exp` is required. A credential shaped like a JWT (three
//!   base64url parts) is tried as one when JWTs are enabled. Why a credential was refused is
//!   counted and logged here; the client only ever hears a generic `unauthorized`.
//!
//! What a bad credential costs is bounded: a malformed one is refused before any hashing or SQL,
//! an unknown key is remembered as unknown, lookups have their own pool, and a client IP past
//! `rate.auth_failures_per_ip` is answered 429 before its credential is even looked at.

use std::sync::Arc;

use axum::http::HeaderMap;

use ferry_shards::ids::ParticipantId;

use crate::http::error::ApiError;
use crate::metrics::count_auth_failure;
use crate::rate::RateLimits;

mod jwks;
mod jwt;
pub mod keys;
pub use jwks::Jwks;
pub use jwt::{JwtVerifier, MAX_TOKEN_BYTES};
pub use keys::{ApiKeys, KeyScope, Pepper};

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// An API key: acts for any participant, within its scope.
    ApiKey { id: String, scope: KeyScope },
    /// An end user, from a JWT: reads and writes only where listed, always sends as itself.
    User {
        sub: ParticipantId,
        /// When the token stops being accepted (`exp` plus `auth.jwt_leeway`), in Unix ms:
        /// sockets and streams opened with it end then.
        expires_at_ms: i64,
    },
}

impl Principal {
    /// When credentials of this caller expire; API keys do not.
    pub fn expires_at_ms(&self) -> Option<i64> {
        match self {
            Principal::User { expires_at_ms, .. } => Some(*expires_at_ms),
            Principal::ApiKey { .. } => None,
        }
    }

    /// [`Principal::expires_at_ms`] on the runtime's clock (now, if it is past), for sockets and
    /// streams to end at. An expiry beyond what the clock can hold is taken as a century away.
    pub fn expires_at(&self) -> Option<tokio::time::Instant> {
        let ms = self.expires_at_ms()?;
        let left = ms.saturating_sub(ferry_shards::record::now_ms()).max(0) as u64;
        let now = tokio::time::Instant::now();
        Some(
            now.checked_add(std::time::Duration::from_millis(left))
                .unwrap_or_else(|| now + std::time::Duration::from_secs(100 * 365 * 86_400)),
        )
    }

    /// The node itself, acting for another node or for a caller it already authorized (a
    /// node-to-node request carries no key of its own).
    pub fn node() -> Principal {
        Principal::ApiKey {
            id: "node".to_owned(),
            scope: KeyScope::Service,
        }
    }

    /// The API key's id; `None` for an end user.
    pub fn key_id(&self) -> Option<&str> {
        match self {
            Principal::ApiKey { id, .. } => Some(id),
            Principal::User { .. } => None,
        }
    }

    /// Whom limits are counted for: `key:<id>` or `user:<sub>`.
    pub fn subject(&self) -> String {
        match self {
            Principal::ApiKey { id, .. } => format!("key:{id}"),
            Principal::User { sub, .. } => format!("user:{sub}"),
        }
    }

    /// Sending, cursor moves and ephemeral events: not for a `read` key.
    pub fn may_write(&self) -> Result<(), ApiError> {
        match self {
            Principal::ApiKey {
                scope: KeyScope::Read,
                ..
            } => {
                count_auth_failure("scope");
                Err(ApiError::forbidden(
                    "a read key may not send or move cursors",
                ))
            }
            _ => Ok(()),
        }
    }

    pub fn is_admin(&self) -> bool {
        matches!(
            self,
            Principal::ApiKey {
                scope: KeyScope::Admin,
                ..
            }
        )
    }
}

pub struct Auth {
    pub keys: ApiKeys,
    jwt: Option<JwtVerifier>,
    rate: Arc<RateLimits>,
}

impl Auth {
    pub fn new(keys: ApiKeys, jwt: Option<JwtVerifier>, rate: Arc<RateLimits>) -> Auth {
        Auth { keys, jwt, rate }
    }

    /// Completes when the API key `key` names is revoked or its rotation grace ends; never for
    /// `None` (an end user, whose token ends at its expiry instead).
    pub async fn key_ended(&self, key: Option<&str>) {
        match key {
            Some(id) => self.keys.ended(id).await,
            None => std::future::pending().await,
        }
    }

    /// The key set end-user tokens are checked against, when one is configured.
    pub fn key_set(&self) -> Option<Arc<Jwks>> {
        self.jwt.as_ref().and_then(JwtVerifier::key_set)
    }

    /// Authenticates `token` from client `ip`: 429 while that IP is past its authentication
    /// failures, else the principal or a 401 (a 429 when this failure is one too many).
    pub async fn authenticate_from(
        &self,
        token: &str,
        ip: Option<&str>,
    ) -> Result<Principal, ApiError> {
        if let Some(limited) = ip.and_then(|ip| self.rate.auth_blocked(ip)) {
            // A key this node already knows costs nothing to check: clients behind the same
            // address as a credential-guessing one keep working.
            if let Some(key) = self.keys.lookup_cached(token) {
                return Ok(Principal::ApiKey {
                    id: key.id,
                    scope: key.scope,
                });
            }
            crate::metrics::count_rate_limited(limited.limit.as_str());
            return Err(limited.into());
        }
        let result = self.authenticate_token(token).await;
        if let (Err(e), Some(ip)) = (&result, ip) {
            if e.code == crate::http::error::Code::Unauthorized {
                self.rate.auth_failed(ip)?;
            }
        }
        result
    }

    pub async fn authenticate_token(&self, token: &str) -> Result<Principal, ApiError> {
        if token.is_empty() {
            count_auth_failure("missing");
            return Err(ApiError::unauthorized("missing credentials"));
        }
        if !keys::well_formed(token) {
            count_auth_failure(if token.len() > MAX_TOKEN_BYTES {
                "too_long"
            } else {
                "malformed"
            });
            crate::metrics::count_key_lookup("malformed");
            return Err(ApiError::unauthorized("invalid credentials"));
        }
        if let Some(jwt) = &self.jwt {
            if jwt::looks_like_jwt(token) {
                return match jwt.verify(token).await {
                    Ok(user) => Ok(user),
                    // An API key may have the shape of a JWT (three parts separated by dots).
                    Err(e) => self.api_key(token).await?.ok_or_else(|| {
                        count_auth_failure(e.reason());
                        tracing::info!(reason = e.reason(), error = %e, "token refused");
                        ApiError::unauthorized("invalid credentials")
                    }),
                };
            }
        }
        self.api_key(token).await?.ok_or_else(|| {
            count_auth_failure("invalid");
            ApiError::unauthorized("invalid credentials")
        })
    }

    /// The API key `token`, if it is one in force.
    async fn api_key(&self, token: &str) -> Result<Option<Principal>, ApiError> {
        match self.keys.lookup(token).await {
            Ok(found) => Ok(found.map(|k| Principal::ApiKey {
                id: k.id,
                scope: k.scope,
            })),
            Err(e) => {
                tracing::warn!(error = %e, "api key lookup failed");
                Err(ApiError::unavailable(
                    "credentials cannot be checked right now",
                ))
            }
        }
    }

    /// Authenticates the `Authorization: Bearer` credential of a request from client `ip`.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        ip: Option<&str>,
    ) -> Result<Principal, ApiError> {
        let token = match headers.get(axum::http::header::AUTHORIZATION) {
            None => Err(("missing", "missing Authorization: Bearer <api key>")),
            Some(value) => value
                .to_str()
                .ok()
                .and_then(|v| {
                    v.strip_prefix("Bearer ")
                        .or_else(|| v.strip_prefix("bearer "))
                })
                .map(str::trim)
                .ok_or(("malformed", "Authorization must be: Bearer <api key>")),
        };
        match token {
            Ok(token) => self.authenticate_from(token, ip).await,
            Err((reason, message)) => {
                if let Some(ip) = ip {
                    if let Some(limited) = self.rate.auth_blocked(ip) {
                        crate::metrics::count_rate_limited(limited.limit.as_str());
                        return Err(limited.into());
                    }
                    self.rate.auth_failed(ip)?;
                }
                count_auth_failure(reason);
                Err(ApiError::unauthorized(message))
            }
        }
    }
}
