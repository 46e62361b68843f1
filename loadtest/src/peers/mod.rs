//! Drivers for the systems Ferry is compared with, speaking their native clients. They run the
//! same [`crate::append::Payload`] at the same pace as Ferry, and count as acknowledged exactly
//! what the peer acknowledges: a JetStream `PubAck`, a Redis `XADD` reply. The tool never starts
//! the peers; whether they fsync before acking is their configuration (see `README.md`).

pub mod nats;
pub mod redis;
