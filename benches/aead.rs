//! The AEAD choice for replicas at rest, measured: AES-256-GCM over one 8 MiB piece
//! (a segment's worth is 8 of them) through ring, which replog uses, and through
//! RustCrypto's `aes-gcm`, which it used before issue 14. Both produce the same bytes
//! (the test below the measurement checks it), so the faster one wins outright.
//!
//! `cargo bench --bench aead -- --quick`

use aes_gcm::aead::{AeadInPlace, KeyInit};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use std::hint::black_box;

const LEN: usize = 8 << 20;
const KEY: [u8; 32] = [7; 32];
const NONCE: [u8; 12] = [9; 12];
const AAD: &[u8] = b"replog header bytes 0..36 as AAD...";

fn seal_ring(buf: &mut [u8]) -> [u8; 16] {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &KEY).expect("key"));
    let tag = key
        .seal_in_place_separate_tag(Nonce::assume_unique_for_key(NONCE), Aad::from(AAD), buf)
        .expect("seal");
    let mut t = [0u8; 16];
    t.copy_from_slice(tag.as_ref());
    t
}

fn seal_rustcrypto(buf: &mut [u8]) -> [u8; 16] {
    let c = aes_gcm::Aes256Gcm::new_from_slice(&KEY).expect("key");
    let tag = c
        .encrypt_in_place_detached(aes_gcm::Nonce::from_slice(&NONCE), AAD, buf)
        .expect("seal");
    tag.into()
}

fn aead(c: &mut Criterion) {
    let plain: Vec<u8> = (0..LEN).map(|i| (i * 131 % 251) as u8).collect();
    // Same key, nonce and AAD: the same ciphertext and tag from both.
    let (mut a, mut b) = (plain.clone(), plain.clone());
    assert_eq!(seal_ring(&mut a), seal_rustcrypto(&mut b));
    assert!(a == b, "the two implementations disagree");
    let mut g = c.benchmark_group("aes_256_gcm_seal_8MiB");
    g.throughput(Throughput::Bytes(LEN as u64));
    let mut buf = plain.clone();
    g.bench_function(BenchmarkId::from_parameter("ring"), |bench| {
        bench.iter(|| black_box(seal_ring(&mut buf)))
    });
    g.bench_function(BenchmarkId::from_parameter("aes-gcm"), |bench| {
        bench.iter(|| black_box(seal_rustcrypto(&mut buf)))
    });
    g.finish();
}

criterion_group!(benches, aead);
criterion_main!(benches);
