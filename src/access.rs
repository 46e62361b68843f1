//! Authorization: what a caller may do in a conversation. One place, used by HTTP, SSE and
//! WebSocket alike.

use ferry_shards::archive::ConversationMeta;
use ferry_shards::ids::ParticipantId;

use crate::auth::Principal;
use crate::http::error::ApiError;

/// API keys may use every conversation; a user only those that list it as a participant.
pub fn authorize(principal: &Principal, meta: &ConversationMeta) -> Result<(), ApiError> {
    match principal {
        Principal::ApiKey { .. } => Ok(()),
        Principal::User { sub, .. } if meta.has_participant(sub.as_str()) => Ok(()),
        Principal::User { .. } => {
            crate::metrics::count_auth_failure("forbidden");
            Err(ApiError::forbidden(
                "not a participant of this conversation",
            ))
        }
    }
}

/// Who a message or cursor update is from: a user is always itself (anything it names is
/// ignored); an API key must name the participant.
pub fn sender(principal: &Principal, requested: Option<&str>) -> Result<ParticipantId, ApiError> {
    match principal {
        Principal::User { sub, .. } => Ok(sub.clone()),
        Principal::ApiKey { .. } => {
            let name =
                requested.ok_or_else(|| ApiError::invalid("sender is required with an API key"))?;
            ParticipantId::parse(name).map_err(|e| ApiError::invalid(e.to_string()))
        }
    }
}

/// Whether the caller may act for `participant` (inbox reads, cursor updates).
pub fn act_for(principal: &Principal, participant: &ParticipantId) -> Result<(), ApiError> {
    match principal {
        Principal::ApiKey { .. } => Ok(()),
        Principal::User { sub, .. } if sub == participant => Ok(()),
        Principal::User { .. } => {
            crate::metrics::count_auth_failure("forbidden");
            Err(ApiError::forbidden("a user may only act for itself"))
        }
    }
}

/// What a user is told about a conversation it may not use: `forbidden` whether or not the
/// conversation exists, so a user cannot probe which ids exist. API keys see `not_found`.
pub fn conceal(principal: &Principal, e: ApiError) -> ApiError {
    match principal {
        Principal::User { .. } if e.code == crate::http::error::Code::NotFound => {
            crate::metrics::count_auth_failure("forbidden");
            ApiError::forbidden("not a participant of this conversation")
        }
        _ => e,
    }
}

/// Creating or changing conversations is for API keys.
pub fn require_api_key(principal: &Principal) -> Result<(), ApiError> {
    match principal {
        Principal::ApiKey { .. } => Ok(()),
        Principal::User { .. } => Err(ApiError::forbidden(
            "creating conversations requires an API key",
        )),
    }
}
