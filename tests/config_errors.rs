//! Config errors as a user meets them. Every section of the config ([admin], [lifecycle],
//! [limits], [reload], [dns], [cluster], [heartbeat], [[listener]] incl. QUIC, [[route]] incl.
//! resource and QUIC-terminating routes, [pool.*] incl. discovery, ejection and health checks,
//! [[agent]], conf.d) gets its mistakes checked for the `path:line: key: problem — fix` shape:
//! the line the user must edit, the key path, and a fix. Then the binary: `sluice check` and
//! `sluice run` on bad configs, `sluice heartbeat` on bad agent configs, and
//! `sluice run --upgrade` when no sluice is there to take the sockets from.
//!
//! Most cases are parsed in-process (`config::parse`), which is fast; each is the small valid
//! config `BASE` with one mistake spliced in. The line an error must point at carries the
//! marker `#<` (a TOML comment), so the expected line is visible in the case itself.

mod support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sluice::config::{Config, ConfigError};
use support::process::{bound_addresses, Running};

const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// The smallest valid config the cases build on. The route matches ALPN `h2` only, so a route
/// appended after it is not shadowed by it (unless a case means it to be).
const BASE: &str = r#"[[listener]]
name = "edge"
address = "127.0.0.1:0"

[[route]]
name = "web"
alpn = ["h2"]
pool = "p"

[pool.p]
backends = ["127.0.0.1:3024"]
"#;

/// Where a case's snippet goes in `BASE`.
enum At {
    /// Before everything: global tables such as `[admin]`.
    Top,
    /// Into the listener `edge` (after its address).
    Listener,
    /// Into the route `web` (after its pool).
    Route,
    /// At the end: keys of `[pool.p]`, or whole new tables.
    End,
}

/// One mistake: the snippet (with `#<` on the line the error must point at), the key path
/// the error must name, and parts of its problem and of its fix.
struct Case {
    at: At,
    snippet: &'static str,
    key: &'static str,
    problem: &'static str,
    fix: &'static str,
}

fn case(
    at: At,
    snippet: &'static str,
    key: &'static str,
    problem: &'static str,
    fix: &'static str,
) -> Case {
    Case {
        at,
        snippet,
        key,
        problem,
        fix,
    }
}

fn build(at: &At, snippet: &str) -> String {
    match at {
        At::Top => format!("{snippet}\n\n{BASE}"),
        At::Listener => BASE.replacen(
            "address = \"127.0.0.1:0\"\n",
            &format!("address = \"127.0.0.1:0\"\n{snippet}\n"),
            1,
        ),
        At::Route => BASE.replacen("pool = \"p\"\n", &format!("pool = \"p\"\n{snippet}\n"), 1),
        At::End => format!("{BASE}\n{snippet}\n"),
    }
}

/// The 1-based line holding the `#<` marker.
fn marked_line(text: &str) -> usize {
    let marked: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains("#<"))
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(marked.len(), 1, "one `#<` marker per case:\n{text}");
    marked[0]
}

fn parse(text: &str) -> Result<Config, Vec<ConfigError>> {
    sluice::config::parse(Path::new("t.toml"), text).map_err(|e| e.0)
}

/// Each case must be refused with exactly one error (the case is valid but for its one
/// mistake), on the marked line, naming the key, the problem and a fix. `{dir}` in a snippet
/// is replaced by `dir`. Every failing case is reported, not only the first.
fn expect_each(cases: &[Case], dir: &Path) {
    let mut failures = Vec::new();
    for c in cases {
        let text = build(
            &c.at,
            &c.snippet.replace("{dir}", &dir.display().to_string()),
        );
        let line = marked_line(&text);
        let errs = match parse(&text) {
            Ok(_) => {
                failures.push(format!("accepted, expected `{}`:\n{text}", c.key));
                continue;
            }
            Err(errs) => errs,
        };
        let shown: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        let [e] = errs.as_slice() else {
            failures.push(format!(
                "{} errors, expected one on `{}`:\n{}\n{text}",
                errs.len(),
                c.key,
                shown.join("\n")
            ));
            continue;
        };
        let prefix = format!("t.toml:{line}: {}: ", c.key);
        let ok = shown[0].starts_with(&prefix)
            && e.path == Path::new("t.toml")
            && e.problem.contains(c.problem)
            && e.fix.contains(c.fix)
            && shown[0].ends_with(&format!("{} — {}", e.problem, e.fix));
        if !ok {
            failures.push(format!(
                "got:      {}\nexpected: {prefix}…{}… — …{}…\n{text}",
                shown[0], c.problem, c.fix
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

/// A certificate, its key, a tokens file and an empty file, for [heartbeat] and
/// `quic = "terminate"` cases.
fn secrets() -> tempfile::TempDir {
    let dir = support::secrets("agents-token-0123456789 name=agents\n");
    std::fs::write(dir.path().join("empty.pem"), "").unwrap();
    dir
}

// ---------------------------------------------------------------------------------------------
// In-process: one section at a time.

#[test]
fn base_config_is_valid() {
    // Every case below is this config plus one mistake: it must be valid on its own.
    let cfg = parse(BASE).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!((cfg.listeners.len(), cfg.routes.len()), (1, 1));
}

#[test]
fn admin_lifecycle_limits_reload_and_dns_errors() {
    use At::Top;
    expect_each(
        &[
            case(
                Top,
                "[admin]\naddress = \"127.0.0.1\" #<",
                "admin.address",
                "`127.0.0.1` has no port",
                "or \"\" to disable the admin API",
            ),
            case(
                Top,
                "[admin]\naddress = \"127.0.0.1:99999\" #<",
                "admin.address",
                "cannot resolve `127.0.0.1:99999`",
                "write an address like \"127.0.0.1:9901\"",
            ),
            case(
                Top,
                "[lifecycle]\ndrain_timeout = \"ten minutes\" #<",
                "lifecycle.drain_timeout",
                "`ten minutes` is not a duration",
                "write a number with a unit, e.g. \"250ms\"",
            ),
            case(
                Top,
                "[lifecycle]\ndrain_delay = \"5\" #<",
                "lifecycle.drain_delay",
                "`5` is not a duration",
                "write a number with a unit",
            ),
            case(
                Top,
                "[lifecycle]\nmin_ready = \"11years\" #<",
                "lifecycle.min_ready",
                "`11years` is longer than sluice allows (10 years)",
                "use a shorter duration",
            ),
            case(
                Top,
                "[limits]\nmax_connections = 0 #<",
                "limits.max_connections",
                "0 is out of range",
                "use a value from 1 to 10000000",
            ),
            case(
                Top,
                "[limits]\npark_idle_after = \"99ms\" #<",
                "limits.park_idle_after",
                "would park connections between the packets of one exchange",
                "use at least \"100ms\"",
            ),
            case(
                Top,
                "[reload]\nwatch = false\ndebounce = \"soon\" #<",
                "reload.debounce",
                "`soon` is not a duration",
                "write a number with a unit",
            ),
            case(
                Top,
                "[dns]\nnameservers = [\"10.96.0.10\", \"dns.google\"] #<",
                "dns.nameservers[1]",
                "`dns.google` is not an IP or IP:port",
                "write e.g. \"10.96.0.10\" or \"127.0.0.1:5353\"",
            ),
            case(
                Top,
                "[dns]\ntimeout = \"2 secs please\" #<",
                "dns.timeout",
                "is not a duration",
                "write a number with a unit",
            ),
        ],
        Path::new("."),
    );
}

#[test]
fn listener_errors() {
    use At::{End, Listener};
    expect_each(
        &[
            case(
                End,
                "[[listener]] #<\naddress = \"127.0.0.1:0\"",
                "listener[1].name",
                "missing or invalid listener name",
                "set name = \"edge\"",
            ),
            case(
                End,
                "[[listener]]\nname = \"edge two\" #<\naddress = \"127.0.0.1:0\"",
                "listener[1].name",
                "missing or invalid listener name",
                "(letters, digits, . _ -)",
            ),
            case(
                End,
                "[[listener]] #<\nname = \"edge2\"",
                "listener[1].address",
                "missing",
                "set address = \"0.0.0.0:443\"",
            ),
            case(
                End,
                "[[listener]]\nname = \"edge2\"\naddress = \"0.0.0.0\" #<",
                "listener[1].address",
                "`0.0.0.0` has no port",
                "write an address like \"0.0.0.0:443\" or \"[::]:443\"",
            ),
            case(
                Listener,
                "protocol = \"sctp\" #<",
                "listener[0].protocol",
                "unknown protocol `sctp`",
                "use \"tcp\" (TLS over TCP) or \"quic\" (QUIC over UDP)",
            ),
            case(
                Listener,
                "max_hello_size = 511 #<",
                "listener[0].max_hello_size",
                "511 is out of range",
                "use a value from 512 to 65536",
            ),
            case(
                Listener,
                "hello_timeout = \"0s\" #<",
                "listener[0].hello_timeout",
                "must be more than 0",
                "set e.g. \"10s\"",
            ),
            case(
                Listener,
                "backlog = 0 #<",
                "listener[0].backlog",
                "0 is out of range",
                "use a value from 1 to 65535",
            ),
            case(
                Listener,
                "max_connections = 0 #<",
                "listener[0].max_connections",
                "0 is out of range",
                "use a value from 1 to 10000000",
            ),
            case(
                Listener,
                "keepalive_idle = \"a minute\" #<",
                "listener[0].keepalive_idle",
                "`a minute` is not a duration",
                "write a number with a unit",
            ),
            case(
                Listener,
                "keepalive_interval = \"0s\" #<",
                "listener[0].keepalive_interval",
                "must not be 0 while keepalive is on",
                "keepalive_idle = \"0s\" to turn keepalive off",
            ),
            case(
                Listener,
                "keepalive_count = 128 #<",
                "listener[0].keepalive_count",
                "128 is out of range",
                "use a value from 1 to 127",
            ),
            case(
                Listener,
                "accept_proxy = \"v1\"\ntrusted_proxies = [\n  \"10.0.0.0/8\",\n  \"10.0.0.0/33\", #<\n]",
                "listener[0].trusted_proxies[1]",
                "`10.0.0.0/33` is not an address or CIDR block",
                "write e.g. \"10.0.0.0/8\"",
            ),
            case(
                Listener,
                "accept_proxy = \"v3\" #<",
                "listener[0].accept_proxy",
                "unknown PROXY protocol mode `v3`",
                "use one of: none, v1, v2, optional",
            ),
            case(
                Listener,
                "trusted_proxies = [\"10.0.0.0/8\"] #<",
                "listener[0].trusted_proxies",
                "has no effect without accept_proxy",
                "set accept_proxy = \"v2\" (or v1, optional), or remove trusted_proxies",
            ),
            case(
                Listener,
                "accept_proxy = \"optional\" #<",
                "listener[0].accept_proxy",
                "accept_proxy needs trusted_proxies",
                "list the load balancers' addresses",
            ),
        ],
        Path::new("."),
    );
}

#[test]
fn quic_listener_errors() {
    use At::{End, Listener};
    expect_each(
        &[
            // The QUIC keys on a TCP listener (the default protocol).
            case(
                Listener,
                "flow_idle_timeout = \"30s\" #<",
                "listener[0].flow_idle_timeout",
                "`flow_idle_timeout` applies to QUIC listeners only",
                "set protocol = \"quic\", or remove it",
            ),
            case(
                Listener,
                "protocol = \"tcp\"\nmax_flows = 10 #<",
                "listener[0].max_flows",
                "`max_flows` applies to QUIC listeners only",
                "set protocol = \"quic\"",
            ),
            case(
                Listener,
                "max_pending_flows = 10 #<",
                "listener[0].max_pending_flows",
                "`max_pending_flows` applies to QUIC listeners only",
                "set protocol = \"quic\"",
            ),
            // Bad values on a QUIC listener.
            case(
                End,
                "[[listener]]\nname = \"quic\"\naddress = \"127.0.0.1:0\"\nprotocol = \"quic\"\nflow_idle_timeout = \"0s\" #<",
                "listener[1].flow_idle_timeout",
                "must be more than 0 (flows would never be forgotten)",
                "set e.g. \"60s\"",
            ),
            case(
                End,
                "[[listener]]\nname = \"quic\"\naddress = \"127.0.0.1:0\"\nprotocol = \"quic\"\nflow_idle_timeout = \"1 hour-ish\" #<",
                "listener[1].flow_idle_timeout",
                "is not a duration",
                "write a number with a unit",
            ),
            case(
                End,
                "[[listener]]\nname = \"quic\"\naddress = \"127.0.0.1:0\"\nprotocol = \"quic\"\nmax_flows = 0 #<",
                "listener[1].max_flows",
                "0 is out of range",
                "use a value from 1 to 10000000",
            ),
            case(
                End,
                "[[listener]]\nname = \"quic\"\naddress = \"127.0.0.1:0\"\nprotocol = \"quic\"\nmax_pending_flows = 1000001 #<",
                "listener[1].max_pending_flows",
                "1000001 is out of range",
                "use a value from 1 to 1000000",
            ),
            case(
                End,
                "[[listener]]\nname = \"quic\"\naddress = \"127.0.0.1:0\"\nprotocol = \"quic\"\naccept_proxy = \"v2\" #<\ntrusted_proxies = [\"10.0.0.0/8\"]",
                "listener[1].accept_proxy",
                "a QUIC listener cannot read PROXY headers (UDP has none)",
                "remove accept_proxy from this listener",
            ),
            // Two QUIC listeners on one UDP port (a TCP and a QUIC one may share it).
            case(
                End,
                "[[listener]]\nname = \"q1\"\naddress = \"127.0.0.1:8443\"\nprotocol = \"quic\"\n\n[[listener]]\nname = \"q2\"\naddress = \"127.0.0.1:8443\" #<\nprotocol = \"quic\"",
                "listener[2].address",
                "127.0.0.1:8443 is already used by another listener",
                "give each listener its own address",
            ),
        ],
        Path::new("."),
    );
}

#[test]
fn route_errors() {
    use At::{End, Route};
    expect_each(
        &[
            case(
                End,
                "[[route]]\nname = \"no good\" #<\npool = \"p\"",
                "route[1].name",
                "route name `no good` has characters outside [A-Za-z0-9._-]",
                "rename the route",
            ),
            case(
                Route,
                "listener = [\"edge\", \"edge6\"] #<",
                "route[0].listener[1]",
                "no listener is named `edge6`",
                "use one of: edge",
            ),
            case(
                End,
                "[[route]]\nname = \"r\"\nalpn = [\"h2\", \"*\"] #<\npool = \"p\"",
                "route[1].alpn[1]",
                "`*` is not a protocol name or prefix",
                "remove the key to match anything",
            ),
            case(
                End,
                "[[route]]\nname = \"r\"\nsni = [] #<\npool = \"p\"",
                "route[1].sni",
                "an empty list matches nothing",
                "remove the key to match any SNI",
            ),
            case(
                End,
                "[[route]]\nname = \"r\"\nsni = [\n  \"a.example.com\",\n  \"b example.com\", #<\n]\npool = \"p\"",
                "route[1].sni[1]",
                "`b example.com` is not a host name, `*.suffix` or `prefix.*` pattern",
                "write \"host.example.com\", \"*.example.com\" or \"prefix.*\"",
            ),
            case(
                End,
                "[[route]]\nname = \"plain\"\ntls = false #<\nsni = [\"a.example.com\"]\npool = \"p\"",
                "route[1].tls",
                "a tls = false route cannot match alpn or sni",
                "remove alpn/sni from this route, or remove tls = false",
            ),
            case(
                End,
                "[[route]] #<\nname = \"nowhere\"\nsni = [\"a.example.com\"]",
                "route[1].pool",
                "missing",
                "set pool = \"NAME\" naming a [pool.NAME] table",
            ),
            case(
                Route,
                "idle_timeout = \"forever\" #<",
                "route[0].idle_timeout",
                "`forever` is not a duration",
                "write a number with a unit",
            ),
            // A route an earlier one (not a catch-all) fully covers.
            case(
                End,
                "[[route]] #<\nname = \"narrow\"\nalpn = [\"h2\"]\nsni = [\"a.example.com\"]\npool = \"p\"",
                "route[1]",
                "route `narrow` can never match: the earlier route `web` takes all its traffic",
                "move `narrow` above `web`, or narrow `web`",
            ),
            // The keys of resource routes on a pool route.
            case(
                Route,
                "labels = { region = \"east\" } #<",
                "route[0].labels",
                "`labels` only applies to a route with resource = { ... }",
                "a pool route takes these settings from its [pool.NAME]",
            ),
            case(
                Route,
                "affinity = \"none\" #<",
                "route[0].affinity",
                "`affinity` only applies to a route with resource",
                "remove it",
            ),
            case(
                Route,
                "connect_timeout = \"1s\" #<",
                "route[0].connect_timeout",
                "`connect_timeout` only applies to a route with resource",
                "remove it",
            ),
            case(
                Route,
                "fallback_pool = \"p\" #<",
                "route[0].fallback_pool",
                "`fallback_pool` only applies to a route with resource",
                "remove it",
            ),
            case(
                End,
                "[[route]] #<\nname = \"both\"\npool = \"p\"\nresource = { kind = \"app\", sni = \"*.apps.example.com\" }",
                "route[1]",
                "route `both` has more than one of pool, resource and serve",
                "give each route one target",
            ),
        ],
        Path::new("."),
    );
}

/// The valid resource route the cases below spoil, one key at a time.
const APPS: &str =
    "[[route]]\nname = \"apps\"\nresource = { kind = \"app\", sni = \"*.apps.example.com\" }";

#[test]
fn resource_route_errors() {
    use At::End;
    assert!(parse(&build(&End, APPS)).is_ok(), "APPS itself is valid");
    expect_each(
        &[
            case(
                End,
                "[[route]]\nname = \"apps\"\nresource = { kind = \"\", sni = \"*.apps.example.com\" } #<",
                "route[1].resource.kind",
                "missing or invalid resource kind",
                "set kind = \"app\"",
            ),
            case(
                End,
                "[[route]]\nname = \"apps\"\nresource = { kind = \"app\", sni = \"apps.example.com\" } #<",
                "route[1].resource.sni",
                "`apps.example.com` is not a `*.domain` pattern",
                "write sni = \"*.apps.example.com\"",
            ),
            case(
                End,
                "[[route]]\nname = \"apps\"\nresource = { kind = \"app\", sni = \"*.apps.example.com\" }\naffinity = \"sticky\" #<",
                "route[1].affinity",
                "unknown affinity `sticky`",
                "use client_ip, client_ip_sni or none",
            ),
            case(
                End,
                "[[route]]\nname = \"apps\"\nresource = { kind = \"app\", sni = \"*.apps.example.com\" }\npick = \"first\" #<",
                "route[1].pick",
                "unknown pick `first`",
                "p2c (fewer active connections of two) or rendezvous",
            ),
            case(
                End,
                "[[route]]\nname = \"apps\"\nresource = { kind = \"app\", sni = \"*.apps.example.com\" }\nfallback_pool = \"spare\" #<",
                "route[1].fallback_pool",
                "no pool is named `spare`",
                "use one of: p — or define [pool.spare]",
            ),
            case(
                End,
                "[[route]]\nname = \"apps\"\nresource = { kind = \"app\", sni = \"*.apps.example.com\" }\nproxy_protocol = \"v3\" #<",
                "route[1].proxy_protocol",
                "unknown PROXY protocol version `v3`",
                "use \"none\", \"v1\" or \"v2\"",
            ),
            case(
                End,
                "[[route]]\nname = \"apps\"\nresource = { kind = \"app\", sni = \"*.apps.example.com\" }\nconnect_timeout = \"0s\" #<",
                "route[1].connect_timeout",
                "must be more than 0",
                "set e.g. \"3s\"",
            ),
            case(
                End,
                "[[route]]\nname = \"apps\"\nresource = { kind = \"app\", sni = \"*.apps.example.com\" }\nmax_sessions = 0 #<",
                "route[1].max_sessions",
                "0 is out of range",
                "use a value from 1 to 100000000",
            ),
            case(
                End,
                "[[route]]\nname = \"apps\"\nresource = { kind = \"app\", sni = \"*.apps.example.com\" }\nsession_idle_ttl = \"a while\" #<",
                "route[1].session_idle_ttl",
                "`a while` is not a duration",
                "write a number with a unit",
            ),
            case(
                End,
                "[[route]]\nname = \"agents\"\nalpn = [\"sluice-heartbeat\"]\nserve = \"metrics\" #<\n\n[heartbeat]\ncert_file = \"{dir}/cert.pem\"\nkey_file = \"{dir}/key.pem\"\ntokens_file = \"{dir}/tokens\"",
                "route[1].serve",
                "sluice cannot serve `metrics`",
                "use serve = \"heartbeat\"",
            ),
        ],
        secrets().path(),
    );
}

#[test]
fn quic_route_errors() {
    use At::{End, Route};
    let dir = secrets();
    // The valid form first, so that each case below fails only by its mistake.
    let good = build(
        &Route,
        &format!(
            "quic = \"terminate\"\ncert_file = \"{d}/cert.pem\"\nkey_file = \"{d}/key.pem\"",
            d = dir.path().display()
        ),
    );
    assert!(parse(&good).is_ok(), "{good}");
    expect_each(
        &[
            case(
                Route,
                "quic = \"sometimes\" #<",
                "route[0].quic",
                "unknown QUIC mode `sometimes`",
                "use \"passthrough\" (the default) or \"terminate\"",
            ),
            case(
                Route,
                "quic = \"passthrough\"\nkey_file = \"{dir}/key.pem\" #<",
                "route[0].key_file",
                "`key_file` only applies with quic = \"terminate\"",
                "passthrough needs no certificate",
            ),
            // Without its certificate: the error points at the route (no cert_file line).
            case(
                End,
                "[[route]] #<\nname = \"q\"\nsni = [\"q.example.com\"]\npool = \"p\"\nquic = \"terminate\"",
                "route[1].cert_file",
                "quic = \"terminate\" needs the certificate sluice presents",
                "set cert_file and key_file (PEM)",
            ),
            case(
                Route,
                "quic = \"terminate\"\ncert_file = \"{dir}/missing.pem\" #<\nkey_file = \"{dir}/key.pem\"",
                "route[0].cert_file",
                "missing.pem",
                "give a PEM certificate chain and its PEM private key",
            ),
            case(
                Route,
                "quic = \"terminate\"\ncert_file = \"{dir}/empty.pem\" #<\nkey_file = \"{dir}/key.pem\"",
                "route[0].cert_file",
                "empty.pem holds no certificate",
                "give a PEM certificate chain",
            ),
            case(
                End,
                "[[route]]\nname = \"apps\"\nresource = { kind = \"app\", sni = \"*.apps.example.com\" }\nquic = \"terminate\" #<",
                "route[1].quic",
                "quic = \"terminate\" bridges streams to a pool's TCP backends",
                "give this route a pool = \"NAME\"",
            ),
        ],
        dir.path(),
    );
}

#[test]
fn pool_errors() {
    use At::End;
    expect_each(
        &[
            case(
                End,
                "[pool.\"a b\"] #<\nbackends = [\"127.0.0.1:3025\"]",
                "pool.a b",
                "pool name `a b` has characters outside [A-Za-z0-9._-]",
                "rename the pool",
            ),
            case(
                End,
                "[pool.q]\nbackends = [] #<",
                "pool.q.backends",
                "the pool has no backends",
                "or dns = [\"name:port\"] / srv = [\"_service._tcp.name\"]",
            ),
            case(
                End,
                "[pool.q]\nbackends = [\n  \"127.0.0.1:3025\",\n  \"127.0.0.1\", #<\n]",
                "pool.q.backends[1]",
                "`127.0.0.1` has no port",
                "write \"host:port\" with a name this machine can resolve, or an IP",
            ),
            case(
                End,
                "[pool.q]\nbackends = [\n  \"127.0.0.1:3025\",\n  { address = \"127.0.0.2:3025\", weight = 1001 }, #<\n]",
                "pool.q.backends[1].weight",
                "1001 is out of range",
                "use a value from 0 to 1000",
            ),
            case(
                End,
                "balance = \"fastest\" #<",
                "pool.p.balance",
                "unknown balancer `fastest`",
                "use one of random, round_robin, least_conn, p2c, hash",
            ),
            case(
                End,
                "balance = \"hash\"\nhash_key = \"cookie\" #<",
                "pool.p.hash_key",
                "unknown hash key `cookie`",
                "use \"client_ip\" or \"sni\"",
            ),
            case(
                End,
                "balance = \"least_conn\"\nhash_key = \"sni\" #<",
                "pool.p.hash_key",
                "hash_key only applies to balance = \"hash\"",
                "remove hash_key or set balance = \"hash\"",
            ),
            case(
                End,
                "retries = 17 #<",
                "pool.p.retries",
                "17 is out of range",
                "use a value from 0 to 16",
            ),
            case(
                End,
                "proxy_protocol = \"v3\" #<",
                "pool.p.proxy_protocol",
                "unknown PROXY protocol version `v3`",
                "use \"none\", \"v1\" or \"v2\"",
            ),
            case(
                End,
                "connect_timeout = \"0ms\" #<",
                "pool.p.connect_timeout",
                "must be more than 0",
                "set e.g. \"3s\"",
            ),
            case(
                End,
                "keepalive_idle = \"30s\"\nkeepalive_interval = \"0s\" #<",
                "pool.p.keepalive_interval",
                "must not be 0 while keepalive is on",
                "set e.g. \"15s\"",
            ),
            case(
                End,
                "keepalive_count = 0 #<",
                "pool.p.keepalive_count",
                "0 is out of range",
                "use a value from 1 to 127",
            ),
            case(
                End,
                "min_ready = \"warm\" #<",
                "pool.p.min_ready",
                "`warm` is not a duration",
                "write a number with a unit",
            ),
            case(
                End,
                "removed_drain_timeout = \"20years\" #<",
                "pool.p.removed_drain_timeout",
                "`20years` is longer than sluice allows",
                "use a shorter duration",
            ),
            case(
                End,
                "all_unhealthy = \"panic\" #<",
                "pool.p.all_unhealthy",
                "unknown mode `panic`",
                "use fail_open (use unhealthy backends when none is healthy) or fail_closed",
            ),
        ],
        Path::new("."),
    );
}

#[test]
fn pool_ejection_errors() {
    use At::End;
    expect_each(
        &[
            case(
                End,
                "eject_after_failures = 1001 #<",
                "pool.p.eject_after_failures",
                "1001 is out of range",
                "use a value from 0 to 1000",
            ),
            case(
                End,
                "eject_after_failures = -1 #<",
                "pool.p.eject_after_failures",
                "-1 is out of range",
                "use a value from 0 to 1000",
            ),
            case(
                End,
                "eject_after_failures = 3\neject_time = \"10m\"\neject_max_time = \"5m\" #<",
                "pool.p.eject_max_time",
                "eject_time must be more than 0 and at most eject_max_time",
                "e.g. eject_time = \"30s\", eject_max_time = \"5m\"",
            ),
            case(
                End,
                "eject_after_failures = 3\neject_time = \"0s\"\neject_max_time = \"1m\" #<",
                "pool.p.eject_max_time",
                "eject_time must be more than 0",
                "eject_time = \"30s\"",
            ),
            case(
                End,
                "eject_time = \"thirty seconds\" #<",
                "pool.p.eject_time",
                "`thirty seconds` is not a duration",
                "write a number with a unit",
            ),
            case(
                End,
                "eject_after_failures = 3\neject_max_time = \"11years\" #<",
                "pool.p.eject_max_time",
                "`11years` is longer than sluice allows",
                "use a shorter duration",
            ),
            case(
                End,
                "eject_after_failures = 3\nmax_ejected_percent = 101 #<",
                "pool.p.max_ejected_percent",
                "101 is out of range",
                "use a value from 0 to 100",
            ),
        ],
        Path::new("."),
    );
}

#[test]
fn pool_discovery_errors() {
    use At::End;
    expect_each(
        &[
            case(
                End,
                "[pool.q]\ndns = [\"proxy.example.com\"] #<",
                "pool.q.dns[0]",
                "`proxy.example.com` is not name:port",
                "write e.g. \"proxy.teleport.svc.cluster.local:3024\"",
            ),
            case(
                End,
                "[pool.q]\ndns = [\n  \"proxy.example.com:3024\",\n  \"10.0.0.1:3024\", #<\n]",
                "pool.q.dns[1]",
                "`10.0.0.1:3024` is not name:port",
                "(an IP belongs in backends)",
            ),
            case(
                End,
                "[pool.q]\ndns = [\"proxy.example.com:0\"] #<",
                "pool.q.dns[0]",
                "`proxy.example.com:0` is not name:port",
                "write e.g.",
            ),
            case(
                End,
                "[pool.q]\nsrv = [\"tunnel.example.com\"] #<",
                "pool.q.srv[0]",
                "`tunnel.example.com` is not an SRV name",
                "(the port comes from the record)",
            ),
            case(
                End,
                "[pool.q]\nsrv = [\"_tunnel._tcp.example.com:3024\"] #<",
                "pool.q.srv[0]",
                "is not an SRV name",
                "write e.g. \"_reversetunnel._tcp.proxy.example.com\"",
            ),
            case(
                End,
                "[pool.q]\ndns = [\"proxy.example.com:3024\"]\ndns_min_refresh = \"10m\"\ndns_max_refresh = \"5m\" #<",
                "pool.q.dns_max_refresh",
                "dns_min_refresh must be more than 0 and at most dns_max_refresh",
                "e.g. dns_min_refresh = \"1s\", dns_max_refresh = \"5m\"",
            ),
            case(
                End,
                "[pool.q]\nsrv = [\"_tunnel._tcp.example.com\"]\ndns_min_refresh = \"0s\"\ndns_max_refresh = \"1m\" #<",
                "pool.q.dns_max_refresh",
                "dns_min_refresh must be more than 0",
                "dns_min_refresh = \"1s\"",
            ),
            case(
                End,
                "[pool.q]\ndns = [\"proxy.example.com:3024\"]\ndns_min_refresh = \"often\" #<",
                "pool.q.dns_min_refresh",
                "`often` is not a duration",
                "write a number with a unit",
            ),
        ],
        Path::new("."),
    );
}

#[test]
fn pool_health_check_errors() {
    use At::End;
    expect_each(
        &[
            case(
                End,
                "[pool.p.health] #<\ninterval = \"5s\"",
                "pool.p.health.kind",
                "missing",
                "set kind = \"tcp\" (or tls, http, h2)",
            ),
            case(
                End,
                "[pool.p.health]\nkind = \"icmp\" #<",
                "pool.p.health.kind",
                "unknown check kind `icmp`",
                "use one of: tcp, tls, http, h2",
            ),
            case(
                End,
                "[pool.p.health]\nkind = \"tcp\"\ninterval = \"0s\" #<",
                "pool.p.health.interval",
                "must be more than 0",
                "set e.g. \"5s\"",
            ),
            case(
                End,
                "[pool.p.health]\nkind = \"tcp\"\ntimeout = \"0s\" #<",
                "pool.p.health.timeout",
                "must be more than 0",
                "set e.g.",
            ),
            case(
                End,
                "[pool.p.health]\nkind = \"tcp\"\njitter = \"some\" #<",
                "pool.p.health.jitter",
                "`some` is not a duration",
                "write a number with a unit",
            ),
            case(
                End,
                "[pool.p.health]\nkind = \"tcp\"\nrise = 0 #<",
                "pool.p.health.rise",
                "0 is out of range",
                "use a value from 1 to 100",
            ),
            case(
                End,
                "[pool.p.health]\nkind = \"tcp\"\nfall = 101 #<",
                "pool.p.health.fall",
                "101 is out of range",
                "use a value from 1 to 100",
            ),
            case(
                End,
                "[pool.p.health]\nkind = \"http\"\npath = \"healthz\" #<",
                "pool.p.health.path",
                "`healthz` is not a request path",
                "write e.g. \"/healthz\"",
            ),
            case(
                End,
                "[pool.p.health]\nkind = \"http\"\npath = \"/health z\" #<",
                "pool.p.health.path",
                "`/health z` is not a request path",
                "write e.g. \"/healthz\"",
            ),
            case(
                End,
                "[pool.p.health]\nkind = \"http\"\nexpect_status = \"600\" #<",
                "pool.p.health.expect_status",
                "not a status code or range",
                "write e.g. \"200\" or \"200-399\"",
            ),
            case(
                End,
                "[pool.p.health]\nkind = \"h2\"\nexpect_status = \"399-200\" #<",
                "pool.p.health.expect_status",
                "not a status code or range",
                "\"200-399\"",
            ),
            case(
                End,
                "[pool.p.health]\nkind = \"http\"\nexpect_status = \"ok\" #<",
                "pool.p.health.expect_status",
                "not a status code or range",
                "\"200\"",
            ),
            case(
                End,
                "[pool.p.health]\nkind = \"tls\"\nalpn = [\"h2\", \"\"] #<",
                "pool.p.health.alpn",
                "ALPN names are 1 to 255 bytes",
                "fix the list",
            ),
            case(
                End,
                "[pool.p.health]\nkind = \"tcp\" #<\nsni = \"proxy.example.com\"",
                "pool.p.health.kind",
                "a tcp check has no TLS settings",
                "use kind = \"tls\", or remove tls/sni/alpn",
            ),
            case(
                End,
                "[pool.p.health]\nkind = \"tls\"\ntls = false #<",
                "pool.p.health.tls",
                "a tls check is always TLS",
                "remove tls = false",
            ),
        ],
        Path::new("."),
    );
}

#[test]
fn cluster_and_heartbeat_errors() {
    use At::{End, Top};
    let dir = secrets();
    // A served heartbeat API with everything it needs is valid; the cases take one thing away
    // or spoil one value.
    let good = build(
        &Top,
        &format!(
            "[heartbeat]\naddress = \"127.0.0.1:0\"\ncert_file = \"{d}/cert.pem\"\nkey_file = \"{d}/key.pem\"\ntokens_file = \"{d}/tokens\"",
            d = dir.path().display()
        ),
    );
    assert!(parse(&good).is_ok(), "{good}");
    expect_each(
        &[
            case(
                Top,
                "[cluster]\nversion = \"seventeen\" #<",
                "cluster.version",
                "`seventeen` is not a version",
                "write major.minor.patch, e.g. \"17.2.1\"",
            ),
            case(
                Top,
                "[heartbeat]\naddress = \"0.0.0.0\" #<\ncert_file = \"{dir}/cert.pem\"\nkey_file = \"{dir}/key.pem\"\ntokens_file = \"{dir}/tokens\"",
                "heartbeat.address",
                "`0.0.0.0` has no port",
                "write an address like \"0.0.0.0:3025\"",
            ),
            case(
                Top,
                "[heartbeat] #<\naddress = \"127.0.0.1:0\"\ntokens_file = \"{dir}/tokens\"",
                "heartbeat.cert_file",
                "the heartbeat API is served but has no certificate",
                "set cert_file and key_file under [heartbeat]",
            ),
            case(
                Top,
                "[heartbeat] #<\ncert_file = \"{dir}/cert.pem\"\ntokens_file = \"{dir}/tokens\"",
                "heartbeat.key_file",
                "cert_file and key_file go together",
                "set both, or neither",
            ),
            case(
                Top,
                "[heartbeat] #<\naddress = \"127.0.0.1:0\"\ncert_file = \"{dir}/cert.pem\"\nkey_file = \"{dir}/key.pem\"",
                "heartbeat.tokens_file",
                "the heartbeat API would accept anyone's heartbeats",
                "set tokens_file (bearer tokens) and/or client_ca_file",
            ),
            case(
                Top,
                "[heartbeat]\ntokens_file = \"{dir}/no-such-tokens\" #<",
                "heartbeat.tokens_file",
                "cannot read",
                "check the path and its permissions",
            ),
            case(
                Top,
                "[heartbeat]\ncert_file = \"{dir}/empty.pem\" #<\nkey_file = \"{dir}/key.pem\"\ntokens_file = \"{dir}/tokens\"",
                "heartbeat.cert_file",
                "empty.pem holds no certificate",
                "give a PEM certificate chain and its PEM private key",
            ),
            case(
                Top,
                "[heartbeat]\ncert_file = \"{dir}/cert.pem\" #<\nkey_file = \"{dir}/empty.pem\"\ntokens_file = \"{dir}/tokens\"",
                "heartbeat.cert_file",
                "no usable private key",
                "give a PEM certificate chain",
            ),
            case(
                Top,
                "[heartbeat]\ncert_file = \"{dir}/cert.pem\" #<\nkey_file = \"{dir}/key.pem\"\nclient_ca_file = \"{dir}/no-such-ca.pem\"",
                "heartbeat.cert_file",
                "cannot read",
                "give a PEM certificate chain",
            ),
            case(
                Top,
                "[heartbeat]\nmax_ttl = \"1m\"\ndefault_ttl = \"2m\" #<",
                "heartbeat.default_ttl",
                "default_ttl and max_ttl must be more than 0, and default_ttl at most max_ttl",
                "e.g. default_ttl = \"90s\", max_ttl = \"15m\"",
            ),
            case(
                Top,
                "[heartbeat]\nmin_ready = \"a bit\" #<",
                "heartbeat.min_ready",
                "`a bit` is not a duration",
                "write a number with a unit",
            ),
            case(
                Top,
                "[heartbeat]\nkeep_expired = \"20years\" #<",
                "heartbeat.keep_expired",
                "is longer than sluice allows",
                "use a shorter duration",
            ),
            case(
                Top,
                "[heartbeat]\nmax_body_bytes = 1023 #<",
                "heartbeat.max_body_bytes",
                "1023 is out of range",
                "use a value from 1024 to 67108864",
            ),
            case(
                Top,
                "[heartbeat]\nmax_resources = 0 #<",
                "heartbeat.max_resources",
                "0 is out of range",
                "use a value from 1 to 1000000",
            ),
            case(
                Top,
                "[heartbeat]\nmax_agents = 100000001 #<",
                "heartbeat.max_agents",
                "100000001 is out of range",
                "use a value from 1 to 100000000",
            ),
            // A `serve = "heartbeat"` route wants the API served, as `address` does.
            case(
                End,
                "[heartbeat] #<\ntokens_file = \"{dir}/tokens\"\n\n[[route]]\nname = \"agents\"\nalpn = [\"sluice-heartbeat\"]\nserve = \"heartbeat\"",
                "heartbeat.cert_file",
                "the heartbeat API is served but has no certificate",
                "set cert_file and key_file",
            ),
        ],
        dir.path(),
    );
}

#[test]
fn static_agent_errors() {
    use At::End;
    expect_each(
        &[
            case(
                End,
                "[[agent]] #<\naddress = \"127.0.0.1:3022\"",
                "agent[0].id",
                "missing, or not 1 to 256 of [A-Za-z0-9._:-]",
                "set id = \"agent-1\"",
            ),
            case(
                End,
                "[[agent]]\nid = \"agent one\" #<\naddress = \"127.0.0.1:3022\"",
                "agent[0].id",
                "missing, or not 1 to 256 of [A-Za-z0-9._:-]",
                "set id = \"agent-1\"",
            ),
            case(
                End,
                "[[agent]] #<\nid = \"a1\"",
                "agent[0].address",
                "missing",
                "write \"host:port\" where the agent listens",
            ),
            case(
                End,
                "[[agent]]\nid = \"a1\"\naddress = \"127.0.0.1\" #<",
                "agent[0].address",
                "`127.0.0.1` has no port",
                "write \"host:port\" where the agent listens",
            ),
            case(
                End,
                "[[agent]]\nid = \"a1\"\naddress = \"127.0.0.1:3022\"\nversion = \"latest\" #<",
                "agent[0].version",
                "`latest` is not a version",
                "write e.g. \"17.2.1\"",
            ),
            case(
                End,
                "[[agent]]\nid = \"a1\"\naddress = \"127.0.0.1:3022\"\nresources = [\n  { kind = \"app\", name = \"myapp\" },\n  { kind = \"app\", name = \"MyApp\" }, #<\n]",
                "agent[0].resources[1]",
                "a name of [a-z0-9._-] (names are matched against the lowercased SNI)",
                "write { kind = \"app\", name = \"myapp\" }",
            ),
            case(
                End,
                "[[agent]]\nid = \"a1\"\naddress = \"127.0.0.1:3022\"\nresources = [{ name = \"myapp\" }] #<",
                "agent[0].resources[0]",
                "a resource needs a kind",
                "write { kind = \"app\", name = \"myapp\" }",
            ),
        ],
        Path::new("."),
    );
}

/// Two things of one kind under one name (or address) are refused, on the second one.
#[test]
fn duplicate_names_are_errors() {
    use At::End;
    expect_each(
        &[
            case(
                End,
                "[[listener]]\nname = \"edge\" #<\naddress = \"127.0.0.1:0\"",
                "listener[1].name",
                "listener name `edge` is used twice",
                "give each listener its own name",
            ),
            case(
                End,
                "[[listener]]\nname = \"edge-a\"\naddress = \"127.0.0.1:8443\"\n\n[[listener]]\nname = \"edge-b\"\naddress = \"127.0.0.1:8443\" #<",
                "listener[2].address",
                "127.0.0.1:8443 is already used by another listener",
                "give each listener its own address",
            ),
            case(
                End,
                "[[route]]\nname = \"web\" #<\nalpn = [\"http/1.1\"]\npool = \"p\"",
                "route[1].name",
                "route name `web` is used twice",
                "give each route its own name (names label metrics and logs)",
            ),
            case(
                End,
                "[[route]]\npool = \"p\"\nalpn = [\"a\"]\n\n[[route]]\nname = \"route1\" #<\nalpn = [\"b\"]\npool = \"p\"",
                "route[2].name",
                "route name `route1` is used twice",
                "give each route its own name",
            ),
            case(
                End,
                "[[agent]]\nid = \"a1\"\naddress = \"127.0.0.1:3022\"\n\n[[agent]]\nid = \"a1\" #<\naddress = \"127.0.0.1:3023\"",
                "agent[1].id",
                "agent `a1` is listed twice",
                "give each agent its own id",
            ),
            case(
                End,
                "[pool.q]\nbackends = [\n  \"127.0.0.1:3025\",\n  { address = \"127.0.0.1:3025\", weight = 2 }, #<\n]",
                "pool.q.backends[1]",
                "backend `127.0.0.1:3025` (127.0.0.1:3025) is listed twice",
                "remove the duplicate, or use `weight` to give it more traffic",
            ),
            // A pool defined twice in one file is a TOML error, on the second header.
            case(
                End,
                "[pool.p] #<\nbackends = [\"127.0.0.1:3025\"]",
                "p",
                "duplicate key",
                "fix the TOML at this line",
            ),
        ],
        Path::new("."),
    );
}

/// An unknown key stops parsing at its line, in every section (nested tables included).
#[test]
fn unknown_keys_are_refused_in_every_section() {
    use At::{End, Listener, Route, Top};
    let unknown = |at, snippet, key| {
        case(
            at,
            snippet,
            key,
            "unknown field",
            "remove the key or fix its spelling (see docs/config.md)",
        )
    };
    expect_each(
        &[
            unknown(Top, "[admin]\nadress = \"127.0.0.1:9901\" #<", "adress"),
            unknown(Top, "[lifecycle]\ndrain = \"5s\" #<", "drain"),
            unknown(Top, "[limits]\nmax_conns = 10 #<", "max_conns"),
            unknown(Top, "[reload]\nwatched = true #<", "watched"),
            unknown(Top, "[dns]\nservers = [\"10.0.0.1\"] #<", "servers"),
            unknown(Top, "[cluster]\nversoin = \"17.0.0\" #<", "versoin"),
            unknown(Top, "[heartbeat]\ntoken_file = \"x\" #<", "token_file"),
            unknown(Top, "[admn] #<\naddress = \"\"", "admn"),
            unknown(Listener, "max_flow = 10 #<", "max_flow"),
            unknown(Route, "idle = \"1h\" #<", "idle"),
            unknown(End, "eject_after = 3 #<", "eject_after"),
            unknown(
                End,
                "[pool.p.health]\nkind = \"tcp\"\nintervall = \"1s\" #<",
                "intervall",
            ),
            unknown(
                End,
                "[[agent]]\nid = \"a1\"\naddress = \"127.0.0.1:3022\"\nlabel = { a = \"b\" } #<",
                "label",
            ),
        ],
        Path::new("."),
    );
}

/// The tokens file is read at load: its problems name that file and its own lines.
#[test]
fn tokens_file_errors_point_into_the_tokens_file() {
    let dir = secrets();
    let tokens = dir.path().join("bad-tokens");
    std::fs::write(
        &tokens,
        "# agents\n\
         short\n\
         0123456789abcdef0123 colour=red\n\
         0123456789abcdef0123\n\
         fedcba98765432100123 name=cert\n",
    )
    .unwrap();
    let text = format!(
        "[heartbeat]\ntokens_file = \"{}\"\n\n{BASE}",
        tokens.display()
    );
    let shown: Vec<String> = parse(&text)
        .unwrap_err()
        .iter()
        .map(|e| e.to_string())
        .collect();
    let t = tokens.display();
    let fix =
        "write one token of 16+ characters per line, then optional name=, kinds=a,b, labels=k=v";
    assert_eq!(
        shown,
        [
            format!("{t}:2: (token): token shorter than 16 characters (easy to guess) — {fix}"),
            format!("{t}:3: (token): unknown field `colour=red` (expected name=, kinds=, labels=) — {fix}"),
            format!("{t}:4: (token): the same token is listed twice — {fix}"),
            format!("{t}:5: (token): token name `cert` is taken (names must be unique; `cert` and `config` are reserved) — {fix}"),
        ]
    );
}

/// Mistakes that do not fit the one-error table: an empty ALPN list (also reported as a route
/// that can never match), and a pool reference when no pool exists at all.
#[test]
fn empty_alpn_list_and_a_config_without_pools() {
    let text = build(
        &At::End,
        "[[route]]\nname = \"none\"\nalpn = [] #<\npool = \"p\"",
    );
    let shown: Vec<String> = parse(&text)
        .unwrap_err()
        .iter()
        .map(|e| e.to_string())
        .collect();
    let want = format!(
        "t.toml:{}: route[1].alpn: an empty list matches nothing — list protocols, or remove the key to match any ALPN",
        marked_line(&text)
    );
    assert!(shown.contains(&want), "{shown:#?}");

    let text = "[[listener]]\nname = \"edge\"\naddress = \"127.0.0.1:0\"\n\n[[route]]\nname = \"all\"\npool = \"p\"\n";
    let shown: Vec<String> = parse(text)
        .unwrap_err()
        .iter()
        .map(|e| e.to_string())
        .collect();
    assert_eq!(
        shown,
        ["t.toml:7: route[0].pool: no pool is named `p` — define it as [pool.NAME] with backends"]
    );
}

/// What is missing altogether has no line: the error names the key and the fix.
#[test]
fn missing_sections_are_reported_without_a_line() {
    let shown: Vec<String> = parse("# nothing yet\n")
        .unwrap_err()
        .iter()
        .map(|e| e.to_string())
        .collect();
    assert_eq!(
        shown,
        [
            "t.toml: listener: no listener is configured — add a [[listener]] with name and address, e.g. address = \"0.0.0.0:443\"",
            "t.toml: route: no route is configured — add a [[route]] with a pool (a route without match keys takes everything TLS)",
        ]
    );

    // A `serve = "heartbeat"` route without any [heartbeat] table: both of what the API needs.
    let text = format!(
        "{BASE}\n[[route]]\nname = \"agents\"\nalpn = [\"sluice-heartbeat\"]\nserve = \"heartbeat\"\n"
    );
    let errs = parse(&text).unwrap_err();
    let shown: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
    assert_eq!(
        shown,
        [
            "t.toml: heartbeat.cert_file: the heartbeat API is served but has no certificate — set cert_file and key_file under [heartbeat] (agents connect with TLS)",
            "t.toml: heartbeat.tokens_file: the heartbeat API would accept anyone's heartbeats — set tokens_file (bearer tokens) and/or client_ca_file (client certificates)",
        ]
    );
}

/// conf.d files: each error names the file it is in and the line and index there.
#[test]
fn conf_d_errors_name_their_own_file_line_and_index() {
    let main = format!("{BASE}\n[[agent]]\nid = \"a1\"\naddress = \"127.0.0.1:3022\"\n");
    let extra = "\
[cluster]
version = \"17.0.0\"

[pool.p]
backends = [\"127.0.0.2:3024\"]

[[agent]]
id = \"a2\"
address = \"127.0.0.1\"
";
    let files = [
        (PathBuf::from("main.toml"), main),
        (PathBuf::from("conf.d/10-extra.toml"), extra.to_owned()),
    ];
    let shown: Vec<String> = sluice::config::parse_files(&files)
        .unwrap_err()
        .0
        .iter()
        .map(|e| e.to_string())
        .collect();
    assert_eq!(
        shown,
        [
            "conf.d/10-extra.toml:1: cluster: [cluster] may only be set in the main config file — move it to main.toml",
            "conf.d/10-extra.toml:4: pool.p: pool `p` is already defined in main.toml — define each pool in one file only",
            // Merged it is agent[1]; in its own file it is the first.
            "conf.d/10-extra.toml:9: agent[0].address: `127.0.0.1` has no port — write \"host:port\" where the agent listens",
        ]
    );
}

/// The bounds are inclusive and sharing a port across protocols is allowed: validation is not
/// stricter than docs/config.md says.
#[test]
fn values_at_their_bounds_are_accepted() {
    let text = format!(
        r#"{BASE}
[pool.p.health]
kind = "http"
rise = 100
fall = 1
expect_status = "204"

[pool.q]
backends = [{{ address = "127.0.0.1:3025", weight = 1000 }}]
balance = "hash"
hash_key = "sni"
retries = 16
keepalive_count = 127
eject_after_failures = 1000
eject_time = "5m"
eject_max_time = "5m"
max_ejected_percent = 100

[pool.d]
dns = ["proxy.example.com:3024"]
srv = ["_tunnel._tcp.example.com"]
dns_min_refresh = "1m"
dns_max_refresh = "1m"

[[listener]]
name = "tcp"
address = "127.0.0.1:8443"
max_hello_size = 65536
backlog = 65535

[[listener]]
name = "udp"
address = "127.0.0.1:8443"
protocol = "quic"
max_flows = 10000000
max_pending_flows = 1000000

[[listener]]
name = "small"
address = "127.0.0.1:0"
max_hello_size = 512
keepalive_idle = "0s"
keepalive_interval = "0s"
"#
    );
    let cfg = parse(&text).unwrap_or_else(|e| panic!("{e:?}\n{text}"));
    assert_eq!(cfg.listeners.len(), 4);
    assert_eq!(cfg.listeners[2].quic.max_flows, 10_000_000);
    assert_eq!(cfg.pools["q"].ejection.unwrap().max_percent, 100);
}

// ---------------------------------------------------------------------------------------------
// The binary.

/// What a finished `sluice` command showed: exit code, stdout, stderr, and how long it took.
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// Run `sluice ARGS` to its end, which must come within `limit` (the child is killed and the
/// test fails otherwise).
fn sluice(args: &[&str], limit: Duration) -> Outcome {
    let started = Instant::now();
    let mut child = Running(
        Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Read both pipes on threads, so the child never blocks on a full one.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = pipe.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > limit {
            drop(child);
            panic!(
                "`sluice {}` still running after {limit:?}; stderr:\n{}",
                args.join(" "),
                err.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = started.elapsed();
    Outcome {
        code: status.code(),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
        took,
    }
}

/// One mistake in each section, in one file: `sluice check` reports them all, one line each,
/// with the file's real path, and exits 1.
#[test]
fn check_reports_a_mistake_in_every_section_in_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    std::fs::write(
        &path,
        r#"[admin]
address = "127.0.0.1"
[lifecycle]
drain_delay = "5 sec-ish"
[limits]
max_connections = 0
[reload]
debounce = "soon"
[dns]
nameservers = ["dns.google"]
[cluster]
version = "seventeen"
[heartbeat]
max_resources = 0

[[listener]]
name = "edge"
address = "127.0.0.1:0"
max_flows = 10

[[route]]
name = "apps"
resource = { kind = "app", sni = "*.apps.example.com" }
pick = "first"

[pool.p]
backends = ["127.0.0.1:3024"]
eject_after_failures = 3
eject_time = "10m"
eject_max_time = "5m"

[pool.p.health]
kind = "icmp"

[[agent]]
id = "a1"
address = "127.0.0.1:3022"
version = "latest"
"#,
    )
    .unwrap();
    let p = path.display().to_string();
    let run = sluice(&["check", "--config", &p], Duration::from_secs(10));
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert_eq!(run.stdout, "", "errors go to stderr only");
    let expected = [
        "2: admin.address: `127.0.0.1` has no port — ",
        "4: lifecycle.drain_delay: `5 sec-ish` is not a duration",
        "6: limits.max_connections: 0 is out of range — use a value from 1 to 10000000",
        "8: reload.debounce: `soon` is not a duration",
        "10: dns.nameservers[0]: `dns.google` is not an IP or IP:port — ",
        "30: pool.p.eject_max_time: eject_time must be more than 0 and at most eject_max_time — ",
        "33: pool.p.health.kind: unknown check kind `icmp` — use one of: tcp, tls, http, h2",
        "19: listener[0].max_flows: `max_flows` applies to QUIC listeners only — ",
        "24: route[0].pick: unknown pick `first` — ",
        "12: cluster.version: `seventeen` is not a version — ",
        "14: heartbeat.max_resources: 0 is out of range — ",
        "38: agent[0].version: `latest` is not a version — ",
    ];
    // Each expected error once, in whatever order validation finds them.
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), expected.len(), "{}", run.stderr);
    for want in expected {
        let want = format!("{p}:{want}");
        assert_eq!(
            lines.iter().filter(|l| l.starts_with(&want)).count(),
            1,
            "expected one line `{want}…` in:\n{}",
            run.stderr
        );
    }
}

/// conf.d beside the config is read by `sluice check`: errors in it name that file.
#[test]
fn check_reads_conf_d_and_names_the_file_of_each_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, BASE).unwrap();
    std::fs::create_dir(dir.path().join("conf.d")).unwrap();
    let extra = dir.path().join("conf.d/20-agents.toml");
    std::fs::write(
        &extra,
        "[heartbeat]\nmax_agents = 10\n\n[[listener]]\nname = \"edge\"\naddress = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let run = sluice(
        &["check", "--config", &path.display().to_string()],
        Duration::from_secs(10),
    );
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    let e = extra.display();
    assert_eq!(
        run.stderr,
        format!(
            "{e}:1: heartbeat: [heartbeat] may only be set in the main config file — move it to {main}\n\
             {e}:5: listener[0].name: listener name `edge` is used twice — give each listener its own name\n",
            main = path.display()
        )
    );

    // Fixed, the same pair of files passes.
    std::fs::write(
        &extra,
        "[[listener]]\nname = \"edge2\"\naddress = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let run = sluice(
        &["check", "--config", &path.display().to_string()],
        Duration::from_secs(10),
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stdout
            .ends_with(": ok (2 listeners, 1 routes, 1 pools)\n"),
        "{}",
        run.stdout
    );
}

/// `sluice run` on an invalid config prints what `check` prints and exits 1 before it serves.
#[test]
fn run_refuses_an_invalid_config_with_the_same_report_as_check() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    std::fs::write(
        &path,
        build(&At::End, "[pool.p.health]\nkind = \"tcp\"\nrise = 0"),
    )
    .unwrap();
    let p = path.display().to_string();
    let check = sluice(&["check", "--config", &p], Duration::from_secs(10));
    let run = sluice(
        &["--log-format", "json", "run", "--config", &p],
        Duration::from_secs(10),
    );
    assert_eq!((check.code, run.code), (Some(1), Some(1)), "{}", run.stderr);
    assert_eq!(
        check.stderr,
        format!("{p}:15: pool.p.health.rise: 0 is out of range — use a value from 1 to 100\n")
    );
    assert_eq!(
        run.stderr, check.stderr,
        "nothing else: no listener was opened"
    );
}

/// `sluice heartbeat --config agent.toml` with a bad agent config: exit 1 at once, with a
/// message naming the file (or the key) and what is wrong.
#[test]
fn heartbeat_refuses_bad_agent_configs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    std::fs::write(dir.path().join("token"), "agents-token-0123456789").unwrap();
    // Valid but for what each case changes: a server nobody listens on is never reached,
    // because every case fails before connecting.
    let good = format!(
        "server = \"127.0.0.1:1\"\nagent = \"a1\"\naddress = \"127.0.0.1:3022\"\ninsecure = true\ntoken_file = \"{d}/token\"\n"
    );
    let agent = dir.path().join("agent.toml");
    let cases: Vec<(String, Vec<String>)> = vec![
        (
            format!("{good}srever = \"127.0.0.1:3025\"\n"),
            vec![
                format!("sluice: {}: TOML parse error at line 6", agent.display()),
                "unknown field `srever`".into(),
            ],
        ),
        (
            good.replace("server = \"127.0.0.1:1\"\n", ""),
            vec![
                format!("sluice: {}: TOML parse error", agent.display()),
                "missing field `server`".into(),
            ],
        ),
        (
            good.replace("agent = \"a1\"\n", ""),
            vec!["missing field `agent`".into()],
        ),
        (
            format!("{good}ttl = \"soon\"\n"),
            vec![format!("sluice: {}: ttl: `soon` is not a duration", agent.display())],
        ),
        (
            format!("{good}interval = \"10\"\n"),
            vec![
                format!("sluice: {}: interval: `10` is not a duration", agent.display()),
                "time unit needed".into(),
            ],
        ),
        (
            // A zero interval used to panic the heartbeat loop (tokio's interval).
            format!("{good}interval = \"0s\"\n"),
            vec![format!("sluice: {}: interval: must be more than 0", agent.display())],
        ),
        (
            format!("{good}ttl = \"0s\"\n"),
            vec![format!("sluice: {}: ttl: must be more than 0", agent.display())],
        ),
        (
            // Half a client certificate used to be ignored without a word.
            format!("{good}cert_file = \"{d}/agent.pem\"\n"),
            vec![format!(
                "sluice: {}: cert_file and key_file go together",
                agent.display()
            )],
        ),
        (
            format!("{good}mode = \"udp\"\n"),
            vec![format!("sluice: {}: mode: must be \"stream\" or \"post\"", agent.display())],
        ),
        (
            good.replace("insecure = true\n", ""),
            vec![format!("sluice: {}: set ca_file (the CA of sluice's heartbeat certificate), or insecure = true for tests", agent.display())],
        ),
        (
            good.replace(&format!("token_file = \"{d}/token\"\n"), ""),
            vec![format!("sluice: {}: set token_file or cert_file/key_file: sluice refuses anonymous heartbeats", agent.display())],
        ),
        (
            good.replace("/token\"", "/no-such-token\""),
            vec![format!("sluice: cannot read {d}/no-such-token: No such file")],
        ),
        (
            good.replace("insecure = true\n", &format!("ca_file = \"{d}/no-such-ca.pem\"\n")),
            vec![format!("sluice: cannot read {d}/no-such-ca.pem")],
        ),
        (
            format!("{good}\n[[resource]]\nkind = \"app\"\n"),
            vec![
                format!("sluice: {}: TOML parse error at line 7", agent.display()),
                "missing field `name`".into(),
            ],
        ),
    ];
    let mut failures = Vec::new();
    for (text, wanted) in &cases {
        std::fs::write(&agent, text).unwrap();
        let run = sluice(
            &["heartbeat", "--config", &agent.display().to_string()],
            Duration::from_secs(10),
        );
        if run.code != Some(1) || !wanted.iter().all(|w| run.stderr.contains(w.as_str())) {
            failures.push(format!(
                "exit {:?}, expected 1 and {wanted:?}; stderr:\n{}\nconfig:\n{text}",
                run.code, run.stderr
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));

    // No file at all.
    let missing = dir.path().join("no-such-agent.toml");
    let run = sluice(
        &["heartbeat", "--config", &missing.display().to_string()],
        Duration::from_secs(10),
    );
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert_eq!(
        run.stderr,
        format!(
            "sluice: cannot read {}: No such file or directory (os error 2)\n",
            missing.display()
        )
    );
}

/// A config for `sluice run` with an admin API on port 0 and `top` above the rest.
fn run_config(dir: &Path, top: &str) -> PathBuf {
    let path = dir.join("sluice.toml");
    std::fs::write(
        &path,
        format!("[admin]\naddress = \"127.0.0.1:0\"\n{top}\n\n{BASE}"),
    )
    .unwrap();
    path
}

/// `--upgrade` takes the sockets of a running sluice through `lifecycle.upgrade_socket`;
/// without that setting there is nothing to take them from: exit 1 at once, saying so.
#[test]
fn upgrade_without_an_upgrade_socket_setting_fails_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = run_config(dir.path(), "");
    let p = path.display().to_string();
    let run = sluice(
        &["run", "--config", &p, "--upgrade"],
        Duration::from_secs(10),
    );
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert_eq!(
        run.stderr,
        format!("sluice: --upgrade needs lifecycle.upgrade_socket in {p}\n")
    );
}

/// `--upgrade` with no sluice on the upgrade socket (no socket file, or a stale one left by a
/// process that died) fails fast and says to start without `--upgrade`; doing that works,
/// and the new process serves upgrades on the path, the stale file replaced.
#[test]
fn upgrade_with_no_running_sluice_fails_fast_and_plain_run_takes_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("upgrade.sock");
    let path = run_config(
        dir.path(),
        &format!(
            "[lifecycle]\nupgrade_socket = \"{}\"\n[reload]\nwatch = false",
            sock.display()
        ),
    );
    let p = path.display().to_string();
    let upgrade = || {
        sluice(
            &["run", "--config", &p, "--upgrade"],
            Duration::from_secs(10),
        )
    };

    // No socket file at all.
    let run = upgrade();
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr.starts_with(&format!(
            "sluice: upgrade: no running sluice answers at {} (",
            sock.display()
        )) && run.stderr.ends_with("; start without --upgrade\n"),
        "{}",
        run.stderr
    );
    assert!(run.took < Duration::from_secs(10), "took {:?}", run.took);

    // A stale socket file: bound once, nobody listening now (connect is refused).
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let run = upgrade();
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains("no running sluice answers at")
            && run.stderr.contains("start without --upgrade"),
        "{}",
        run.stderr
    );
    assert!(
        !run.stderr.contains("listening"),
        "it served: {}",
        run.stderr
    );

    // As the message says: start without --upgrade. It serves, and answers on the path.
    let mut child = Running(
        Command::new(BIN)
            .args(["--log-format", "json", "run", "--config", &p])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (_edge, _admin, _log) = bound_addresses(&mut child);
    // The control socket is bound after the listeners: wait (bounded) for it to answer.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(
            Instant::now() < deadline,
            "the stale socket file was not replaced by a live control socket"
        );
        assert!(child.try_wait().unwrap().is_none(), "sluice exited");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A predecessor that hangs up before offering its sockets (it died mid-handover): the new
/// process does not start half-way, it exits 1 at once.
#[test]
fn upgrade_from_a_peer_that_hangs_up_fails_fast() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("upgrade.sock");
    let path = run_config(
        dir.path(),
        &format!("[lifecycle]\nupgrade_socket = \"{}\"", sock.display()),
    );
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let peer = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        drop(conn);
    });
    let run = sluice(
        &["run", "--config", &path.display().to_string(), "--upgrade"],
        Duration::from_secs(10),
    );
    peer.join().unwrap();
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr.starts_with("sluice: upgrade: "),
        "{}",
        run.stderr
    );
    assert!(
        !run.stderr.contains("listening"),
        "it served: {}",
        run.stderr
    );
}
