//! # ferry: the node
//!
//! A durable, real-time conversation backbone. This binary wires the runtime in `ferry-shards`
//! (placement, actors, WAL) to the world.
//!
//! ## Layout
//! - `main.rs`: the CLI (`ferry serve | migrate`).
//! - [`config`]: defaults ← TOML file ← `FERRY_*` environment ← flags.
//! - [`server`]: start-up, listeners, the `ferry ready` line, graceful shutdown.
//! - [`http`]: the public HTTP API; `http::error` maps every failure to a protocol code.
//! - [`auth`]: API keys and JWT end users; [`access`]: who may do what in a conversation.
//! - [`delivery`]: cursor-driven delivery (replay from ring/SQL, then live) for SSE and WebSocket.
//! - [`inbox`]: read cursors, unread counts, inbox deltas and ephemeral fan-out.
//! - [`store`]: the SQL archive (SQLite embedded), implementing the runtime's `Archive` trait.
//! - [`admin`]: the admin listener (`/metrics`).
//! - [`metrics`]: metric names of this binary and the Prometheus recorder.

pub mod access;
pub mod admin;
pub mod auth;
pub mod config;
pub mod delivery;
pub mod http;
pub mod inbox;
pub mod metrics;
pub mod server;
pub mod store;
