//! API keys: the pepper they are hashed with, the cache in front of the `api_keys` table, and
//! their lifecycle (create, revoke, rotate with grace).
//!
//! - **Hashing**: a key is stored as HMAC-SHA256 under a server-side pepper, so the table alone
//!   (a backup, a read replica, an SQL injection elsewhere) does not let anyone check a guessed key
//!   offline. The pepper comes from `[auth] api_key_pepper`, else from the cluster secret, else
//!   from `<data_dir>/api_key_pepper` (made once, mode 0600).
//! - **Cost of a bad key**: malformed credentials are refused before any hashing or SQL; a key the
//!   table does not hold is remembered as unknown for [`NEGATIVE_TTL`] (at most [`NEGATIVE_MAX`]
//!   of them), so repeating it costs no query; lookups go through their own small pool, so a flood
//!   of them can never take a connection the archiver needs.
//! - **Revocation**: the node that revokes drops the key at once; every node polls the table's
//!   changes every [`POLL_EVERY`], so a revoked key is refused everywhere within about a second.
//!   Sockets opened with a key end when it is revoked or its rotation grace runs out
//!   ([`ApiKeys::ended`]).
//! - **`last_used_at`**: remembered in memory and written every [`TOUCH_EVERY`], never on the
//!   request path.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use ferry_shards::record::now_ms;

use crate::store::{KeyRow, NewKey, Store, StoreError};

/// Shortest API key an operator may register (`bootstrap_api_key`); generated keys are longer.
pub const MIN_KEY_LEN: usize = 16;
/// Longest credential looked at; anything longer is refused unread.
pub const MAX_CREDENTIAL_LEN: usize = 8192;
/// Shortest configured pepper.
pub const MIN_PEPPER_LEN: usize = 32;
/// How long a key the table does not hold is remembered as unknown.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(10);
/// Unknown keys remembered at most (a flood of random ones cannot grow the cache further).
pub const NEGATIVE_MAX: usize = 65_536;
/// Most credentials whose hash is remembered ([`ApiKeys::recent`]).
const RECENT_MAX: usize = 4_096;
/// How often each node reads revocations and rotations from the table.
pub const POLL_EVERY: Duration = Duration::from_millis(500);
/// How often `last_used_at` is written.
pub const TOUCH_EVERY: Duration = Duration::from_secs(10);
/// Changes are read from this far before the newest one seen, so a change stamped by a node whose
/// clock is a little behind is not missed.
const CLOCK_MARGIN_MS: i64 = 5_000;

/// What a key may do (PROTOCOL.md "API keys").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyScope {
    /// Everything, `/admin` included.
    Admin,
    /// The public API for any participant.
    Service,
    /// Reads, joins and streams; no send and no cursor move.
    Read,
}

impl KeyScope {
    pub fn parse(text: &str) -> Option<KeyScope> {
        match text {
            "admin" => Some(KeyScope::Admin),
            "service" => Some(KeyScope::Service),
            "read" => Some(KeyScope::Read),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            KeyScope::Admin => "admin",
            KeyScope::Service => "service",
            KeyScope::Read => "read",
        }
    }
}

/// The secret keys are hashed under, and a short public name for it.
#[derive(Clone)]
pub struct Pepper {
    secret: Vec<u8>,
    id: String,
}

impl std::fmt::Debug for Pepper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pepper").field("id", &self.id).finish()
    }
}

fn hmac(secret: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

impl Pepper {
    pub fn new(secret: &[u8]) -> Pepper {
        let id = hex::encode(&hmac(secret, b"ferry api key pepper id")[..8]);
        Pepper {
            secret: secret.to_vec(),
            id,
        }
    }

    /// The pepper configured, derived from the cluster secret, or kept in the data dir.
    pub fn resolve(
        configured: Option<&str>,
        cluster_secret: Option<&str>,
        data_dir: &Path,
    ) -> anyhow::Result<Pepper> {
        if let Some(p) = configured {
            if p.len() < MIN_PEPPER_LEN {
                anyhow::bail!("auth.api_key_pepper must be at least {MIN_PEPPER_LEN} bytes");
            }
            return Ok(Pepper::new(p.as_bytes()));
        }
        if let Some(secret) = cluster_secret.filter(|s| !s.is_empty()) {
            return Ok(Pepper::new(&hmac(
                secret.as_bytes(),
                b"ferry api key pepper",
            )));
        }
        let path = data_dir.join("api_key_pepper");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_pepper_file(&path)?,
            Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
        };
        let secret = hex::decode(text.trim())
            .ok()
            .filter(|s| s.len() >= MIN_PEPPER_LEN)
            .ok_or_else(|| {
                anyhow::anyhow!("{} does not hold a pepper (64 hex digits)", path.display())
            })?;
        Ok(Pepper::new(&secret))
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn hash(&self, key: &str) -> String {
        hex::encode(hmac(&self.secret, key.as_bytes()))
    }
}

/// Writes a new random pepper durably; another process racing to do the same wins or loses whole.
fn create_pepper_file(path: &Path) -> anyhow::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let text = hex::encode(rand::random::<[u8; 32]>());
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", tmp.display()))?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    drop(file);
    // Never replaces a pepper another process wrote first: keys hashed under it would break.
    match std::fs::hard_link(&tmp, path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let _ = std::fs::remove_file(&tmp);
            return Ok(std::fs::read_to_string(path)?);
        }
        Err(e) => anyhow::bail!("cannot create {}: {e}", path.display()),
    }
    let _ = std::fs::remove_file(&tmp);
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    tracing::info!(path = %path.display(), "created the api key pepper");
    Ok(text)
}

/// A key known to be in force.
#[derive(Debug, Clone)]
struct KnownKey {
    id: String,
    scope: KeyScope,
    /// End of a rotated key's grace.
    expires_at_ms: Option<i64>,
}

/// What [`ApiKeys::lookup`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundKey {
    pub id: String,
    pub scope: KeyScope,
}

/// Whether a key still works.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    Revoked,
    Until(Option<i64>),
}

#[derive(Default)]
struct Cache {
    /// Key hash → the key, for keys in force.
    by_hash: HashMap<String, KnownKey>,
    /// Key ids known revoked.
    revoked: HashSet<String>,
    /// Key id → end of its grace, for rotated keys.
    expires: HashMap<String, i64>,
}

/// A newly created key; `key` is shown to the operator once and never stored.
#[derive(Debug, Clone)]
pub struct CreatedKey {
    pub row: KeyRow,
    pub key: String,
}

/// The API keys of this node: cache, pepper and lifecycle.
pub struct ApiKeys {
    /// The auth pool: lookups never wait behind the archiver's connections.
    store: Store,
    pepper: Pepper,
    /// There are rows hashed before peppers: an unknown key is also looked up by its SHA-256.
    legacy: std::sync::atomic::AtomicBool,
    cache: RwLock<Cache>,
    unknown: Mutex<HashMap<String, Instant>>,
    /// Key id → last use (ms), written to the table every [`TOUCH_EVERY`].
    used: Mutex<HashMap<String, i64>>,
    /// Credentials recently found in force → their hash: a client presenting its key on every
    /// request costs one map lookup instead of an HMAC. Only keys that were in force get in
    /// (random guesses cannot fill it); a revoked key's entry leads to no cached key, so it is
    /// refused as before. At most [`RECENT_MAX`] entries.
    recent: RwLock<HashMap<Box<str>, String>>,
    /// Bumped on every revocation or rotation seen, so sockets re-check their key.
    changes: watch::Sender<u64>,
}

/// A key id: `key_` + 16 hex digits.
fn new_key_id() -> String {
    format!("key_{}", hex::encode(rand::random::<[u8; 8]>()))
}

/// A new random API key: `fk_` + 32 random bytes in hex.
pub fn generate_key() -> String {
    format!("fk_{}", hex::encode(rand::random::<[u8; 32]>()))
}

/// A credential that could be an API key: visible ASCII, no longer than [`MAX_CREDENTIAL_LEN`].
pub fn well_formed(token: &str) -> bool {
    token.len() <= MAX_CREDENTIAL_LEN && token.bytes().all(|b| b.is_ascii_graphic())
}

impl ApiKeys {
    pub fn new(store: Store, pepper: Pepper) -> ApiKeys {
        ApiKeys {
            store,
            pepper,
            legacy: std::sync::atomic::AtomicBool::new(true),
            cache: RwLock::new(Cache::default()),
            unknown: Mutex::new(HashMap::new()),
            used: Mutex::new(HashMap::new()),
            recent: RwLock::new(HashMap::new()),
            changes: watch::channel(0).0,
        }
    }

    /// Registers the bootstrap key, or on the first start of an empty table creates an admin key
    /// and returns it so it can be printed once. Also says how many keys this pepper cannot check.
    pub async fn bootstrap(
        &self,
        bootstrap_key: Option<&str>,
    ) -> Result<Option<String>, StoreError> {
        let (other_pepper, legacy) = self.store.api_keys_by_pepper(self.pepper.id()).await?;
        self.legacy
            .store(legacy > 0, std::sync::atomic::Ordering::Relaxed);
        if other_pepper > 0 {
            tracing::warn!(
                keys = other_pepper,
                pepper = self.pepper.id(),
                "api keys hashed under another pepper cannot be accepted; restore that pepper or create new keys"
            );
        }
        if let Some(key) = bootstrap_key {
            if self.lookup_stored(key).await?.is_none() {
                let id = new_key_id();
                let hash = self.pepper.hash(key);
                self.store
                    .insert_api_key(&NewKey {
                        id: &id,
                        hash: &hash,
                        pepper_id: self.pepper.id(),
                        name: "bootstrap",
                        scope: "admin",
                        now_ms: now_ms(),
                    })
                    .await?;
            }
            return Ok(None);
        }
        if self.store.api_key_count().await? == 0 {
            let created = self.create("generated admin", KeyScope::Admin).await?;
            return Ok(Some(created.key));
        }
        Ok(None)
    }

    /// The key `token`, if it is one in force.
    pub async fn lookup(&self, token: &str) -> Result<Option<FoundKey>, StoreError> {
        if token.len() < MIN_KEY_LEN || !well_formed(token) {
            crate::metrics::count_key_lookup("malformed");
            return Ok(None);
        }
        let (hash, remembered) = self.hash(token);
        let now = now_ms();
        let cached = {
            let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
            cache.by_hash.get(&hash).cloned()
        };
        if let Some(key) = cached {
            if key.expires_at_ms.is_some_and(|t| t <= now) {
                self.cache
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .by_hash
                    .remove(&hash);
                crate::metrics::count_key_lookup("expired");
                return Ok(None);
            }
            crate::metrics::count_key_lookup("cached");
            self.note_use(&key.id, now);
            if !remembered {
                self.remember(token, hash);
            }
            return Ok(Some(FoundKey {
                id: key.id,
                scope: key.scope,
            }));
        }
        {
            let unknown = self.unknown.lock().unwrap_or_else(|e| e.into_inner());
            if unknown
                .get(&hash)
                .is_some_and(|at| at.elapsed() < NEGATIVE_TTL)
            {
                crate::metrics::count_key_lookup("negative_cached");
                return Ok(None);
            }
        }
        match self.lookup_stored(token).await? {
            Some(found) => {
                crate::metrics::count_key_lookup("stored");
                self.note_use(&found.id, now);
                Ok(Some(found))
            }
            None => {
                crate::metrics::count_key_lookup("unknown");
                let mut unknown = self.unknown.lock().unwrap_or_else(|e| e.into_inner());
                if unknown.len() >= NEGATIVE_MAX {
                    unknown.retain(|_, at| at.elapsed() < NEGATIVE_TTL);
                    if unknown.len() >= NEGATIVE_MAX {
                        unknown.clear();
                    }
                }
                unknown.insert(hash, Instant::now());
                Ok(None)
            }
        }
    }

    /// The peppered hash of `token`, and whether it came from [`ApiKeys::recent`].
    fn hash(&self, token: &str) -> (String, bool) {
        let recent = self.recent.read().unwrap_or_else(|e| e.into_inner());
        match recent.get(token) {
            Some(hash) => (hash.clone(), true),
            None => {
                drop(recent);
                (self.pepper.hash(token), false)
            }
        }
    }

    /// Keeps `token`'s hash, found in force, for its next use.
    fn remember(&self, token: &str, hash: String) {
        let mut recent = self.recent.write().unwrap_or_else(|e| e.into_inner());
        if recent.len() >= RECENT_MAX {
            recent.clear();
        }
        recent.insert(token.into(), hash);
    }

    /// Records a use of key `id` (written to `last_used_at` later).
    fn note_use(&self, id: &str, now: i64) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        match used.get_mut(id) {
            Some(at) => *at = now,
            None => {
                used.insert(id.to_owned(), now);
            }
        }
    }

    /// The key `token` if this node knows it in force, without any query.
    pub fn lookup_cached(&self, token: &str) -> Option<FoundKey> {
        if token.len() < MIN_KEY_LEN || !well_formed(token) {
            return None;
        }
        let (hash, _) = self.hash(token);
        let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
        let key = cache.by_hash.get(&hash)?;
        if key.expires_at_ms.is_some_and(|t| t <= now_ms()) {
            return None;
        }
        Some(FoundKey {
            id: key.id.clone(),
            scope: key.scope,
        })
    }

    /// Looks `token` up in the table (peppered, then as a pre-pepper row, which is rehashed) and
    /// caches it when it is in force.
    async fn lookup_stored(&self, token: &str) -> Result<Option<FoundKey>, StoreError> {
        let hash = self.pepper.hash(token);
        let mut row = self.store.api_key_by_hash(&hash, 2).await?;
        if row.is_none() && self.legacy.load(std::sync::atomic::Ordering::Relaxed) {
            let plain = hex::encode(Sha256::digest(token.as_bytes()));
            if let Some(old) = self.store.api_key_by_hash(&plain, 1).await? {
                self.store
                    .rehash_api_key(&old.id, &hash, self.pepper.id())
                    .await?;
                tracing::info!(key = %old.id, "rehashed an api key under the pepper");
                row = Some(old);
            }
        }
        let Some(row) = row else { return Ok(None) };
        let now = now_ms();
        let scope = KeyScope::parse(&row.scope).ok_or_else(|| {
            StoreError::Invalid(format!("api key {} has scope {:?}", row.id, row.scope))
        })?;
        if row.revoked_at_ms.is_some() || row.expires_at_ms.is_some_and(|t| t <= now) {
            return Ok(None);
        }
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        if cache.revoked.contains(&row.id) {
            return Ok(None);
        }
        let expires_at_ms = row
            .expires_at_ms
            .or_else(|| cache.expires.get(&row.id).copied());
        cache.by_hash.insert(
            hash,
            KnownKey {
                id: row.id.clone(),
                scope,
                expires_at_ms,
            },
        );
        Ok(Some(FoundKey { id: row.id, scope }))
    }

    pub async fn create(&self, name: &str, scope: KeyScope) -> Result<CreatedKey, StoreError> {
        let key = generate_key();
        let id = new_key_id();
        let hash = self.pepper.hash(&key);
        self.store
            .insert_api_key(&NewKey {
                id: &id,
                hash: &hash,
                pepper_id: self.pepper.id(),
                name,
                scope: scope.as_str(),
                now_ms: now_ms(),
            })
            .await?;
        let row = self
            .store
            .api_key(&id)
            .await?
            .ok_or_else(|| StoreError::Invalid("a created api key is gone".into()))?;
        tracing::info!(key = %id, name, scope = scope.as_str(), "api key created");
        Ok(CreatedKey { row, key })
    }

    pub async fn list(&self) -> Result<Vec<KeyRow>, StoreError> {
        let mut rows = self.store.list_api_keys().await?;
        // Uses not yet written count too.
        let used = self.used.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for row in &mut rows {
            if let Some(at) = used.get(&row.id) {
                row.last_used_at_ms = Some(row.last_used_at_ms.unwrap_or(0).max(*at));
            }
        }
        Ok(rows)
    }

    /// Revokes key `id` here at once (the other nodes see it at their next poll).
    pub async fn revoke(&self, id: &str) -> Result<Option<KeyRow>, StoreError> {
        let row = self.store.revoke_api_key(id, now_ms()).await?;
        if row.is_some() {
            self.forget(id);
            tracing::info!(key = %id, "api key revoked");
        }
        Ok(row)
    }

    /// A new key with the name and scope of key `id`; the old one works `grace` longer.
    pub async fn rotate(
        &self,
        id: &str,
        grace: Duration,
    ) -> Result<Option<(KeyRow, CreatedKey)>, StoreError> {
        let key = generate_key();
        let new_id = new_key_id();
        let hash = self.pepper.hash(&key);
        let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
        let rotated = self
            .store
            .rotate_api_key(
                id,
                &NewKey {
                    id: &new_id,
                    hash: &hash,
                    pepper_id: self.pepper.id(),
                    name: "",
                    scope: "",
                    now_ms: now_ms(),
                },
                grace_ms,
            )
            .await?;
        let Some((old, new)) = rotated else {
            return Ok(None);
        };
        if let Some(ends) = old.expires_at_ms {
            self.set_expiry(&old.id, ends);
        }
        tracing::info!(key = %old.id, new_key = %new.id, grace_ms, "api key rotated");
        Ok(Some((old, CreatedKey { row: new, key })))
    }

    fn forget(&self, id: &str) {
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        if !cache.revoked.insert(id.to_owned()) {
            return;
        }
        cache.by_hash.retain(|_, k| k.id != id);
        drop(cache);
        self.changes.send_modify(|n| *n += 1);
    }

    fn set_expiry(&self, id: &str, ends: i64) {
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        if cache.expires.get(id) == Some(&ends) {
            return;
        }
        cache.expires.insert(id.to_owned(), ends);
        for key in cache.by_hash.values_mut().filter(|k| k.id == id) {
            key.expires_at_ms = Some(ends);
        }
        drop(cache);
        self.changes.send_modify(|n| *n += 1);
    }

    fn standing(&self, id: &str) -> Standing {
        let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
        if cache.revoked.contains(id) {
            return Standing::Revoked;
        }
        Standing::Until(cache.expires.get(id).copied())
    }

    /// Completes when key `id` is revoked or its rotation grace ends (never for a key that stays
    /// in force).
    pub async fn ended(&self, id: &str) {
        let mut changes = self.changes.subscribe();
        loop {
            let until = match self.standing(id) {
                Standing::Revoked => return,
                Standing::Until(until) => until,
            };
            match until {
                Some(t) => {
                    let left = t - now_ms();
                    if left <= 0 {
                        return;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(left as u64)) => return,
                        changed = changes.changed() => if changed.is_err() { return },
                    }
                }
                None => {
                    if changes.changed().await.is_err() {
                        return std::future::pending().await;
                    }
                }
            }
        }
    }

    /// Reads revocations and rotations every [`POLL_EVERY`] and writes `last_used_at` every
    /// [`TOUCH_EVERY`], until `stop` turns true.
    pub async fn run(&self, mut stop: watch::Receiver<bool>) {
        let mut since = now_ms() - CLOCK_MARGIN_MS;
        let mut tick = tokio::time::interval(POLL_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_touch = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = crate::cluster::stopped(&mut stop) => break,
            }
            match self.store.api_key_changes_since(since).await {
                Ok(changes) => {
                    for change in changes {
                        since = since.max(change.changed_at_ms - CLOCK_MARGIN_MS);
                        if change.revoked_at_ms.is_some() {
                            self.forget(&change.id);
                        } else if let Some(ends) = change.expires_at_ms {
                            self.set_expiry(&change.id, ends);
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot read api key changes"),
            }
            if last_touch.elapsed() >= TOUCH_EVERY {
                last_touch = Instant::now();
                self.touch().await;
                self.unknown
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|_, at| at.elapsed() < NEGATIVE_TTL);
            }
        }
        self.touch().await;
    }

    async fn touch(&self) {
        let used: Vec<(String, i64)> = self
            .used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        if used.is_empty() {
            return;
        }
        if let Err(e) = self.store.touch_api_keys(&used).await {
            tracing::debug!(error = %e, "cannot write api keys' last use");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_round_trip() {
        for s in [KeyScope::Admin, KeyScope::Service, KeyScope::Read] {
            assert_eq!(KeyScope::parse(s.as_str()), Some(s));
        }
        assert_eq!(KeyScope::parse("root"), None);
    }

    #[test]
    fn the_pepper_changes_the_hash_and_names_itself() {
        let a = Pepper::new(&[1; 32]);
        let b = Pepper::new(&[2; 32]);
        assert_ne!(a.hash("fk_x"), b.hash("fk_x"));
        assert_eq!(a.hash("fk_x"), Pepper::new(&[1; 32]).hash("fk_x"));
        assert_ne!(a.id(), b.id());
        assert_eq!(a.id().len(), 16);
        assert!(!format!("{a:?}").contains("0101"));
    }

    #[test]
    fn credentials_are_screened_before_any_lookup() {
        assert!(well_formed("fk_0123456789abcdef"));
        assert!(!well_formed("has space in it"));
        assert!(!well_formed("tab\there"));
        assert!(!well_formed("ünïcode-key-value"));
        assert!(!well_formed(&"a".repeat(MAX_CREDENTIAL_LEN + 1)));
    }

    #[test]
    fn the_pepper_file_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = Pepper::resolve(None, None, dir.path()).unwrap();
        let again = Pepper::resolve(None, None, dir.path()).unwrap();
        assert_eq!(first.id(), again.id());
        let mode = std::fs::metadata(dir.path().join("api_key_pepper"))
            .unwrap()
            .permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o600);
        assert!(Pepper::resolve(Some("short"), None, dir.path()).is_err());
        let cluster = Pepper::resolve(None, Some("s3cret"), dir.path()).unwrap();
        assert_ne!(cluster.id(), first.id());
    }
}
