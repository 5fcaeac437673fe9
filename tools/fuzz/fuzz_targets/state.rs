//! libFuzzer target: the bytes are a JSON state file: status.json, a job record, a plan run's state. See
//! tools/fuzz/README.md.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    replog_fuzz::decoders::Target::State.check(data);
});
