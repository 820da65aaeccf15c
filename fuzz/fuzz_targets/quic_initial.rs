//! The `quic_initial` check (fuzz/checks/quic_initial.rs) under libFuzzer. tests/fuzz_corpora.rs replays the
//! same check over the seeds and every input that ever crashed it.
#![no_main]

mod check {
    include!("../checks/quic_initial.rs");
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::check(data));
