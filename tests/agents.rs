//! The heartbeat table and the resource router, as agents and clients see them: real
//! `sluice heartbeat` processes announcing through the main port, clients from many source
//! addresses, the API's refusals (of requests and of stream lines), static agents, goodbyes,
//! expiry, warm-up and sweeping on the real clock, and each key of a resource route.

mod support;

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice::control::server::Server;
use support::heartbeats::{
    agent_process, api, heartbeat, heartbeat_process, line, open_stream, stream_end, visit,
    visit_open,
};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const TOKEN: &str = "agents-token-0123456789";
const SCOPED: &str = "scoped-token-0123456789";

/// Certificate, key and tokens files in a temp dir, and the agents' token file.
fn secrets() -> tempfile::TempDir {
    let dir = support::secrets(&format!(
        "# test tokens\n{TOKEN} name=agents\n{SCOPED} name=east kinds=db\n"
    ));
    std::fs::write(dir.path().join("token"), TOKEN).unwrap();
    dir
}

fn config(dir: &Path, extra: &str, fallback: &str) -> String {
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
max_resources = 5
max_body_bytes = 2048

[[listener]]
name = "edge"
address = "127.0.0.1:0"

[[route]]
name = "heartbeat"
alpn = ["sluice-heartbeat"]
serve = "heartbeat"

[[route]]
name = "apps"
resource = {{ kind = "app", sni = "*.apps.example.com" }}
idle_timeout = "0s"
{fallback}

[[route]]
name = "rest"
pool = "p"

[pool.p]
backends = ["{fb}"]
{extra}
"#,
        d = dir.display(),
        fb = "{fb}",
    )
}

async fn start_with(dir: &Path, extra: &str, fallback: &str, fb: SocketAddr) -> Server {
    start(&config(dir, extra, fallback), &[("fb", fb.to_string())]).await
}

fn agents_for(server: &Server, name: &str) -> Vec<String> {
    let key = sluice_core::agents::table::ResourceKey::new("app", name);
    let mut v: Vec<String> = server
        .rt
        .agents
        .table
        .lookup(&key)
        .map(|r| r.iter().map(|r| r.agent.id.to_string()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_spread_stick_and_move_when_their_agent_goes() {
    let dir = secrets();
    let (a1, a2) = (
        RawBackend::start("a1", false).await,
        RawBackend::start("a2", false).await,
    );
    let fb = RawBackend::start("fallback", false).await;
    let server = start_with(dir.path(), "", "", fb.address).await;
    let edge = edge(&server);
    let mut p1 = agent_process(dir.path(), edge, "a1", a1.address);
    let p2 = agent_process(dir.path(), edge, "a2", a2.address);
    eventually(
        "both agents announced myapp through the main port",
        || async { agents_for(&server, "myapp") == ["a1", "a2"] },
    )
    .await;

    // 200 clients from 200 addresses: new sessions pick a random agent.
    let clients: Vec<Ipv4Addr> = (0..200u32)
        .map(|i| Ipv4Addr::new(127, 0, 1 + (i / 250) as u8, 2 + (i % 250) as u8))
        .collect();
    let mut first: HashMap<Ipv4Addr, String> = HashMap::new();
    for &c in &clients {
        first.insert(c, visit(edge, c, "myapp.apps.example.com").await);
    }
    let on_a1 = first.values().filter(|t| *t == "a1").count();
    let on_a2 = first.values().filter(|t| *t == "a2").count();
    assert_eq!(
        on_a1 + on_a2,
        200,
        "every client reached an agent: {first:?}"
    );
    // Binomial(200, 1/2): below 50 on one side happens with probability ~1e-12.
    assert!(on_a1 >= 50 && on_a2 >= 50, "split a1={on_a1} a2={on_a2}");
    // Counted gauges are filled by the scrape of /metrics itself.
    assert_eq!(
        metric(&server, "sluice_sessions_active", &[("route", "apps")]).await,
        200.0
    );

    // The same client keeps its agent.
    for &c in clients.iter().take(20) {
        assert_eq!(visit(edge, c, "myapp.apps.example.com").await, first[&c]);
    }

    // a1's heartbeat process dies: its stream breaks and its records go at once (its ttl is
    // 60 s), so its clients start new sessions on a2.
    p1.kill().unwrap();
    p1.wait().unwrap();
    eventually("a1's records are gone", || async {
        agents_for(&server, "myapp") == ["a2"]
    })
    .await;
    for &c in &clients {
        assert_eq!(visit(edge, c, "myapp.apps.example.com").await, "a2");
    }
    assert_eq!(
        metric(&server, "sluice_session_repins_total", &[("route", "apps")]).await,
        on_a1 as f64
    );
    assert!(
        metric(
            &server,
            "sluice_heartbeats_total",
            &[("result", "stream_ended")]
        )
        .await
            >= 1.0
    );
    // Each agent's connection to the main port is the heartbeat API's: the killed one's
    // ended when its socket closed (a FIN from the kernel: a clean end for sluice).
    eventually("the killed agent's connection counted", || async {
        closed(&server, "heartbeat_api").await == 1.0
    })
    .await;
    // a2 stops (SIGTERM: a goodbye, then it exits). Its stream, and its goodbye if that came
    // on a connection of its own, end cleanly or cut short by the exit: counted either way.
    support::process::signal(p2.id(), "TERM");
    eventually("a2 said goodbye", || async {
        agents_for(&server, "myapp").is_empty()
    })
    .await;
    let mut p2 = p2;
    assert!(support::process::exits_within(&mut p2, Duration::from_secs(10)).success());
    eventually("a2's connections counted", || async {
        closed(&server, "heartbeat_api").await + closed(&server, "heartbeat_api_error").await >= 2.0
    })
    .await;
    server.shutdown().await;
}

/// A client that offers the heartbeat ALPN on the main port, then sends a record of no known
/// type instead of the rest of a handshake: the TLS handshake fails at once, and the
/// connection is counted as an error of the heartbeat API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_heartbeat_handshake_on_the_main_port_is_counted_as_an_error() {
    let dir = secrets();
    let fb = RawBackend::start("fallback", false).await;
    let server = start_with(dir.path(), "", "", fb.address).await;
    let mut s = TcpStream::connect(edge(&server)).await.unwrap();
    let hello = sluice_core::hello::build::hello(Some("sluice.test"), &["sluice-heartbeat"]);
    s.write_all(&[hello, vec![0x6e, 3, 3, 0, 1, 0]].concat())
        .await
        .unwrap();
    let _ = read_to_end(&mut s, Duration::from_secs(10)).await;
    eventually("the failed handshake counted", || async {
        closed(&server, "heartbeat_api_error").await == 1.0
    })
    .await;
    assert_eq!(closed(&server, "heartbeat_api").await, 0.0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_and_forged_heartbeats_change_nothing_and_skewed_agents_get_nothing() {
    let dir = secrets();
    let good = RawBackend::start("good", false).await;
    let skewed = RawBackend::start("skewed", false).await;
    let fb = RawBackend::start("fallback", false).await;
    let server = start_with(dir.path(), "", "", fb.address).await;
    let hb = server
        .heartbeat_addr()
        .expect("[heartbeat] address is bound");
    let edge = edge(&server);
    let post = |token: Option<&'static str>, body: String| async move {
        api(hb, "POST", "/v1/heartbeats", token, &body).await
    };

    // A ttl over max_ttl (15m by default) is capped to it.
    let long = heartbeat("good", good.address, "17.2.0", &["app1"]).replace("60s", "2h");
    let (status, _) = post(Some(TOKEN), long).await;
    assert_eq!(status, 200);
    let expires = server.rt.agents.table.agent("good").unwrap().expires();
    let left = expires.saturating_sub(sluice::agents::Agents::now());
    assert!((890_000..=900_000).contains(&left), "{left} ms left");
    // Forged: no token, a wrong token. Nothing changes.
    let forged = heartbeat("evil", fb.address, "17.2.0", &["app1"]);
    assert_eq!(post(None, forged.clone()).await.0, 401);
    assert_eq!(post(Some("not-a-token-at-all-000"), forged).await.0, 401);
    // Malformed, oversized, too many resources, out of scope.
    let (status, text) = post(Some(TOKEN), "{\"agent\": 7}".into()).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("not a heartbeat"), "{text}");
    let (status, text) = post(
        Some(TOKEN),
        heartbeat("x", good.address, "17.2.0", &["a"]).replace("127.0.0.1", "nowhere"),
    )
    .await;
    assert_eq!(
        (status, text.contains("is not IP:port")),
        (400, true),
        "{text}"
    );
    assert_eq!(post(Some(TOKEN), "x".repeat(4096)).await.0, 413);
    // Ids that would not survive a URL path, names no lowercased SNI can match, and sluice's
    // own listener as a dial address (it would dial itself) are refused.
    for bad in [
        heartbeat("web?1", good.address, "17.2.0", &["a"]),
        heartbeat("x", good.address, "17.2.0", &["MyApp"]),
        heartbeat("x", edge, "17.2.0", &["a"]),
    ] {
        let (status, text) = post(Some(TOKEN), bad).await;
        assert_eq!(status, 400, "{text}");
    }
    let six = heartbeat("x", good.address, "17.2.0", &["a", "b", "c", "d", "e", "f"]);
    assert_eq!(post(Some(TOKEN), six).await.0, 422);
    let (status, text) = post(Some(SCOPED), heartbeat("x", good.address, "17.2.0", &["a"])).await;
    assert_eq!(status, 403, "{text}");
    // The scoped token may not take over `good` either.
    let takeover = heartbeat("good", fb.address, "17.2.0", &["app1"]).replace("\"app\"", "\"db\"");
    assert_eq!(post(Some(SCOPED), takeover).await.0, 403);
    assert_eq!(server.rt.agents.table.agent_count(), 1);
    assert_eq!(agents_for(&server, "app1"), ["good"]);
    for (result, n) in [
        ("ok", 1.0),
        ("unauthorized", 2.0),
        ("malformed", 5.0),
        ("too_large", 1.0),
        ("too_many_resources", 1.0),
        ("forbidden", 2.0),
    ] {
        assert_eq!(
            metric(&server, "sluice_heartbeats_total", &[("result", result)]).await,
            n,
            "{result}"
        );
    }
    assert_eq!(
        visit(edge, Ipv4Addr::LOCALHOST, "app1.apps.example.com").await,
        "good"
    );

    // An agent newer than the cluster is listed, with the reason, and gets nothing.
    assert_eq!(
        post(
            Some(TOKEN),
            heartbeat("skewed", skewed.address, "18.0.0", &["app2"])
        )
        .await
        .0,
        200
    );
    assert_eq!(
        visit(edge, Ipv4Addr::LOCALHOST, "app2.apps.example.com").await,
        ""
    );
    assert_eq!(
        metric(
            &server,
            "sluice_resource_misses_total",
            &[("route", "apps"), ("reason", "no_eligible_agent")]
        )
        .await,
        1.0
    );
    let admin = server.admin_addr().unwrap();
    let (_, agents) = http_get(admin, "/debug/agents").await;
    let v: serde_json::Value = serde_json::from_str(&agents).unwrap();
    let state = |id: &str| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|a| a["id"] == id)
            .unwrap()["state"]
            .clone()
    };
    assert_eq!(state("skewed"), "version_skew");
    assert_eq!(state("good"), "ready");
    // A page of the table, filtered in sluice: the counts travel in headers.
    let total = v.as_array().unwrap().len();
    let page = |path: &'static str| async move {
        let (status, head, body) = http_response(admin, "GET", path).await;
        let head = head.to_lowercase();
        let count = |name: &str| -> usize {
            head.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(usize::MAX)
        };
        let ids: Vec<String> = serde_json::from_str::<Vec<serde_json::Value>>(&body)
            .map(|v| {
                v.iter()
                    .map(|a| a["id"].as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default();
        (
            status,
            count("x-total-count:"),
            count("x-matching-count:"),
            ids,
        )
    };
    assert_eq!(
        page("/debug/agents?limit=1").await,
        (200, total, total, vec!["good".to_owned()])
    );
    assert_eq!(
        page("/debug/agents?q=18.0").await,
        (200, total, 1, vec!["skewed".to_owned()])
    );
    assert_eq!(page("/debug/agents?q=APP2&limit=5").await.3, ["skewed"]);
    assert_eq!(page("/debug/agents?q=version_skew").await.3, ["skewed"]);
    assert_eq!(page("/debug/agents?limit=many").await.0, 400);
    assert_eq!(page("/debug/agents?sort=id").await.0, 400);
    assert!(skewed.connections().is_empty());
    // Unknown resource: closed, counted.
    assert_eq!(
        visit(edge, Ipv4Addr::LOCALHOST, "nothing.apps.example.com").await,
        ""
    );
    assert_eq!(
        metric(
            &server,
            "sluice_resource_misses_total",
            &[("route", "apps"), ("reason", "unknown_resource")]
        )
        .await,
        1.0
    );

    // Goodbye: the agent's records go at once.
    assert_eq!(
        api(hb, "DELETE", "/v1/agents/good", Some(TOKEN), "")
            .await
            .0,
        200
    );
    assert!(agents_for(&server, "app1").is_empty());
    assert_eq!(
        api(hb, "DELETE", "/v1/agents/good", Some(TOKEN), "")
            .await
            .0,
        404
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_agents_fallback_pool_and_the_resources_command() {
    let dir = secrets();
    let s1 = RawBackend::start("static1", false).await;
    let fb = RawBackend::start("fallback", false).await;
    let dead = dead_address().await;
    let extra = format!(
        r#"
[[agent]]
id = "s1"
address = "{}"
version = "17.0.0"
labels = {{ region = "east" }}
resources = [{{ kind = "app", name = "static-app" }}]

[[agent]]
id = "s0"
address = "{dead}"
version = "17.0.0"
resources = [{{ kind = "app", name = "static-app" }}]

[[agent]]
id = "s2"
address = "{dead}"
version = "17.0.0"
labels = {{ region = "east" }}
resources = [{{ kind = "app", name = "static-app" }}]
"#,
        s1.address
    );
    let server = start_with(
        dir.path(),
        &extra,
        "fallback_pool = \"p\"\nlabels = { region = \"east\" }",
        fb.address,
    )
    .await;
    let edge = edge(&server);
    // The label selector keeps s0 out. s2 is eligible but dead: clients whose new session
    // picks it are dialled on to s1 (20 clients: all missing s2 has probability 1e-6).
    let visit_all = || async {
        for i in 0..20 {
            let source = Ipv4Addr::new(127, 0, 0, 10 + i);
            assert_eq!(
                visit(edge, source, "static-app.apps.example.com").await,
                "static1"
            );
        }
    };
    visit_all().await;
    let failures = |reason: Option<&'static str>| {
        let server = &server;
        async move {
            let mut labels = vec![("route", "apps")];
            labels.extend(reason.map(|r| ("reason", r)));
            metric(server, "sluice_agent_connect_failures_total", &labels).await
        }
    };
    let refused = failures(Some("refused")).await;
    assert!(refused >= 1.0, "s2 was tried and refused");
    // Those sessions were pinned to the agent that answered: no failed dials the second time.
    visit_all().await;
    assert_eq!(failures(Some("refused")).await, refused);
    // No agent for it: the fallback pool.
    assert_eq!(
        visit(edge, Ipv4Addr::LOCALHOST, "other.apps.example.com").await,
        "fallback"
    );
    assert_eq!(
        metric(
            &server,
            "sluice_resource_misses_total",
            &[("route", "apps"), ("reason", "unknown_resource")]
        )
        .await,
        1.0
    );
    // `sluice resources` prints the table.
    let admin = server.admin_addr().unwrap();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["resources", "--admin", &admin.to_string()])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.starts_with("KIND"), "{text}");
    let row = text.lines().find(|l| l.contains("s1")).expect(&text);
    for word in ["app", "static-app", "17.0.0", "ready", "never"] {
        assert!(row.contains(word), "{row}");
    }
    assert!(text.contains("1 resources"), "{text}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_after_rotating_the_tokens_file_applies_the_new_tokens() {
    let dir = secrets();
    let fb = RawBackend::start("fallback", false).await;
    let path = dir.path().join("sluice.toml");
    let text = config(dir.path(), "", "").replace("{fb}", &fb.address.to_string());
    std::fs::write(&path, text).unwrap();
    let server = Server::start(sluice::config::load(&path).unwrap())
        .await
        .unwrap();
    let hb = server.heartbeat_addr().unwrap();
    let body = heartbeat("a1", fb.address, "17.2.0", &["app1"]);
    assert_eq!(
        api(hb, "POST", "/v1/heartbeats", Some(TOKEN), &body)
            .await
            .0,
        200
    );
    let rotated = "rotated-token-0123456789";
    std::fs::write(
        dir.path().join("tokens"),
        format!("{rotated} name=agents\n"),
    )
    .unwrap();
    // Only the tokens file changed: the reload is not skipped as "unchanged".
    assert!(matches!(
        sluice::control::reload::reload(&server.rt, "test").await,
        sluice::control::reload::Outcome::Applied(_)
    ));
    assert_eq!(
        api(hb, "POST", "/v1/heartbeats", Some(TOKEN), &body)
            .await
            .0,
        401
    );
    assert_eq!(
        api(hb, "POST", "/v1/heartbeats", Some(rotated), &body)
            .await
            .0,
        200
    );
    server.shutdown().await;
}

/// A CA, a client certificate it signed, and one it did not, as PEM files in `dir`.
fn client_certs(dir: &Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "agents CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    let client = |signed: bool| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["agent-c".to_owned()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, "agent-c");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = if signed {
            p.signed_by(&key, &ca_cert, &ca_key).unwrap()
        } else {
            p.self_signed(&key).unwrap()
        };
        (cert.pem(), key.serialize_pem())
    };
    for (name, signed) in [("good", true), ("rogue", false)] {
        let (cert, key) = client(signed);
        std::fs::write(dir.join(format!("{name}-cert.pem")), cert).unwrap();
        std::fs::write(dir.join(format!("{name}-key.pem")), key).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_signed_by_the_ca_authenticate_and_others_do_not() {
    let dir = secrets();
    client_certs(dir.path());
    let (good, fb) = (
        RawBackend::start("good", false).await,
        RawBackend::start("fallback", false).await,
    );
    let text = config(dir.path(), "", "").replace(
        "tokens_file = ",
        &format!(
            "client_ca_file = \"{}/ca.pem\"\ntokens_file = ",
            dir.path().display()
        ),
    );
    let server = start(&text, &[("fb", fb.address.to_string())]).await;
    let hb = server.heartbeat_addr().unwrap();
    let agent = |id: &str, cert: &str, dial: SocketAddr| {
        let cfg = dir.path().join(format!("{id}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "server = \"{hb}\"\nserver_name = \"sluice.test\"\ninsecure = true\n\
                 cert_file = \"{d}/{cert}-cert.pem\"\nkey_file = \"{d}/{cert}-key.pem\"\n\
                 agent = \"{id}\"\naddress = \"{dial}\"\nversion = \"17.2.0\"\ninterval = \"200ms\"\n\
                 [[resource]]\nkind = \"app\"\nname = \"{id}-app\"\n",
                d = dir.path().display()
            ),
        )
        .unwrap();
        heartbeat_process(&cfg)
    };
    let _rogue = agent("rogue", "rogue", fb.address);
    let _good = agent("good", "good", good.address);
    eventually(
        "the agent with a CA-signed certificate is in the table",
        || async { agents_for(&server, "good-app") == ["good"] },
    )
    .await;
    assert_eq!(
        visit(
            edge(&server),
            Ipv4Addr::LOCALHOST,
            "good-app.apps.example.com"
        )
        .await,
        "good"
    );
    eventually(
        "the rogue certificate was refused in the handshake",
        || async {
            metric(
                &server,
                "sluice_heartbeats_total",
                &[("result", "tls_error")],
            )
            .await
                >= 1.0
        },
    )
    .await;
    assert!(agents_for(&server, "rogue-app").is_empty());
    // Tokens still work beside certificates.
    let body = heartbeat("tok", fb.address, "17.2.0", &["tok-app"]);
    assert_eq!(
        api(hb, "POST", "/v1/heartbeats", Some(TOKEN), &body)
            .await
            .0,
        200
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_removed_by_a_reload_ends_the_streams_it_authenticated() {
    let dir = secrets();
    let (a1, fb) = (
        RawBackend::start("a1", false).await,
        RawBackend::start("fallback", false).await,
    );
    let path = dir.path().join("sluice.toml");
    let text = config(dir.path(), "", "").replace("{fb}", &fb.address.to_string());
    std::fs::write(&path, text).unwrap();
    let server = Server::start(sluice::config::load(&path).unwrap())
        .await
        .unwrap();
    let _agent = agent_process(dir.path(), edge(&server), "a1", a1.address);
    eventually("the agent streams its heartbeats", || async {
        agents_for(&server, "myapp") == ["a1"]
    })
    .await;
    std::fs::write(
        dir.path().join("tokens"),
        "another-token-0123456789 name=other\n",
    )
    .unwrap();
    assert!(matches!(
        sluice::control::reload::reload(&server.rt, "test").await,
        sluice::control::reload::Outcome::Applied(_)
    ));
    // The stream's next line is checked against the new tokens: the stream ends, and with
    // it the agent's records (its ttl is 60 s).
    eventually("the revoked agent is gone", || async {
        agents_for(&server, "myapp").is_empty()
    })
    .await;
    assert!(
        metric(
            &server,
            "sluice_heartbeats_total",
            &[("result", "unauthorized")]
        )
        .await
            >= 1.0
    );
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Stream refusals, expiry and warm-up on the real clock, and the resource routes' keys.

/// `config` with more `[heartbeat]` keys.
fn with_heartbeat(text: String, keys: &str) -> String {
    let anchor = "max_body_bytes = 2048\n";
    assert!(text.contains(anchor), "the [heartbeat] table moved");
    text.replacen(anchor, &format!("{anchor}{keys}\n"), 1)
}

/// `config` with more routes, placed before the catch-all `rest` (which would cover them).
fn with_routes(text: String, routes: &str) -> String {
    let anchor = "[[route]]\nname = \"rest\"";
    assert!(text.contains(anchor), "the `rest` route moved");
    text.replacen(anchor, &format!("{routes}\n{anchor}"), 1)
}

/// A resource route `name` for apps under `*.{name}.example.com`, with more keys.
fn resource_route(name: &str, keys: &str) -> String {
    format!(
        "[[route]]\nname = \"{name}\"\nresource = {{ kind = \"app\", sni = \"*.{name}.example.com\" }}\nidle_timeout = \"0s\"\n{keys}\n\n"
    )
}

/// POST one heartbeat with the test token.
async fn post(hb: SocketAddr, body: &str) -> (u16, String) {
    api(hb, "POST", "/v1/heartbeats", Some(TOKEN), body).await
}

/// An agent as `/debug/agents` lists it; `None` when it is not listed.
async fn listed(server: &Server, id: &str) -> Option<serde_json::Value> {
    support::heartbeats::listed(server.admin_addr().unwrap(), id).await
}

/// One series of `/metrics` that must be there.
async fn series(server: &Server, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape(server.admin_addr().unwrap())
        .await
        .value(name, labels)
}

/// The agent table's clock counts whole milliseconds, so its deadlines (expiry, end of
/// warm-up) fall up to 1 ms before the same span measured on `Instant`: a read counts as
/// early only if it ended 1 ms inside the span, and a late one may come 1 ms short of it.
const CLOCK_MS: Duration = Duration::from_millis(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_heartbeat_stream_is_closed_after_its_ttl_and_counted() {
    let dir = secrets();
    let (quiet, fb) = (
        RawBackend::start("quiet", false).await,
        RawBackend::start("fallback", false).await,
    );
    // Before its first line a stream may be silent for default_ttl; after it, for the ttl of
    // the agent it carries.
    let text = with_heartbeat(config(dir.path(), "", ""), "default_ttl = \"1s\"");
    let server = start(&text, &[("fb", fb.address.to_string())]).await;
    let (hb, edge) = (server.heartbeat_addr().unwrap(), edge(&server));
    let ttl = Duration::from_secs(1);

    // A stream that never sends a line.
    let mute_opened = Instant::now();
    let (_mute, mute_answer) = open_stream(hb, TOKEN).await;
    // A stream that announces `quiet` (ttl 1s) once, then falls silent.
    let (tx, answer) = open_stream(hb, TOKEN).await;
    let sent = Instant::now();
    let hello = heartbeat("quiet", quiet.address, "17.2.0", &["quietapp"]).replace("60s", "1s");
    tx.send(line(hello)).await.unwrap();
    eventually("the stream announced quiet", || async {
        agents_for(&server, "quietapp") == ["quiet"]
    })
    .await;
    let routed = visit(edge, Ipv4Addr::LOCALHOST, "quietapp.apps.example.com").await;
    if sent.elapsed() + CLOCK_MS < ttl {
        assert_eq!(routed, "quiet", "a client within the agent's ttl");
    }

    // Both are closed with 408, and not before their idle limit.
    let (status, body) = stream_end(mute_answer).await;
    assert!(
        mute_opened.elapsed() >= ttl,
        "closed after {:?}",
        mute_opened.elapsed()
    );
    assert_eq!(status, 408, "{body}");
    assert!(body.contains("no heartbeat for"), "{body}");
    let (status, body) = stream_end(answer).await;
    assert!(sent.elapsed() >= ttl, "closed after {:?}", sent.elapsed());
    assert_eq!(status, 408, "{body}");
    assert!(body.contains("the agent's ttl"), "{body}");
    drop(tx);
    // The stream took its agent with it: clients find nothing.
    assert!(agents_for(&server, "quietapp").is_empty());
    assert!(listed(&server, "quiet").await.is_none());
    assert_eq!(
        visit(edge, Ipv4Addr::LOCALHOST, "quietapp.apps.example.com").await,
        ""
    );
    let s = scrape(server.admin_addr().unwrap()).await;
    let hb_total = |result| s.value("sluice_heartbeats_total", &[("result", result)]);
    assert_eq!(hb_total("stream_idle"), 2.0);
    assert_eq!(
        hb_total("stream_ended"),
        1.0,
        "only one stream carried an agent"
    );
    assert_eq!(hb_total("ok"), 1.0);
    assert_eq!(
        s.value(
            "sluice_resource_misses_total",
            &[("route", "apps"), ("reason", "unknown_resource")]
        ),
        1.0
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_or_malformed_stream_line_ends_the_stream_and_takes_its_agent() {
    let dir = secrets();
    let (a, fb) = (
        RawBackend::start("a", false).await,
        RawBackend::start("fallback", false).await,
    );
    let server = start_with(dir.path(), "", "", fb.address).await;
    let (hb, edge) = (server.heartbeat_addr().unwrap(), edge(&server));

    // Each stream first announces its agent, which clients then reach; then one bad line.
    let announced = |id: &'static str| {
        let server = &server;
        async move {
            let (tx, answer) = open_stream(hb, TOKEN).await;
            let app = format!("{id}-app");
            tx.send(line(heartbeat(id, a.address, "17.2.0", &[&app])))
                .await
                .unwrap();
            eventually(&format!("{id} is announced"), || async {
                agents_for(server, &app) == [id]
            })
            .await;
            assert_eq!(
                visit(
                    edge,
                    Ipv4Addr::LOCALHOST,
                    &format!("{app}.apps.example.com")
                )
                .await,
                "a"
            );
            (tx, answer)
        }
    };
    // A line over max_body_bytes (2048) that never ends.
    let (tx, answer) = announced("big").await;
    tx.send(Bytes::from(vec![b' '; 4096])).await.unwrap();
    let (status, body) = stream_end(answer).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("a line over 2048 bytes"), "{body}");
    // A whole heartbeat over max_body_bytes, newline included, in one frame: refused the
    // same way, not applied.
    let (tx4, answer) = announced("whole").await;
    let padded = format!(
        "{{\"agent\": \"whole\", \"address\": \"{}\", \"labels\": {{\"pad\": \"{}\"}}, \"resources\": [{{\"kind\": \"app\", \"name\": \"whole-app\"}}, {{\"kind\": \"app\", \"name\": \"padded-app\"}}]}}",
        a.address,
        "x".repeat(3000)
    );
    tx4.send(line(padded)).await.unwrap();
    let (status, body) = stream_end(answer).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("a line over 2048 bytes"), "{body}");
    // A line that is not a heartbeat.
    let (tx2, answer) = announced("garbled").await;
    tx2.send(line("{\"agent\": 7}".into())).await.unwrap();
    let (status, body) = stream_end(answer).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not a heartbeat"), "{body}");
    // A line for another agent: one stream carries one agent.
    let (tx3, answer) = announced("first").await;
    tx3.send(line(heartbeat(
        "second",
        a.address,
        "17.2.0",
        &["second-app"],
    )))
    .await
    .unwrap();
    let (status, body) = stream_end(answer).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("one stream carries one agent"), "{body}");
    drop((tx, tx2, tx3, tx4));

    // Every stream's agent went with it (their ttl is 60 s), and `second` never came.
    for app in [
        "big-app",
        "whole-app",
        "padded-app",
        "garbled-app",
        "first-app",
        "second-app",
    ] {
        assert!(agents_for(&server, app).is_empty(), "{app}");
        assert_eq!(
            visit(
                edge,
                Ipv4Addr::LOCALHOST,
                &format!("{app}.apps.example.com")
            )
            .await,
            "",
            "{app}"
        );
    }
    assert_eq!(server.rt.agents.table.agent_count(), 0);
    let s = scrape(server.admin_addr().unwrap()).await;
    for (result, n) in [
        ("ok", 4.0),
        ("too_large", 2.0),
        ("malformed", 2.0),
        ("stream_ended", 4.0),
    ] {
        assert_eq!(
            s.value("sluice_heartbeats_total", &[("result", result)]),
            n,
            "{result}"
        );
    }
    assert_eq!(a.connections().len(), 4, "one client per announced agent");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_table_refuses_new_agents_with_503_until_one_leaves() {
    let dir = secrets();
    let (a, fb) = (
        RawBackend::start("a", false).await,
        RawBackend::start("fallback", false).await,
    );
    let text = with_heartbeat(config(dir.path(), "", ""), "max_agents = 2");
    let server = start(&text, &[("fb", fb.address.to_string())]).await;
    let (hb, edge) = (server.heartbeat_addr().unwrap(), edge(&server));
    for id in ["a1", "a2"] {
        let (status, body) = post(hb, &heartbeat(id, a.address, "17.2.0", &["myapp"])).await;
        assert_eq!(status, 200, "{body}");
    }
    // A third agent, by POST and by stream.
    let (status, body) = post(hb, &heartbeat("a3", a.address, "17.2.0", &["a3-app"])).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("the table is full (2 agents)"), "{body}");
    let (tx, answer) = open_stream(hb, TOKEN).await;
    tx.send(line(heartbeat("a3", a.address, "17.2.0", &["a3-app"])))
        .await
        .unwrap();
    let (status, body) = stream_end(answer).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("heartbeat.max_agents"), "{body}");
    assert_eq!(
        visit(edge, Ipv4Addr::LOCALHOST, "a3-app.apps.example.com").await,
        ""
    );
    // Agents already in the table still heartbeat.
    let (status, body) = post(hb, &heartbeat("a1", a.address, "17.2.0", &["myapp"])).await;
    assert_eq!((status, body.as_str()), (200, "keptalive\n"));
    let s = scrape(server.admin_addr().unwrap()).await;
    assert_eq!(
        s.value("sluice_heartbeats_total", &[("result", "table_full")]),
        2.0
    );
    assert_eq!(s.value("sluice_agents", &[("state", "ready")]), 2.0);
    // One leaves: the next one gets its place.
    assert_eq!(
        api(hb, "DELETE", "/v1/agents/a2", Some(TOKEN), "").await.0,
        200
    );
    let (status, body) = post(hb, &heartbeat("a3", a.address, "17.2.0", &["a3-app"])).await;
    assert_eq!((status, body.as_str()), (200, "joined\n"));
    assert_eq!(
        visit(edge, Ipv4Addr::LOCALHOST, "a3-app.apps.example.com").await,
        "a"
    );
    assert_eq!(
        metric(
            &server,
            "sluice_heartbeats_total",
            &[("result", "table_full")]
        )
        .await,
        2.0
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agent_expires_after_its_ttl_stays_listed_for_keep_expired_then_goes() {
    let dir = secrets();
    let (brief, fb) = (
        RawBackend::start("brief", false).await,
        RawBackend::start("fallback", false).await,
    );
    let path = dir.path().join("sluice.toml");
    let write = |keep: &str| {
        let text = with_heartbeat(
            config(dir.path(), "", ""),
            &format!("keep_expired = \"{keep}\""),
        );
        std::fs::write(&path, text.replace("{fb}", &fb.address.to_string())).unwrap();
    };
    write("1h");
    let server = Server::start(sluice::config::load(&path).unwrap())
        .await
        .unwrap();
    let (hb, edge) = (server.heartbeat_addr().unwrap(), edge(&server));
    let ttl = Duration::from_secs(1);

    // One heartbeat with ttl 1s, and no other.
    let sent = Instant::now();
    let body = heartbeat("brief", brief.address, "17.2.0", &["brief"]).replace("60s", "1s");
    assert_eq!(post(hb, &body).await.0, 200);
    let routed = visit(edge, Ipv4Addr::LOCALHOST, "brief.apps.example.com").await;
    if sent.elapsed() + CLOCK_MS < ttl {
        assert_eq!(routed, "brief", "a client within the agent's ttl");
    }

    // It expires on the real clock: listed as expired, and no client reaches it.
    eventually("brief is listed as expired", || async {
        listed(&server, "brief")
            .await
            .is_some_and(|a| a["state"] == "expired")
    })
    .await;
    assert!(
        sent.elapsed() + CLOCK_MS >= ttl,
        "expired {:?} after its heartbeat",
        sent.elapsed()
    );
    let clients_before = brief.connections().len();
    assert_eq!(
        visit(edge, Ipv4Addr::LOCALHOST, "brief.apps.example.com").await,
        ""
    );
    assert_eq!(brief.connections().len(), clients_before);
    let s = scrape(server.admin_addr().unwrap()).await;
    assert_eq!(
        s.value(
            "sluice_resource_misses_total",
            &[("route", "apps"), ("reason", "no_eligible_agent")]
        ),
        1.0
    );
    assert_eq!(s.value("sluice_agents", &[("state", "expired")]), 1.0);
    assert_eq!(s.value("sluice_agents", &[("state", "ready")]), 0.0);
    // keep_expired = 1h has not passed: it is still listed, with a negative expiry.
    let view = listed(&server, "brief").await.expect("still listed");
    assert_eq!(view["state"], "expired");
    assert!(
        view["expires_in_seconds"].as_f64().unwrap() <= 0.0,
        "{view}"
    );

    // keep_expired shortened to 1s by a reload: swept once 1 s has passed since it expired.
    write("1s");
    assert!(matches!(
        sluice::control::reload::reload(&server.rt, "test").await,
        sluice::control::reload::Outcome::Applied(_)
    ));
    let keep = Duration::from_secs(1);
    eventually("brief is swept", || async {
        listed(&server, "brief").await.is_none()
    })
    .await;
    assert!(
        sent.elapsed() + CLOCK_MS >= ttl + keep,
        "swept {:?} after its heartbeat",
        sent.elapsed()
    );
    assert_eq!(
        visit(edge, Ipv4Addr::LOCALHOST, "brief.apps.example.com").await,
        ""
    );
    let s = scrape(server.admin_addr().unwrap()).await;
    assert_eq!(
        s.value(
            "sluice_resource_misses_total",
            &[("route", "apps"), ("reason", "unknown_resource")]
        ),
        1.0
    );
    assert_eq!(s.value("sluice_agents", &[("state", "expired")]), 0.0);
    assert_eq!(s.value("sluice_resources", &[]), 0.0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_agent_takes_no_connection_before_min_ready() {
    let dir = secrets();
    let (old, fresh, fb) = (
        RawBackend::start("old", false).await,
        RawBackend::start("fresh", false).await,
        RawBackend::start("fallback", false).await,
    );
    // `old` is configured (ready at once); `fresh` joins by heartbeat and must warm up.
    let extra = format!(
        "[[agent]]\nid = \"old\"\naddress = \"{}\"\nversion = \"17.0.0\"\nresources = [{{ kind = \"app\", name = \"myapp\" }}]\n",
        old.address
    );
    let text = with_heartbeat(
        config(dir.path(), &extra, "affinity = \"none\""),
        "min_ready = \"1s\"",
    );
    let server = start(&text, &[("fb", fb.address.to_string())]).await;
    let (hb, edge) = (server.heartbeat_addr().unwrap(), edge(&server));
    let min_ready = Duration::from_secs(1);

    let sent = Instant::now();
    let body = heartbeat("fresh", fresh.address, "17.2.0", &["myapp"]);
    assert_eq!(post(hb, &body).await.0, 200);
    // Read inside min_ready: warming, and every connection goes to `old` (each one picks
    // anew: with both eligible, ten in a row on `old` has probability 1/1024).
    let mut early = Vec::new();
    for _ in 0..10 {
        early.push(visit(edge, Ipv4Addr::LOCALHOST, "myapp.apps.example.com").await);
    }
    let state = listed(&server, "fresh").await.expect("listed")["state"].clone();
    let warming = series(&server, "sluice_agents", &[("state", "warming")]).await;
    if sent.elapsed() + CLOCK_MS < min_ready {
        assert!(early.iter().all(|t| t == "old"), "{early:?}");
        assert_eq!(state, "warming");
        assert_eq!(warming, 1.0);
        assert!(fresh.connections().is_empty());
    }

    // Then it takes its share, and not before min_ready has passed since it was announced.
    eventually("a connection reaches fresh", || async {
        visit(edge, Ipv4Addr::LOCALHOST, "myapp.apps.example.com").await == "fresh"
    })
    .await;
    assert!(
        sent.elapsed() + CLOCK_MS >= min_ready,
        "fresh was dialled {:?} after its first heartbeat",
        sent.elapsed()
    );
    assert_eq!(listed(&server, "fresh").await.unwrap()["state"], "ready");
    assert_eq!(
        series(&server, "sluice_agents", &[("state", "ready")]).await,
        2.0
    );
    server.shutdown().await;
}

/// A server whose agents `a1` and `a2` (at `b1`, `b2`) announce `myapp` and `other`, with
/// `routes` before the catch-all.
/// Two agent backends, a1 and a2, and the fallback pool's backend.
async fn agent_backends() -> (RawBackend, RawBackend, RawBackend) {
    (
        RawBackend::start("a1", false).await,
        RawBackend::start("a2", false).await,
        RawBackend::start("fallback", false).await,
    )
}

/// sluice with `routes` added to the agents config, its pool `p` on `fb`.
async fn start_routes(dir: &Path, routes: &str, fb: &RawBackend) -> Server {
    let text = with_routes(config(dir, "", ""), routes);
    start(&text, &[("fb", fb.address.to_string())]).await
}

async fn two_agents(
    dir: &Path,
    routes: &str,
    b1: &RawBackend,
    b2: &RawBackend,
    fb: &RawBackend,
) -> Server {
    let server = start_routes(dir, routes, fb).await;
    let hb = server.heartbeat_addr().unwrap();
    for (id, b) in [("a1", b1), ("a2", b2)] {
        let (status, body) =
            post(hb, &heartbeat(id, b.address, "17.2.0", &["myapp", "other"])).await;
        assert_eq!(status, 200, "{body}");
    }
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn affinity_none_picks_anew_and_client_ip_modes_keep_each_client_on_its_agent() {
    let dir = secrets();
    let (b1, b2, fb) = agent_backends().await;
    let routes = [
        resource_route("none", "affinity = \"none\""),
        resource_route("ip", "affinity = \"client_ip\""),
        resource_route("ipsni", "affinity = \"client_ip_sni\""),
    ]
    .concat();
    let server = two_agents(dir.path(), &routes, &b1, &b2, &fb).await;
    let edge = edge(&server);
    let both: HashSet<String> = ["a1".to_owned(), "a2".to_owned()].into();

    // `none`: one client, every connection picks anew (40 on one agent: probability 2^-39),
    // and no session is kept.
    let mut seen = HashSet::new();
    for _ in 0..40 {
        seen.insert(visit(edge, Ipv4Addr::new(127, 0, 3, 1), "myapp.none.example.com").await);
    }
    assert_eq!(seen, both);

    // `client_ip` and `client_ip_sni`: each client keeps one agent per resource (six more
    // connections on the first one's agent: 2^-6 each by chance), and clients spread.
    for route in ["ip", "ipsni"] {
        let mut firsts = HashSet::new();
        for i in 0..20u8 {
            let client = Ipv4Addr::new(127, 0, 4, 10 + i);
            for app in ["myapp", "other"] {
                let sni = format!("{app}.{route}.example.com");
                let first = visit(edge, client, &sni).await;
                assert!(both.contains(&first), "{sni}: {first:?}");
                for _ in 0..6 {
                    assert_eq!(visit(edge, client, &sni).await, first, "{client} {sni}");
                }
                firsts.insert(first);
            }
        }
        assert_eq!(firsts, both, "{route}: new sessions spread");
    }
    let s = scrape(server.admin_addr().unwrap()).await;
    let sessions = |route| s.value("sluice_sessions_active", &[("route", route)]);
    assert_eq!(sessions("none"), 0.0);
    // 20 clients × 2 resources.
    assert_eq!(sessions("ip"), 40.0);
    assert_eq!(sessions("ipsni"), 40.0);
    for route in ["none", "ip", "ipsni"] {
        assert_eq!(
            s.value("sluice_session_repins_total", &[("route", route)]),
            0.0,
            "{route}"
        );
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_starts_new_sessions_on_the_agent_with_fewer_connections() {
    let dir = secrets();
    let (b1, b2, fb) = agent_backends().await;
    let server = start_routes(dir.path(), &resource_route("p2c", "pick = \"p2c\""), &fb).await;
    let (hb, edge) = (server.heartbeat_addr().unwrap(), edge(&server));
    let sni = "myapp.p2c.example.com";
    assert_eq!(
        post(hb, &heartbeat("a1", b1.address, "17.2.0", &["myapp"]))
            .await
            .0,
        200
    );
    // Five clients hold connections to a1, the only agent.
    let mut held = Vec::new();
    let mut active: HashMap<String, usize> = HashMap::from([("a1".into(), 0), ("a2".into(), 0)]);
    for i in 0..5u8 {
        let (s, tag) = visit_open(edge, Ipv4Addr::new(127, 0, 5, 1 + i), sni).await;
        assert_eq!(tag, "a1");
        *active.get_mut(&tag).unwrap() += 1;
        held.push(s);
    }
    // a2 joins. Each new session (a new client) goes to the agent with fewer connections
    // held (either on a tie): the first five all to a2, then they alternate. A uniform pick
    // would send one of the first five to a1 with probability 31/32.
    assert_eq!(
        post(hb, &heartbeat("a2", b2.address, "17.2.0", &["myapp"]))
            .await
            .0,
        200
    );
    let mut order = Vec::new();
    for i in 0..11u8 {
        let (s, tag) = visit_open(edge, Ipv4Addr::new(127, 0, 5, 100 + i), sni).await;
        let other = if tag == "a1" { "a2" } else { "a1" };
        assert!(
            active[&tag] <= active[other],
            "session {i} went to {tag} with {active:?} held (so far {order:?})"
        );
        *active.get_mut(&tag).unwrap() += 1;
        order.push(tag);
        held.push(s);
    }
    assert_eq!(order[..5], ["a2"; 5]);
    // What sluice counts agrees.
    for (id, n) in &active {
        let view = listed(&server, id).await.unwrap();
        assert_eq!(view["active_connections"], *n as u64, "{view}");
    }
    assert_eq!(active["a1"] + active["a2"], 16);
    assert!(active["a1"].abs_diff(active["a2"]) <= 1, "{active:?}");
    drop(held);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_unused_for_session_idle_ttl_is_forgotten() {
    let dir = secrets();
    let (b1, b2, fb) = agent_backends().await;
    // p2c makes a new session's choice certain: the agent without the held connection.
    let routes = resource_route("idle", "pick = \"p2c\"\nsession_idle_ttl = \"1s\"");
    let server = two_agents(dir.path(), &routes, &b1, &b2, &fb).await;
    let edge = edge(&server);
    let (client, sni) = (Ipv4Addr::new(127, 0, 6, 1), "myapp.idle.example.com");
    let idle_ttl = Duration::from_secs(1);

    let started = Instant::now();
    let (_held, pinned) = visit_open(edge, client, sni).await;
    let other = if pinned == "a1" { "a2" } else { "a1" };
    // Within the ttl, its session wins over p2c: back to the agent it holds a connection to.
    let used = Instant::now();
    let again = visit(edge, client, sni).await;
    if started.elapsed() < idle_ttl {
        assert_eq!(again, pinned, "the session's agent, though busier");
    }
    let sessions = series(&server, "sluice_sessions_active", &[("route", "idle")]).await;
    if used.elapsed() < idle_ttl {
        assert_eq!(sessions, 1.0);
    }
    // Unused for the ttl, it is forgotten, and not before.
    eventually("the idle session is forgotten", || async {
        series(&server, "sluice_sessions_active", &[("route", "idle")]).await == 0.0
    })
    .await;
    assert!(
        used.elapsed() >= idle_ttl,
        "forgotten {:?} after its last use",
        used.elapsed()
    );
    // The client's next connection starts a new session: p2c picks the idle agent. It is not
    // a re-pin (the session's agent is still eligible; there is no session).
    assert_eq!(visit(edge, client, sni).await, other);
    assert_eq!(
        series(&server, "sluice_session_repins_total", &[("route", "idle")]).await,
        0.0
    );
    assert_eq!(
        series(&server, "sluice_sessions_active", &[("route", "idle")]).await,
        1.0
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_sessions_keeps_only_the_most_recently_used_sessions() {
    let dir = secrets();
    let (b1, b2, fb) = agent_backends().await;
    let server = start_routes(
        dir.path(),
        &resource_route("capped", "max_sessions = 2"),
        &fb,
    )
    .await;
    let (hb, edge) = (server.heartbeat_addr().unwrap(), edge(&server));
    let sni = "myapp.capped.example.com";
    let sessions = || series(&server, "sluice_sessions_active", &[("route", "capped")]);
    let repins = || {
        series(
            &server,
            "sluice_session_repins_total",
            &[("route", "capped")],
        )
    };
    assert_eq!(
        post(hb, &heartbeat("a1", b1.address, "17.2.0", &["myapp"]))
            .await
            .0,
        200
    );
    // Three clients, one after the other, all on a1; two sessions are kept.
    let c = |i| Ipv4Addr::new(127, 0, 7, i);
    for (i, kept) in [(1, 1.0), (2, 2.0), (3, 2.0)] {
        assert_eq!(visit(edge, c(i), sni).await, "a1");
        assert_eq!(sessions().await, kept, "after client {i}");
    }
    // a1 leaves for a2. A client whose session was kept is re-pinned; the least recently
    // used one (client 1) had none left: a new session, not a re-pin.
    assert_eq!(
        post(hb, &heartbeat("a2", b2.address, "17.2.0", &["myapp"]))
            .await
            .0,
        200
    );
    assert_eq!(
        api(hb, "DELETE", "/v1/agents/a1", Some(TOKEN), "").await.0,
        200
    );
    assert_eq!(visit(edge, c(1), sni).await, "a2");
    assert_eq!(repins().await, 0.0, "client 1's session was dropped");
    assert_eq!(sessions().await, 2.0);
    assert_eq!(visit(edge, c(3), sni).await, "a2");
    assert_eq!(repins().await, 1.0, "client 3's session was kept");
    assert_eq!(sessions().await, 2.0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_agent_fails_the_fallback_pool_serves_or_the_client_is_closed() {
    let dir = secrets();
    let fb = RawBackend::start("fallback", false).await;
    let (dead1, dead2) = (dead_address().await, dead_address().await);
    let text = with_routes(
        config(dir.path(), "", "fallback_pool = \"p\""),
        &resource_route("nofb", ""),
    );
    let server = start(&text, &[("fb", fb.address.to_string())]).await;
    let (hb, edge) = (server.heartbeat_addr().unwrap(), edge(&server));
    for (id, dead) in [("d1", dead1), ("d2", dead2)] {
        let (status, body) = post(hb, &heartbeat(id, dead, "17.2.0", &["myapp"])).await;
        assert_eq!(status, 200, "{body}");
    }
    // Both agents are dialled and refuse: the route's fallback pool takes the client.
    assert_eq!(
        visit(edge, Ipv4Addr::LOCALHOST, "myapp.apps.example.com").await,
        "fallback"
    );
    // Without one, the client is closed.
    assert_eq!(
        visit(edge, Ipv4Addr::LOCALHOST, "myapp.nofb.example.com").await,
        ""
    );
    let admin = server.admin_addr().unwrap();
    eventually("the refused client is counted as closed", || async {
        scrape(admin).await.counter(
            "sluice_connections_closed_total",
            &[("route", "nofb"), ("reason", "backend_unavailable")],
        ) == 1.0
    })
    .await;
    let s = scrape(admin).await;
    for route in ["apps", "nofb"] {
        assert_eq!(
            s.value(
                "sluice_resource_misses_total",
                &[("route", route), ("reason", "all_agents_failed")]
            ),
            1.0,
            "{route}"
        );
        assert_eq!(
            s.value(
                "sluice_agent_connect_failures_total",
                &[("route", route), ("reason", "refused")]
            ),
            2.0,
            "{route}: every agent was tried once"
        );
        // No session is kept on an agent that never answered.
        assert_eq!(
            s.value("sluice_sessions_active", &[("route", route)]),
            0.0,
            "{route}"
        );
    }
    assert_eq!(
        fb.connections().len(),
        1,
        "only the route with a fallback used it"
    );
    server.shutdown().await;
}

/// The fallback pool sends its own PROXY header, not the resource route's: a pool without
/// one gets the bare hello from a route that sends v2 to its agents, and a pool with v1 gets
/// v1 from a route that sends none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_pool_gets_its_own_proxy_header_not_the_routes() {
    let dir = secrets();
    let hello = sluice_core::hello::build::hello(Some("myapp.apps.example.com"), &["h2"]);
    for (route_pp, pool_pp, expect_header) in [
        ("v2", "none", None),
        ("none", "v1", Some("PROXY TCP4 127.0.0.1 127.0.0.1 ")),
    ] {
        let fb = RawBackend::start("fallback", false).await;
        let server = start_with(
            dir.path(),
            &format!("proxy_protocol = \"{pool_pp}\""),
            &format!("fallback_pool = \"p\"\nproxy_protocol = \"{route_pp}\""),
            fb.address,
        )
        .await;
        let hb = server.heartbeat_addr().unwrap();
        let dead = dead_address().await;
        let (status, body) = post(hb, &heartbeat("d", dead, "17.2.0", &["myapp"])).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            visit(edge(&server), Ipv4Addr::LOCALHOST, "myapp.apps.example.com").await,
            "fallback"
        );
        eventually("the fallback received the hello", || async {
            fb.connections()
                .first()
                .is_some_and(|c| c.ends_with(&hello))
        })
        .await;
        let got = fb.connections()[0].clone();
        match expect_header {
            None => assert_eq!(
                got, hello,
                "route {route_pp}, pool {pool_pp}: the bare hello"
            ),
            Some(prefix) => {
                let text = String::from_utf8_lossy(&got[..got.len() - hello.len()]).into_owned();
                assert!(
                    text.starts_with(prefix) && text.ends_with("\r\n"),
                    "{text:?}"
                );
            }
        }
        server.shutdown().await;
    }
}

/// What an agent received on its `n`th connection, once it holds `hello` at the end.
async fn received_by(agent: &RawBackend, n: usize, hello: &[u8]) -> Vec<u8> {
    eventually("the agent received the header and the hello", || async {
        agent
            .connections()
            .get(n)
            .is_some_and(|c| c.len() > hello.len() && c.ends_with(hello))
    })
    .await;
    agent.connections()[n].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_get_a_proxy_header_with_the_real_client_address() {
    let dir = secrets();
    let (agent, fb) = (
        RawBackend::start("agent", false).await,
        RawBackend::start("fallback", false).await,
    );
    let routes = [
        resource_route("ppv1", "proxy_protocol = \"v1\""),
        resource_route("ppv2", "proxy_protocol = \"v2\""),
    ]
    .concat();
    let server = start(
        &with_routes(config(dir.path(), "", ""), &routes),
        &[("fb", fb.address.to_string())],
    )
    .await;
    let edge = edge(&server);
    // The agent announces itself with the real `sluice heartbeat`, through the main port.
    let _announcer = agent_process(dir.path(), edge, "pp", agent.address);
    eventually("the agent announced myapp", || async {
        agents_for(&server, "myapp") == ["pp"]
    })
    .await;

    // v1 from 127.0.0.21.
    let hello1 = sluice_core::hello::build::hello(Some("myapp.ppv1.example.com"), &["h2"]);
    let (s1, tag) = visit_open(edge, Ipv4Addr::new(127, 0, 0, 21), "myapp.ppv1.example.com").await;
    assert_eq!(tag, "agent");
    let client1 = s1.local_addr().unwrap();
    let got = received_by(&agent, 0, &hello1).await;
    let expected = format!(
        "PROXY TCP4 127.0.0.21 127.0.0.1 {} {}\r\n",
        client1.port(),
        edge.port()
    );
    assert_eq!(
        String::from_utf8_lossy(&got[..got.len() - hello1.len()]),
        expected,
        "exactly one v1 header, then the hello"
    );

    // v2 from 127.0.0.22, with the ALPN and the SNI.
    let sni2 = "myapp.ppv2.example.com";
    let hello2 = sluice_core::hello::build::hello(Some(sni2), &["h2"]);
    let (s2, tag) = visit_open(edge, Ipv4Addr::new(127, 0, 0, 22), sni2).await;
    assert_eq!(tag, "agent");
    let client2 = s2.local_addr().unwrap();
    assert_eq!(client2.ip(), Ipv4Addr::new(127, 0, 0, 22));
    let got = received_by(&agent, 1, &hello2).await;
    let header = ppp::v2::Header::try_from(got.as_slice()).expect("a PROXY v2 header first");
    assert_eq!(header.addresses, ppp::v2::Addresses::from((client2, edge)));
    let tlvs = proxy_v2_tlvs(&header);
    assert_eq!(
        tlvs,
        vec![
            (ppp::v2::Type::ALPN as u8, b"h2".to_vec()),
            (ppp::v2::Type::Authority as u8, sni2.as_bytes().to_vec()),
        ]
    );
    assert_eq!(
        &got[header.len()..],
        &hello2[..],
        "exactly one v2 header, then the hello"
    );

    // The `apps` route sends none.
    let hello3 = sluice_core::hello::build::hello(Some("myapp.apps.example.com"), &["h2"]);
    assert_eq!(
        visit(edge, Ipv4Addr::new(127, 0, 0, 23), "myapp.apps.example.com").await,
        "agent"
    );
    eventually("the agent received the hello", || async {
        agent
            .connections()
            .get(2)
            .is_some_and(|c| c.len() >= hello3.len())
    })
    .await;
    assert_eq!(agent.connections()[2], hello3);
    drop((s1, s2));
    server.shutdown().await;
}

/// Two edges with the same agents and `pick = "rendezvous"` send each client to the same agent,
/// and fail over in the same order; a joining agent moves no pinned session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendezvous_picks_the_same_agent_on_every_edge() {
    let dir = secrets();
    let agents = [
        RawBackend::start("a1", false).await,
        RawBackend::start("a2", false).await,
        RawBackend::start("a3", false).await,
    ];
    let fb = RawBackend::start("fallback", false).await;
    let routes = resource_route("rdv", "pick = \"rendezvous\"");
    let mut edges = Vec::new();
    for _ in 0..2 {
        let server = start_routes(dir.path(), &routes, &fb).await;
        let hb = server.heartbeat_addr().unwrap();
        for (i, b) in agents.iter().enumerate() {
            let id = format!("a{}", i + 1);
            let (status, body) = post(hb, &heartbeat(&id, b.address, "17.2.0", &["myapp"])).await;
            assert_eq!(status, 200, "{body}");
        }
        edges.push(server);
    }
    let sni = "myapp.rdv.example.com";
    let mut chosen = HashSet::new();
    let mut first_of = Vec::new();
    for i in 0..30u8 {
        let client = Ipv4Addr::new(127, 0, 9, 10 + i);
        let on_a = visit(edge(&edges[0]), client, sni).await;
        let on_b = visit(edge(&edges[1]), client, sni).await;
        assert_eq!(on_a, on_b, "{client}: the edges disagree");
        chosen.insert(on_a.clone());
        first_of.push((client, on_a));
    }
    assert_eq!(
        chosen.len(),
        3,
        "30 clients spread over the three agents: {chosen:?}"
    );

    // A fourth agent joins both edges: clients with a session keep their agent on each edge,
    // and new clients still agree between the edges.
    let a4 = RawBackend::start("a4", false).await;
    for e in &edges {
        let (status, body) = post(
            e.heartbeat_addr().unwrap(),
            &heartbeat("a4", a4.address, "17.2.0", &["myapp"]),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    for (client, first) in &first_of {
        for e in &edges {
            assert_eq!(&visit(edge(e), *client, sni).await, first, "{client} moved");
        }
    }
    let mut took_a4 = 0;
    for i in 0..40u8 {
        let client = Ipv4Addr::new(127, 0, 10, 10 + i);
        let on_a = visit(edge(&edges[0]), client, sni).await;
        assert_eq!(on_a, visit(edge(&edges[1]), client, sni).await, "{client}");
        took_a4 += usize::from(on_a == "a4");
    }
    assert!(
        took_a4 > 0,
        "new clients rank the new agent first for some keys"
    );

    // The agent a client ranks first leaves both edges: it fails over to the same next one.
    let (client, first) = first_of[0].clone();
    for e in &edges {
        let path = format!("/v1/agents/{first}");
        let hb = e.heartbeat_addr().unwrap();
        assert_eq!(api(hb, "DELETE", &path, Some(TOKEN), "").await.0, 200);
    }
    let next_a = visit(edge(&edges[0]), client, sni).await;
    assert_ne!(next_a, first);
    assert_eq!(next_a, visit(edge(&edges[1]), client, sni).await);
    for e in edges {
        e.shutdown().await;
    }
}

/// A body over `max_body_bytes` is answered 413 as soon as the limit is passed, while the
/// client goes on uploading (declared by Content-Length, or found in a chunked body), and the
/// client reads that answer rather than a reset: the close lingers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_is_refused_while_the_upload_goes_on() {
    let dir = secrets();
    let fb = RawBackend::start("fallback", false).await;
    let server = start_with(dir.path(), "", "", fb.address).await;
    let hb = server.heartbeat_addr().unwrap();
    for chunked in [false, true] {
        let tls = sluice::tls::testing::insecure_client_config(&["http/1.1"]);
        let tcp = TcpStream::connect(hb).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("sluice.test").unwrap();
        let s = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .unwrap();
        let (mut r, mut w) = tokio::io::split(s);
        let framing = if chunked {
            "transfer-encoding: chunked"
        } else {
            "content-length: 8388608"
        };
        let head = format!(
            "POST /v1/heartbeats HTTP/1.1\r\nhost: sluice.test\r\nauthorization: Bearer {TOKEN}\r\n{framing}\r\n\r\n"
        );
        // 8 MiB of a body (the limit here is 2048), written at full speed while the
        // answer is read.
        let upload = tokio::spawn(async move {
            w.write_all(head.as_bytes()).await?;
            let part = vec![b'x'; 16384];
            for _ in 0..512 {
                if chunked {
                    w.write_all(format!("{:x}\r\n", part.len()).as_bytes())
                        .await?;
                }
                w.write_all(&part).await?;
                if chunked {
                    w.write_all(b"\r\n").await?;
                }
            }
            std::io::Result::Ok(())
        });
        let mut answer = Vec::new();
        let read = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read_to_end(&mut r, &mut answer),
        )
        .await;
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.starts_with("HTTP/1.1 413"),
            "chunked={chunked}: {read:?} {text}"
        );
        assert!(text.contains("heartbeat.max_body_bytes"), "{text}");
        upload.abort();
    }
    // A declared length over the limit is refused before any of the body arrives (a slow
    // uploader does not hold the connection until it has sent 2 KiB).
    let tls = sluice::tls::testing::insecure_client_config(&["http/1.1"]);
    let tcp = TcpStream::connect(hb).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("sluice.test").unwrap();
    let mut s = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .unwrap();
    let head = format!(
        "POST /v1/heartbeats HTTP/1.1\r\nhost: sluice.test\r\nauthorization: Bearer {TOKEN}\r\ncontent-length: 8388608\r\n\r\n{{\"agent\""
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::io::AsyncReadExt::read_to_end(&mut s, &mut answer),
    )
    .await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 413"), "{read:?} {text}");
    let refused = series(
        &server,
        "sluice_heartbeats_total",
        &[("result", "too_large")],
    )
    .await;
    assert!(refused >= 3.0, "{refused}");
    server.shutdown().await;
}

/// `/debug/rollout` and `sluice_agent_versions`: agents by version and state against
/// `cluster.version` (17.2.0 here), with the skewed ones and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rollout_view_counts_versions_and_explains_skew() {
    let dir = secrets();
    let fb = RawBackend::start("fallback", false).await;
    let server = start_with(dir.path(), "", "", fb.address).await;
    let hb = server.heartbeat_addr().unwrap();
    for (id, version) in [
        ("a1", "17.2.0"),
        ("a2", "17.2.0"),
        ("a3", "17.1.0"),
        ("a4", "18.0.0"),
        ("a5", "15.0.0"),
    ] {
        let (status, body) = post(hb, &heartbeat(id, fb.address, version, &["myapp"])).await;
        assert_eq!(status, 200, "{body}");
    }
    let admin = server.admin_addr().unwrap();
    let (status, body) = http_get(admin, "/debug/rollout").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["cluster_version"], "17.2.0");
    let versions: Vec<(String, u64, u64)> = v["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["version"].as_str().unwrap().to_owned(),
                c["ready"].as_u64().unwrap(),
                c["version_skew"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        versions,
        [
            ("18.0.0".to_owned(), 0, 1),
            ("17.2.0".to_owned(), 2, 0),
            ("17.1.0".to_owned(), 1, 0),
            ("15.0.0".to_owned(), 0, 1),
        ]
    );
    let skewed: Vec<(String, String)> = v["skewed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["agent"].as_str().unwrap().to_owned(),
                s["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        skewed,
        [
            ("a4".to_owned(), "newer than cluster 17.2.0".to_owned()),
            (
                "a5".to_owned(),
                "more than one major version older than cluster 17.2.0".to_owned()
            ),
        ]
    );
    let ready = [("version", "17.2.0"), ("state", "ready")];
    assert_eq!(series(&server, "sluice_agent_versions", &ready).await, 2.0);
    // The same as a table, as an operator reads it.
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["agents", "versions", "--admin", &admin.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.starts_with("cluster version: 17.2.0\n"), "{text}");
    let row = text.lines().find(|l| l.starts_with("17.2.0")).unwrap();
    assert_eq!(
        row.split_whitespace().collect::<Vec<_>>(),
        ["17.2.0", "2", "0", "0", "0"]
    );
    assert!(
        text.contains("a4     18.0.0   newer than cluster 17.2.0"),
        "{text}"
    );
    // An agent that leaves takes its version with it from the metric.
    let (status, _) = api(hb, "DELETE", "/v1/agents/a5", Some(TOKEN), "").await;
    assert_eq!(status, 200);
    let s = scrape(admin).await;
    assert!(s
        .get(
            "sluice_agent_versions",
            &[("version", "15.0.0"), ("state", "version_skew")]
        )
        .is_none());
    server.shutdown().await;
}
