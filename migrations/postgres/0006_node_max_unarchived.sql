-- `cluster.max_unarchived` as the node's last start configured it: the most durable-but-unarchived
-- messages one of its conversations can hold. A failover of a node that ran `durability = local`
-- reserves this many seqs per conversation for what it may have acknowledged. Written and read
-- only through src/cluster/db.rs (`register`, `nodes`).
ALTER TABLE nodes ADD COLUMN IF NOT EXISTS max_unarchived BIGINT NOT NULL DEFAULT 10000
    CHECK (max_unarchived > 0);
