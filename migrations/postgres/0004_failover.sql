-- Failover: a dead node's slots handed to live nodes without its data. Written and read only
-- through src/cluster/db.rs (`register`, `failover_slot`); times from the database clock.

-- What the node acknowledges after: `local` (its own fdatasync, so acknowledged messages may
-- exist only on its disk) or `archive` (the SQL commit as well: nothing acknowledged is only on
-- its disk). Written at every start; a node configured `archive` is stored `local` until it has
-- archived what its log recovered (that was acknowledged under whatever it ran before). A failover
-- of a `local` node's slots needs seqs reserved for what it may have acknowledged.
ALTER TABLE nodes ADD COLUMN IF NOT EXISTS durability TEXT NOT NULL DEFAULT 'local'
    CHECK (durability IN ('local', 'archive'));

-- One row per failover of a slot, written in the transaction of the compare-and-swap that gave the
-- slot to `to_node` at `epoch` (so `(slot, epoch)` is the key, as in `slot_owners`).
CREATE TABLE IF NOT EXISTS slot_failovers (
    slot       INT NOT NULL CHECK (slot >= 0),
    epoch      BIGINT NOT NULL CHECK (epoch > 0),          -- the slot's new epoch
    from_node  TEXT NOT NULL,                              -- the dead owner
    from_epoch BIGINT NOT NULL CHECK (from_epoch >= 0),    -- the epoch it owned the slot under
    to_node    TEXT NOT NULL,
    reserve    BIGINT NOT NULL CHECK (reserve >= 0),       -- seqs per conversation reserved for
                                                           -- the dead node (0: it ran `archive`)
    at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (slot, epoch),
    CHECK (epoch = from_epoch + 1)
);
