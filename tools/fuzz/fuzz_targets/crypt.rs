//! libFuzzer target: the bytes are an encrypted replica file. See tools/fuzz/README.md.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    replog_fuzz::decoders::Target::Crypt.check(data);
});
