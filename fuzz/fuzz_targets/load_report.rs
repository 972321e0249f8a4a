//! Fuzz target `load_report`: the body is `registry_lb::fuzzing`'s, shared with the corpus replay test.
#![no_main]

use registry_lb::fuzzing::{alloc::Counting, run_bounded};

#[global_allocator]
static ALLOC: Counting = Counting;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(e) = run_bounded("load_report", data) {
        panic!("{e}");
    }
});
