//! libFuzzer target: the bytes are a metadata file. See tools/fuzz/README.md.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    replog_fuzz::decoders::Target::Meta.check(data);
});
