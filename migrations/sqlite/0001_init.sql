-- Ferry's embedded archive (SQLite). Column names and meanings match migrations/postgres.
CREATE TABLE IF NOT EXISTS conversations (
    id            TEXT PRIMARY KEY NOT NULL,
    participants  TEXT NOT NULL,             -- JSON array of participant ids
    metadata      TEXT NOT NULL,             -- JSON object
    created_at    TEXT NOT NULL,             -- RFC 3339 UTC, milliseconds
    created_at_ms INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS conversation_participants (
    participant_id  TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    PRIMARY KEY (participant_id, conversation_id)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS messages (
    conversation_id TEXT NOT NULL,
    seq             INTEGER NOT NULL,
    id              TEXT NOT NULL,           -- UUIDv7
    sender          TEXT NOT NULL,
    kind            TEXT NOT NULL,
    content         TEXT NOT NULL,           -- JSON
    metadata        TEXT NOT NULL,           -- JSON object
    created_at      TEXT NOT NULL,           -- RFC 3339 UTC, milliseconds
    created_at_ms   INTEGER NOT NULL,
    idempotency_key TEXT,
    slot            INTEGER NOT NULL,
    PRIMARY KEY (conversation_id, seq)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS read_cursors (
    conversation_id TEXT NOT NULL,
    participant_id  TEXT NOT NULL,
    read_seq        INTEGER NOT NULL DEFAULT 0,
    ack_seq         INTEGER NOT NULL DEFAULT 0,
    updated_at_ms   INTEGER NOT NULL,
    PRIMARY KEY (conversation_id, participant_id)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS api_keys (
    key_hash      TEXT PRIMARY KEY NOT NULL, -- hex SHA-256 of the key; the key itself is never stored
    name          TEXT NOT NULL,
    admin         INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL
);
