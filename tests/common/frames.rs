//! The chunk frames of `tests/fixtures/v8/protocol`: what `fixture_writer.rs` writes
//! and `format_fixtures.rs` reads back.

use replog::replication::protocol::Message;

/// The payload every fixture chunk carries.
pub fn payload() -> Vec<u8> {
    (0..5000u32).map(|i| (i * 13 + i / 251) as u8).collect()
}

/// Each fixture file's name and its message, carrying `bytes` (the payload for the
/// writer; nothing for a reader comparing heads).
pub fn chunk_messages(bytes: &[u8]) -> [(&'static str, Message); 3] {
    [
        (
            "segment-chunk.frame",
            Message::SegmentChunk {
                machine: "vm1".into(),
                generation: 2,
                seq: 7,
                segment_len: 64 << 20,
                offset: 8 << 20,
                compressed: false,
                bytes: bytes.to_vec(),
            },
        ),
        (
            "initial-chunk.frame",
            Message::InitialChunk {
                machine: "vm1".into(),
                generation: 2,
                disk: 1,
                offset: 1 << 30,
                compressed: true,
                bytes: bytes.to_vec(),
            },
        ),
        (
            "resync-chunk.frame",
            Message::ResyncChunk {
                machine: "vm1".into(),
                disk: 0,
                offset: 4096,
                compressed: false,
                bytes: bytes.to_vec(),
            },
        ),
    ]
}
