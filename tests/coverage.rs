//! What the suite must keep covering: every metric sluice declares and every reason a
//! connection can close with is asserted by some test. The lists come from the source, so a
//! new metric or close reason without a test fails here, naming it.

use std::path::Path;

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

/// Every test file but this one, concatenated.
fn tests_text() -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut text = String::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("coverage.rs") {
            text.push_str(&std::fs::read_to_string(path).unwrap());
        }
    }
    text
}

/// The quoted words of `source` that `pick` selects, e.g. `"sluice_..."` names.
fn quoted(source: &str, pick: impl Fn(&str) -> bool) -> Vec<&str> {
    let mut words: Vec<&str> = source
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|w| pick(w))
        .collect();
    words.sort_unstable();
    words.dedup();
    words
}

#[test]
fn every_declared_metric_is_asserted_by_a_test() {
    let metrics = read("src/observe/metrics.rs");
    let names = quoted(&metrics, |w| {
        w.starts_with("sluice_") && w.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
    });
    assert!(names.len() > 30, "{names:?}");
    let tests = tests_text();
    let missing: Vec<&&str> = names
        .iter()
        .filter(|n| !tests.contains(&format!("\"{n}")))
        .collect();
    assert!(missing.is_empty(), "metrics no test asserts: {missing:?}");
}

/// Close reasons: every `CloseReason` (the access log's `end` and the metric's `reason`), and
/// the snake_case metric results written in the establishing phase (`src/edge/connection.rs`)
/// and the inbound PROXY policy (`sluice_core::proxy`), which must be asserted too.
#[test]
fn every_close_reason_is_asserted_by_a_test() {
    let mut reasons: Vec<&str> = sluice_core::close::CloseReason::ALL
        .iter()
        .map(|r| r.label())
        .collect();
    let snake = |w: &str| w.contains('_') && w.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
    let connection = read("src/edge/connection.rs");
    reasons.extend(quoted(&connection, snake));
    let proxy = read("crates/sluice-core/src/proxy.rs");
    reasons.extend(quoted(&proxy, snake));
    reasons.sort_unstable();
    reasons.dedup();
    for expected in [
        "closed",
        "hello_timeout",
        "no_route",
        "proxy_missing",
        "client_error",
    ] {
        assert!(reasons.contains(&expected), "{expected} in {reasons:?}");
    }
    // A parked connection the reactor refuses, or a PROXY header that cannot be encoded:
    // neither can be caused from outside the process.
    let untestable = ["internal_error"];
    let tests = tests_text();
    let missing: Vec<&&str> = reasons
        .iter()
        .filter(|r| !untestable.contains(r) && !tests.contains(&format!("\"{r}\"")))
        .collect();
    assert!(
        missing.is_empty(),
        "close reasons no test asserts: {missing:?}"
    );
}
