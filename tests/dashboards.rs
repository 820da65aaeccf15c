//! The Grafana dashboard (`deploy/grafana/sluice.json`) and the alert rules
//! (`deploy/prometheus/sluice-rules.yaml`) query only metrics a real sluice exports: a sluice
//! with every feature the queries cover is started, given some traffic, and scraped.

mod support;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Every `sluice_*` and `process_*` metric name in `text`, histogram series mapped to their
/// family (`_bucket`, `_sum`, `_count`).
fn queried(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if !text.is_char_boundary(i) {
            i += 1;
            continue;
        }
        let rest = &text[i..];
        let starts = rest.starts_with("sluice_") || rest.starts_with("process_");
        let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if starts && boundary {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let name = &rest[..end];
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            names.insert(family.to_owned());
            i += end;
        } else {
            i += 1;
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_the_alerts_query_is_exported() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let dashboard = std::fs::read_to_string(root.join("grafana/sluice.json")).unwrap();
    let rules = std::fs::read_to_string(root.join("prometheus/sluice-rules.yaml")).unwrap();
    let mut wanted = queried(&dashboard);
    wanted.extend(queried(&rules));
    assert!(wanted.len() > 30, "{wanted:?}");

    let dir = support::secrets("dash-token-0123456789abcd name=agents\n");
    let live = RawBackend::start("live", false).await;
    let dead = dead_address().await;
    let server = start(
        &format!(
            r#"
[admin]
address = "127.0.0.1:0"

[heartbeat]
address = "127.0.0.1:0"
cert_file = "{d}/cert.pem"
key_file = "{d}/key.pem"
tokens_file = "{d}/tokens"

[[listener]]
name = "edge"
address = "127.0.0.1:0"

[[listener]]
name = "guarded"
address = "127.0.0.1:0"
allow = ["127.0.0.9"]

[[listener]]
name = "quic"
address = "127.0.0.1:0"
protocol = "quic"

[[route]]
name = "apps"
resource = {{ kind = "app", sni = "*.apps.example.com" }}

[[route]]
name = "gone"
sni = ["gone.example.com"]
pool = "gone"

[[route]]
name = "all"
pool = "p"

[pool.p]
backends = ["{live}"]

[pool.p.health]
kind = "tcp"
interval = "100ms"

[pool.gone]
backends = ["{dead}"]
"#,
            d = dir.path().display(),
            live = live.address,
        ),
        &[],
    )
    .await;
    let admin = server.admin_addr().unwrap();
    let edge = edge(&server);
    // A relayed connection (connect time, bytes, duration), one to a pool with no backend
    // left, a resource nobody serves, a refused source, a bad heartbeat, a failed reload.
    let (mut t, tag) = open_tunnel(edge).await;
    assert_eq!(tag, "live");
    t.shutdown().await.unwrap();
    drop(t);
    let mut s = TcpStream::connect(edge).await.unwrap();
    s.write_all(&sluice_core::hello::build::hello(
        Some("gone.example.com"),
        &["h2"],
    ))
    .await
    .unwrap();
    assert_eq!(read_line(&mut s).await, "");
    let mut s = TcpStream::connect(edge).await.unwrap();
    s.write_all(&sluice_core::hello::build::hello(
        Some("x.apps.example.com"),
        &["h2"],
    ))
    .await
    .unwrap();
    assert_eq!(read_line(&mut s).await, "");
    let guarded = server.listener_addr("guarded").unwrap();
    let mut s = connect_from(Ipv4Addr::new(127, 0, 0, 1), guarded).await;
    let _ = s.write_all(&tunnel_hello()).await;
    assert_eq!(read_line(&mut s).await, "");
    let (status, _) = support::heartbeats::api(
        server.heartbeat_addr().unwrap(),
        "POST",
        "/v1/heartbeats",
        Some("wrong-token-0123456789"),
        "{}",
    )
    .await;
    assert_eq!(status, 401);
    let _ = http_request(admin, "POST", "/-/reload").await;

    // Families with at least one series (`# TYPE name ...` lines), polled until the health
    // checks' first verdict is in.
    let exported = |text: &str| -> BTreeSet<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .collect()
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    let missing = loop {
        let have = exported(&scrape(admin).await.text);
        let missing: Vec<&String> = wanted.iter().filter(|n| !have.contains(*n)).collect();
        if missing.is_empty() || tokio::time::Instant::now() > deadline {
            break missing.into_iter().cloned().collect::<Vec<_>>();
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(missing.is_empty(), "queried but not exported: {missing:?}");

    // The exposition passes Prometheus's own linter.
    if support::process::have("promtool") {
        use std::io::Write;
        let text = scrape(admin).await.text;
        let mut lint = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        lint.stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = lint.wait_with_output().unwrap();
        let said = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && said.trim().is_empty(),
            "promtool check metrics:\n{said}"
        );
    }
    server.shutdown().await;
}

/// Counters whose labels the config determines exist at 0 from the start, before any event:
/// an alert on their rate has a series to watch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_counters_exist_at_zero_from_the_start() {
    let b = RawBackend::start("b", false).await;
    let server = start(
        &format!(
            r#"
[admin]
address = "127.0.0.1:0"
allow = ["127.0.0.1"]

[[listener]]
name = "edge"
address = "127.0.0.1:0"

[[route]]
name = "apps"
resource = {{ kind = "app", sni = "*.apps.example.com" }}

[[route]]
name = "all"
pool = "p"

[pool.p]
backends = ["{}"]

[pool.p.health]
kind = "tcp"
interval = "1h"
"#,
            b.address
        ),
        &[],
    )
    .await;
    let s = scrape(server.admin_addr().unwrap()).await;
    let zero = |name: &str, labels: &[(&str, &str)]| {
        assert_eq!(s.get(name, labels), Some(0.0), "{name} {labels:?}");
    };
    zero(
        "sluice_heartbeats_total",
        &[("result", "store_unavailable")],
    );
    zero("sluice_config_reloads_total", &[("result", "failure")]);
    zero(
        "sluice_hello_total",
        &[("listener", "edge"), ("result", "timeout")],
    );
    zero(
        "sluice_connections_closed_total",
        &[
            ("listener", "edge"),
            ("route", "none"),
            ("reason", "hello_timeout"),
        ],
    );
    zero(
        "sluice_route_decisions_total",
        &[("listener", "edge"), ("route", "apps")],
    );
    zero(
        "sluice_resource_misses_total",
        &[("route", "apps"), ("reason", "no_eligible_agent")],
    );
    zero(
        "sluice_agent_connect_failures_total",
        &[("route", "apps"), ("reason", "refused")],
    );
    zero(
        "sluice_health_checks_total",
        &[("pool", "p"), ("result", "fail")],
    );
    zero(
        "sluice_access_denied_total",
        &[("scope", "admin"), ("name", "admin")],
    );
    zero(
        "sluice_accept_errors_total",
        &[("listener", "edge"), ("kind", "emfile")],
    );
    zero(
        "sluice_backend_connections_total",
        &[("pool", "p"), ("backend", &b.address.to_string())],
    );
    server.shutdown().await;
}
