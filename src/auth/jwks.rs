//! An identity provider's signing keys, from its JSON Web Key Set (`auth.jwt_jwks_url`; Keycloak
//! publishes it at `…/realms/REALM/protocol/openid-connect/certs`).
//!
//! The set is fetched at start, every `auth.jwt_jwks_refresh`, and when a token names a `kid`
//! the set does not hold (the provider rotated its keys). A token can make the server fetch at
//! most once per [`MIN_REFETCH`], so a flood of made-up `kid`s cannot hammer the provider, and
//! fetches never overlap (callers that find one under way wait for it). A fetch that fails, or
//! that yields no usable key, keeps the last good set and is logged.
//!
//! Only signing keys are kept: RSA (RS256/384/512, PS256/384/512), EC P-256/P-384 (ES256/384)
//! and Ed25519 (EdDSA), each with a `kid`. Keys marked for encryption (`use: "enc"`, Keycloak
//! lists its RSA-OAEP key beside the signing ones) and symmetric keys are skipped: a secret
//! published in a key set would let anyone sign.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;

/// Fewest time between two fetches caused by unknown `kid`s (periodic refreshes do not wait).
pub const MIN_REFETCH: Duration = Duration::from_secs(5);
/// A fetch that takes longer is abandoned (the last good set stays).
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A larger key set document is refused; real ones are a few KiB.
const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

/// One signing key and the algorithms a token signed with it may name.
#[derive(Clone)]
pub struct SigningKey {
    pub key: Arc<DecodingKey>,
    pub algorithms: Vec<Algorithm>,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("request failed: {0}")]
    Request(String),
    #[error("answered HTTP {0}")]
    Status(u16),
    #[error("document larger than {MAX_DOCUMENT_BYTES} bytes")]
    TooLarge,
    #[error("not a JSON Web Key Set: {0}")]
    Document(String),
    #[error("no usable signing key in the set")]
    NoKeys,
}

/// The key set and how to fetch it again; shared by every verification.
pub struct Jwks {
    url: String,
    client: reqwest_rustls::Client,
    keys: RwLock<Arc<HashMap<String, SigningKey>>>,
    /// Held while fetching, so fetches never overlap; holds when the last fetch started.
    fetching: tokio::sync::Mutex<Option<Instant>>,
}

impl Jwks {
    pub fn new(url: String) -> anyhow::Result<Jwks> {
        let client = reqwest_rustls::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(FETCH_TIMEOUT)
            .build()
            .map_err(|e| anyhow::anyhow!("cannot build the JWKS client: {e}"))?;
        Ok(Jwks {
            url,
            client,
            keys: RwLock::new(Arc::new(HashMap::new())),
            fetching: tokio::sync::Mutex::new(None),
        })
    }

    fn current(&self) -> Arc<HashMap<String, SigningKey>> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The key `kid` names, fetching the set again when it is unknown and the last fetch is at
    /// least [`MIN_REFETCH`] old.
    pub async fn key(&self, kid: &str) -> Option<SigningKey> {
        if let Some(key) = self.current().get(kid) {
            return Some(key.clone());
        }
        let mut last = self.fetching.lock().await;
        // Another caller may have fetched while this one waited.
        if let Some(key) = self.current().get(kid) {
            return Some(key.clone());
        }
        if last.is_some_and(|at| at.elapsed() < MIN_REFETCH) {
            return None;
        }
        *last = Some(Instant::now());
        tracing::info!(url = %self.url, "token names an unknown key id; fetching the key set");
        self.fetch_and_log().await;
        self.current().get(kid).cloned()
    }

    /// Fetches the set now (at start and periodically); failures are logged.
    pub async fn refresh(&self) {
        let mut last = self.fetching.lock().await;
        *last = Some(Instant::now());
        self.fetch_and_log().await;
    }

    async fn fetch_and_log(&self) {
        match self.fetch().await {
            Ok(keys) => {
                let count = keys.len();
                let mut kids: Vec<&str> = keys.keys().map(String::as_str).collect();
                kids.sort_unstable();
                tracing::debug!(url = %self.url, keys = count, kids = ?kids, "key set fetched");
                *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
                crate::metrics::count_jwks_fetch("ok");
            }
            Err(e) => {
                crate::metrics::count_jwks_fetch("error");
                tracing::warn!(
                    url = %self.url,
                    error = %e,
                    keys_kept = self.current().len(),
                    "cannot fetch the JWT key set; keeping the last good keys"
                );
            }
        }
    }

    async fn fetch(&self) -> Result<HashMap<String, SigningKey>, FetchError> {
        let mut response = self
            .client
            .get(&self.url)
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| FetchError::Request(describe(&e)))?;
        if !response.status().is_success() {
            return Err(FetchError::Status(response.status().as_u16()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| FetchError::Request(describe(&e)))?
        {
            if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
                return Err(FetchError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        parse_key_set(&body)
    }

    /// Refetches every `interval` until `stop`.
    pub async fn run_refresh(
        self: Arc<Self>,
        interval: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            let stopped = async {
                let _ = stop.wait_for(|s| *s).await;
            };
            tokio::select! {
                _ = tokio::time::sleep(interval) => self.refresh().await,
                _ = stopped => return,
            }
        }
    }
}

/// reqwest's message and every cause below it (its top-level message alone rarely says why).
fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[derive(Deserialize)]
struct KeySetDocument {
    keys: Vec<serde_json::Value>,
}

/// The usable signing keys of a JWKS document, by `kid`. Keys that cannot be used are skipped
/// one by one (a provider may list kinds this server does not know); a set with none is an error.
pub fn parse_key_set(body: &[u8]) -> Result<HashMap<String, SigningKey>, FetchError> {
    let document: KeySetDocument =
        serde_json::from_slice(body).map_err(|e| FetchError::Document(e.to_string()))?;
    let mut keys = HashMap::new();
    for raw in document.keys {
        let kid = raw.get("kid").and_then(|k| k.as_str()).map(str::to_owned);
        match signing_key(raw) {
            Ok(key) => match kid {
                Some(kid) => {
                    keys.insert(kid, key);
                }
                None => tracing::debug!("skipping a key without kid in the key set"),
            },
            Err(why) => tracing::debug!(kid = ?kid, why, "skipping a key in the key set"),
        }
    }
    if keys.is_empty() {
        return Err(FetchError::NoKeys);
    }
    Ok(keys)
}

fn signing_key(raw: serde_json::Value) -> Result<SigningKey, &'static str> {
    let jwk: Jwk = serde_json::from_value(raw).map_err(|_| "not a key this server reads")?;
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return Err("an encryption key");
    }
    let family: &[Algorithm] = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => &[
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => &[Algorithm::ES256],
            EllipticCurve::P384 => &[Algorithm::ES384],
            _ => return Err("an unsupported curve"),
        },
        AlgorithmParameters::OctetKeyPair(okp) => match okp.curve {
            EllipticCurve::Ed25519 => &[Algorithm::EdDSA],
            _ => return Err("an unsupported curve"),
        },
        AlgorithmParameters::OctetKey(_) => return Err("a symmetric key"),
        _ => return Err("an unsupported key type"),
    };
    let algorithms = match &jwk.common.key_algorithm {
        None => family.to_vec(),
        Some(alg) => {
            let alg = signing_algorithm(alg).ok_or("not a signing algorithm")?;
            if !family.contains(&alg) {
                return Err("an algorithm that does not fit the key");
            }
            vec![alg]
        }
    };
    let key = DecodingKey::from_jwk(&jwk).map_err(|_| "malformed key parameters")?;
    Ok(SigningKey {
        key: Arc::new(key),
        algorithms,
    })
}

/// The signature algorithm a JWK's `alg` names (encryption ones, like `RSA-OAEP`, are none).
fn signing_algorithm(alg: &KeyAlgorithm) -> Option<Algorithm> {
    Some(match alg {
        KeyAlgorithm::HS256 => Algorithm::HS256,
        KeyAlgorithm::HS384 => Algorithm::HS384,
        KeyAlgorithm::HS512 => Algorithm::HS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rsa(kid: &str) -> serde_json::Value {
        // A real 2048-bit modulus is not needed to parse; the components only need to decode.
        json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": "sXch", "e": "AQAB"})
    }

    #[test]
    fn keeps_signing_keys_and_skips_the_rest() {
        let doc = json!({"keys": [
            rsa("a"),
            {"kty": "RSA", "kid": "enc", "use": "enc", "alg": "RSA-OAEP", "n": "sXch", "e": "AQAB"},
            {"kty": "RSA", "kid": "oaep", "alg": "RSA-OAEP", "n": "sXch", "e": "AQAB"},
            {"kty": "oct", "kid": "secret", "k": "c2VjcmV0"},
            {"kty": "RSA", "n": "sXch", "e": "AQAB"},
            {"kty": "EC", "kid": "ec", "crv": "P-256", "x": "AQ", "y": "AQ"},
            {"kty": "RSA", "kid": "any-rsa", "n": "sXch", "e": "AQAB"},
            {"kty": "XYZ", "kid": "future"},
            {"kty": "RSA", "kid": "mismatch", "alg": "ES256", "n": "sXch", "e": "AQAB"}
        ]});
        let keys = parse_key_set(doc.to_string().as_bytes()).unwrap();
        let mut kids: Vec<&str> = keys.keys().map(String::as_str).collect();
        kids.sort_unstable();
        assert_eq!(kids, ["a", "any-rsa", "ec"]);
        assert_eq!(keys["a"].algorithms, [Algorithm::RS256]);
        assert_eq!(keys["ec"].algorithms, [Algorithm::ES256]);
        assert!(keys["any-rsa"].algorithms.contains(&Algorithm::PS256));
        assert!(!keys["any-rsa"].algorithms.contains(&Algorithm::HS256));
    }

    #[test]
    fn a_set_without_usable_keys_or_not_a_set_is_an_error() {
        let only_enc = json!({"keys": [{"kty": "oct", "kid": "s", "k": "c2VjcmV0"}]});
        assert!(matches!(
            parse_key_set(only_enc.to_string().as_bytes()),
            Err(FetchError::NoKeys)
        ));
        assert!(matches!(
            parse_key_set(b"<html>login</html>"),
            Err(FetchError::Document(_))
        ));
    }

    #[tokio::test]
    async fn an_unknown_kid_fetches_at_most_once_per_interval() {
        // Nothing listens on port 9 of loopback here: every fetch fails at once.
        let jwks = Jwks::new("http://127.0.0.1:9/certs".into()).unwrap();
        assert!(jwks.key("nope").await.is_none());
        let first = jwks.fetching.lock().await.expect("a fetch was started");
        for _ in 0..10 {
            assert!(jwks.key("nope").await.is_none());
        }
        let last = jwks.fetching.lock().await.expect("a fetch was started");
        assert_eq!(first, last, "no second fetch within MIN_REFETCH");
    }
}
