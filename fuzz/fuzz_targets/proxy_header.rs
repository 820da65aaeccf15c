//! The `proxy_header` check (fuzz/checks/proxy_header.rs) under libFuzzer. tests/fuzz_corpora.rs replays the
//! same check over the seeds and every input that ever crashed it.
#![no_main]

mod check {
    include!("../checks/proxy_header.rs");
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::check(data));
