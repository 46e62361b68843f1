//! # ferry-shards: the runtime of a Ferry node
//!
//! Everything that decides where a message lives and in which order, with no knowledge of HTTP, SQL
//! or Redis: the node binary (`src/`) wires this crate to the world through the [`archive::Archive`]
//! trait.
//!
//! ## Layout
//! - [`ids`]: conversation and participant identifiers and their validation.
//! - [`placement`]: the stable hash from conversation id to slot, and slot → node placement on a
//!   consistent-hash ring with virtual nodes.
//! - [`wal`]: the node's write-ahead log: CRC32-framed records in preallocated segments, one writer
//!   thread with group commit, recovery, archived-LSN checkpoint.
//! - [`record`]: the message record and its byte encoding inside a WAL frame.
//! - [`conversation_log`]: the shared per-conversation log in memory: the hot ring of recent
//!   messages plus every message not yet archived, the durable seq subscribers wait on, the last
//!   assigned seq, the idempotency window and the mailbox admission count.
//! - [`gate`]: per-slot serving gates (serving, holding for a hand-over, not owned) and the lease
//!   deadline a clustered node fences itself with.
//! - [`archive`]: the trait the node implements to read and write the SQL archive.
//! - [`actor`]: slot actors supervising conversation actors (ractor); the conversation actor assigns
//!   `seq`, dedupes idempotency keys and submits to the WAL without waiting for the fsync.
//! - [`ownership`]: the slot ownership state machine and the rebalance planner (pure; the cluster
//!   persists changes with CAS).
//! - [`node`]: the cloneable handle that ties WAL, actors, archiver queue and budgets together.
//! - [`metrics`]: the metric names this crate records.
//!
//! ## Invariants
//! - Nothing is acknowledged before the WAL reports it durable under the configured fsync policy.
//! - Per conversation, seqs are assigned 1, 2, 3, … without holes or reuse, also across actor
//!   restarts, and become durable in seq order.
//! - Every queue is bounded: a full one is an explicit overload error, never an unbounded buffer.

pub mod actor;
pub mod archive;
pub mod conversation_log;
pub mod gate;
pub mod ids;
pub mod metrics;
pub mod node;
pub mod ownership;
pub mod placement;
pub mod record;
pub mod wal;
