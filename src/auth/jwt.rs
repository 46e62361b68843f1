//! End-user tokens: JWTs verified with an HS256 secret (`jwt_secret`), an RS256 public key
//! (`jwt_public_key`), or an identity provider's key set (`auth.jwt_jwks_url`, keys chosen by
//! `kid`; see [`super::jwks`]). Claim `sub` is the participant id.
//!
//! Every token must carry `exp`; `nbf` is checked when present; `iss` and `aud` are checked when
//! `auth.jwt_issuer` / `auth.jwt_audience` are set; `auth.jwt_leeway` allows for clock skew. The
//! token's `alg` must be one its key was made for, so a public key is never used as an HMAC
//! secret. A token that is not three base64url parts, or is longer than [`MAX_TOKEN_BYTES`], is
//! refused before any signature is checked.
//!
//! Why a token was refused is a [`JwtError`] with a bounded metric reason; callers log it and
//! answer only a generic 401, never the library's message.

use std::collections::HashSet;
use std::sync::Arc;

use ferry_shards::ids::ParticipantId;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::jwks::Jwks;
use super::Principal;
use crate::config::Config;

/// Longest credential accepted at all (Keycloak's access tokens are 1–2 KiB).
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("not a well-formed JWT")]
    Malformed,
    #[error("expired")]
    Expired,
    #[error("not valid yet (nbf)")]
    NotYetValid,
    #[error("bad signature")]
    Signature,
    #[error("wrong issuer")]
    Issuer,
    #[error("wrong audience")]
    Audience,
    #[error("claim {0} missing or invalid")]
    Claim(String),
    #[error("algorithm {0:?} not accepted for this key")]
    Algorithm(Algorithm),
    #[error("no key with kid {0:?}")]
    UnknownKey(Option<String>),
    #[error("not verifiable: {0:?}")]
    Other(ErrorKind),
}

impl JwtError {
    /// The `reason` label of `ferry_auth_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            JwtError::Malformed => "jwt_malformed",
            JwtError::Expired => "jwt_expired",
            JwtError::NotYetValid => "jwt_not_yet_valid",
            JwtError::Signature => "jwt_signature",
            JwtError::Issuer => "jwt_issuer",
            JwtError::Audience => "jwt_audience",
            JwtError::Claim(_) => "jwt_claims",
            JwtError::Algorithm(_) => "jwt_algorithm",
            JwtError::UnknownKey(_) => "jwt_unknown_kid",
            JwtError::Other(_) => "jwt_invalid",
        }
    }
}

impl From<jsonwebtoken::errors::Error> for JwtError {
    fn from(e: jsonwebtoken::errors::Error) -> JwtError {
        match e.into_kind() {
            ErrorKind::InvalidToken
            | ErrorKind::Base64(_)
            | ErrorKind::Json(_)
            | ErrorKind::Utf8(_)
            | ErrorKind::MissingAlgorithm
            | ErrorKind::InvalidAlgorithmName => JwtError::Malformed,
            ErrorKind::InvalidSignature => JwtError::Signature,
            ErrorKind::ExpiredSignature => JwtError::Expired,
            ErrorKind::ImmatureSignature => JwtError::NotYetValid,
            ErrorKind::InvalidIssuer => JwtError::Issuer,
            ErrorKind::InvalidAudience => JwtError::Audience,
            ErrorKind::InvalidSubject => JwtError::Claim("sub".into()),
            ErrorKind::MissingRequiredClaim(c) | ErrorKind::InvalidClaimFormat(c) => {
                JwtError::Claim(c)
            }
            other => JwtError::Other(other),
        }
    }
}

/// True when `token` has the shape of a JWS compact serialization: three non-empty parts of
/// base64url characters, within [`MAX_TOKEN_BYTES`]. Cheap; decides whether to try it as a JWT.
pub fn looks_like_jwt(token: &str) -> bool {
    if token.len() > MAX_TOKEN_BYTES {
        return false;
    }
    let mut parts = 0;
    for part in token.split('.') {
        parts += 1;
        if part.is_empty()
            || !part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return false;
        }
    }
    parts == 3
}

enum Keys {
    /// `jwt_secret` or `jwt_public_key`: one key, one algorithm.
    Fixed {
        key: DecodingKey,
        algorithm: Algorithm,
    },
    /// `auth.jwt_jwks_url`.
    Set(Arc<Jwks>),
}

/// How JWTs are verified, when enabled.
pub struct JwtVerifier {
    keys: Keys,
    issuer: Option<String>,
    audience: Option<String>,
    leeway_s: u64,
}

/// Optional here so a token without them is refused as missing a claim, not as malformed
/// (the validation requires both).
#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    /// Seconds since the epoch; some providers write a fraction.
    exp: Option<f64>,
}

impl JwtVerifier {
    /// The verifier the configuration asks for, if any. A key set is not fetched here: see
    /// [`JwtVerifier::key_set`].
    pub fn from_config(config: &Config) -> anyhow::Result<Option<JwtVerifier>> {
        let keys = match (
            config.jwt_secret.as_deref(),
            config.jwt_public_key.as_deref(),
            config.auth.jwt_jwks_url.as_deref(),
        ) {
            (Some(secret), _, _) => Keys::Fixed {
                key: DecodingKey::from_secret(secret.as_bytes()),
                algorithm: Algorithm::HS256,
            },
            (None, Some(pem), _) => {
                let pem = if pem.trim_start().starts_with("-----BEGIN") {
                    pem.to_owned()
                } else {
                    std::fs::read_to_string(pem).map_err(|e| {
                        anyhow::anyhow!("jwt_public_key: cannot read PEM file {pem}: {e}")
                    })?
                };
                let key = DecodingKey::from_rsa_pem(pem.as_bytes())
                    .map_err(|e| anyhow::anyhow!("jwt_public_key is not an RSA PEM key: {e}"))?;
                Keys::Fixed {
                    key,
                    algorithm: Algorithm::RS256,
                }
            }
            (None, None, Some(url)) => Keys::Set(Arc::new(Jwks::new(url.to_owned())?)),
            (None, None, None) => return Ok(None),
        };
        Ok(Some(JwtVerifier {
            keys,
            issuer: config.auth.jwt_issuer.clone(),
            audience: config.auth.jwt_audience.clone(),
            leeway_s: config.auth.jwt_leeway.as_secs(),
        }))
    }

    /// The key set, when keys come from one (to fetch it at start and keep it fresh).
    pub fn key_set(&self) -> Option<Arc<Jwks>> {
        match &self.keys {
            Keys::Set(jwks) => Some(jwks.clone()),
            Keys::Fixed { .. } => None,
        }
    }

    pub(super) async fn verify(&self, token: &str) -> Result<Principal, JwtError> {
        if !looks_like_jwt(token) {
            return Err(JwtError::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| JwtError::Malformed)?;
        let key = match &self.keys {
            Keys::Fixed { key, algorithm } => {
                if header.alg != *algorithm {
                    return Err(JwtError::Algorithm(header.alg));
                }
                KeyRef::Borrowed(key)
            }
            Keys::Set(jwks) => {
                let Some(kid) = header.kid.as_deref() else {
                    return Err(JwtError::UnknownKey(None));
                };
                let key = jwks
                    .key(kid)
                    .await
                    .ok_or_else(|| JwtError::UnknownKey(Some(kid.to_owned())))?;
                if !key.algorithms.contains(&header.alg) {
                    return Err(JwtError::Algorithm(header.alg));
                }
                KeyRef::Shared(key.key)
            }
        };
        let data = jsonwebtoken::decode::<Claims>(token, key.get(), &self.validation(header.alg))?;
        let sub = data
            .claims
            .sub
            .as_deref()
            .and_then(|sub| ParticipantId::parse(sub).ok())
            .ok_or_else(|| JwtError::Claim("sub".into()))?;
        let exp_ms = data.claims.exp.unwrap_or(f64::NAN) * 1000.0;
        if !exp_ms.is_finite() {
            return Err(JwtError::Claim("exp".into()));
        }
        // The moment this server stops taking the token: `exp`, plus the skew it allows.
        let expires_at_ms = (exp_ms as i64).saturating_add((self.leeway_s * 1000) as i64);
        // The library compares whole seconds; sockets end at this very millisecond, so the
        // token must not be taken again in the rest of that second.
        if expires_at_ms <= ferry_shards::record::now_ms() {
            return Err(JwtError::Expired);
        }
        Ok(Principal::User { sub, expires_at_ms })
    }

    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut validation = Validation::new(algorithm);
        let mut required: HashSet<String> = ["sub", "exp"].map(str::to_owned).into();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = self.leeway_s;
        match &self.issuer {
            Some(issuer) => {
                validation.set_issuer(&[issuer]);
                required.insert("iss".into());
            }
            None => validation.iss = None,
        }
        match &self.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.insert("aud".into());
            }
            // Identity providers put their own `aud` in tokens; unless told which to expect
            // there is nothing to check it against.
            None => validation.validate_aud = false,
        }
        validation.required_spec_claims = required;
        validation
    }
}

/// A fixed key, or one shared with the key set (which may replace it meanwhile).
enum KeyRef<'a> {
    Borrowed(&'a DecodingKey),
    Shared(Arc<DecodingKey>),
}

impl KeyRef<'_> {
    fn get(&self) -> &DecodingKey {
        match self {
            KeyRef::Borrowed(key) => key,
            KeyRef::Shared(key) => key,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    const SECRET: &str = "a-test-secret-that-is-long-enough-0123456789";

    fn verifier(configure: impl FnOnce(&mut Config)) -> JwtVerifier {
        let mut config = Config {
            jwt_secret: Some(SECRET.into()),
            ..Config::default()
        };
        configure(&mut config);
        JwtVerifier::from_config(&config).unwrap().unwrap()
    }

    fn now() -> i64 {
        ferry_shards::record::now_ms() / 1000
    }

    fn sign(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn a_valid_token_is_its_sub_until_exp_plus_leeway() {
        let v = verifier(|_| {});
        let exp = now() + 600;
        let user = v.verify(&sign(json!({"sub": "alice", "exp": exp}))).await;
        match user.unwrap() {
            Principal::User { sub, expires_at_ms } => {
                assert_eq!(sub.as_str(), "alice");
                assert_eq!(expires_at_ms, exp * 1000 + 30_000);
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn every_refusal_has_its_reason() {
        let v = verifier(|c| {
            c.auth.jwt_issuer = Some("https://idp/realms/r".into());
            c.auth.jwt_audience = Some("ferry".into());
        });
        let good = json!({"sub": "alice", "exp": now() + 600, "iss": "https://idp/realms/r",
                          "aud": ["account", "ferry"]});
        assert!(v.verify(&sign(good.clone())).await.is_ok());
        let with = |key: &str, value: serde_json::Value| {
            let mut claims = good.clone();
            claims[key] = value;
            sign(claims)
        };
        let without = |key: &str| {
            let mut claims = good.clone();
            claims.as_object_mut().unwrap().remove(key);
            sign(claims)
        };
        let cases = [
            (without("exp"), "jwt_claims"),
            (without("sub"), "jwt_claims"),
            (without("iss"), "jwt_claims"),
            (without("aud"), "jwt_claims"),
            (with("exp", json!(now() - 3600)), "jwt_expired"),
            (with("nbf", json!(now() + 3600)), "jwt_not_yet_valid"),
            (with("iss", json!("https://evil/realms/r")), "jwt_issuer"),
            (with("aud", json!("account")), "jwt_audience"),
            (with("sub", json!("not a participant!")), "jwt_claims"),
            ("a.b".to_owned(), "jwt_malformed"),
            ("a.b.c.d".to_owned(), "jwt_malformed"),
            ("a..c".to_owned(), "jwt_malformed"),
            ("a.b=.c".to_owned(), "jwt_malformed"),
            ("eyJhbGciOiJIUzI1NiJ9.e30.c2ln".to_owned(), "jwt_signature"),
        ];
        for (token, reason) in cases {
            let e = v.verify(&token).await.unwrap_err();
            assert_eq!(e.reason(), reason, "{token}: {e}");
        }
        let forged = jsonwebtoken::encode(
            &Header::default(),
            &good,
            &EncodingKey::from_secret(b"another-secret-that-is-long-enough-xyz"),
        )
        .unwrap();
        assert_eq!(
            v.verify(&forged).await.unwrap_err().reason(),
            "jwt_signature"
        );
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &good,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert_eq!(
            v.verify(&hs512).await.unwrap_err().reason(),
            "jwt_algorithm"
        );
    }

    #[test]
    fn shape_is_checked_before_anything_else() {
        assert!(looks_like_jwt("aGVhZA.Ym9keQ.c2ln"));
        assert!(!looks_like_jwt("aGVhZA.Ym9keQ."), "unsigned (alg none)");
        assert!(!looks_like_jwt("fk_0123abcd"));
        let long = format!("{}.{}.{}", "a".repeat(4096), "b".repeat(4096), "c");
        assert!(!looks_like_jwt(&long));
    }
}
