//! Replication between sites: the wire protocol ([`protocol`]) over mutual TLS 1.3
//! between pinned peers ([`transport`], [`crate::identity`]); the source's
//! [`shipper`] and the per-machine loop [`run`] that `serve` keeps; the target's
//! [`receiver`]; a machine's [`relationship`]; [`resync_schedule`]: when a broken
//! chain is mended by comparing chunks. What status shows is derived in
//! [`crate::protection::status`].

pub mod bandwidth;
pub mod protocol;
pub mod receiver;
pub mod relationship;
pub mod resync_schedule;
pub mod run;
pub mod shipper;
pub mod transport;
pub mod wire_fault;
