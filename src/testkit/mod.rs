//! Real servers for tests and benchmarks (not for production use): a SeaweedFS
//! cluster for the object-store target.

pub mod seaweed;
