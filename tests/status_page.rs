//! The admin API's status page in a real browser: headless Chromium loads `/status` from a
//! running sluice with agents announced and a dead backend, and the test reads what a person
//! would see in the rendered page. A screenshot is kept as a test artefact
//! (`target/test-artifacts/status.png`).

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::heartbeats::api;
use support::process::have;
use support::{eventually, http_get, start, RawBackend};

const TOKEN: &str = "status-page-test-token-0123456789abcdef";

fn config(dir: &Path) -> String {
    format!(
        r#"
[admin]
address = "127.0.0.1:0"

[cluster]
version = "17.2.0"

[heartbeat]
address = "127.0.0.1:0"
cert_file = "{d}/cert.pem"
key_file = "{d}/key.pem"
tokens_file = "{d}/tokens"
min_ready = "0s"

[versions]
stable_after = "0s"

[versions.channels."default"]
static_version = "17.2.0"

[[listener]]
name = "edge"
address = "127.0.0.1:0"

[[route]]
name = "apps"
resource = {{ kind = "app", sni = "*.apps.example.com" }}

[[route]]
name = "proxies"
pool = "proxies"

[pool.proxies]
backends = ["{{alive}}", "{{dead}}"]

[pool.proxies.health]
kind = "tcp"
interval = "100ms"
timeout = "200ms"
rise = 1
fall = 1
"#,
        d = dir.display()
    )
}

/// Run headless Chromium on `url` with `extra` arguments; its stdout.
fn browse(browser: &str, profile: &Path, url: &str, extra: &[&str]) -> String {
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--virtual-time-budget=4000",
            "--window-size=1280,1800",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("chromium runs");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn artefacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_agents_versions_and_an_unhealthy_backend_in_chromium() {
    // Debian's package (what .ci/run installs).
    let browser = "chromium";
    if !have(browser) {
        return;
    }
    let dir = support::secrets(&format!("{TOKEN} name=agents\n"));
    let alive = RawBackend::start("alive", false).await;
    let dead = support::dead_address().await;
    let server = start(
        &config(dir.path()),
        &[
            ("alive", alive.address.to_string()),
            ("dead", dead.to_string()),
        ],
    )
    .await;
    let (hb, admin) = (
        server.heartbeat_addr().unwrap(),
        server.admin_addr().unwrap(),
    );
    let agent_at: SocketAddr = alive.address;
    for (id, version, app) in [
        ("agent-east-1", "17.2.0", "grafana"),
        ("agent-east-2", "17.2.0", "grafana"),
        ("agent-west-1", "17.1.0", "kibana"),
        ("agent-old-9", "15.0.0", "legacy"),
    ] {
        let body = format!(
            r#"{{"agent":"{id}","address":"{agent_at}","version":"{version}","ttl":"60s","resources":[{{"kind":"app","name":"{app}"}}]}}"#
        );
        let (status, text) = api(hb, "POST", "/v1/heartbeats", Some(TOKEN), &body).await;
        assert_eq!(status, 200, "{text}");
    }
    eventually("the dead backend is marked unhealthy", || async {
        http_get(admin, "/debug/pools")
            .await
            .1
            .contains("\"unhealthy\"")
    })
    .await;
    // The text index links to the page.
    assert!(http_get(admin, "/").await.1.contains("/status"));

    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://{admin}/status");
    let (b, p, u) = (browser.to_owned(), profile.path().to_owned(), url.clone());
    let dom = tokio::task::spawn_blocking(move || browse(&b, &p, &u, &["--dump-dom"]))
        .await
        .unwrap();
    assert!(
        dom.contains("data-loaded=\"true\""),
        "the script did not run:\n{dom}"
    );
    for id in [
        "agent-east-1",
        "agent-east-2",
        "agent-west-1",
        "agent-old-9",
    ] {
        assert!(
            dom.contains(&format!("data-agent=\"{id}\"")),
            "{id} missing:\n{dom}"
        );
    }
    // The versions chart: one row per version, with its counts.
    for (version, text) in [
        ("17.2.0", "2 (2 ready)"),
        ("17.1.0", "1 (1 ready)"),
        ("15.0.0", "1 (1 version_skew)"),
    ] {
        assert!(
            dom.contains(&format!("data-version=\"{version}\"")),
            "{version}:\n{dom}"
        );
        assert!(dom.contains(text), "{text}:\n{dom}");
    }
    assert!(dom.contains("more than one major version older than cluster 17.2.0"));
    // The channel's adoption: 2 of the 3 stable, non-skewed agents run the target.
    assert!(dom.contains("data-channel=\"default\""), "{dom}");
    assert!(dom.contains("2/3 (67%)"), "{dom}");
    // The dead backend, marked unhealthy; the live one healthy.
    let row = |name: String| {
        let at = dom
            .find(&format!("data-backend=\"{name}\""))
            .unwrap_or_else(|| panic!("backend {name} missing:\n{dom}"));
        dom[at..at + dom[at..].find("</tr>").unwrap()].to_owned()
    };
    assert!(
        row(dead.to_string()).contains("unhealthy"),
        "{}",
        row(dead.to_string())
    );
    assert!(row(alive.address.to_string()).contains("state ready"));
    // Every endpoint answered (the error box stays hidden).
    assert!(dom.contains("id=\"errors\" hidden=\"\""), "{dom}");
    assert!(dom.contains(">4 agents<"), "{dom}");

    // A filter in the address: sluice answers with the matching agents only, and says so.
    let (b, p, u) = (
        browser.to_owned(),
        profile.path().to_owned(),
        format!("{url}#q=EAST"),
    );
    let filtered = tokio::task::spawn_blocking(move || browse(&b, &p, &u, &["--dump-dom"]))
        .await
        .unwrap();
    assert!(filtered.contains("4 agents, 2 matching"), "{filtered}");
    assert!(
        filtered.contains("data-agent=\"agent-east-2\""),
        "{filtered}"
    );
    assert!(
        !filtered.contains("data-agent=\"agent-west-1\""),
        "{filtered}"
    );

    let shot = artefacts().join("status.png");
    let _ = std::fs::remove_file(&shot);
    let (b, p) = (browser.to_owned(), profile.path().to_owned());
    let arg = format!("--screenshot={}", shot.display());
    tokio::task::spawn_blocking(move || browse(&b, &p, &url, &[&arg]))
        .await
        .unwrap();
    let png = std::fs::read(&shot).expect("a screenshot was written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{}",
        png.len()
    );
    server.shutdown().await;
}
