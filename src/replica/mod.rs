//! The target side: replicas of other sites' machines. So far: the segment store
//! ([`store`]) — verified, gap-free, exactly-once, encrypted at rest ([`crypt`]).
//! Recovery points, retention and the replay engine build on it (issue 5).

pub mod crypt;
pub mod points;
pub mod restore;
pub mod store;
