-- Reserved seqs: what a failover keeps aside in each conversation of a dead node's slots for the
-- messages that node may have acknowledged but not archived (durability = local). Written and
-- read only through src/cluster/reserve.rs.

-- One row per (conversation, failover) that reserved anything: seqs from_seq..=to_seq belong to
-- node_id's messages and nothing else. `restored` counts those written back when it returned.
CREATE TABLE IF NOT EXISTS reserved_seqs (
    conversation_id TEXT NOT NULL,
    from_seq        BIGINT NOT NULL CHECK (from_seq > 0),
    to_seq          BIGINT NOT NULL,
    slot            INT NOT NULL CHECK (slot >= 0),
    epoch           BIGINT NOT NULL,             -- the failover's epoch (slot_failovers key)
    node_id         TEXT NOT NULL,               -- the dead node the seqs are kept for
    restored        BIGINT NOT NULL DEFAULT 0,
    at              TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (conversation_id, from_seq),
    CHECK (to_seq >= from_seq)
);

-- The highest failover epoch of its slot a conversation has taken into account (reserved for, or
-- was created after): each failover reserves once per conversation, lazily, when the new owner
-- first starts the conversation or the dead node's messages come back, whichever is first.
CREATE TABLE IF NOT EXISTS conversation_failovers (
    conversation_id TEXT PRIMARY KEY,
    epoch           BIGINT NOT NULL CHECK (epoch >= 0)
);

-- Messages a returning node held that no reservation explains: a bug, kept aside for an operator
-- instead of being written anywhere or dropped.
CREATE TABLE IF NOT EXISTS orphaned_messages (
    conversation_id TEXT NOT NULL,
    seq             BIGINT NOT NULL,
    node_id         TEXT NOT NULL,
    epoch           BIGINT NOT NULL,
    message         JSONB NOT NULL,
    reason          TEXT NOT NULL,
    at              TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (conversation_id, seq, node_id)
);
