//! The version server as agents' updaters use it (RFD 109): `version` then `critical` over
//! HTTPS, on the heartbeat listener and through the main port by SNI; static, forwarded (a
//! local HTTP server as upstream), clamped, unknown, reloaded, rate limited; and the rollout
//! view's channels.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use sluice::control::reload::{reload, Outcome};
use sluice::control::server::Server;
use support::heartbeats::api;
use support::{edge, http_get, scrape};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TOKEN: &str = "versions-test-token-0123456789abcdef";
const PATH: &str = "/v1/webapi/automaticupgrades/channel";

fn config(dir: &Path, versions: &str) -> String {
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

[[listener]]
name = "edge"
address = "127.0.0.1:0"

[[route]]
name = "updates"
sni = ["updates.example.com"]
serve = "heartbeat"

[[route]]
name = "rest"
pool = "p"

[pool.p]
backends = ["127.0.0.1:9"]

{versions}
"#,
        d = dir.display()
    )
}

struct Setup {
    dir: tempfile::TempDir,
    server: Server,
}

impl Setup {
    async fn new(versions: &str) -> Setup {
        let dir = support::secrets(&format!("{TOKEN} name=agents\n"));
        Self::in_dir(dir, versions).await
    }

    async fn in_dir(dir: tempfile::TempDir, versions: &str) -> Setup {
        let path = dir.path().join("sluice.toml");
        std::fs::write(&path, config(dir.path(), versions)).unwrap();
        let cfg = sluice::config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let server = Server::start(cfg).await.expect("sluice starts");
        Setup { dir, server }
    }

    fn hb(&self) -> SocketAddr {
        self.server.heartbeat_addr().unwrap()
    }

    fn admin(&self) -> SocketAddr {
        self.server.admin_addr().unwrap()
    }

    async fn rewrite(&self, versions: &str) {
        let path = self.dir.path().join("sluice.toml");
        std::fs::write(&path, config(self.dir.path(), versions)).unwrap();
        assert!(matches!(
            reload(&self.server.rt, "test").await,
            Outcome::Applied(_)
        ));
    }

    async fn requests(&self, channel: &str, endpoint: &str, answer: &str) -> f64 {
        scrape(self.admin()).await.counter(
            "sluice_version_requests_total",
            &[
                ("channel", channel),
                ("endpoint", endpoint),
                ("answer", answer),
            ],
        )
    }
}

/// One HTTPS GET as Teleport's updaters make it (ALPN http/1.1, no credential, SNI `sni`).
async fn get(addr: SocketAddr, sni: &str, path: &str) -> (u16, String) {
    let tls = sluice::tls::testing::insecure_client_config(&["http/1.1"]);
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .expect("TLS to the version server");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", sni)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// What an updater decides from the edge: the target, and whether it is critical (asked
/// only when the target differs from the running version, as Teleport's updaters do).
async fn updater(addr: SocketAddr, sni: &str, channel: &str, running: &str) -> (String, bool) {
    let (status, version) = get(addr, sni, &format!("{PATH}/{channel}/version")).await;
    assert_eq!(status, 200, "{version}");
    let target = version.trim().to_owned();
    if target == "none" || target == running {
        return (target, false);
    }
    let (status, critical) = get(addr, sni, &format!("{PATH}/{channel}/critical")).await;
    assert_eq!(status, 200, "{critical}");
    (target, critical.trim() == "yes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updaters_read_static_channels_on_both_listeners() {
    let s = Setup::new(
        "[versions.channels.\"default\"]\nstatic_version = \"17.1.0\"\ncritical = true\n\
         [versions.channels.\"stable/cloud\"]\nstatic_version = \"17.0.3\"\n",
    )
    .await;
    // The heartbeat listener, and the main port by SNI with ordinary ALPNs.
    for (addr, sni) in [
        (s.hb(), "sluice.test"),
        (edge(&s.server), "updates.example.com"),
    ] {
        assert_eq!(
            updater(addr, sni, "default", "v16.4.0").await,
            ("v17.1.0".into(), true)
        );
        assert_eq!(
            updater(addr, sni, "stable/cloud", "v16.4.0").await,
            ("v17.0.3".into(), false)
        );
        assert_eq!(
            updater(addr, sni, "default", "v17.1.0").await,
            ("v17.1.0".into(), false)
        );
    }
    // curl, as the systemd updater's script uses it, through the main port (ALPN h2 offered).
    let port = edge(&s.server).port();
    let out = Command::new("curl")
        .args(["-sS", "-k", "--fail", "--max-time", "5", "--resolve"])
        .arg(format!("updates.example.com:{port}:127.0.0.1"))
        .arg(format!(
            "https://updates.example.com:{port}{PATH}/stable/cloud/version"
        ))
        .output()
        .expect("curl runs");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "v17.0.3");
    // Unknown channels, paths under the prefix that name no endpoint, and other methods.
    assert_eq!(
        get(s.hb(), "sluice.test", &format!("{PATH}/nightly/version"))
            .await
            .0,
        404
    );
    assert_eq!(
        get(s.hb(), "sluice.test", &format!("{PATH}/default"))
            .await
            .0,
        404
    );
    let (status, _) = api(s.hb(), "POST", &format!("{PATH}/default/version"), None, "").await;
    assert_eq!(status, 405);
    // The heartbeat endpoints still want a credential.
    let (status, body) = api(s.hb(), "POST", "/v1/heartbeats", None, "{}").await;
    assert_eq!(status, 401, "{body}");
    assert!(s.requests("default", "version", "version").await >= 4.0);
    assert!(s.requests("default", "critical", "yes").await >= 2.0);
    assert_eq!(s.requests("unknown", "version", "not_found").await, 1.0);
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_channels_default_is_the_cluster_version_and_a_reload_changes_it() {
    let s = Setup::new("").await;
    assert_eq!(
        get(s.hb(), "sluice.test", &format!("{PATH}/default/version")).await,
        (200, "v17.2.0".into())
    );
    assert_eq!(
        get(s.hb(), "sluice.test", &format!("{PATH}/default/critical")).await,
        (200, "no".into())
    );
    s.rewrite("[versions.channels.\"default\"]\nstatic_version = \"17.1.5\"\n")
        .await;
    assert_eq!(
        get(s.hb(), "sluice.test", &format!("{PATH}/default/version")).await,
        (200, "v17.1.5".into())
    );
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_above_the_cluster_is_clamped_and_one_too_old_is_flagged() {
    let s = Setup::new(
        "[versions.channels.\"default\"]\nstatic_version = \"18.0.0\"\ncritical = true\n\
         [versions.channels.\"old\"]\nstatic_version = \"15.2.0\"\n",
    )
    .await;
    assert_eq!(
        updater(s.hb(), "sluice.test", "default", "v17.1.0").await,
        ("v17.2.0".into(), true)
    );
    assert_eq!(
        updater(s.hb(), "sluice.test", "old", "v17.1.0").await,
        ("v15.2.0".into(), false)
    );
    let clamped = scrape(s.admin())
        .await
        .counter("sluice_version_clamped_total", &[("channel", "default")]);
    assert_eq!(clamped, 2.0);
    let (_, body) = http_get(s.admin(), "/debug/rollout").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["channels"]["default"]["target"], "v17.2.0");
    assert_eq!(v["channels"]["default"]["clamped"], true);
    assert_eq!(v["channels"]["old"]["too_old"], true);
    // A view, read-only like the other debug endpoints.
    assert_eq!(
        support::http_request(s.admin(), "POST", "/debug/rollout")
            .await
            .0,
        405
    );
    s.server.shutdown().await;
}

/// A client certificate is asked for but optional: updaters send none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updaters_need_no_client_certificate_when_a_client_ca_is_set() {
    let dir = support::secrets(&format!("{TOKEN} name=agents\n"));
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = params
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
    let path = dir.path().join("sluice.toml");
    let text = config(dir.path(), "").replace(
        "tokens_file",
        &format!(
            "client_ca_file = \"{}/ca.pem\"\ntokens_file",
            dir.path().display()
        ),
    );
    std::fs::write(&path, text).unwrap();
    let cfg = sluice::config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let server = Server::start(cfg).await.expect("sluice starts");
    let hb = server.heartbeat_addr().unwrap();
    assert_eq!(
        get(hb, "sluice.test", &format!("{PATH}/default/version")).await,
        (200, "v17.2.0".into())
    );
    let (status, body) = api(hb, "POST", "/v1/heartbeats", None, "{}").await;
    assert_eq!(status, 401, "{body}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_over_the_rate_limit_is_refused_with_429() {
    let s = Setup::new("[versions]\nrate_limit = 1\n").await;
    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(
            get(s.hb(), "sluice.test", &format!("{PATH}/default/version"))
                .await
                .0,
        );
    }
    // A burst of twice the rate, then refusals.
    assert_eq!(&codes[..2], &[200, 200], "{codes:?}");
    assert!(codes[2..].contains(&429), "{codes:?}");
    assert!(s.requests("default", "version", "rate_limited").await >= 1.0);
    s.server.shutdown().await;
}

/// An upstream version server: answers `/v1/stable/cloud/version` and `.../critical` from
/// what the test sets, counts requests, and can be stopped.
struct Upstream {
    address: SocketAddr,
    answers: Arc<Mutex<(String, String)>>,
    hits: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    async fn start(version: &str, critical: &str) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let answers = Arc::new(Mutex::new((version.to_owned(), critical.to_owned())));
        let hits = Arc::new(AtomicU64::new(0));
        let (a, h) = (answers.clone(), hits.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let (a, h) = (a.clone(), h.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut n = 0;
                    while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf[n..]).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => n += k,
                        }
                    }
                    h.fetch_add(1, Ordering::SeqCst);
                    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let (version, critical) = a.lock().unwrap().clone();
                    let (status, body) = if head.starts_with("GET /v1/stable/cloud/version ") {
                        ("200 OK", version)
                    } else if head.starts_with("GET /v1/stable/cloud/critical ") {
                        ("200 OK", critical)
                    } else {
                        ("404 Not Found", "no\n".into())
                    };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        Upstream {
            address,
            answers,
            hits,
            task,
        }
    }

    fn set(&self, version: &str, critical: &str) {
        *self.answers.lock().unwrap() = (version.to_owned(), critical.to_owned());
    }

    fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
}

fn forwarded(upstream: SocketAddr, ttl: &str, max_stale: &str) -> String {
    format!(
        "[versions]\ncache_ttl = \"{ttl}\"\nmax_stale = \"{max_stale}\"\n\
         [versions.channels.\"stable/cloud\"]\nforward_url = \"http://{upstream}/v1/stable/cloud\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_channels_are_cached_served_stale_and_refused_when_nothing_is_left() {
    let mut up = Upstream::start("v17.1.2\n", "no\n").await;
    let s = Setup::new(&forwarded(up.address, "1s", "3s")).await;
    let ask = |channel: &'static str| {
        let hb = s.hb();
        async move { get(hb, "sluice.test", &format!("{PATH}/{channel}/version")).await }
    };
    // `default` has no entry: it is stable/cloud's.
    assert_eq!(ask("default").await, (200, "v17.1.2".into()));
    assert_eq!(
        updater(s.hb(), "sluice.test", "stable/cloud", "v17.0.0").await,
        ("v17.1.2".into(), false)
    );
    // One refresh asks both endpoints; within cache_ttl upstream is not asked again.
    assert_eq!(up.hits(), 2);
    up.set("v17.1.3", "yes");
    assert_eq!(ask("stable/cloud").await, (200, "v17.1.2".into()));
    assert_eq!(up.hits(), 2);
    // After cache_ttl the next request refreshes.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        updater(s.hb(), "sluice.test", "stable/cloud", "v17.1.2").await,
        ("v17.1.3".into(), true)
    );
    // Upstream gone: the cached answer is served once stale (counted), within max_stale.
    up.task.abort();
    let _ = (&mut up.task).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(ask("stable/cloud").await, (200, "v17.1.3".into()));
    assert!(s.requests("stable/cloud", "version", "stale").await >= 1.0);
    let failures = scrape(s.admin()).await.counter(
        "sluice_version_forward_failures_total",
        &[("channel", "stable/cloud")],
    );
    assert!(failures >= 1.0, "{failures}");
    // Past max_stale nothing is served: 503, so updaters do not update.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (status, body) = ask("stable/cloud").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("upstream"), "{body}");
    let (_, view) = http_get(s.admin(), "/debug/rollout").await;
    let v: serde_json::Value = serde_json::from_str(&view).unwrap();
    assert!(v["channels"]["stable/cloud"]["target"].is_null(), "{view}");
    assert!(v["channels"]["stable/cloud"]["error"].is_string(), "{view}");
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_down_from_the_start_gives_503_and_a_bad_answer_is_not_served() {
    let dead = support::dead_address().await;
    let s = Setup::new(&forwarded(dead, "1m", "1h")).await;
    let (status, body) = get(
        s.hb(),
        "sluice.test",
        &format!("{PATH}/stable/cloud/version"),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(s.requests("stable/cloud", "version", "unavailable").await >= 1.0);
    // An upstream answering something that is not a version is a failure too.
    let up = Upstream::start("<html>maintenance</html>", "no").await;
    s.rewrite(&forwarded(up.address, "1m", "1h")).await;
    let (status, body) = get(
        s.hb(),
        "sluice.test",
        &format!("{PATH}/stable/cloud/version"),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("is not a version"), "{body}");
    s.server.shutdown().await;
}

/// Adoption per channel: agents at the target among those ready for `stable_after`, each
/// agent in the channel its `channel` label names (`default` without one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rollout_view_shows_each_channels_adoption() {
    let s = Setup::new(
        "[versions]\nstable_after = \"0s\"\n\
         [versions.channels.\"default\"]\nstatic_version = \"17.2.0\"\n\
         [versions.channels.\"edge\"]\nstatic_version = \"17.1.0\"\n",
    )
    .await;
    let fb: SocketAddr = "127.0.0.1:9".parse().unwrap();
    for (id, version, channel) in [
        ("a1", "17.2.0", None),
        ("a2", "17.2.0", None),
        ("a3", "17.1.0", None),
        ("a4", "16.3.0", None),
        ("e1", "17.1.0", Some("edge")),
        ("e2", "17.0.0", Some("edge")),
    ] {
        let labels = channel.map_or(String::new(), |c| {
            format!(r#","labels":{{"channel":"{c}"}}"#)
        });
        let body = format!(
            r#"{{"agent":"{id}","address":"{fb}","version":"{version}","ttl":"60s"{labels},"resources":[]}}"#
        );
        let (status, text) = api(s.hb(), "POST", "/v1/heartbeats", Some(TOKEN), &body).await;
        assert_eq!(status, 200, "{text}");
    }
    let (_, body) = http_get(s.admin(), "/debug/rollout").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let d = &v["channels"]["default"];
    assert_eq!(d["target"], "v17.2.0");
    assert_eq!(d["adoption"]["at_target"], 2);
    assert_eq!(d["adoption"]["stable"], 4);
    assert_eq!(d["adoption"]["share"], 0.5);
    let e = &v["channels"]["edge"]["adoption"];
    assert_eq!(
        (e["at_target"].as_u64(), e["stable"].as_u64()),
        (Some(1), Some(2))
    );
    // The same view as a table.
    let table = sluice::agents::client::print_versions(&s.admin().to_string())
        .await
        .unwrap();
    assert!(
        table.contains("default") && table.contains("2/4 (50%)"),
        "{table}"
    );
    assert!(
        table.contains("edge") && table.contains("1/2 (50%)"),
        "{table}"
    );
    s.server.shutdown().await;
}
