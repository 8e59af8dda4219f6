//! The sync protocol, free of I/O: bytes in, bytes and store writes out.
//!
//! - [`message`]: the automerge-repo wire messages and their CBOR codec.
//! - [`hub`]: the state machine that serves many peers (the server) and can also open
//!   outbound connections (a tablet, or a sub-office replicating upstream).
//! - `prepare`: the hub applying the documents of one batch on several cores.
//!
//! Both ends use the same [`hub::Hub`], so a whole multi-peer sync runs in a unit test
//! by passing frames between hubs.

pub mod fuzzing;
pub mod hub;
pub mod message;
mod prepare;
