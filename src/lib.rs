//! replog: replicate virtual disks to a second site and bring them back at any
//! recovery point.
//!
//! Data flow (see `README.md` and `docs/DESIGN.md`): writes go through a [`Volume`]
//! into the machine's change [`journal`]; reads see the newest data through the
//! [`index`]; the [`compactor`] folds sealed segments back into the parent images.
//! Every byte on disk goes through the [`storage`] seam and is laid out as documented
//! in [`format`].

#![warn(clippy::unwrap_used)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod chunk_hash;
pub mod compactor;
pub mod config;
pub mod control;
pub mod crc;
pub mod digest;
pub mod error;
pub mod failover;
pub mod failpoint;
pub mod format;
pub mod frontend;
pub mod holds;
pub mod identity;
pub mod index;
pub mod inspect;
pub mod jobs;
pub mod journal;
pub mod metrics;
pub mod names;
pub mod ops;
pub mod parallel;
pub mod plan;
pub mod protection;
pub mod replica;
pub mod replication;
pub mod serve;
pub mod site;
pub mod storage;
#[doc(hidden)]
pub mod testkit;
pub mod volume;

pub use error::{Error, Result};
pub use site::Site;
pub use volume::{Machine, Volume};
