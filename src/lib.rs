//! # ferry: the node
//!
//! A durable, real-time conversation backbone. This binary wires the runtime in `ferry-shards`
//! (placement, actors, WAL) to the world.
//!
//! ## Layout
//! - `main.rs`: the CLI (`ferry serve | admin | migrate`); [`admin_cli`] is `ferry admin`.
//! - [`config`]: defaults ← TOML file ← `FERRY_*` environment ← flags.
//! - [`server`]: start-up, listeners, the `ferry ready` line, graceful shutdown.
//! - [`http`]: the public HTTP API; `http::error` maps every failure to a protocol code.
//! - [`auth`]: API keys and JWT end users; [`access`]: who may do what in a conversation;
//!   [`rate`]: the `[rate]` limits (sliding windows, shared through Redis in a cluster) and the
//!   sockets each principal has open.
//! - [`service`]: the layer every transport calls (append, read, cursors, inbox); it decides
//!   "this node, the owner over the node-to-node API, or the archive".
//! - [`cluster`]: membership, fenced slot ownership, hand-overs, the rebalancer, the
//!   node-to-node API and Redis fan-out.
//! - [`delivery`]: cursor-driven delivery (replay from ring/SQL, then live) for SSE and WebSocket.
//! - [`inbox`]: read cursors, unread counts, inbox deltas and ephemeral fan-out.
//! - [`store`]: the SQL archive (SQLite embedded, Postgres in production), implementing the
//!   runtime's `Archive` trait; reads merge the cold tier below SQL.
//! - [`cold`]: the cold tier, segment objects in an object store (local files or S3);
//!   [`segment`] is their byte format; [`compactor`] moves old messages from SQL into them.
//! - [`ws`]: the WebSocket gateway (Phoenix Channels V2 JSON), topics `conversation:` and `inbox:`.
//! - [`admin`]: the admin listener (`/metrics`, `/dashboard`, `/admin/*`); [`admin_keys`] is
//!   `/admin/keys`.
//! - [`metrics`]: metric names of this binary and the Prometheus recorder.

pub mod access;
pub mod admin;
pub mod admin_cli;
pub mod admin_keys;
pub mod auth;
pub mod cluster;
pub mod cold;
pub mod compactor;
pub mod config;
pub mod delivery;
pub mod http;
pub mod inbox;
pub mod metrics;
pub mod rate;
pub mod segment;
pub mod server;
pub mod service;
pub mod store;
pub mod ws;
