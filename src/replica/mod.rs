//! The target side: replicas of other sites' machines — the [`store`] (verified,
//! gap-free, exactly-once, encrypted at rest by [`crypt`]; parent chunks below the
//! segments), their recovery [`points`] and retention, the [`replay`] engine that
//! materialises any point without a copy, [`restore`] to image files, the target
//! [`compact`]or that folds expired points into the parent, and the readers' [`pin`]s
//! that keep it away from what is being read.

pub mod backend;
pub mod compact;
pub mod crypt;
pub mod maintain;
pub mod objects;
pub mod pin;
pub mod points;
pub mod replay;
pub mod restore;
pub mod resync_apply;
pub mod scrub;
pub mod store;
pub mod warm;
