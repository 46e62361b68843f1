//! The cold tier: segment objects ([`crate::segment`]) in an object store, through `object_store`.
//!
//! - `file://DIR` (embedded default `file://<data_dir>/objects`): local files. `object_store`
//!   writes a file under a temporary name and renames it into place but does not sync it, so
//!   [`ColdTier::put`] fsyncs the file and its directory before returning: the compactor deletes
//!   SQL rows only after `put` returned, i.e. after the object is durable.
//! - `s3://BUCKET[/PREFIX]`: any S3-compatible store. Region, credentials and endpoint come from
//!   the usual AWS environment variables (`AWS_REGION`, `AWS_ACCESS_KEY_ID`,
//!   `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`; an `http://` endpoint is allowed as such).
//!   Requests are retried a few times within seconds, not minutes, so an unavailable store
//!   surfaces quickly (the compactor tries again on its next run; a read answers `try_again`).
//!
//! Keys: `PREFIX/conversations/<conversation id>/<first seq>-<last seq>.seg`, seqs zero-padded to
//! 20 digits so a listing sorts by seq. Objects are immutable; the same range always has the same
//! key and the same bytes, so a repeated `put` after a crash is harmless.
//!
//! Decoded segments are kept in a small LRU (bounded in bytes) because a reader paging through
//! old history asks for the same segment once per page.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
};

use ferry_shards::ids::ConversationId;
use ferry_shards::record::Message;

use crate::segment::{self, SegmentError};

/// Decoded segments kept in memory, in approximate bytes.
const CACHE_BYTES: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ColdError {
    #[error("object store: {0}")]
    Object(#[from] object_store::Error),
    #[error("segment {key}: {source}")]
    Segment { key: String, source: SegmentError },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("unsupported object store url {0:?} (expected file://DIR or s3://BUCKET[/PREFIX])")]
    UnsupportedUrl(String),
}

/// Decoded messages of one segment, ascending.
pub type Segment = Arc<Vec<Arc<Message>>>;

pub struct ColdTier {
    store: Arc<dyn ObjectStore>,
    /// Set for `file://`: lets `put` find and fsync the file it wrote, and the directories up to
    /// the tier's root (the second field).
    local: Option<(Arc<LocalFileSystem>, std::path::PathBuf)>,
    /// Key prefix inside the bucket (empty for `file://`).
    prefix: Vec<String>,
    /// The URL, for logs.
    pub url: String,
    cache: Mutex<SegmentCache>,
}

impl ColdTier {
    pub fn open(url: &str) -> Result<ColdTier, ColdError> {
        if let Some(dir) = url.strip_prefix("file://") {
            ferry_shards::wal::io::create_dir_all_durably(std::path::Path::new(dir))?;
            let root = std::fs::canonicalize(dir)?;
            let fs = Arc::new(LocalFileSystem::new_with_prefix(&root)?);
            return Ok(ColdTier {
                store: fs.clone(),
                local: Some((fs, root)),
                prefix: Vec::new(),
                url: url.to_owned(),
                cache: Mutex::new(SegmentCache::default()),
            });
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(ColdError::UnsupportedUrl(url.to_owned()));
            }
            let mut builder = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_retry(RetryConfig {
                    backoff: BackoffConfig::default(),
                    max_retries: 3,
                    retry_timeout: Duration::from_secs(10),
                })
                .with_client_options(
                    ClientOptions::new()
                        .with_timeout(Duration::from_secs(30))
                        .with_connect_timeout(Duration::from_secs(5)),
                );
            if let Some(endpoint) = std::env::var("AWS_ENDPOINT_URL")
                .ok()
                .or_else(|| std::env::var("AWS_ENDPOINT").ok())
            {
                let http = endpoint.starts_with("http://");
                builder = builder.with_endpoint(endpoint).with_allow_http(http);
            }
            if std::env::var("AWS_REGION").is_err() && std::env::var("AWS_DEFAULT_REGION").is_err()
            {
                builder = builder.with_region("us-east-1");
            }
            let store = Arc::new(builder.build()?);
            return Ok(ColdTier {
                store,
                local: None,
                prefix: prefix
                    .split('/')
                    .filter(|p| !p.is_empty())
                    .map(str::to_owned)
                    .collect(),
                url: url.to_owned(),
                cache: Mutex::new(SegmentCache::default()),
            });
        }
        Err(ColdError::UnsupportedUrl(url.to_owned()))
    }

    /// `PREFIX/conversations/<id>/<first>-<last>.seg`.
    pub fn segment_key(&self, conversation: &ConversationId, first: u64, last: u64) -> String {
        let file = format!("{first:020}-{last:020}.seg");
        let parts = self.prefix.iter().map(String::as_str).chain([
            "conversations",
            conversation.as_str(),
            &file,
        ]);
        Path::from_iter(parts).to_string()
    }

    /// Writes a segment object and returns once it is durable.
    pub async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), ColdError> {
        let path = parse_key(key)?;
        self.store.put(&path, PutPayload::from(bytes)).await?;
        if let Some((fs, root)) = &self.local {
            let file = fs.path_to_filesystem(&path)?;
            let root = root.clone();
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                std::fs::File::open(&file)?.sync_all()?;
                // `object_store` creates `conversations/<id>/` as needed without syncing: each
                // directory's name is durable only once its parent is synced, so sync every
                // directory from the file's up to the tier's root.
                let mut dir = file.parent();
                while let Some(d) = dir {
                    std::fs::File::open(d)?.sync_all()?;
                    if d == root || !d.starts_with(&root) {
                        break;
                    }
                    dir = d.parent();
                }
                Ok(())
            })
            .await
            .map_err(std::io::Error::other)??;
        }
        Ok(())
    }

    /// The decoded segment at `key` (from the cache when it is there).
    pub async fn get(&self, key: &str) -> Result<Segment, ColdError> {
        if let Some(hit) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
        {
            metrics::counter!(crate::metrics::SEGMENT_READS_TOTAL, "result" => "cached")
                .increment(1);
            return Ok(hit);
        }
        let bytes = self.store.get(&parse_key(key)?).await?.bytes().await?;
        let decoded = tokio::task::spawn_blocking(move || segment::decode(&bytes))
            .await
            .map_err(std::io::Error::other)?
            .map_err(|source| ColdError::Segment {
                key: key.to_owned(),
                source,
            })?;
        metrics::counter!(crate::metrics::SEGMENT_READS_TOTAL, "result" => "fetched").increment(1);
        let decoded = Arc::new(decoded);
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_owned(), decoded.clone());
        Ok(decoded)
    }

    /// Deletes an object; one that is already gone counts as deleted.
    pub async fn delete(&self, key: &str) -> Result<(), ColdError> {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        match self.store.delete(&parse_key(key)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// A key as [`ColdTier::segment_key`] made it (already encoded: parsed, not re-encoded).
fn parse_key(key: &str) -> Result<Path, ColdError> {
    Path::parse(key).map_err(|e| ColdError::Object(e.into()))
}

/// Least-recently-inserted-or-used decoded segments, bounded by approximate bytes.
#[derive(Default)]
struct SegmentCache {
    entries: HashMap<String, (Segment, usize)>,
    order: VecDeque<String>,
    bytes: usize,
}

impl SegmentCache {
    fn get(&mut self, key: &str) -> Option<Segment> {
        let hit = self.entries.get(key)?.0.clone();
        if let Some(at) = self.order.iter().position(|k| k == key) {
            let k = self.order.remove(at).expect("position is valid");
            self.order.push_back(k);
        }
        Some(hit)
    }

    fn insert(&mut self, key: String, segment: Segment) {
        let size = segment.iter().map(|m| m.approx_bytes()).sum::<usize>();
        if size > CACHE_BYTES / 4 {
            return;
        }
        self.remove(&key);
        while self.bytes + size > CACHE_BYTES {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some((_, s)) = self.entries.remove(&old) {
                self.bytes -= s;
            }
        }
        self.bytes += size;
        self.order.push_back(key.clone());
        self.entries.insert(key, (segment, size));
    }

    fn remove(&mut self, key: &str) {
        if let Some((_, s)) = self.entries.remove(key) {
            self.bytes -= s;
            self.order.retain(|k| k != key);
        }
    }
}
