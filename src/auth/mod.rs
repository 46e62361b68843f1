//! Authentication: who is calling, from `Authorization: Bearer <credential>` (HTTP) or the
//! `token` parameter (WebSocket).
//!
//! API keys are stored as hex SHA-256 hashes in the `api_keys` table and cached in memory after
//! the first successful lookup; the key itself is never stored or logged. An API key acts for any
//! participant; an admin key may also use `/admin`.
//!
//! End-user tokens are JWTs, enabled by `jwt_secret` (HS256), `jwt_public_key` (RS256, PEM text
//! or a path to a PEM file) or `auth.jwt_jwks_url` (an identity provider's key set); see [`jwt`].
//! Claim `sub` is the participant id, `exp` is required. A credential shaped like a JWT (three
//! base64url parts) is tried as one when JWTs are enabled. Why a credential was refused is
//! counted and logged here; the client only ever hears a generic `unauthorized`.

use std::collections::HashMap;
use std::sync::RwLock;

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};

use ferry_shards::ids::ParticipantId;

use crate::http::error::ApiError;
use crate::metrics::count_auth_failure;
use crate::store::Store;

mod jwks;
mod jwt;
pub use jwks::Jwks;
pub use jwt::{JwtVerifier, MAX_TOKEN_BYTES};

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    ApiKey {
        admin: bool,
    },
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
}

pub struct Auth {
    store: Store,
    jwt: Option<JwtVerifier>,
    /// Known key hashes → admin flag. Keys are never revoked while running (no revocation API yet).
    cache: RwLock<HashMap<String, bool>>,
}

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A new random API key: `fk_` + 32 random bytes in hex.
pub fn generate_key() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("fk_{}", hex::encode(bytes))
}

impl Auth {
    /// The key set end-user tokens are checked against, when one is configured.
    pub fn key_set(&self) -> Option<std::sync::Arc<Jwks>> {
        self.jwt.as_ref().and_then(JwtVerifier::key_set)
    }

    pub fn new(store: Store, jwt: Option<JwtVerifier>) -> Auth {
        Auth {
            store,
            jwt,
            cache: RwLock::new(HashMap::new()),
        }
    }

    /// Registers the bootstrap key, or on the first start of an empty database creates an admin
    /// key and returns it so it can be printed once.
    pub async fn bootstrap(
        &self,
        bootstrap_key: Option<&str>,
        now_ms: i64,
    ) -> Result<Option<String>, crate::store::StoreError> {
        if let Some(key) = bootstrap_key {
            self.store
                .insert_api_key(&hash_key(key), "bootstrap", true, now_ms)
                .await?;
            return Ok(None);
        }
        if self.store.api_key_count().await? == 0 {
            let key = generate_key();
            self.store
                .insert_api_key(&hash_key(&key), "generated admin", true, now_ms)
                .await?;
            return Ok(Some(key));
        }
        Ok(None)
    }

    pub async fn authenticate_token(&self, token: &str) -> Result<Principal, ApiError> {
        if token.is_empty() {
            count_auth_failure("missing");
            return Err(ApiError::unauthorized("missing credentials"));
        }
        if token.len() > MAX_TOKEN_BYTES {
            count_auth_failure("too_long");
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

    /// The API key `token`, if it is one.
    async fn api_key(&self, token: &str) -> Result<Option<Principal>, ApiError> {
        let hash = hash_key(token);
        if let Some(admin) = self
            .cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&hash)
        {
            return Ok(Some(Principal::ApiKey { admin: *admin }));
        }
        let Some(admin) = self.store.api_key(&hash).await? else {
            return Ok(None);
        };
        self.cache
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(hash, admin);
        Ok(Some(Principal::ApiKey { admin }))
    }

    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, ApiError> {
        let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
            count_auth_failure("missing");
            return Err(ApiError::unauthorized(
                "missing Authorization: Bearer <api key>",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(|| {
                count_auth_failure("malformed");
                ApiError::unauthorized("Authorization must be: Bearer <api key>")
            })?;
        self.authenticate_token(token).await
    }
}
