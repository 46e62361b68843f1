-- Ferry's production archive (Postgres). Tables and column names match migrations/sqlite; the
-- types are Postgres-native: JSON as JSONB, ids as UUID, timestamps as TIMESTAMPTZ (the
-- millisecond columns stay, so both backends read the same values). This is also the SQL export
-- interface operators query (see docs/protocol.md).
CREATE TABLE IF NOT EXISTS conversations (
    id            TEXT PRIMARY KEY,
    participants  JSONB NOT NULL,             -- JSON array of participant ids
    metadata      JSONB NOT NULL,             -- JSON object
    created_at    TIMESTAMPTZ NOT NULL,
    created_at_ms BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS conversation_participants (
    participant_id  TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    PRIMARY KEY (participant_id, conversation_id)
);

CREATE TABLE IF NOT EXISTS messages (
    conversation_id TEXT NOT NULL,
    seq             BIGINT NOT NULL,
    id              UUID NOT NULL,            -- UUIDv7
    sender          TEXT NOT NULL,
    kind            TEXT NOT NULL,
    content         JSONB NOT NULL,
    metadata        JSONB NOT NULL,           -- JSON object
    created_at      TIMESTAMPTZ NOT NULL,
    created_at_ms   BIGINT NOT NULL,
    idempotency_key TEXT,
    slot            BIGINT NOT NULL,
    PRIMARY KEY (conversation_id, seq)
);

CREATE TABLE IF NOT EXISTS read_cursors (
    conversation_id TEXT NOT NULL,
    participant_id  TEXT NOT NULL,
    read_seq        BIGINT NOT NULL DEFAULT 0,
    ack_seq         BIGINT NOT NULL DEFAULT 0,
    updated_at_ms   BIGINT NOT NULL,
    PRIMARY KEY (conversation_id, participant_id)
);

CREATE TABLE IF NOT EXISTS api_keys (
    key_hash      TEXT PRIMARY KEY,           -- hex SHA-256 of the key; the key itself is never stored
    name          TEXT NOT NULL,
    admin         BOOLEAN NOT NULL,
    created_at_ms BIGINT NOT NULL
);
