//! The target side: replicas of other sites' machines — the [`store`] (verified,
//! gap-free, exactly-once, encrypted at rest by [`crypt`]), their recovery
//! [`points`], and [`restore`] at any of them. Retention and a target compactor are
//! still to come.

pub mod crypt;
pub mod points;
pub mod restore;
pub mod store;
