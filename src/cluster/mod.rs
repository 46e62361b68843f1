//! The cluster: membership, ownership, routing and the rebalancer of several `ferry serve`
//! processes that share one Postgres database.
//!
//! Postgres is the only coordinator (DESIGN.md § 6): node leases, slot ownership and the
//! rebalancer's leadership are rows changed by compare-and-swap, on the database clock. The pure
//! rules (which change of a slot is allowed, where placement wants a slot) live in
//! `ferry_shards::ownership`; this module persists and fences them.
//!
//! - [`db`]: the tables `nodes`, `slot_owners`, `cluster_meta` and `cluster_leader`, and the
//!   fence that archive writes check inside their own transaction.

pub mod db;
