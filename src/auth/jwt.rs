//! End-user tokens: JWTs verified with an HS256 secret or an RS256 public key. Claim `sub` is the
//! participant id.

use ferry_shards::ids::ParticipantId;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::Principal;
use crate::http::error::ApiError;
use crate::metrics::count_auth_failure;

/// How JWTs are verified, when enabled.
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
}

impl JwtVerifier {
    pub fn from_config(
        secret: Option<&str>,
        public_key: Option<&str>,
    ) -> anyhow::Result<Option<JwtVerifier>> {
        let (key, algorithm) = match (secret, public_key) {
            (Some(secret), _) => (
                DecodingKey::from_secret(secret.as_bytes()),
                Algorithm::HS256,
            ),
            (None, Some(pem)) => {
                let pem = if pem.trim_start().starts_with("-----BEGIN") {
                    pem.to_owned()
                } else {
                    std::fs::read_to_string(pem).map_err(|e| {
                        anyhow::anyhow!("jwt_public_key: cannot read PEM file {pem}: {e}")
                    })?
                };
                let key = DecodingKey::from_rsa_pem(pem.as_bytes())
                    .map_err(|e| anyhow::anyhow!("jwt_public_key is not an RSA PEM key: {e}"))?;
                (key, Algorithm::RS256)
            }
            (None, None) => return Ok(None),
        };
        let mut validation = Validation::new(algorithm);
        validation.required_spec_claims = ["sub".to_owned()].into_iter().collect();
        validation.validate_nbf = true;
        // Identity providers put their own `aud` in tokens; Ferry has no audience of its own to
        // check it against.
        validation.validate_aud = false;
        validation.leeway = 30;
        Ok(Some(JwtVerifier { key, validation }))
    }

    pub(super) fn verify(&self, token: &str) -> Result<Principal, ApiError> {
        let data =
            jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|e| {
                count_auth_failure("jwt");
                ApiError::unauthorized(format!("invalid token: {e}"))
            })?;
        let sub = ParticipantId::parse(&data.claims.sub).map_err(|_| {
            count_auth_failure("jwt");
            ApiError::unauthorized("token sub is not a valid participant id")
        })?;
        Ok(Principal::User { sub })
    }
}
