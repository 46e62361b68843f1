-- API keys get an id, a scope, an expiry (a rotated key's grace), a revocation time and a
-- last-used time; `key_hash` becomes an HMAC-SHA256 of the key under the server's pepper
-- (`hash_version` 2). Rows from before keep their plain SHA-256 (`hash_version` 1) until the key is
-- next used, when the node rehashes them. See the Postgres migration of the same name.
ALTER TABLE api_keys ADD COLUMN id TEXT;
ALTER TABLE api_keys ADD COLUMN scope TEXT CHECK (scope IN ('admin', 'service', 'read'));
ALTER TABLE api_keys ADD COLUMN hash_version INTEGER NOT NULL DEFAULT 1;
ALTER TABLE api_keys ADD COLUMN pepper_id TEXT;
ALTER TABLE api_keys ADD COLUMN expires_at_ms INTEGER;
ALTER TABLE api_keys ADD COLUMN revoked_at_ms INTEGER;
ALTER TABLE api_keys ADD COLUMN last_used_at_ms INTEGER;
ALTER TABLE api_keys ADD COLUMN changed_at_ms INTEGER NOT NULL DEFAULT 0;
UPDATE api_keys
   SET id = 'key_' || substr(key_hash, 1, 16),
       scope = CASE WHEN admin THEN 'admin' ELSE 'service' END
 WHERE id IS NULL;
CREATE UNIQUE INDEX IF NOT EXISTS api_keys_id ON api_keys (id);
CREATE INDEX IF NOT EXISTS api_keys_changed ON api_keys (changed_at_ms);
