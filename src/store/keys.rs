//! API keys, stored and looked up by the hash of the key (the key itself is never stored):
//! whether a key is an admin's, how many there are, and the insert [`crate::auth`] makes at
//! startup (the configured bootstrap key, or a generated admin key while there is no key at
//! all).

use super::{Db, Store, StoreError};

impl Store {
    /// `(is_admin)` for a stored key hash.
    pub async fn api_key(&self, key_hash: &str) -> Result<Option<bool>, StoreError> {
        let row: Option<(bool,)> = with_pool!(self, pool => {
            sqlx::query_as("SELECT admin FROM api_keys WHERE key_hash = $1")
                .bind(key_hash)
                .fetch_optional(pool)
                .await?
        });
        Ok(row.map(|(admin,)| admin))
    }

    pub async fn api_key_count(&self) -> Result<i64, StoreError> {
        let (n,): (i64,) = with_pool!(self, pool => {
            sqlx::query_as("SELECT COUNT(*) FROM api_keys")
                .fetch_one(pool)
                .await?
        });
        Ok(n)
    }

    pub async fn insert_api_key(
        &self,
        key_hash: &str,
        name: &str,
        admin: bool,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        with_pool!(self, pool => {
            sqlx::query(
                "INSERT INTO api_keys (key_hash, name, admin, created_at_ms) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (key_hash) DO UPDATE SET admin = excluded.admin",
            )
            .bind(key_hash)
            .bind(name)
            .bind(admin)
            .bind(now_ms)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(())
    }
}
