//! libFuzzer target: the bytes are a peer's certificate chain (DER certificates, each prefixed by a 2-byte length). See
//! tools/fuzz/README.md.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    replog_fuzz::decoders::Target::Cert.check(data);
});
