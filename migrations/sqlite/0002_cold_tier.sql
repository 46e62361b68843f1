-- Cold tier: the index of segment objects (runs of messages compacted out of `messages`), and the
-- index that finds messages old enough to compact. Column names match migrations/postgres.
CREATE TABLE IF NOT EXISTS message_segments (
    conversation_id   TEXT NOT NULL,
    first_seq         INTEGER NOT NULL,
    last_seq          INTEGER NOT NULL,
    object_key        TEXT NOT NULL,         -- key in the object store
    record_count      INTEGER NOT NULL,
    bytes             INTEGER NOT NULL,      -- object size
    min_created_at_ms INTEGER NOT NULL,
    max_created_at_ms INTEGER NOT NULL,      -- the segment expires when this is older than `retention`
    created_at_ms     INTEGER NOT NULL,      -- when the segment was written
    PRIMARY KEY (conversation_id, first_seq)
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS message_segments_max_created_at_ms ON message_segments (max_created_at_ms);
CREATE INDEX IF NOT EXISTS messages_created_at_ms ON messages (created_at_ms);

-- Retention: the highest seq of the conversation deleted for age. Reads start above it (the `gap`
-- answer names `expired_through_seq + 1`), and it keeps `last_seq` right after everything expired.
ALTER TABLE conversations ADD COLUMN expired_through_seq INTEGER NOT NULL DEFAULT 0;
