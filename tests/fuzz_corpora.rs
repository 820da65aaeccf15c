//! The fuzz targets' checks (fuzz/checks/) as ordinary tests: every seed, and every input that
//! ever made a target fail (fuzz/regressions/<target>/, committed with its fix), replayed on
//! each run. The fuzzers themselves run in CI for a bounded time (fuzz/run.sh).

use std::path::{Path, PathBuf};

mod client_hello {
    include!("../fuzz/checks/client_hello.rs");
}
mod proxy_header {
    include!("../fuzz/checks/proxy_header.rs");
}
mod route_config {
    include!("../fuzz/checks/route_config.rs");
}
mod quic_initial {
    include!("../fuzz/checks/quic_initial.rs");
}

/// The seed and regression inputs of one target; at least one seed must exist.
fn corpus(target: &str) -> Vec<PathBuf> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for dir in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(dir).join(target)) else {
            continue;
        };
        files.extend(entries.map(|e| e.unwrap().path()));
    }
    files.sort();
    assert!(
        files
            .iter()
            .any(|f| f.to_string_lossy().contains("/seeds/")),
        "fuzz/seeds/{target}/ has no seed"
    );
    files
}

fn replay(target: &str, check: fn(&[u8])) {
    for file in corpus(target) {
        let data = std::fs::read(&file).unwrap();
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(outcome.is_ok(), "{target} fails on {}", file.display());
    }
}

#[test]
fn client_hello_corpus() {
    replay("client_hello", client_hello::check);
}

#[test]
fn proxy_header_corpus() {
    replay("proxy_header", proxy_header::check);
}

#[test]
fn route_config_corpus() {
    replay("route_config", route_config::check);
}

#[test]
fn quic_initial_corpus() {
    replay("quic_initial", quic_initial::check);
}
