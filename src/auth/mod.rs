//! Authentication: who is calling, from `Authorization: Bearer <credential>` (HTTP) or the
//! `token` parameter (WebSocket).
//!
//! API keys are stored as hex SHA-256 hashes in the `api_keys` table and cached in memory after
//! the first successful lookup; the key itself is never stored or logged. An API key acts for any
//! participant; an admin key may also use `/admin`.
//!
//! End-user tokens are JWTs, enabled by `jwt_secret` (HS256) or `jwt_public_key` (RS256, PEM text
//! or a path to a PEM file). Claim `sub` is the participant id; `exp` and `nbf` are checked when
//! present. A credential with three dot-separated parts is treated as a JWT when JWTs are enabled.

use std::collections::HashMap;
use std::sync::RwLock;

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};

use ferry_shards::ids::ParticipantId;

use crate::http::error::ApiError;
use crate::metrics::count_auth_failure;
use crate::store::Store;

mod jwt;
pub use jwt::JwtVerifier;

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    ApiKey {
        admin: bool,
    },
    /// An end user, from a JWT: reads and writes only where listed, always sends as itself.
    User {
        sub: ParticipantId,
    },
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
        if let Some(jwt) = &self.jwt {
            if token.split('.').count() == 3 {
                return match jwt.verify(token) {
                    Ok(user) => Ok(user),
                    // An API key may have the shape of a JWT (three parts separated by dots).
                    Err(e) => self.api_key(token).await?.ok_or(e),
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
