//! The cluster's state in Postgres: membership (`nodes`), slot ownership (`slot_owners`), the
//! fixed slot count (`cluster_meta`), the one rebalancer (`cluster_leader`) and the record of
//! failovers (`slot_failovers`); schema in `migrations/postgres/0003_cluster.sql` and
//! `0004_failover.sql`.
//!
//! [`ClusterDb`] owns every read and write of those tables; nothing else touches them. The
//! archive's insert transaction, which runs on another pool of the same database, calls
//! [`check_fence`] to prove that its node still owns the slots it writes.
//!
//! Invariants it keeps:
//! - **Database clock only.** Every lease, heartbeat and expiry is computed by Postgres (`now()`),
//!   and "alive" means `lease_until > now()` as Postgres sees it. No node's wall clock is ever
//!   written or compared, so clock skew between nodes cannot make two of them believe they hold
//!   the same lease. (A node's *own* decision to stop serving before its lease could expire uses
//!   its monotonic clock; that is the caller's, not this module's.)
//! - **One statement, or a short transaction.** Renewals, registrations and elections are single
//!   statements; a slot change is one `UPDATE` in a transaction that only sets its `lock_timeout`.
//!   No call holds a row lock across a network round trip of the caller's.
//! - **Ownership changes only by compare-and-swap** on the whole old row ([`ClusterDb::cas_slot`]),
//!   a slot's epoch never goes back, and a change of owner always raises it, so `(slot, epoch)`
//!   names one owner for all time. `ferry_shards::ownership` decides which changes are allowed;
//!   this module refuses only what would break the epoch rule — except for a failover
//!   ([`ClusterDb::failover_slot`]), which it checks against the membership it locks inside its
//!   own transaction: the owner's lease has expired and the receiver is alive and active.
//! - **A paused node cannot block a failover.** Every connection of the pool carries
//!   `idle_in_transaction_session_timeout` (half the lease) and a `statement_timeout`, and
//!   statements that take row locks over others set a short `lock_timeout` ([`SessionTimeouts`]):
//!   a node stopped inside a transaction (SIGSTOP, a frozen VM) has that transaction ended by
//!   Postgres well before its lease could expire anywhere else, and a takeover that meets its
//!   lock fails fast and is retried instead of waiting forever.
//! - `dead` (a node) and `unavailable` (a slot) are never stored: they are how a row whose lease
//!   expired reads.
//!
//! Leadership is a row with a lease, not an advisory lock (those break under poolers and leak on
//! cancellation). A leader that lost its lease without noticing can still only issue
//! [`ClusterDb::cas_slot`]s, which fail on any row someone else changed meanwhile.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};

use ferry_shards::ownership::{self, Change, NodeState, NodeView, Refusal, SlotRow, SlotState};

/// Postgres error codes this module tells apart (SQLSTATE).
mod sqlstate {
    /// `lock_not_available`: `lock_timeout` expired.
    pub const LOCK_NOT_AVAILABLE: &str = "55P03";
    /// `idle_in_transaction_session_timeout` ended the session.
    pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "25P03";
    /// Classes that mean "try again later": connection exception, insufficient resources,
    /// operator intervention (includes `statement_timeout`'s `query_canceled` and shutdowns),
    /// transaction rollback (serialization failure, deadlock).
    pub const TRANSIENT_CLASSES: &[&str] = &["08", "53", "57", "40"];
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterDbError {
    /// The database cannot be reached or did not answer in time (connection, pool or statement
    /// timeout, a session ended by the server). Retry later; meanwhile the node's lease ages.
    #[error("cluster database unavailable: {0}")]
    Unavailable(String),
    /// A row this statement must change is locked by another session (a running archive
    /// transaction, or a paused node's until Postgres ends it), and `lock_timeout` ran out;
    /// retry.
    #[error("gave up waiting for a row lock held by another session (lock_timeout)")]
    LockTimeout,
    /// The cluster was created with another slot count; it can never change.
    #[error(
        "the cluster has {stored} slots, this node is configured with {requested}: \
         a cluster's slot count is fixed (set slots.count = {stored})"
    )]
    SlotCountMismatch { stored: u32, requested: u32 },
    /// The request itself breaks a rule (an epoch going back, an out-of-range number); nothing
    /// was written.
    #[error("refused: {0}")]
    Refused(String),
    /// A write of this node is not covered by its ownership of the slot.
    #[error(transparent)]
    Fenced(#[from] Fenced),
    /// The membership, read and locked in the write's own transaction, does not allow the change
    /// (a failover of an owner that is alive again, to a node that can no longer receive).
    #[error(transparent)]
    Denied(#[from] Refusal),
    /// A row holds something this code cannot read (a state it does not know).
    #[error("unexpected value in {table}: {detail}")]
    Corrupt { table: &'static str, detail: String },
    #[error("cluster database: {0}")]
    Sql(sqlx::Error),
}

impl From<sqlx::Error> for ClusterDbError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::BeginFailed => ClusterDbError::Unavailable(e.to_string()),
            sqlx::Error::Database(db) => {
                let code = db.code().unwrap_or_default();
                if code == sqlstate::LOCK_NOT_AVAILABLE {
                    ClusterDbError::LockTimeout
                } else if code == sqlstate::IDLE_IN_TRANSACTION_TIMEOUT
                    || sqlstate::TRANSIENT_CLASSES
                        .iter()
                        .any(|class| code.starts_with(class))
                {
                    ClusterDbError::Unavailable(e.to_string())
                } else {
                    ClusterDbError::Sql(e)
                }
            }
            _ => ClusterDbError::Sql(e),
        }
    }
}

type Result<T, E = ClusterDbError> = std::result::Result<T, E>;

/// A write refused by [`check_fence`]: the slot is not (or no longer) this node's at the epoch
/// the write was made under. The node must stop serving the slot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Fenced {
    pub slot: u32,
    /// The epoch the writer holds the slot under.
    pub expected_epoch: u64,
    /// The slot's owner now; `None` when it has none (or there is no such slot).
    pub found_owner: Option<String>,
    /// The slot's epoch now; `None` when there is no such slot.
    pub found_epoch: Option<u64>,
}

impl fmt::Display for Fenced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "slot {} is fenced: written under epoch {}, ",
            self.slot, self.expected_epoch
        )?;
        match (&self.found_owner, self.found_epoch) {
            (_, None) => f.write_str("but no such slot exists"),
            (Some(owner), Some(epoch)) => write!(f, "but it is {owner}'s at epoch {epoch}"),
            (None, Some(epoch)) => write!(f, "but it has no owner (epoch {epoch})"),
        }
    }
}

/// The server-side timeouts of every cluster connection, derived from the node lease so that a
/// stuck or paused session is always ended before its lease could expire elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionTimeouts {
    /// `idle_in_transaction_session_timeout`: half the lease, at least 500 ms. A session that
    /// sits in an open transaction this long (its process paused) is terminated and its locks
    /// released.
    pub idle_in_transaction: Duration,
    /// `statement_timeout`: the lease, and never below `idle_in_transaction`.
    pub statement: Duration,
    /// `lock_timeout` of statements that change rows others may hold locks on (slot changes,
    /// [`ClusterDb::reclaim`]): a quarter of the lease, at least 100 ms, so it stays below
    /// `idle_in_transaction` and the caller retries rather than queues behind a zombie.
    pub lock: Duration,
}

impl SessionTimeouts {
    pub fn for_lease(lease: Duration) -> SessionTimeouts {
        let idle_in_transaction = (lease / 2).max(Duration::from_millis(500));
        SessionTimeouts {
            idle_in_transaction,
            statement: lease.max(idle_in_transaction),
            lock: (lease / 4).max(Duration::from_millis(100)),
        }
    }

    /// `options` with these timeouts set at connect time (startup `-c` options, which no
    /// statement of ours resets). The SQL archive's pool can use this too, since its
    /// transactions take `FOR SHARE` locks on slot rows through [`check_fence`].
    pub fn apply(&self, options: PgConnectOptions) -> PgConnectOptions {
        options.options([
            (
                "idle_in_transaction_session_timeout",
                duration_ms(self.idle_in_transaction),
            ),
            ("statement_timeout", duration_ms(self.statement)),
        ])
    }
}

/// What a node acknowledges after (`cluster.durability`), as stored in `nodes.durability`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Durability {
    /// After its own fdatasync: acknowledged messages may exist only on its disk, so its slots
    /// can be failed over only with seqs reserved for them.
    Local,
    /// After the SQL commit as well: nothing it acknowledged is only on its disk, so its slots
    /// can be failed over as they are.
    Archive,
}

impl Durability {
    /// The spelling of `cluster.durability` and of the stored column.
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Local => "local",
            Durability::Archive => "archive",
        }
    }

    pub fn parse(s: &str) -> Option<Durability> {
        match s {
            "local" => Some(Durability::Local),
            "archive" => Some(Durability::Archive),
            _ => None,
        }
    }
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a node came back from [`ClusterDb::register`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registered {
    /// 1 for a node id never seen, the previous one + 1 otherwise. Renewals must name it.
    pub incarnation: u64,
    /// `joining`, or `draining`/`drained` when an operator's drain was in force.
    pub state: NodeState,
    /// What the row says the node acknowledges after: `local` for a node that asked for
    /// `archive` but did not run it before (see [`ClusterDb::register`]).
    pub durability: Durability,
}

/// One row of `slot_failovers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverRecord {
    pub slot: u32,
    /// The slot's epoch after the failover.
    pub epoch: u64,
    /// The dead owner, and the epoch it owned the slot under.
    pub from_node: String,
    pub from_epoch: u64,
    pub to_node: String,
    /// Seqs per conversation reserved for what the dead owner may have acknowledged; 0 when it
    /// ran `durability = "archive"`.
    pub reserve: u64,
    /// Unix milliseconds, database clock.
    pub at_ms: i64,
}

/// A row of `nodes` as the cluster sees it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    pub id: String,
    pub incarnation: u64,
    pub advertise_url: String,
    /// The stored state, except that an expired lease reads as `Dead` unless the node had
    /// drained or left (those need no failover).
    pub state: NodeState,
    /// `lease_until > now()` on the database clock.
    pub alive: bool,
    /// Unix milliseconds, database clock.
    pub lease_until_ms: i64,
    pub last_heartbeat_ms: i64,
    /// When this incarnation registered.
    pub started_at_ms: i64,
    /// What it acknowledges after, as its last start (or [`ClusterDb::set_durability`]) stored.
    pub durability: Durability,
    /// Its `cluster.max_unarchived` at its last start: what a failover of a `local` node
    /// reserves per conversation.
    pub max_unarchived: u64,
    /// Milliseconds until its lease expires, by the database clock at the read (negative once
    /// it has).
    pub lease_remaining_ms: i64,
}

impl NodeRecord {
    /// What placement and the ownership state machine need of it.
    pub fn view(&self) -> NodeView {
        NodeView {
            id: self.id.clone(),
            state: self.state,
            alive: self.alive,
        }
    }
}

/// The row of `cluster_leader`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderRecord {
    pub node_id: String,
    /// Unix milliseconds, database clock.
    pub lease_until_ms: i64,
    /// `lease_until > now()`: a lapsed leader is no leader; anyone may take over.
    pub alive: bool,
}

/// The cluster's tables. Cheap to clone: a handle on a small pool of its own, whose connections
/// all carry the [`SessionTimeouts`] of the lease it was opened with.
#[derive(Debug, Clone)]
pub struct ClusterDb {
    pool: PgPool,
    timeouts: SessionTimeouts,
}

impl ClusterDb {
    /// Opens a pool of `pool_size` connections to `url` with the timeouts of `lease` (see
    /// [`SessionTimeouts::for_lease`]); fails with `Unavailable` if the database does not answer.
    pub async fn connect(url: &str, pool_size: u32, lease: Duration) -> Result<ClusterDb> {
        let timeouts = SessionTimeouts::for_lease(lease);
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| ClusterDbError::Refused(format!("database url: {e}")))?
            .application_name("ferry-cluster");
        let pool = PgPoolOptions::new()
            .max_connections(pool_size.max(1))
            // A heartbeat must fail while there is still lease left to act on, not queue for it.
            .acquire_timeout(timeouts.idle_in_transaction)
            .connect_with(timeouts.apply(options))
            .await?;
        Ok(ClusterDb { pool, timeouts })
    }

    /// Wraps an existing pool. Its connections keep whatever session settings they were opened
    /// with (use [`SessionTimeouts::apply`]); `lock_timeout` is still set per statement.
    pub fn from_pool(pool: PgPool, lease: Duration) -> ClusterDb {
        ClusterDb {
            pool,
            timeouts: SessionTimeouts::for_lease(lease),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn timeouts(&self) -> SessionTimeouts {
        self.timeouts
    }

    pub async fn close(&self) {
        self.pool.close().await
    }

    /// Creates the rows of slots `0..slot_count` that do not exist yet (no owner, epoch 0,
    /// active) and records the slot count, or checks it against the one recorded. Every node
    /// calls this at start; several at once are fine.
    pub async fn init_slots(&self, slot_count: u32) -> Result<()> {
        let count = i32::try_from(slot_count)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                ClusterDbError::Refused(format!(
                    "slot count {slot_count} is not between 1 and {}",
                    i32::MAX
                ))
            })?;
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO cluster_meta (id, slot_count) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
        )
        .bind(count)
        .execute(&mut *tx)
        .await?;
        // A fresh statement sees the row of whoever inserted first (read committed).
        let (stored,): (i32,) = sqlx::query_as("SELECT slot_count FROM cluster_meta WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?;
        if stored != count {
            return Err(ClusterDbError::SlotCountMismatch {
                stored: u32::try_from(stored).map_err(|_| corrupt("cluster_meta", stored))?,
                requested: slot_count,
            });
        }
        sqlx::query(
            "INSERT INTO slot_owners (slot, node_id, epoch, state, target, updated_at) \
             SELECT s, NULL, 0, 'active', NULL, now() FROM generate_series(0, $1 - 1) AS s \
             ON CONFLICT (slot) DO NOTHING",
        )
        .bind(count)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The slot count the cluster was created with; `None` before the first [`init_slots`].
    ///
    /// [`init_slots`]: ClusterDb::init_slots
    pub async fn slot_count(&self) -> Result<Option<u32>> {
        let row: Option<(i32,)> =
            sqlx::query_as("SELECT slot_count FROM cluster_meta WHERE id = 1")
                .fetch_optional(&self.pool)
                .await?;
        row.map(|(n,)| u32::try_from(n).map_err(|_| corrupt("cluster_meta", n)))
            .transpose()
    }

    /// Starts a new incarnation of `node_id` with a lease of `lease` from now. Its state becomes
    /// `joining`, unless an operator's drain is in force (`draining`/`drained` survive restarts).
    /// The previous incarnation, if still running, can no longer renew.
    ///
    /// `durability` is what this incarnation acknowledges after. `local` is stored as it is.
    /// `archive` is stored only if the node already ran `archive` before; otherwise the row says
    /// `local` until the node calls [`set_durability`](ClusterDb::set_durability) — once it has
    /// archived everything its log recovered, which may hold messages acknowledged under `local`
    /// and nowhere else. `max_unarchived` is its `cluster.max_unarchived`.
    pub async fn register(
        &self,
        node_id: &str,
        advertise_url: &str,
        lease: Duration,
        durability: Durability,
        max_unarchived: u64,
    ) -> Result<Registered> {
        let (incarnation, state, stored): (i64, String, String) = sqlx::query_as(
            "INSERT INTO nodes (id, incarnation, advertise_url, state, lease_until, last_heartbeat, started_at, durability, max_unarchived) \
             VALUES ($1, 1, $2, 'joining', now() + make_interval(secs => $3), now(), now(), 'local', $5) \
             ON CONFLICT (id) DO UPDATE SET \
                 incarnation = nodes.incarnation + 1, \
                 advertise_url = EXCLUDED.advertise_url, \
                 state = CASE WHEN nodes.state IN ('draining', 'drained') THEN nodes.state \
                              ELSE 'joining' END, \
                 lease_until = EXCLUDED.lease_until, \
                 last_heartbeat = EXCLUDED.last_heartbeat, \
                 started_at = EXCLUDED.started_at, \
                 max_unarchived = EXCLUDED.max_unarchived, \
                 durability = CASE WHEN $4 = 'archive' AND nodes.durability = 'archive' \
                                   THEN 'archive' ELSE 'local' END \
             RETURNING incarnation, state, durability",
        )
        .bind(node_id)
        .bind(advertise_url)
        .bind(lease.as_secs_f64())
        .bind(durability.as_str())
        .bind(to_sql_i64("max_unarchived", max_unarchived.max(1))?)
        .fetch_one(&self.pool)
        .await?;
        Ok(Registered {
            incarnation: from_sql_u64("nodes", incarnation)?,
            state: parse_node_state(&state)?,
            durability: parse_durability(&stored)?,
        })
    }

    /// Stores what incarnation `incarnation` of `node_id` acknowledges after; `false` if a newer
    /// incarnation holds the row (or there is none). A node configured `archive` calls this once
    /// nothing it acknowledged under `local` is left unarchived (see
    /// [`register`](ClusterDb::register)).
    pub async fn set_durability(
        &self,
        node_id: &str,
        incarnation: u64,
        durability: Durability,
    ) -> Result<bool> {
        let done =
            sqlx::query("UPDATE nodes SET durability = $3 WHERE id = $1 AND incarnation = $2")
                .bind(node_id)
                .bind(to_sql_i64("incarnation", incarnation)?)
                .bind(durability.as_str())
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Extends the lease of `node_id` to `lease` from now, if `incarnation` is still the one
    /// registered; `false` means a newer start of the same id took over and this process must
    /// stop serving. Also succeeds after the lease lapsed (the node then reads alive again; its
    /// slots may have been failed over meanwhile, which their epochs tell).
    pub async fn renew(&self, node_id: &str, incarnation: u64, lease: Duration) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE nodes SET lease_until = now() + make_interval(secs => $3), last_heartbeat = now() \
             WHERE id = $1 AND incarnation = $2",
        )
        .bind(node_id)
        .bind(to_sql_i64("incarnation", incarnation)?)
        .bind(lease.as_secs_f64())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Moves `node_id` to `to` if its stored state is one of `from`; `false` otherwise (or when
    /// there is no such node). `Dead` cannot be stored: it is what an expired lease reads as.
    pub async fn set_state(
        &self,
        node_id: &str,
        from: &[NodeState],
        to: NodeState,
    ) -> Result<bool> {
        if to == NodeState::Dead {
            return Err(ClusterDbError::Refused(
                "`dead` is not stored: a node is dead when its lease expires".into(),
            ));
        }
        let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
        let done = sqlx::query("UPDATE nodes SET state = $3 WHERE id = $1 AND state = ANY($2)")
            .bind(node_id)
            .bind(&from)
            .bind(to.as_str())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Every node, ordered by id (byte order).
    pub async fn nodes(&self) -> Result<Vec<NodeRecord>> {
        let rows: Vec<NodeRow> =
            sqlx::query_as(&format!("{SELECT_NODES} ORDER BY id COLLATE \"C\""))
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter().map(node_record).collect()
    }

    pub async fn node(&self, node_id: &str) -> Result<Option<NodeRecord>> {
        let row: Option<NodeRow> = sqlx::query_as(&format!("{SELECT_NODES} WHERE id = $1"))
            .bind(node_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(node_record).transpose()
    }

    /// Every slot row, ordered by slot.
    pub async fn slots(&self) -> Result<Vec<SlotRow>> {
        let rows: Vec<SlotSqlRow> = sqlx::query_as(&format!("{SELECT_SLOTS} ORDER BY slot"))
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(slot_row).collect()
    }

    pub async fn slot(&self, slot: u32) -> Result<Option<SlotRow>> {
        let row: Option<SlotSqlRow> = sqlx::query_as(&format!("{SELECT_SLOTS} WHERE slot = $1"))
            .bind(to_sql_slot(slot)?)
            .fetch_optional(&self.pool)
            .await?;
        row.map(slot_row).transpose()
    }

    /// Replaces the slot's row `old` by `new` if the stored row is still exactly `old`; `false`
    /// when someone changed it first (re-read and decide again). Refused without writing when
    /// `new` would lower the epoch, or change the owner without raising it. `false` as well when
    /// the node `new` hands the slot to (its move target or new owner) is not alive and `active`
    /// at that moment. A row lock held by another session fails it with `LockTimeout` after
    /// [`SessionTimeouts::lock`].
    pub async fn cas_slot(&self, old: &SlotRow, new: &SlotRow) -> Result<bool> {
        if new.slot != old.slot {
            return Err(ClusterDbError::Refused(format!(
                "a change of slot {} cannot write slot {}",
                old.slot, new.slot
            )));
        }
        if new.epoch < old.epoch {
            return Err(ClusterDbError::Refused(format!(
                "slot {}: epoch would go back from {} to {}",
                old.slot, old.epoch, new.epoch
            )));
        }
        if new.owner != old.owner && new.epoch == old.epoch {
            return Err(ClusterDbError::Refused(format!(
                "slot {}: owner {:?} -> {:?} must raise epoch {}",
                old.slot, old.owner, new.owner, old.epoch
            )));
        }
        let (old_state, old_target) = state_columns(&old.state);
        let (new_state, new_target) = state_columns(&new.state);
        let mut tx = self.begin_with_lock_timeout().await?;
        // The node a change gives the slot to (a move's target, or a new owner) must be alive
        // and active *now*, not only when the caller planned: checked in this transaction with
        // its row locked, so a drain or an expiry cannot slip in between the check and the write.
        let receiver = match (&new.state, &old.state) {
            (SlotState::Moving { target }, SlotState::Moving { target: was }) if target == was => {
                None
            }
            (SlotState::Moving { target }, _) => Some(target.as_str()),
            _ if new.owner != old.owner => new.owner.as_deref(),
            _ => None,
        };
        if let Some(receiver) = receiver {
            let ready: Option<(i32,)> = sqlx::query_as(
                "SELECT 1 FROM nodes WHERE id = $1 AND state = 'active' AND lease_until > now() \
                 FOR SHARE",
            )
            .bind(receiver)
            .fetch_optional(&mut *tx)
            .await?;
            if ready.is_none() {
                tracing::debug!(
                    slot = old.slot,
                    node = receiver,
                    "slot change refused: the receiving node is not alive and active"
                );
                return Ok(false);
            }
        }
        let done = sqlx::query(
            "UPDATE slot_owners SET node_id = $6, epoch = $7, state = $8, target = $9, updated_at = now() \
             WHERE slot = $1 AND epoch = $2 AND node_id IS NOT DISTINCT FROM $3 \
               AND state = $4 AND target IS NOT DISTINCT FROM $5",
        )
        .bind(to_sql_slot(old.slot)?)
        .bind(to_sql_i64("epoch", old.epoch)?)
        .bind(old.owner.as_deref())
        .bind(old_state)
        .bind(old_target)
        .bind(new.owner.as_deref())
        .bind(to_sql_i64("epoch", new.epoch)?)
        .bind(new_state)
        .bind(new_target)
        .execute(&mut *tx)
        .await
        ?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    /// Fails the slot over: replaces `old`, owned by a node whose lease has expired, by `new`, the
    /// same slot given to another node at epoch + 1 (`active`, a move abandoned), and records it
    /// in `slot_failovers` with `reserve` (seqs per conversation reserved for the dead owner) —
    /// all in one transaction, or nothing.
    ///
    /// Inside the transaction the slot row is swapped first (compare-and-swap on the whole row;
    /// `false` when it is no longer `old`: another failover won, or the owner came back and
    /// reclaimed it). Then the rows of both nodes are read-locked (`FOR SHARE`, in id order), so
    /// a renewal or restart of the old owner, or a state change of the receiver, waits for the
    /// commit and the checks hold at the commit: the change must be exactly what
    /// [`ownership::apply`] makes of [`Change::Failover`] against that membership (old owner not
    /// alive by the database clock, receiver alive and `active`), else `Denied` with the reason;
    /// and an owner that ran `durability = "local"` may hold acknowledged messages only on its
    /// disk, so with `reserve` 0 it is `Refused`. A refusal rolls everything back. A slot row
    /// locked by another session (a paused node's archive transaction) fails it with
    /// `LockTimeout` before any node row is locked.
    pub async fn failover_slot(&self, old: &SlotRow, new: &SlotRow, reserve: u64) -> Result<bool> {
        let (Some(from), Some(to)) = (old.owner.as_deref(), new.owner.as_deref()) else {
            return Err(ClusterDbError::Refused(format!(
                "slot {}: a failover takes an owned slot to another node",
                old.slot
            )));
        };
        let mut tx = self.begin_with_lock_timeout().await?;
        // The slot row first: if another session holds it (a paused node's archive
        // transaction), this waits without holding the node rows, whose renewals must go on.
        let (old_state, old_target) = state_columns(&old.state);
        let done = sqlx::query(
            "UPDATE slot_owners SET node_id = $6, epoch = $7, state = 'active', target = NULL, updated_at = now() \
             WHERE slot = $1 AND epoch = $2 AND node_id IS NOT DISTINCT FROM $3 \
               AND state = $4 AND target IS NOT DISTINCT FROM $5",
        )
        .bind(to_sql_slot(old.slot)?)
        .bind(to_sql_i64("epoch", old.epoch)?)
        .bind(from)
        .bind(old_state)
        .bind(old_target)
        .bind(to)
        .bind(to_sql_i64("epoch", new.epoch)?)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
        // Then the membership, locked until the commit and judged now (`clock_timestamp`, not
        // the transaction's start: the wait above may have been long).
        let members: Vec<(String, String, bool, String)> = sqlx::query_as(
            "SELECT id, state, lease_until > clock_timestamp(), durability FROM nodes \
             WHERE id = ANY($1) ORDER BY id COLLATE \"C\" FOR SHARE",
        )
        .bind(vec![from, to])
        .fetch_all(&mut *tx)
        .await?;
        let mut views = Vec::with_capacity(members.len());
        let mut from_durability = None;
        for (id, state, alive, durability) in &members {
            if id == from {
                from_durability = Some(parse_durability(durability)?);
            }
            views.push(NodeView {
                id: id.clone(),
                state: effective_state(parse_node_state(state)?, *alive),
                alive: *alive,
            });
        }
        let allowed = match ownership::apply(old, &Change::Failover { to: to.to_owned() }, &views) {
            Ok(allowed) => allowed,
            Err(refusal) => {
                tx.rollback().await?;
                return Err(refusal.into());
            }
        };
        if allowed != *new {
            tx.rollback().await?;
            return Err(ClusterDbError::Refused(format!(
                "slot {}: a failover of {old:?} makes {allowed:?}, not {new:?}",
                old.slot
            )));
        }
        // A node id that is not a member never acknowledged anything this cluster knows of as
        // `archive`: judge it as `local`.
        if reserve == 0 && from_durability != Some(Durability::Archive) {
            tx.rollback().await?;
            return Err(ClusterDbError::Refused(format!(
                "slot {}: {from} ran durability=local, so its slots cannot be failed over \
                 without seqs reserved for what it may have acknowledged",
                old.slot
            )));
        }
        sqlx::query(
            "INSERT INTO slot_failovers (slot, epoch, from_node, from_epoch, to_node, reserve) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(to_sql_slot(old.slot)?)
        .bind(to_sql_i64("epoch", new.epoch)?)
        .bind(from)
        .bind(to_sql_i64("epoch", old.epoch)?)
        .bind(to)
        .bind(to_sql_i64("reserve", reserve)?)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Every recorded failover, ordered by slot and epoch.
    pub async fn failovers(&self) -> Result<Vec<FailoverRecord>> {
        let rows: Vec<(i32, i64, String, i64, String, i64, i64)> = sqlx::query_as(
            "SELECT slot, epoch, from_node, from_epoch, to_node, reserve, \
                    floor(extract(epoch FROM at) * 1000)::int8 \
             FROM slot_failovers ORDER BY slot, epoch",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(
                |(slot, epoch, from_node, from_epoch, to_node, reserve, at_ms)| {
                    Ok(FailoverRecord {
                        slot: u32::try_from(slot).map_err(|_| corrupt("slot_failovers", slot))?,
                        epoch: from_sql_u64("slot_failovers", epoch)?,
                        from_node,
                        from_epoch: from_sql_u64("slot_failovers", from_epoch)?,
                        to_node,
                        reserve: from_sql_u64("slot_failovers", reserve)?,
                        at_ms,
                    })
                },
            )
            .collect()
    }

    /// The epoch of the last failover of each slot that was ever failed over.
    pub async fn last_failover_epochs(&self) -> Result<HashMap<u32, u64>> {
        let rows: Vec<(i32, i64)> =
            sqlx::query_as("SELECT slot, max(epoch) FROM slot_failovers GROUP BY slot")
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter()
            .map(|(slot, epoch)| {
                Ok((
                    u32::try_from(slot).map_err(|_| corrupt("slot_failovers", slot))?,
                    from_sql_u64("slot_failovers", epoch)?,
                ))
            })
            .collect()
    }

    /// Takes back every slot `node_id` owns under a new epoch (epoch + 1, `active`, a move in
    /// progress abandoned), so that writes of an earlier incarnation or of the time before a
    /// lapsed lease are fenced. Returns the new rows, ordered by slot.
    pub async fn reclaim(&self, node_id: &str) -> Result<Vec<SlotRow>> {
        let mut tx = self.begin_with_lock_timeout().await?;
        // Locking in slot order first: two statements locking overlapping slot sets in different
        // orders could deadlock.
        let mut rows: Vec<SlotSqlRow> = sqlx::query_as(
            "WITH mine AS ( \
                 SELECT slot FROM slot_owners WHERE node_id = $1 ORDER BY slot FOR UPDATE \
             ) \
             UPDATE slot_owners AS s \
             SET epoch = s.epoch + 1, state = 'active', target = NULL, updated_at = now() \
             FROM mine WHERE s.slot = mine.slot AND s.node_id = $1 \
             RETURNING s.slot, s.node_id, s.epoch, s.state, s.target",
        )
        .bind(node_id)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        rows.sort_by_key(|r| r.0);
        rows.into_iter().map(slot_row).collect()
    }

    /// Becomes (or stays) the cluster's one rebalancer for `lease` from now: succeeds iff nobody
    /// leads, `node_id` already does, or the leader's lease expired.
    pub async fn try_lead(&self, node_id: &str, lease: Duration) -> Result<bool> {
        let row: Option<(String,)> = sqlx::query_as(
            "INSERT INTO cluster_leader (id, node_id, lease_until) \
             VALUES (1, $1, now() + make_interval(secs => $2)) \
             ON CONFLICT (id) DO UPDATE \
                 SET node_id = EXCLUDED.node_id, lease_until = EXCLUDED.lease_until \
                 WHERE cluster_leader.node_id = EXCLUDED.node_id \
                    OR cluster_leader.lease_until <= now() \
             RETURNING node_id",
        )
        .bind(node_id)
        .bind(lease.as_secs_f64())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    /// Gives up leadership if `node_id` holds it (a clean stop), so another node need not wait
    /// for the lease; `false` if it did not lead.
    pub async fn resign(&self, node_id: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM cluster_leader WHERE id = 1 AND node_id = $1")
            .bind(node_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The leader row, expired or not; `None` if nobody ever led or the last leader resigned.
    pub async fn leader(&self) -> Result<Option<LeaderRecord>> {
        let row: Option<(String, i64, bool)> = sqlx::query_as(
            "SELECT node_id, floor(extract(epoch FROM lease_until) * 1000)::int8, \
                    lease_until > now() \
             FROM cluster_leader WHERE id = 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(node_id, lease_until_ms, alive)| LeaderRecord {
            node_id,
            lease_until_ms,
            alive,
        }))
    }

    /// A transaction whose statements wait at most [`SessionTimeouts::lock`] for a row lock.
    async fn begin_with_lock_timeout(&self) -> Result<Transaction<'static, Postgres>> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT set_config('lock_timeout', $1, true)")
            .bind(format!("{}ms", duration_ms(self.timeouts.lock)))
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }
}

/// Checks, inside the caller's transaction, that `node_id` owns each of `slots` at exactly the
/// given epoch, and read-locks their rows (`FOR SHARE`) until that transaction ends, so no
/// change of owner can commit between this check and the caller's commit (Temporal's `range_id`
/// pattern). Call it in the archive's insert transaction before its writes; on `Fenced` roll
/// back and stop serving the slot.
///
/// The lock is what a paused node could hold forever; the caller's connections should carry
/// [`SessionTimeouts::apply`] so Postgres ends such a transaction.
pub async fn check_fence(
    tx: &mut Transaction<'_, Postgres>,
    node_id: &str,
    slots: &[(u32, u64)],
) -> Result<()> {
    if slots.is_empty() {
        return Ok(());
    }
    let ids = slots
        .iter()
        .map(|(slot, _)| to_sql_slot(*slot))
        .collect::<Result<Vec<i32>>>()?;
    // In slot order, like every other statement that locks several slot rows.
    let rows: Vec<(i32, Option<String>, i64)> = sqlx::query_as(
        "SELECT slot, node_id, epoch FROM slot_owners WHERE slot = ANY($1) ORDER BY slot FOR SHARE",
    )
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await?;
    let mut found = HashMap::with_capacity(rows.len());
    for (slot, owner, epoch) in rows {
        found.insert(slot, (owner, from_sql_u64("slot_owners", epoch)?));
    }
    for &(slot, expected_epoch) in slots {
        let current = found.get(&to_sql_slot(slot)?);
        let holds = matches!(current, Some((Some(owner), epoch)) if owner == node_id && *epoch == expected_epoch);
        if !holds {
            return Err(Fenced {
                slot,
                expected_epoch,
                found_owner: current.and_then(|(owner, _)| owner.clone()),
                found_epoch: current.map(|(_, epoch)| *epoch),
            }
            .into());
        }
    }
    Ok(())
}

/// Inside an archive transaction: the first of `slots` (`(slot, oldest epoch of the batch's
/// messages)`) that was failed over away from `node_id` after that epoch, with the failover's
/// epoch. Such messages were written by this node before it lost the slot and may only be
/// restored (`reserve`), even if the slot is this node's again.
pub async fn failed_over_since(
    tx: &mut Transaction<'_, Postgres>,
    node_id: &str,
    slots: &[(u32, u64)],
) -> Result<Option<(u32, u64)>> {
    if slots.is_empty() {
        return Ok(None);
    }
    let ids = slots
        .iter()
        .map(|(slot, _)| to_sql_slot(*slot))
        .collect::<Result<Vec<i32>>>()?;
    let rows: Vec<(i32, i64, i64)> = sqlx::query_as(
        "SELECT slot, MAX(from_epoch), MAX(epoch) FROM slot_failovers \
         WHERE from_node = $1 AND slot = ANY($2) GROUP BY slot",
    )
    .bind(node_id)
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await?;
    for (slot, from_epoch, epoch) in rows {
        let slot = u32::try_from(slot).map_err(|_| corrupt("slot_failovers", slot))?;
        let from_epoch = from_sql_u64("slot_failovers", from_epoch)?;
        let oldest = slots
            .iter()
            .find(|(s, _)| *s == slot)
            .map_or(0, |(_, e)| *e);
        if oldest <= from_epoch {
            return Ok(Some((slot, from_sql_u64("slot_failovers", epoch)?)));
        }
    }
    Ok(None)
}

/// How a node's state reads: an expired lease makes it `Dead`, unless it had drained or left
/// (it owns nothing, so nothing needs failing over).
pub fn effective_state(stored: NodeState, alive: bool) -> NodeState {
    match stored {
        NodeState::Left | NodeState::Drained => stored,
        _ if !alive => NodeState::Dead,
        _ => stored,
    }
}

const SELECT_NODES: &str = "SELECT id, incarnation, advertise_url, state, lease_until > now(), \
     floor(extract(epoch FROM lease_until) * 1000)::int8, \
     floor(extract(epoch FROM last_heartbeat) * 1000)::int8, \
     floor(extract(epoch FROM started_at) * 1000)::int8, \
     durability, max_unarchived, \
     floor(extract(epoch FROM lease_until - now()) * 1000)::int8 \
     FROM nodes";

type NodeRow = (
    String,
    i64,
    String,
    String,
    bool,
    i64,
    i64,
    i64,
    String,
    i64,
    i64,
);

fn node_record(row: NodeRow) -> Result<NodeRecord> {
    let (
        id,
        incarnation,
        advertise_url,
        state,
        alive,
        lease_until_ms,
        last_heartbeat_ms,
        started_at_ms,
        durability,
        max_unarchived,
        lease_remaining_ms,
    ) = row;
    Ok(NodeRecord {
        incarnation: from_sql_u64("nodes", incarnation)?,
        state: effective_state(parse_node_state(&state)?, alive),
        durability: parse_durability(&durability)?,
        max_unarchived: from_sql_u64("nodes", max_unarchived)?,
        id,
        advertise_url,
        alive,
        lease_until_ms,
        last_heartbeat_ms,
        started_at_ms,
        lease_remaining_ms,
    })
}

const SELECT_SLOTS: &str = "SELECT slot, node_id, epoch, state, target FROM slot_owners";

type SlotSqlRow = (i32, Option<String>, i64, String, Option<String>);

fn slot_row((slot, owner, epoch, state, target): SlotSqlRow) -> Result<SlotRow> {
    let state = match (state.as_str(), target) {
        ("active", None) => SlotState::Active,
        ("moving", Some(target)) => SlotState::Moving { target },
        (state, target) => {
            return Err(ClusterDbError::Corrupt {
                table: "slot_owners",
                detail: format!("slot {slot}: state {state:?} with target {target:?}"),
            })
        }
    };
    Ok(SlotRow {
        slot: u32::try_from(slot).map_err(|_| corrupt("slot_owners", slot))?,
        owner,
        epoch: from_sql_u64("slot_owners", epoch)?,
        state,
    })
}

fn state_columns(state: &SlotState) -> (&'static str, Option<&str>) {
    match state {
        SlotState::Active => ("active", None),
        SlotState::Moving { target } => ("moving", Some(target.as_str())),
    }
}

fn parse_node_state(s: &str) -> Result<NodeState> {
    NodeState::parse(s).ok_or_else(|| ClusterDbError::Corrupt {
        table: "nodes",
        detail: format!("unknown state {s:?}"),
    })
}

fn parse_durability(s: &str) -> Result<Durability> {
    Durability::parse(s).ok_or_else(|| ClusterDbError::Corrupt {
        table: "nodes",
        detail: format!("unknown durability {s:?}"),
    })
}

fn corrupt(table: &'static str, value: impl fmt::Display) -> ClusterDbError {
    ClusterDbError::Corrupt {
        table,
        detail: format!("out-of-range number {value}"),
    }
}

fn from_sql_u64(table: &'static str, n: i64) -> Result<u64> {
    u64::try_from(n).map_err(|_| corrupt(table, n))
}

fn to_sql_i64(what: &str, n: u64) -> Result<i64> {
    i64::try_from(n).map_err(|_| ClusterDbError::Refused(format!("{what} {n} is out of range")))
}

fn to_sql_slot(slot: u32) -> Result<i32> {
    i32::try_from(slot).map_err(|_| ClusterDbError::Refused(format!("slot {slot} is out of range")))
}

/// Whole milliseconds, at least 1 (Postgres reads 0 as "no timeout").
fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_expired_lease_reads_dead_unless_drained_or_left() {
        use NodeState::*;
        for stored in [Joining, Active, Draining] {
            assert_eq!(effective_state(stored, true), stored);
            assert_eq!(effective_state(stored, false), Dead);
        }
        for stored in [Drained, Left] {
            assert_eq!(effective_state(stored, true), stored);
            assert_eq!(effective_state(stored, false), stored);
        }
    }

    #[test]
    fn timeouts_end_a_paused_transaction_well_inside_the_lease() {
        let t = SessionTimeouts::for_lease(Duration::from_secs(5));
        assert_eq!(t.idle_in_transaction, Duration::from_millis(2500));
        assert_eq!(t.statement, Duration::from_secs(5));
        assert_eq!(t.lock, Duration::from_millis(1250));
        // Short leases keep floors, and the lock timeout stays below the idle one.
        for lease_ms in [0, 1, 100, 300, 999, 1000, 2000, 60_000] {
            let t = SessionTimeouts::for_lease(Duration::from_millis(lease_ms));
            assert!(t.idle_in_transaction >= Duration::from_millis(500));
            assert!(t.lock < t.idle_in_transaction, "lease {lease_ms} ms: {t:?}");
            assert!(
                t.statement >= t.idle_in_transaction,
                "lease {lease_ms} ms: {t:?}"
            );
        }
    }

    #[test]
    fn fenced_says_what_it_found() {
        let f = |found_owner: Option<&str>, found_epoch| Fenced {
            slot: 7,
            expected_epoch: 3,
            found_owner: found_owner.map(str::to_owned),
            found_epoch,
        };
        assert_eq!(
            f(Some("b"), Some(4)).to_string(),
            "slot 7 is fenced: written under epoch 3, but it is b's at epoch 4"
        );
        assert_eq!(
            f(None, Some(0)).to_string(),
            "slot 7 is fenced: written under epoch 3, but it has no owner (epoch 0)"
        );
        assert_eq!(
            f(None, None).to_string(),
            "slot 7 is fenced: written under epoch 3, but no such slot exists"
        );
    }
}
