-- API keys get an id, a scope, an expiry (a rotated key's grace), a revocation time and a
-- last-used time; `key_hash` becomes an HMAC-SHA256 of the key under the server's pepper
-- (`hash_version` 2). Rows from before keep their plain SHA-256 (`hash_version` 1) until the key is
-- next used, when the node rehashes them. `pepper_id` names the pepper a version-2 hash was made
-- with, so a node started with another pepper can say how many keys it cannot accept.
-- `changed_at_ms` moves on every revocation and rotation: each node polls it to drop revoked keys
-- from its cache. Written and read only through src/store/keys.rs.
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS id TEXT;
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS scope TEXT;
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS hash_version SMALLINT NOT NULL DEFAULT 1;
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS pepper_id TEXT;
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS expires_at_ms BIGINT;
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS revoked_at_ms BIGINT;
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS last_used_at_ms BIGINT;
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS changed_at_ms BIGINT NOT NULL DEFAULT 0;
UPDATE api_keys
   SET id = 'key_' || substr(key_hash, 1, 16),
       scope = CASE WHEN admin THEN 'admin' ELSE 'service' END
 WHERE id IS NULL;
ALTER TABLE api_keys ALTER COLUMN id SET NOT NULL;
ALTER TABLE api_keys ALTER COLUMN scope SET NOT NULL;
ALTER TABLE api_keys ADD CONSTRAINT api_keys_scope CHECK (scope IN ('admin', 'service', 'read'));
CREATE UNIQUE INDEX IF NOT EXISTS api_keys_id ON api_keys (id);
CREATE INDEX IF NOT EXISTS api_keys_changed ON api_keys (changed_at_ms);
