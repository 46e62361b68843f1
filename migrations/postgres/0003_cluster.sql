-- The cluster's coordination state (Postgres only: a cluster always has a Postgres archive, and
-- SQLite runs a single node). Written and read only through src/cluster/db.rs; every time in
-- these tables comes from the database clock (`now()`), never from a node's own clock.

-- Membership: one row per node id. `incarnation` grows by one with every start of that id, so a
-- process that was replaced can no longer renew. A lease past `lease_until` means the node is
-- dead; `dead` itself is never stored, it is how an expired row reads.
CREATE TABLE IF NOT EXISTS nodes (
    id             TEXT PRIMARY KEY,
    incarnation    BIGINT NOT NULL CHECK (incarnation > 0),
    advertise_url  TEXT NOT NULL,            -- where the other nodes reach its admin listener
    state          TEXT NOT NULL CHECK (state IN ('joining', 'active', 'draining', 'drained', 'left')),
    lease_until    TIMESTAMPTZ NOT NULL,
    last_heartbeat TIMESTAMPTZ NOT NULL,
    started_at     TIMESTAMPTZ NOT NULL      -- when this incarnation registered
);

-- Ownership: one row per slot, changed only by compare-and-swap on the whole row. `epoch` grows
-- by one with every change of owner and never goes back, so (slot, epoch) names one owner for
-- all time. `unavailable` is not stored either: it is how a slot of a dead owner reads.
CREATE TABLE IF NOT EXISTS slot_owners (
    slot       INT PRIMARY KEY CHECK (slot >= 0),
    node_id    TEXT NULL,                    -- NULL: never assigned (a fresh cluster)
    epoch      BIGINT NOT NULL CHECK (epoch >= 0),
    state      TEXT NOT NULL CHECK (state IN ('active', 'moving')),
    target     TEXT NULL,                    -- the node a moving slot is handed to
    updated_at TIMESTAMPTZ NOT NULL,
    CHECK ((state = 'moving') = (target IS NOT NULL))
);

-- The cluster's fixed facts: its slot count is chosen once, by the first node to start.
CREATE TABLE IF NOT EXISTS cluster_meta (
    id         INT PRIMARY KEY CHECK (id = 1),
    slot_count INT NOT NULL CHECK (slot_count > 0)
);

-- The one rebalancer: whoever holds this row with an unexpired lease. A row, not an advisory
-- lock, so leadership survives poolers and is never leaked by a cancelled statement.
CREATE TABLE IF NOT EXISTS cluster_leader (
    id          INT PRIMARY KEY CHECK (id = 1),
    node_id     TEXT NOT NULL,
    lease_until TIMESTAMPTZ NOT NULL
);
