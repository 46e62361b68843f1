//! API keys, stored and looked up by a hash of the key (the key itself is never stored): the
//! lookup [`crate::auth`] makes for a key it has not cached, the admin API's create, list, revoke
//! and rotate, the changes every node polls to drop revoked keys, and `last_used_at`.
//!
//! `hash_version` 2 rows hold an HMAC-SHA256 of the key under the server's pepper, named by
//! `pepper_id`; version 1 rows (from before peppers) hold a plain SHA-256 and are rehashed the
//! first time their key is used. A revoked key's row stays (revocation sets `revoked_at_ms`), so
//! other nodes can see the revocation and the list can show it.

use super::{Db, Store, StoreError};

/// A stored API key, without any secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRow {
    pub id: String,
    pub name: String,
    pub scope: String,
    pub created_at_ms: i64,
    /// A rotated key stops working at this time (its grace ends).
    pub expires_at_ms: Option<i64>,
    pub revoked_at_ms: Option<i64>,
    pub last_used_at_ms: Option<i64>,
}

type KeyTuple = (
    String,
    String,
    String,
    i64,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);

const KEY_COLUMNS: &str =
    "id, name, scope, created_at_ms, expires_at_ms, revoked_at_ms, last_used_at_ms";

impl From<KeyTuple> for KeyRow {
    fn from(
        (id, name, scope, created_at_ms, expires_at_ms, revoked_at_ms, last_used_at_ms): KeyTuple,
    ) -> KeyRow {
        KeyRow {
            id,
            name,
            scope,
            created_at_ms,
            expires_at_ms,
            revoked_at_ms,
            last_used_at_ms,
        }
    }
}

/// A key to store.
#[derive(Debug, Clone)]
pub struct NewKey<'a> {
    pub id: &'a str,
    pub hash: &'a str,
    pub pepper_id: &'a str,
    pub name: &'a str,
    pub scope: &'a str,
    pub now_ms: i64,
}

/// A revocation or rotation another node may not have seen yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyChange {
    pub id: String,
    pub expires_at_ms: Option<i64>,
    pub revoked_at_ms: Option<i64>,
    pub changed_at_ms: i64,
}

impl Store {
    /// The key whose hash (of `hash_version`) is `key_hash`, revoked or not.
    pub async fn api_key_by_hash(
        &self,
        key_hash: &str,
        hash_version: i16,
    ) -> Result<Option<KeyRow>, StoreError> {
        let sql =
            format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = $1 AND hash_version = $2");
        let row: Option<KeyTuple> = with_pool!(self, pool => {
            sqlx::query_as(&sql)
                .bind(key_hash)
                .bind(hash_version)
                .fetch_optional(pool)
                .await?
        });
        Ok(row.map(KeyRow::from))
    }

    /// Replaces a version-1 hash with a peppered one (the key was just used).
    pub async fn rehash_api_key(
        &self,
        id: &str,
        key_hash: &str,
        pepper_id: &str,
    ) -> Result<(), StoreError> {
        with_pool!(self, pool => {
            sqlx::query(
                "UPDATE api_keys SET key_hash = $2, pepper_id = $3, hash_version = 2 \
                 WHERE id = $1 AND hash_version = 1",
            )
            .bind(id)
            .bind(key_hash)
            .bind(pepper_id)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(())
    }

    pub async fn api_key_count(&self) -> Result<i64, StoreError> {
        let (n,): (i64,) = with_pool!(self, pool => {
            sqlx::query_as("SELECT COUNT(*) FROM api_keys")
                .fetch_one(pool)
                .await?
        });
        Ok(n)
    }

    /// `(peppered with another pepper, not yet peppered)` among the keys still in force.
    pub async fn api_keys_by_pepper(&self, pepper_id: &str) -> Result<(i64, i64), StoreError> {
        let (other, legacy): (i64, i64) = with_pool!(self, pool => {
            sqlx::query_as(
                "SELECT \
                   COALESCE(SUM(CASE WHEN hash_version = 2 AND pepper_id <> $1 THEN 1 ELSE 0 END), 0), \
                   COALESCE(SUM(CASE WHEN hash_version = 1 THEN 1 ELSE 0 END), 0) \
                 FROM api_keys WHERE revoked_at_ms IS NULL",
            )
            .bind(pepper_id)
            .fetch_one(pool)
            .await?
        });
        Ok((other, legacy))
    }

    /// Stores a new key. `false` when its hash is already stored (the same key registered again).
    pub async fn insert_api_key(&self, key: &NewKey<'_>) -> Result<bool, StoreError> {
        let inserted = with_pool!(self, pool => {
            sqlx::query(
                "INSERT INTO api_keys \
                   (key_hash, name, admin, created_at_ms, id, scope, hash_version, pepper_id, changed_at_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, 2, $7, $4) \
                 ON CONFLICT (key_hash) DO NOTHING",
            )
            .bind(key.hash)
            .bind(key.name)
            .bind(key.scope == "admin")
            .bind(key.now_ms)
            .bind(key.id)
            .bind(key.scope)
            .bind(key.pepper_id)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(inserted == 1)
    }

    /// Every key, newest first.
    pub async fn list_api_keys(&self) -> Result<Vec<KeyRow>, StoreError> {
        let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at_ms DESC, id");
        let rows: Vec<KeyTuple> = with_pool!(self, pool => {
            sqlx::query_as(&sql).fetch_all(pool).await?
        });
        Ok(rows.into_iter().map(KeyRow::from).collect())
    }

    pub async fn api_key(&self, id: &str) -> Result<Option<KeyRow>, StoreError> {
        let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1");
        let row: Option<KeyTuple> = with_pool!(self, pool => {
            sqlx::query_as(&sql).bind(id).fetch_optional(pool).await?
        });
        Ok(row.map(KeyRow::from))
    }

    /// Revokes key `id`: `None` if there is no such key; a key revoked before keeps its time.
    pub async fn revoke_api_key(
        &self,
        id: &str,
        now_ms: i64,
    ) -> Result<Option<KeyRow>, StoreError> {
        with_pool!(self, pool => {
            sqlx::query(
                "UPDATE api_keys SET revoked_at_ms = $2, changed_at_ms = $2 \
                 WHERE id = $1 AND revoked_at_ms IS NULL",
            )
            .bind(id)
            .bind(now_ms)
            .execute(pool)
            .await?
            .rows_affected()
        });
        self.api_key(id).await
    }

    /// Stores `new` with the name and scope of key `old_id`, and ends the old key `grace_ms` from
    /// now (or keeps an earlier end it already had). `None` if `old_id` is not a key in force.
    pub async fn rotate_api_key(
        &self,
        old_id: &str,
        new: &NewKey<'_>,
        grace_ms: i64,
    ) -> Result<Option<(KeyRow, KeyRow)>, StoreError> {
        let now = new.now_ms;
        let ends = now.saturating_add(grace_ms);
        let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1");
        let rotated = with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let ended = sqlx::query(
                "UPDATE api_keys \
                    SET expires_at_ms = CASE WHEN expires_at_ms IS NULL OR expires_at_ms > $2 \
                                             THEN $2 ELSE expires_at_ms END, \
                        changed_at_ms = $3 \
                  WHERE id = $1 AND revoked_at_ms IS NULL \
                    AND (expires_at_ms IS NULL OR expires_at_ms > $3)",
            )
            .bind(old_id)
            .bind(ends)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if ended == 0 {
                None
            } else {
                let old: KeyTuple = sqlx::query_as(&sql).bind(old_id).fetch_one(&mut *tx).await?;
                let old = KeyRow::from(old);
                sqlx::query(
                    "INSERT INTO api_keys \
                       (key_hash, name, admin, created_at_ms, id, scope, hash_version, pepper_id, changed_at_ms) \
                     VALUES ($1, $2, $3, $4, $5, $6, 2, $7, $4)",
                )
                .bind(new.hash)
                .bind(&old.name)
                .bind(old.scope == "admin")
                .bind(now)
                .bind(new.id)
                .bind(&old.scope)
                .bind(new.pepper_id)
                .execute(&mut *tx)
                .await?;
                let fresh: KeyTuple = sqlx::query_as(&sql).bind(new.id).fetch_one(&mut *tx).await?;
                tx.commit().await?;
                Some((old, KeyRow::from(fresh)))
            }
        });
        Ok(rotated)
    }

    /// Revocations and rotations made at or after `since_ms`.
    pub async fn api_key_changes_since(&self, since_ms: i64) -> Result<Vec<KeyChange>, StoreError> {
        let rows: Vec<(String, Option<i64>, Option<i64>, i64)> = with_pool!(self, pool => {
            sqlx::query_as(
                "SELECT id, expires_at_ms, revoked_at_ms, changed_at_ms FROM api_keys \
                 WHERE changed_at_ms >= $1 AND (revoked_at_ms IS NOT NULL OR expires_at_ms IS NOT NULL)",
            )
            .bind(since_ms)
            .fetch_all(pool)
            .await?
        });
        Ok(rows
            .into_iter()
            .map(
                |(id, expires_at_ms, revoked_at_ms, changed_at_ms)| KeyChange {
                    id,
                    expires_at_ms,
                    revoked_at_ms,
                    changed_at_ms,
                },
            )
            .collect())
    }

    /// Records when keys were last used (the latest time wins).
    pub async fn touch_api_keys(&self, used: &[(String, i64)]) -> Result<(), StoreError> {
        for (id, at_ms) in used {
            with_pool!(self, pool => {
                sqlx::query(
                    "UPDATE api_keys SET last_used_at_ms = $2 \
                     WHERE id = $1 AND (last_used_at_ms IS NULL OR last_used_at_ms < $2)",
                )
                .bind(id)
                .bind(*at_ms)
                .execute(pool)
                .await?
                .rows_affected()
            });
        }
        Ok(())
    }
}
