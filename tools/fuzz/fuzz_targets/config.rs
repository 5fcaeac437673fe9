//! libFuzzer target: the bytes are a site.toml or relationship.toml. See
//! tools/fuzz/README.md.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    replog_fuzz::decoders::Target::Config.check(data);
});
