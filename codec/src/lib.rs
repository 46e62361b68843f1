//! # ferry-codec: the formats a node reads from outside its own process
//!
//! Pure functions over bytes and text that arrive from clients or from storage the node does not
//! control, kept apart from the node so the fuzz targets (`fuzz/`) build them without the HTTP,
//! SQL and object-store stack. Nothing here does IO or keeps state; every decoder returns an
//! error for bad input and must never panic on it.
//!
//! ## Layout
//! - [`segment`]: the cold tier's segment objects (header, zstd body, CRC-checked records).
//! - [`phoenix`]: Phoenix Channels V2 JSON frames, decoded from and encoded for the WebSocket.
//! - [`send`]: a `send` event's payload, read the serde way ([`send::AppendBody`], also HTTP's
//!   append body) or in one pass that also checks what is storable ([`send::parse_send`]).
//! - [`storable`]: [`storable::check_storable_json`], what a client's JSON must not hold to be
//!   stored in a JSONB column and served back.
//!
//! The node re-exports each under its old path (`ferry::segment`, `ferry::ws::frame`,
//! `ferry::store::check_storable_json`); code there uses those.

pub mod phoenix;
pub mod segment;
pub mod send;
pub mod storable;
