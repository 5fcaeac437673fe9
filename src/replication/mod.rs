//! Replication between sites. So far: the wire protocol's framing and messages
//! ([`protocol`]). The transport is mutual TLS 1.3 between pinned peers
//! ([`crate::identity`]); the shipper, receiver, initial replication and resync build
//! on these (issue 4 onwards).

pub mod health;
pub mod protocol;
pub mod receiver;
pub mod relationship;
pub mod run;
pub mod shipper;
pub mod transport;
