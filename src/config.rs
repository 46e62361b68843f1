//! Configuration: defaults ← `--config` TOML file ← `FERRY_*` environment ← command-line flags.
//!
//! Every file key has an environment variable `FERRY_` + SECTION + `__` + KEY (upper case); top-level
//! keys (`listen`, `data_dir`, …) are `FERRY_LISTEN`, `FERRY_DATA_DIR`, …. Unknown keys in the file
//! or in a known section are rejected so a typo never silently falls back to a default.
//! Durations are written with a unit: `ms`, `s`, `m`, `h`, `d` (`"7d"`, `"250ms"`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Deserializer, Serialize};

use ferry_shards::wal::FsyncPolicy;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen: String,
    pub admin_listen: String,
    pub data_dir: PathBuf,
    pub node_id: Option<String>,
    /// Default: `sqlite://<data_dir>/ferry.db`.
    pub database_url: Option<String>,
    pub redis_url: Option<String>,
    /// Shared by every node of a cluster; opens the node-to-node API and nothing else.
    pub cluster_secret: Option<String>,
    /// Where the other nodes reach this node's admin listener. Default: `http://` + the admin
    /// listener's bound address.
    pub advertise_url: Option<String>,
    /// Default: `file://<data_dir>/objects`.
    pub object_store: Option<String>,
    pub bootstrap_api_key: Option<String>,
    pub jwt_secret: Option<String>,
    pub jwt_public_key: Option<String>,
    /// Skip running migrations on start.
    pub no_migrate: bool,
    /// How long history is kept at all.
    #[serde(with = "duration_str")]
    pub retention: Duration,
    /// Log format: `text` or `json`.
    pub log_format: String,
    pub wal: WalSection,
    pub slots: SlotsSection,
    pub archive: ArchiveSection,
    pub limits: LimitsSection,
    pub runtime: RuntimeSection,
    pub cluster: ClusterSection,
    pub rate: RateSection,
    pub auth: AuthSection,
    pub http: HttpSection,
}

/// `[rate]`: request rate limits, each `N/s` or `N/m`, `0` = off. In a cluster with Redis they
/// hold cluster-wide.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateSection {
    /// Appends per principal (API key or JWT `sub`), over HTTP and WebSocket together.
    pub appends: String,
    /// WebSocket upgrades and SSE streams opened per client IP.
    pub connects_per_ip: String,
    /// Requests with missing or invalid credentials per client IP.
    pub auth_failures_per_ip: String,
    /// `chunk` and `typing` events per socket.
    pub ephemeral: String,
}

impl Default for RateSection {
    fn default() -> Self {
        RateSection {
            appends: "1000/s".into(),
            connects_per_ip: "50/s".into(),
            auth_failures_per_ip: "20/s".into(),
            ephemeral: "100/s".into(),
        }
    }
}

/// `[auth]`: how API keys are stored and how end-user tokens (JWTs) are checked beyond their key
/// (`jwt_secret`, `jwt_public_key`, or `jwt_jwks_url` here).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    /// When set, a token's `iss` must equal it.
    pub jwt_issuer: Option<String>,
    /// When set, a token's `aud` (a string or a list) must contain it.
    pub jwt_audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(with = "duration_str")]
    pub jwt_leeway: Duration,
    /// A JSON Web Key Set (an identity provider's signing keys, e.g. Keycloak's
    /// `…/protocol/openid-connect/certs`); a token's key is the one its `kid` names.
    pub jwt_jwks_url: Option<String>,
    /// How often the key set is fetched again (it is also fetched on an unknown `kid`).
    #[serde(with = "duration_str")]
    pub jwt_jwks_refresh: Duration,
    /// The secret API keys are hashed with (HMAC-SHA256), at least 32 bytes. Default: derived
    /// from the cluster secret in a cluster, else a random one kept in `<data_dir>/api_key_pepper`.
    pub api_key_pepper: Option<String>,
}

impl Default for AuthSection {
    fn default() -> Self {
        AuthSection {
            jwt_issuer: None,
            jwt_audience: None,
            jwt_leeway: Duration::from_secs(30),
            jwt_jwks_url: None,
            jwt_jwks_refresh: Duration::from_secs(300),
            api_key_pepper: None,
        }
    }
}

/// Shortest `jwt_secret`: an HS256 key shorter than its 256-bit hash can be guessed offline
/// from any one token.
pub const MIN_JWT_SECRET_BYTES: usize = 32;

/// `[http]`: what browsers may do with the public API.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    /// Origins (`https://app.example.com`) whose pages may call the public API; none by
    /// default. From the environment: a comma-separated list.
    #[serde(deserialize_with = "list_or_commas")]
    pub cors_origins: Vec<String>,
}

/// A list, or (as an environment variable gives it) one comma-separated string.
fn list_or_commas<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        List(Vec<String>),
        Text(String),
    }
    let items = match Raw::deserialize(d)? {
        Raw::List(items) => items,
        Raw::Text(text) => text.split(',').map(str::to_owned).collect(),
    };
    Ok(items
        .into_iter()
        .map(|item| item.trim().to_owned())
        .filter(|item| !item.is_empty())
        .collect())
}

/// `[cluster]`: used when the node is part of a cluster (a Redis URL is set).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// How often a node renews its lease (and refreshes its view of the slot table).
    #[serde(with = "duration_str")]
    pub heartbeat: Duration,
    /// A node not renewed for this long is `dead`; a node stops acknowledging before its own
    /// lease can expire.
    #[serde(with = "duration_str")]
    pub lease: Duration,
    /// Slot moves in progress at once, cluster-wide.
    pub max_moves: usize,
    /// How long SIGTERM waits for the node's slots to move away before it exits anyway.
    #[serde(with = "duration_str")]
    pub drain_timeout: Duration,
    /// `local`: an append is acknowledged after the owner's fdatasync; `archive`: after the SQL
    /// commit of its archive batch as well.
    pub durability: String,
    /// `manual`: a dead node's slots move only when an operator asks (`ferry admin failover`);
    /// `auto`: the leader fails over every dead node that ran `durability = "archive"` once its
    /// lease has expired.
    pub failover: String,
    /// Durable-but-unarchived messages one conversation may have.
    pub max_unarchived: u64,
    /// How long an append to a moving slot waits before `try_again` (`slot_moving`).
    #[serde(with = "duration_str")]
    pub move_hold: Duration,
}

impl ClusterSection {
    /// `failover = "auto"`.
    pub fn auto_failover(&self) -> bool {
        self.failover == "auto"
    }
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            heartbeat: Duration::from_secs(1),
            lease: Duration::from_secs(5),
            max_moves: 16,
            drain_timeout: Duration::from_secs(60),
            durability: "local".into(),
            failover: "manual".into(),
            max_unarchived: 10_000,
            move_hold: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WalSection {
    /// `always` | `interval:<ms>` | `never`.
    pub fsync: String,
    pub segment_bytes: u64,
    pub queue_capacity: usize,
    pub max_batch_bytes: usize,
    /// Quarantine corrupt segments on start instead of refusing to start.
    pub repair: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SlotsSection {
    pub count: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiveSection {
    /// Messages older than this move from SQL to the object tier.
    #[serde(with = "duration_str")]
    pub sql_retention: Duration,
    /// How often that move runs.
    #[serde(with = "duration_str")]
    pub compact_interval: Duration,
    /// Durable but unarchived bytes beyond which appends get `try_again`.
    pub backlog_bytes: usize,
    pub batch_records: usize,
    /// How long a partial archive batch waits to fill before it is stored anyway.
    #[serde(with = "duration_str")]
    pub linger: Duration,
    /// SQL connections in the pool.
    pub pool_size: u32,
    /// Postgres cancels a statement running longer than this (SQLite: how long to wait for the
    /// database lock).
    #[serde(with = "duration_str")]
    pub statement_timeout: Duration,
    /// How long a request waits for a SQL connection before the archive counts as unavailable.
    #[serde(with = "duration_str")]
    pub acquire_timeout: Duration,
    /// Most messages per cold-tier segment; a conversation with this many messages past
    /// `sql_retention` is compacted without waiting for `2 × sql_retention`.
    pub segment_records: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    pub max_message_bytes: usize,
    pub max_frame_bytes: usize,
    pub max_page_size: usize,
    pub max_participants: usize,
    pub mailbox_capacity: usize,
    /// Requests (`send`, `ack`, `read`) one WebSocket may have in flight.
    pub socket_in_flight: usize,
    /// A request whose headers have not all arrived this long after its first byte is closed.
    #[serde(with = "duration_str")]
    pub header_timeout: Duration,
    /// An HTTP connection that carries no byte either way for this long, with no request
    /// open, is closed (WebSocket sessions have their own heartbeat timeout).
    #[serde(with = "duration_str")]
    pub http_idle_timeout: Duration,
    /// Connections per listener; past it new ones are closed at once while existing ones are
    /// served.
    pub max_connections: usize,
    /// A page of messages holds at most this many bytes of messages (at least one message).
    pub max_page_bytes: usize,
    /// A connection (HTTP, SSE or WebSocket) whose peer accepts no byte of what it is sent for
    /// this long is closed; a slow reader that takes some is never dropped.
    #[serde(with = "duration_str")]
    pub write_timeout: Duration,
    /// Topics one WebSocket may have joined at once.
    pub max_topics_per_socket: usize,
    /// WebSockets and SSE streams open at once per principal (API key or JWT `sub`), on this
    /// node.
    pub max_sockets_per_principal: usize,
    /// A public API request not answered within this is answered `try_again` (503); streams
    /// (SSE, WebSocket) are long-lived and exempt.
    #[serde(with = "duration_str")]
    pub request_timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeSection {
    pub ring_bytes_per_conversation: usize,
    pub ring_budget_bytes: usize,
    pub dedupe_window: usize,
    #[serde(with = "duration_str")]
    pub idle_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:4000".into(),
            admin_listen: "127.0.0.1:4001".into(),
            data_dir: PathBuf::from("./data"),
            node_id: None,
            database_url: None,
            redis_url: None,
            cluster_secret: None,
            advertise_url: None,
            object_store: None,
            bootstrap_api_key: None,
            jwt_secret: None,
            jwt_public_key: None,
            no_migrate: false,
            retention: Duration::from_secs(30 * 86_400),
            log_format: "text".into(),
            wal: WalSection::default(),
            slots: SlotsSection::default(),
            archive: ArchiveSection::default(),
            limits: LimitsSection::default(),
            runtime: RuntimeSection::default(),
            cluster: ClusterSection::default(),
            rate: RateSection::default(),
            auth: AuthSection::default(),
            http: HttpSection::default(),
        }
    }
}

impl Default for WalSection {
    fn default() -> Self {
        WalSection {
            fsync: "always".into(),
            segment_bytes: 64 * 1024 * 1024,
            queue_capacity: 65_536,
            max_batch_bytes: 4 * 1024 * 1024,
            repair: false,
        }
    }
}

impl Default for SlotsSection {
    fn default() -> Self {
        SlotsSection {
            count: ferry_shards::placement::DEFAULT_SLOT_COUNT,
        }
    }
}

impl Default for ArchiveSection {
    fn default() -> Self {
        ArchiveSection {
            sql_retention: Duration::from_secs(7 * 86_400),
            compact_interval: Duration::from_secs(60),
            backlog_bytes: 512 * 1024 * 1024,
            batch_records: 10_000,
            linger: Duration::from_millis(100),
            pool_size: 8,
            statement_timeout: Duration::from_secs(30),
            acquire_timeout: Duration::from_secs(5),
            segment_records: 4096,
        }
    }
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            max_message_bytes: 64 * 1024,
            max_frame_bytes: 1024 * 1024,
            max_page_size: 1000,
            max_participants: 1000,
            mailbox_capacity: 1024,
            socket_in_flight: 256,
            header_timeout: Duration::from_secs(10),
            http_idle_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            max_page_bytes: 4 * 1024 * 1024,
            write_timeout: Duration::from_secs(30),
            max_topics_per_socket: 100,
            max_sockets_per_principal: 1000,
            request_timeout: Duration::from_secs(30),
        }
    }
}

impl Default for RuntimeSection {
    fn default() -> Self {
        RuntimeSection {
            ring_bytes_per_conversation: 64 * 1024,
            ring_budget_bytes: 256 * 1024 * 1024,
            dedupe_window: 1024,
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// Top-level keys that may come from `FERRY_<KEY>`; anything else prefixed `FERRY_` without `__`
/// (for example `FERRY_CONFIG`, read by the CLI) is not configuration.
const TOP_LEVEL_KEYS: &[&str] = &[
    "listen",
    "admin_listen",
    "data_dir",
    "node_id",
    "database_url",
    "redis_url",
    "cluster_secret",
    "advertise_url",
    "object_store",
    "bootstrap_api_key",
    "jwt_secret",
    "jwt_public_key",
    "no_migrate",
    "retention",
    "log_format",
];

/// Values given on the command line; they win over everything else.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_secret: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object_store: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bootstrap_api_key: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub no_migrate: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub repair: bool,
}

/// Dotted keys of the text settings: those whose default is a string, or unset (every optional
/// setting is text).
fn text_keys() -> Vec<String> {
    fn walk(prefix: &str, value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(members) => {
                for (key, value) in members {
                    let path = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    walk(&path, value, out);
                }
            }
            serde_json::Value::String(_) | serde_json::Value::Null => out.push(prefix.to_owned()),
            _ => {}
        }
    }
    let mut keys = Vec::new();
    if let Ok(defaults) = serde_json::to_value(Config::default()) {
        walk("", &defaults, &mut keys);
    }
    keys
}

impl Config {
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> anyhow::Result<Config> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.exists() {
                bail!("config file {} does not exist", file.display());
            }
            figment = figment.merge(Toml::file(file));
        }
        let env = Env::prefixed("FERRY_").split("__").filter(|key| {
            let key = key.as_str().to_ascii_lowercase();
            key.contains('.') || TOP_LEVEL_KEYS.contains(&key.as_str())
        });
        // Figment reads environment values as TOML-like literals: `FERRY_NODE_ID=7` would be a
        // number, `FERRY_JWT_SECRET='"x"'` would lose its quotes. Text settings take the
        // variable verbatim instead, as their flags do.
        let text = text_keys();
        let verbatim: Vec<(String, String)> = env
            .iter()
            .map(|(key, value)| (key.as_str().to_ascii_lowercase(), value))
            .filter(|(key, _)| text.contains(key))
            .collect();
        let repair = overrides.repair;
        let mut flags = overrides.clone();
        flags.repair = false;
        figment = figment.merge(env);
        for (key, value) in verbatim {
            figment = figment.merge(Serialized::default(&key, value));
        }
        figment = figment.merge(Serialized::defaults(flags));
        let mut config: Config = figment.extract().context("invalid configuration")?;
        if repair {
            config.wal.repair = true;
        }
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        self.fsync_policy()?;
        if self.slots.count == 0 || self.slots.count > 65_536 {
            bail!("slots.count must be between 1 and 65536");
        }
        if self.limits.max_message_bytes < 256 || self.limits.max_message_bytes > 16 << 20 {
            bail!("limits.max_message_bytes must be between 256 and 16 MiB");
        }
        if self.limits.max_page_size == 0 {
            bail!("limits.max_page_size must be positive");
        }
        if self.limits.max_page_bytes == 0 {
            bail!("limits.max_page_bytes must be positive");
        }
        if self.limits.header_timeout.is_zero()
            || self.limits.http_idle_timeout.is_zero()
            || self.limits.write_timeout.is_zero()
            || self.limits.request_timeout.is_zero()
            || self.limits.max_connections == 0
        {
            bail!(
                "limits.header_timeout, limits.http_idle_timeout, limits.write_timeout, \
                 limits.request_timeout and limits.max_connections must be positive"
            );
        }
        if self.limits.max_topics_per_socket == 0 || self.limits.max_sockets_per_principal == 0 {
            bail!("limits.max_topics_per_socket and limits.max_sockets_per_principal must be positive");
        }
        crate::rate::RateLimits::from_config(&self.rate)?;
        if let Some(key) = &self.bootstrap_api_key {
            let min = crate::auth::keys::MIN_KEY_LEN;
            if key.len() < min || !crate::auth::keys::well_formed(key) {
                bail!("bootstrap_api_key must be at least {min} visible ASCII characters");
            }
        }
        if let Some(pepper) = &self.auth.api_key_pepper {
            let min = crate::auth::keys::MIN_PEPPER_LEN;
            if pepper.len() < min {
                bail!("auth.api_key_pepper must be at least {min} bytes");
            }
        }
        if self.wal.segment_bytes < 1 << 20 {
            bail!("wal.segment_bytes must be at least 1 MiB");
        }
        if (self.wal.segment_bytes as usize) < self.limits.max_message_bytes * 4 {
            bail!("wal.segment_bytes must hold at least four maximum-size messages");
        }
        if self.archive.batch_records == 0 {
            bail!("archive.batch_records must be positive");
        }
        if self.archive.linger > Duration::from_secs(10) {
            bail!("archive.linger must be at most 10s");
        }
        if self.archive.pool_size == 0 {
            bail!("archive.pool_size must be positive");
        }
        if self.archive.statement_timeout.is_zero() || self.archive.acquire_timeout.is_zero() {
            bail!("archive.statement_timeout and archive.acquire_timeout must be positive");
        }
        crate::store::Backend::of_url(&self.database_url())?;
        if self.archive.segment_records == 0 || self.archive.segment_records > 1_000_000 {
            bail!("archive.segment_records must be between 1 and 1000000");
        }
        if self.archive.sql_retention.is_zero()
            || self.archive.compact_interval.is_zero()
            || self.retention.is_zero()
        {
            bail!("retention, archive.sql_retention and archive.compact_interval must be positive");
        }
        let object_store = self.object_store_url();
        if !object_store.starts_with("file://") && !object_store.starts_with("s3://") {
            bail!("object_store must be file://DIR or s3://BUCKET[/PREFIX], not {object_store:?}");
        }
        self.validate_auth()?;
        self.validate_http()?;
        if !matches!(self.log_format.as_str(), "text" | "json") {
            bail!("log_format must be text or json");
        }
        self.validate_cluster()
    }

    fn validate_auth(&self) -> anyhow::Result<()> {
        let a = &self.auth;
        let sources = [
            self.jwt_secret.is_some(),
            self.jwt_public_key.is_some(),
            a.jwt_jwks_url.is_some(),
        ];
        if sources.into_iter().filter(|set| *set).count() > 1 {
            bail!(
                "set only one of jwt_secret (HS256), jwt_public_key (RS256 PEM) and \
                 auth.jwt_jwks_url (an identity provider's key set)"
            );
        }
        if let Some(secret) = &self.jwt_secret {
            if secret.len() < MIN_JWT_SECRET_BYTES {
                bail!(
                    "jwt_secret must be at least {MIN_JWT_SECRET_BYTES} bytes (it has {}); \
                     generate one with `openssl rand -base64 48`",
                    secret.len()
                );
            }
        }
        if let Some(url) = &a.jwt_jwks_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                bail!("auth.jwt_jwks_url must be an http:// or https:// URL, not {url:?}");
            }
        }
        if a.jwt_jwks_refresh < Duration::from_secs(1) {
            bail!("auth.jwt_jwks_refresh must be at least 1s");
        }
        if a.jwt_leeway > Duration::from_secs(600) {
            bail!("auth.jwt_leeway must be at most 10m");
        }
        if a.jwt_issuer.as_deref() == Some("") || a.jwt_audience.as_deref() == Some("") {
            bail!("auth.jwt_issuer and auth.jwt_audience must not be empty when set");
        }
        Ok(())
    }

    fn validate_http(&self) -> anyhow::Result<()> {
        for origin in &self.http.cors_origins {
            let scheme_ok = origin.starts_with("http://") || origin.starts_with("https://");
            let host = origin.split_once("://").map_or("", |(_, rest)| rest);
            if !scheme_ok || host.is_empty() || host.contains('/') || origin.contains('*') {
                bail!(
                    "http.cors_origins takes origins like \"https://app.example.com\" (scheme, \
                     host, optional port; no path, no wildcard), not {origin:?}"
                );
            }
        }
        Ok(())
    }

    /// A Redis URL makes the node a cluster member, which needs Postgres and the secret.
    fn validate_cluster(&self) -> anyhow::Result<()> {
        let c = &self.cluster;
        if c.heartbeat.is_zero() || c.lease < c.heartbeat * 2 {
            bail!(
                "cluster.lease must be at least twice cluster.heartbeat (and heartbeat positive)"
            );
        }
        if c.max_moves == 0 {
            bail!("cluster.max_moves must be positive");
        }
        if c.max_unarchived == 0 {
            bail!("cluster.max_unarchived must be positive");
        }
        match c.durability.as_str() {
            "local" | "archive" => {}
            other => bail!("cluster.durability must be local or archive, not {other:?}"),
        }
        match c.failover.as_str() {
            "manual" | "auto" => {}
            other => bail!("cluster.failover must be manual or auto, not {other:?}"),
        }
        if self.redis_url.is_none() {
            return Ok(());
        }
        let mut missing = Vec::new();
        if !self.database_url().starts_with("postgres") {
            missing.push("a Postgres --database-url (the cluster coordinates through it)");
        }
        if self.cluster_secret.as_deref().is_none_or(str::is_empty) {
            missing.push("--cluster-secret (FERRY_CLUSTER_SECRET), the same on every node");
        }
        if !missing.is_empty() {
            bail!(
                "--redis-url makes this node part of a cluster, which also needs {}",
                missing.join(" and ")
            );
        }
        if let Some(url) = &self.advertise_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                bail!("advertise_url must be an http:// or https:// URL, not {url:?}");
            }
        }
        Ok(())
    }

    /// Part of a cluster (a Redis URL is set; `validate` checked the rest).
    /// A clustered node that acknowledges only after the archive commit.
    pub fn ack_after_archive(&self) -> bool {
        self.clustered() && self.cluster.durability == "archive"
    }

    pub fn clustered(&self) -> bool {
        self.redis_url.is_some()
    }

    pub fn fsync_policy(&self) -> anyhow::Result<FsyncPolicy> {
        self.wal
            .fsync
            .parse::<FsyncPolicy>()
            .map_err(|_| anyhow::anyhow!("wal.fsync must be always, interval:<ms> or never"))
    }

    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}/ferry.db", self.data_dir.display()))
    }

    pub fn object_store_url(&self) -> String {
        self.object_store
            .clone()
            .unwrap_or_else(|| format!("file://{}/objects", self.data_dir.display()))
    }

    /// The SQL pool settings of the `[archive]` section.
    pub fn store_options(&self) -> crate::store::StoreOptions {
        crate::store::StoreOptions {
            pool_size: self.archive.pool_size,
            statement_timeout: self.archive.statement_timeout,
            acquire_timeout: self.archive.acquire_timeout,
            // A paused cluster member's archive transaction holds read locks on its slot rows:
            // Postgres ends it well before the member's lease could expire elsewhere.
            idle_in_transaction_timeout: self
                .clustered()
                .then(|| (self.cluster.lease / 2).max(std::time::Duration::from_millis(500))),
        }
    }

    /// The small pool credentials are looked up on.
    pub fn auth_store_options(&self) -> crate::store::StoreOptions {
        crate::store::StoreOptions {
            pool_size: 2,
            statement_timeout: std::time::Duration::from_secs(5),
            acquire_timeout: std::time::Duration::from_secs(2),
            idle_in_transaction_timeout: None,
        }
    }

    pub fn node_id(&self) -> String {
        self.node_id.clone().unwrap_or_else(|| "node-1".to_owned())
    }
}

/// Parses `250ms`, `30s`, `5m`, `2h`, `7d` (and `0`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("duration {text:?} needs a unit (ms, s, m, h, d)"))?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("duration {text:?} must start with a whole number"))?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        "d" => n.checked_mul(86_400_000),
        _ => return Err(format!("duration {text:?} has unknown unit {unit:?}")),
    }
    .ok_or_else(|| format!("duration {text:?} is too large"))?;
    Ok(Duration::from_millis(ms))
}

pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms != 0 && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

mod duration_str {
    use super::*;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Number(u64),
        }
        match Raw::deserialize(d)? {
            Raw::Text(t) => parse_duration(&t).map_err(serde::de::Error::custom),
            Raw::Number(0) => Ok(Duration::ZERO),
            Raw::Number(n) => Err(serde::de::Error::custom(format!(
                "duration {n} needs a unit (ms, s, m, h, d)"
            ))),
        }
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("7").is_err());
        assert!(parse_duration("7w").is_err());
        assert!(parse_duration("d").is_err());
        assert_eq!(format_duration(Duration::from_secs(7 * 86_400)), "7d");
    }

    #[test]
    fn precedence_is_flag_env_file_default() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "ferry.toml",
                r#"
                listen = "127.0.0.1:5000"
                admin_listen = "127.0.0.1:5001"
                [archive]
                sql_retention = "3d"
                [wal]
                fsync = "interval:5"
                "#,
            )?;
            jail.set_env("FERRY_ADMIN_LISTEN", "127.0.0.1:6001");
            jail.set_env("FERRY_ARCHIVE__SQL_RETENTION", "2h");
            jail.set_env("FERRY_CONFIG", "ignored-by-config");
            let flags = Overrides {
                listen: Some("127.0.0.1:7000".into()),
                ..Overrides::default()
            };
            let c = Config::load(Some(Path::new("ferry.toml")), &flags).unwrap();
            assert_eq!(c.listen, "127.0.0.1:7000");
            assert_eq!(c.admin_listen, "127.0.0.1:6001");
            assert_eq!(c.archive.sql_retention, Duration::from_secs(7200));
            assert_eq!(c.wal.fsync, "interval:5");
            assert_eq!(c.retention, Duration::from_secs(30 * 86_400));
            Ok(())
        });
    }

    #[test]
    fn rates_keys_and_peppers_are_checked() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("FERRY_RATE__APPENDS", "30/m");
            let c = Config::load(None, &Overrides::default()).unwrap();
            assert_eq!(c.rate.appends, "30/m");
            jail.set_env("FERRY_RATE__APPENDS", "lots");
            let e = Config::load(None, &Overrides::default()).unwrap_err();
            assert!(format!("{e:#}").contains("rate.appends"), "{e:#}");
            jail.set_env("FERRY_RATE__APPENDS", "0");
            jail.set_env("FERRY_BOOTSTRAP_API_KEY", "short");
            let e = Config::load(None, &Overrides::default()).unwrap_err();
            assert!(format!("{e:#}").contains("bootstrap_api_key"), "{e:#}");
            jail.set_env("FERRY_BOOTSTRAP_API_KEY", "long-enough-admin-key");
            jail.set_env("FERRY_AUTH__API_KEY_PEPPER", "too short");
            let e = Config::load(None, &Overrides::default()).unwrap_err();
            assert!(format!("{e:#}").contains("api_key_pepper"), "{e:#}");
            Ok(())
        });
    }

    #[test]
    fn text_settings_from_the_environment_are_taken_verbatim() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("FERRY_NODE_ID", "7");
            jail.set_env("FERRY_BOOTSTRAP_API_KEY", "12345678901234567890");
            jail.set_env(
                "FERRY_JWT_SECRET",
                "\"s3cret-of-at-least-thirty-two-bytes\"",
            );
            jail.set_env("FERRY_REDIS_URL", "[abc]");
            // A Redis URL makes a cluster member, which needs these two as well.
            jail.set_env("FERRY_DATABASE_URL", "postgres://ferry@db/ferry");
            jail.set_env("FERRY_CLUSTER_SECRET", "\"quoted\"");
            jail.set_env("FERRY_DATA_DIR", "2024");
            jail.set_env("FERRY_WAL__FSYNC", "always");
            jail.set_env("FERRY_SLOTS__COUNT", "32");
            jail.set_env("FERRY_ARCHIVE__SQL_RETENTION", "2h");
            let c = Config::load(None, &Overrides::default()).unwrap();
            assert_eq!(c.node_id.as_deref(), Some("7"));
            assert_eq!(c.bootstrap_api_key.as_deref(), Some("12345678901234567890"));
            assert_eq!(
                c.jwt_secret.as_deref(),
                Some("\"s3cret-of-at-least-thirty-two-bytes\"")
            );
            assert_eq!(c.redis_url.as_deref(), Some("[abc]"));
            assert_eq!(c.cluster_secret.as_deref(), Some("\"quoted\""));
            assert_eq!(c.data_dir, PathBuf::from("2024"));
            assert_eq!(c.wal.fsync, "always");
            assert_eq!(c.slots.count, 32, "numbers stay numbers");
            assert_eq!(c.archive.sql_retention, Duration::from_secs(7200));
            // A flag still wins over the verbatim variable.
            let flags = Overrides {
                node_id: Some("flag".into()),
                ..Overrides::default()
            };
            let c = Config::load(None, &flags).unwrap();
            assert_eq!(c.node_id.as_deref(), Some("flag"));
            Ok(())
        });
        let keys = text_keys();
        for key in [
            "node_id",
            "jwt_secret",
            "database_url",
            "listen",
            "wal.fsync",
            "retention",
        ] {
            assert!(keys.iter().any(|k| k == key), "{key} in {keys:?}");
        }
        assert!(!keys.iter().any(|k| k == "slots.count"), "{keys:?}");
    }

    #[test]
    fn shipped_config_file_equals_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/ferry.toml");
        let from_file: Config = Figment::new().merge(Toml::file(&path)).extract().unwrap();
        assert_eq!(
            serde_json::to_value(&from_file).unwrap(),
            serde_json::to_value(Config::default()).unwrap()
        );
    }

    #[test]
    fn database_url_selects_a_known_backend() {
        let mut c = Config::default();
        assert!(c.validate().is_ok(), "the sqlite default");
        c.database_url = Some("postgres://ferry@db/ferry".into());
        assert!(c.validate().is_ok());
        c.database_url = Some("mysql://ferry:pw@db/ferry".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("unsupported database url") && !e.contains("pw"),
            "{e}"
        );
        c.database_url = None;
        c.archive.pool_size = 0;
        assert!(c.validate().is_err());
    }

    #[test]
    fn a_cluster_member_needs_postgres_and_a_secret_and_sane_cluster_keys() {
        let mut c = Config {
            redis_url: Some("redis://127.0.0.1:6379".into()),
            ..Config::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("Postgres") && e.contains("--cluster-secret"),
            "{e}"
        );
        c.database_url = Some("postgres://ferry@db/ferry".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(
            !e.contains("Postgres") && e.contains("--cluster-secret"),
            "{e}"
        );
        c.cluster_secret = Some("s".into());
        assert!(c.validate().is_ok());
        assert!(c.clustered());
        c.cluster.lease = c.cluster.heartbeat;
        assert!(
            c.validate().is_err(),
            "the lease must outlast two heartbeats"
        );
        c.cluster.lease = Duration::from_secs(5);
        for (durability, failover) in [("x", "manual"), ("local", "x")] {
            c.cluster.durability = durability.into();
            c.cluster.failover = failover.into();
            assert!(c.validate().is_err(), "{durability}/{failover}");
        }
        c.cluster.durability = "archive".into();
        c.cluster.failover = "manual".into();
        assert!(c.validate().is_ok(), "durability = archive");
        // Auto failover acts on dead nodes that ran archive; with local it leaves them alone.
        c.cluster.durability = "local".into();
        c.cluster.failover = "auto".into();
        assert!(c.validate().is_ok());
        assert!(c.cluster.auto_failover());
        c.cluster.failover = "manual".into();
        c.advertise_url = Some("10.0.0.5:4001".into());
        assert!(c.validate().is_err(), "advertise_url needs a scheme");
        // Without Redis the [cluster] keys are checked but nothing else is required.
        let alone = Config::default();
        assert!(alone.validate().is_ok() && !alone.clustered());
    }

    #[test]
    fn jwt_settings_are_checked() {
        let mut c = Config {
            jwt_secret: Some("short".into()),
            ..Config::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("at least 32 bytes"), "{e}");
        c.jwt_secret = Some("x".repeat(MIN_JWT_SECRET_BYTES));
        assert!(c.validate().is_ok());
        c.auth.jwt_jwks_url = Some("https://idp/realms/r/protocol/openid-connect/certs".into());
        assert!(c.validate().is_err(), "one key source at a time");
        c.jwt_secret = None;
        assert!(c.validate().is_ok());
        c.auth.jwt_jwks_url = Some("idp/certs".into());
        assert!(c.validate().is_err(), "the key set URL needs a scheme");
        c.auth.jwt_jwks_url = None;
        c.auth.jwt_issuer = Some(String::new());
        assert!(c.validate().is_err());
    }

    #[test]
    fn auth_and_http_sections_come_from_file_and_environment() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "ferry.toml",
                r#"
                [auth]
                jwt_issuer = "https://idp/realms/r"
                jwt_leeway = "5s"
                [http]
                cors_origins = ["https://a.example.com"]
                "#,
            )?;
            jail.set_env("FERRY_AUTH__JWT_AUDIENCE", "ferry");
            jail.set_env("FERRY_AUTH__JWT_JWKS_REFRESH", "1m");
            let c = Config::load(Some(Path::new("ferry.toml")), &Overrides::default()).unwrap();
            assert_eq!(c.auth.jwt_issuer.as_deref(), Some("https://idp/realms/r"));
            assert_eq!(c.auth.jwt_audience.as_deref(), Some("ferry"));
            assert_eq!(c.auth.jwt_leeway, Duration::from_secs(5));
            assert_eq!(c.auth.jwt_jwks_refresh, Duration::from_secs(60));
            assert_eq!(c.http.cors_origins, ["https://a.example.com"]);
            jail.set_env(
                "FERRY_HTTP__CORS_ORIGINS",
                "https://a.example.com, http://localhost:5173",
            );
            let c = Config::load(Some(Path::new("ferry.toml")), &Overrides::default()).unwrap();
            assert_eq!(
                c.http.cors_origins,
                ["https://a.example.com", "http://localhost:5173"]
            );
            for bad in ["*", "https://a.example.com/app", "a.example.com"] {
                jail.set_env("FERRY_HTTP__CORS_ORIGINS", bad);
                assert!(
                    Config::load(None, &Overrides::default()).is_err(),
                    "{bad} is not an origin"
                );
            }
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_rejected() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("ferry.toml", "[wal]\nfsynk = \"always\"\n")?;
            assert!(Config::load(Some(Path::new("ferry.toml")), &Overrides::default()).is_err());
            jail.create_file("ok.toml", "")?;
            jail.set_env("FERRY_WAL__FSYNC", "sometimes");
            assert!(Config::load(Some(Path::new("ok.toml")), &Overrides::default()).is_err());
            Ok(())
        });
    }
}
