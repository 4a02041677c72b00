//! Bootstrap tokens: random secrets bound to one SPIFFE identity, with an expiry. Only their
//! SHA-256 is stored, so the store never holds a usable token.

use crate::ca::spiffe::SpiffeId;
use crate::state::records::{TokenRecord, now_unix};
use crate::state::registry::{Registry, RegistryError};
use sha2::{Digest, Sha256};

/// Default lifetime of a bootstrap token.
pub const DEFAULT_TOKEN_TTL_SECS: u64 = 24 * 3600;
pub const PREFIX: &str = "mesh1.";
/// Prefix of a scoped admin credential (`api::admin::scope`), told apart from bootstrap tokens.
pub const ADMIN_PREFIX: &str = "meshadm1.";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("unknown or revoked bootstrap token")]
    Unknown,
    #[error("bootstrap token expired")]
    Expired,
    #[error("malformed bootstrap token")]
    Malformed,
}

/// The store key of a token.
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Hex digits of a token's hash that name it in lists (not enough to use it).
pub const ID_LEN: usize = 16;
/// Fewest hex digits `revoke` accepts as an id.
pub const MIN_ID_LEN: usize = 8;

/// The id shown for a stored token hash.
pub fn id_of(hash: &str) -> &str {
    hash.get(..ID_LEN).unwrap_or(hash)
}

/// Revokes the one token that `id` names (an id prefix, or the token itself); returns its
/// hash and identity.
pub async fn revoke(registry: &Registry, id: &str) -> Result<(String, String), RegistryError> {
    let key = if id.starts_with(PREFIX) || id.starts_with(ADMIN_PREFIX) {
        hash(id)
    } else {
        if id.len() < MIN_ID_LEN || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(RegistryError::Invalid(format!(
                "token id {id:?}: give at least {MIN_ID_LEN} hex digits of it, or the token"
            )));
        }
        let st = registry.state();
        let mut matching = st.tokens.keys().filter(|h| h.starts_with(id));
        match (matching.next(), matching.next()) {
            (Some(h), None) => h.clone(),
            (None, _) => return Err(RegistryError::NotFound(format!("no token with id {id}"))),
            (Some(_), Some(_)) => {
                return Err(RegistryError::Invalid(format!(
                    "token id {id} names several tokens; give more digits"
                )));
            }
        }
    };
    let identity = registry
        .state()
        .tokens
        .get(&key)
        .map(|r| r.identity.clone())
        .ok_or_else(|| RegistryError::NotFound("no such token".into()))?;
    registry.revoke_token(&key, id_of(&key)).await?;
    Ok((key, identity))
}

/// Creates a token for `identity` and stores its hash. The token itself is returned once.
pub async fn create(
    registry: &Registry,
    identity: &SpiffeId,
    ttl_secs: u64,
) -> Result<(String, i64), RegistryError> {
    let (token, expires, _) = store(
        registry,
        PREFIX,
        identity.to_string(),
        Vec::new(),
        "",
        ttl_secs,
    )
    .await?;
    Ok((token, expires))
}

/// Makes a random secret with `prefix`, stores its hash with what it grants, and returns the
/// secret (once), its expiry and its id.
pub(crate) async fn store(
    registry: &Registry,
    prefix: &str,
    identity: String,
    scopes: Vec<String>,
    name: &str,
    ttl_secs: u64,
) -> Result<(String, i64, String), RegistryError> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| RegistryError::Invalid(e.to_string()))?;
    let token = format!("{prefix}{}", hex::encode(secret));
    let now = now_unix();
    let ttl = if ttl_secs == 0 {
        DEFAULT_TOKEN_TTL_SECS
    } else {
        ttl_secs
    };
    let expires = now.saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX));
    let key = hash(&token);
    let id = id_of(&key).to_string();
    registry
        .put_token(
            key,
            TokenRecord {
                identity,
                expires_at_unix: expires,
                created_at_unix: now,
                scopes,
                name: name.to_string(),
            },
        )
        .await?;
    Ok((token, expires, id))
}

/// Checks a token's shape (`mesh1.` + 64 hex digits) before it is looked up.
pub fn parse(token: &str) -> Result<&str, TokenError> {
    let rest = token.strip_prefix(PREFIX).ok_or(TokenError::Malformed)?;
    if rest.len() != 64 || !rest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(TokenError::Malformed);
    }
    Ok(token)
}

/// The identity a token is valid for, now.
pub fn check(registry: &Registry, token: &str) -> Result<SpiffeId, TokenError> {
    let token = parse(token)?;
    let state = registry.state();
    let rec = state.tokens.get(&hash(token)).ok_or(TokenError::Unknown)?;
    if rec.expires_at_unix <= now_unix() {
        return Err(TokenError::Expired);
    }
    SpiffeId::parse(&rec.identity).map_err(|_| TokenError::Unknown)
}
