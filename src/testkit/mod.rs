//! Real servers for tests and benchmarks (not for production use): a SeaweedFS
//! cluster for the object-store target.

pub mod seaweed;

/// A free TCP port on 127.0.0.1 for a server a test starts and names on its command
/// line. Taken below the kernel's ephemeral range (`ip_local_port_range`, 32768 and
/// up by default), where `bind(:0)` would pick: a port picked there and given back
/// was sometimes taken meanwhile by the local end of a connection another test opened
/// ("Address already in use" when the server started). Random in 20000–32767, checked
/// free by binding it; the kernel's pick if none is found.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    for _ in 0..200 {
        // Each RandomState is keyed afresh: a random number without a crate.
        let r = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let port = 20_000 + (r % 12_768) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}
