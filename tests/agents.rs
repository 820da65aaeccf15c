//! The heartbeat table and the resource router, as agents and clients see them: real
//! `sluice heartbeat` processes announcing through the main port, clients from many source
//! addresses, the API's refusals, static agents, goodbyes and the fallback pool.

mod support;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use sluice::server::Server;
use support::process::Running;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

const TOKEN: &str = "agents-token-0123456789";
const SCOPED: &str = "scoped-token-0123456789";

/// Certificate, key and tokens files in a temp dir.
fn secrets() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["sluice.test".to_owned()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), ck.key_pair.serialize_pem()).unwrap();
    std::fs::write(
        dir.path().join("tokens"),
        format!("# test tokens\n{TOKEN} name=agents\n{SCOPED} name=east kinds=db\n"),
    )
    .unwrap();
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

/// One HTTP/1.1 request over TLS (ALPN sluice-heartbeat) to a heartbeat API address.
async fn api(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let tls = sluice::tls::testing::insecure_client_config(&["sluice-heartbeat"]);
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("sluice.test").unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .expect("TLS to the heartbeat API");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "sluice.test");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = sender
        .send_request(req.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&text).into_owned())
}

fn heartbeat(agent: &str, address: SocketAddr, version: &str, apps: &[&str]) -> String {
    let resources: Vec<String> = apps
        .iter()
        .map(|a| format!(r#"{{"kind":"app","name":"{a}"}}"#))
        .collect();
    format!(
        r#"{{"agent":"{agent}","address":"{address}","version":"{version}","ttl":"60s","resources":[{}]}}"#,
        resources.join(",")
    )
}

/// Connect from `source` with a hello for `sni`; the backend's first line (its tag), or ""
/// when sluice closes the connection.
async fn visit(edge: SocketAddr, source: Ipv4Addr, sni: &str) -> String {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(IpAddr::V4(source), 0)).unwrap();
    let mut s = sock.connect(edge).await.unwrap();
    s.write_all(&sluice::tls::hello::build::hello(Some(sni), &["h2"]))
        .await
        .unwrap();
    read_line(&mut s).await
}

fn agents_for(server: &Server, name: &str) -> Vec<String> {
    let key = sluice::agents::table::ResourceKey::new("app", name);
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

/// `sluice heartbeat` for one agent, announcing `myapp` through the edge's main port.
fn agent_process(dir: &Path, edge: SocketAddr, id: &str, dial: SocketAddr) -> Running {
    let cfg = dir.join(format!("{id}.toml"));
    std::fs::write(
        &cfg,
        format!(
            r#"
server = "{edge}"
server_name = "sluice.test"
insecure = true
token_file = "{d}/token"
agent = "{id}"
address = "{dial}"
version = "17.1.0"
ttl = "60s"
interval = "200ms"

[[resource]]
kind = "app"
name = "myapp"
"#,
            d = dir.display()
        ),
    )
    .unwrap();
    heartbeat_process(&cfg)
}

/// `sluice heartbeat --config CFG`, a real second process (killed when the test ends).
fn heartbeat_process(cfg: &Path) -> Running {
    Running(
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["heartbeat", "--config"])
            .arg(cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sluice heartbeat starts"),
    )
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
    let _p2 = agent_process(dir.path(), edge, "a2", a2.address);
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
    let server = Server::start(sluice::config::Config::load(&path).unwrap())
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
        sluice::reload::reload(&server.rt, "test").await,
        sluice::reload::Outcome::Applied(_)
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
    let server = Server::start(sluice::config::Config::load(&path).unwrap())
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
        sluice::reload::reload(&server.rt, "test").await,
        sluice::reload::Outcome::Applied(_)
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
