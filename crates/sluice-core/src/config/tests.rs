//! The config model's unit tests. Validation is pure, so none of them touches the file
//! system or a resolver: names, tokens and certificates come out as pending work.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::error::Locator;
use super::*;

fn parse(text: &str) -> Result<Config, ConfigErrors> {
    Config::parse(Path::new("t.toml"), text).map(|v| v.config)
}

fn validated(text: &str) -> Validated {
    Config::parse(Path::new("t.toml"), text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// The 1-based line of the first line holding `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).unwrap() + 1
}

const GOOD: &str = r#"
[[listener]]
name = "edge"
address = "127.0.0.1:0"

[[route]]
name = "tunnels"
alpn = ["teleport-reversetunnel*"]
pool = "tunnel"
idle_timeout = "0s"

[[route]]
name = "clients"
pool = "client"

[pool.tunnel]
backends = ["127.0.0.1:3024", { address = "127.0.0.2:3024", weight = 3 }]
balance = "p2c"
proxy_protocol = "v2"

[pool.client]
backends = ["localhost:3080"]
"#;

#[test]
fn accept_proxy_needs_trusted_proxies() {
    let with = |keys: &str| {
        GOOD.replacen(
            "address = \"127.0.0.1:0\"\n",
            &format!("address = \"127.0.0.1:0\"\n{keys}\n"),
            1,
        )
    };
    let errs = parse(&with("accept_proxy = \"v2\""))
        .unwrap_err()
        .to_string();
    assert!(
        errs.contains("t.toml:5: listener[0].accept_proxy: accept_proxy needs trusted_proxies"),
        "{errs}"
    );
    let errs = parse(&with("trusted_proxies = [\"10.0.0.0/8\"]"))
        .unwrap_err()
        .to_string();
    assert!(
        errs.contains("trusted_proxies: has no effect without accept_proxy"),
        "{errs}"
    );
    let errs = parse(&with(
        "accept_proxy = \"v3\"\ntrusted_proxies = [\"10.0.0.0/8\", \"nope\"]",
    ))
    .unwrap_err()
    .to_string();
    assert!(errs.contains("unknown PROXY protocol mode `v3`"), "{errs}");
    assert!(
        errs.contains("trusted_proxies[1]: `nope` is not an address or CIDR block"),
        "{errs}"
    );
    let ok = parse(&with(
        "accept_proxy = \"optional\"\ntrusted_proxies = [\"10.0.0.0/8\", \"192.0.2.7\", \"::/0\"]",
    ))
    .unwrap();
    assert_eq!(ok.listeners[0].trusted_proxies.len(), 3);
}

#[test]
fn absurd_durations_are_errors_not_overflows() {
    let text = format!("{GOOD}\n[lifecycle]\nclose_spread = \"20years\"\n");
    let errs = parse(&text).unwrap_err().to_string();
    assert!(
        errs.contains("lifecycle.close_spread: `20years` is longer than sluice allows"),
        "{errs}"
    );
    let text = GOOD.replace(
        "balance = \"p2c\"",
        "balance = \"p2c\"\nmin_ready = \"9999999years\"",
    );
    assert!(parse(&text).is_err());
}

#[test]
fn good_config() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.routes.len(), 2);
    assert_eq!(c.routes[0].idle_timeout, None);
    assert_eq!(c.routes[1].idle_timeout, Some(Duration::from_secs(3600)));
    assert_eq!(c.pools["tunnel"].backends[1].weight, 3);
    assert_eq!(c.pools["tunnel"].proxy_protocol, ProxyProtocol::V2);
    assert_eq!(c.listeners[0].max_hello_size, 16384);
}

#[test]
fn errors_name_line_and_key() {
    let bad = GOOD
        .replace("pool = \"client\"", "pool = \"nope\"")
        .replace("balance = \"p2c\"", "balance = \"fastest\"");
    let errs = parse(&bad).unwrap_err().0;
    let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
    assert!(
        text.iter()
            .any(|t| t.starts_with("t.toml:14: route[1].pool: no pool is named `nope`")),
        "{text:?}"
    );
    assert!(
        text.iter()
            .any(|t| t.starts_with("t.toml:18: pool.tunnel.balance: unknown balancer")),
        "{text:?}"
    );
}

#[test]
fn park_idle_after_defaults_turns_off_and_has_a_floor() {
    let with = |v: &str| format!("[limits]\npark_idle_after = \"{v}\"\n{GOOD}");
    let c = parse(GOOD).unwrap();
    assert_eq!(c.limits.park_idle_after, Some(DEFAULT_PARK_IDLE_AFTER));
    assert_eq!(parse(&with("0s")).unwrap().limits.park_idle_after, None);
    assert_eq!(
        parse(&with("100ms")).unwrap().limits.park_idle_after,
        Some(Duration::from_millis(100))
    );
    let errs = parse(&with("10ms")).unwrap_err().0;
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].key, "limits.park_idle_after");
    assert!(errs[0].to_string().contains("at least"), "{}", errs[0]);
}

#[test]
fn unknown_key_is_an_error_with_its_line() {
    let bad = GOOD.replace("idle_timeout = \"0s\"", "idle_timout = \"0s\"");
    let errs = parse(&bad).unwrap_err().0;
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].line, Some(10));
    assert_eq!(errs[0].key, "idle_timout");
    assert!(errs[0].problem.contains("unknown field"), "{:?}", errs[0]);
}

#[test]
fn inputs_found_by_fuzzing_are_errors_not_panics() {
    // fuzz/artifacts/route_config: made toml_edit 0.23 panic.
    for text in ["==\x0f\n\n[.\n", "a.b=1\na=2\n[a]\n", "[x]\n[x.y]\nx.y=1\n"] {
        assert!(parse(text).is_err(), "{text:?}");
    }
    // The same kind of input behind an otherwise valid config keeps line numbers working.
    assert!(Locator::new("==\x0f\n\n[.\n").doc.is_none());
}

#[test]
fn shadowed_route_is_rejected() {
    let bad = GOOD.replace(
        "[pool.tunnel]",
        "[[route]]\nname = \"late\"\nalpn = [\"h2\"]\npool = \"client\"\n\n[pool.tunnel]",
    );
    let errs = parse(&bad).unwrap_err().0;
    assert!(
        errs[0].problem.contains("catch-all route `clients`"),
        "{errs:?}"
    );
    assert_eq!(errs[0].line, Some(16)); // the `[[route]]` header of the shadowed route
}

#[test]
fn bad_values() {
    let bad = GOOD
        .replace("idle_timeout = \"0s\"", "idle_timeout = \"soon\"")
        .replace(
            "address = \"127.0.0.1:0\"",
            "address = \"127.0.0.1:0\"\nmax_hello_size = 100000",
        );
    let errs = parse(&bad).unwrap_err().0;
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(errs.iter().any(|e| e.key == "listener[0].max_hello_size"));
    assert!(errs.iter().any(|e| e.key == "route[0].idle_timeout"));
}

// ---------------------------------------------------------------------------------------------
// Validation is pure: what needs I/O is pending work, with its place and its fix.

/// A file that no test creates: validation must not notice that it is missing.
const NOWHERE: &str = "/nonexistent/sluice-config-test";

#[test]
fn a_backend_name_is_left_to_resolve_with_its_place() {
    let text = GOOD.replace("\"localhost:3080\"", "\"proxy.internal:3024\"");
    let v = validated(&text);
    let resolve: Vec<_> = v
        .pending
        .iter()
        .filter(|p| matches!(p, Pending::Resolve { .. }))
        .collect();
    assert_eq!(
        resolve,
        [&Pending::Resolve {
            at: Place {
                path: PathBuf::from("t.toml"),
                line: Some(line_of(&text, "proxy.internal:3024")),
                key: "pool.client.backends[0]".into(),
            },
            slot: AddrSlot::Backend {
                pool: "client".into(),
                index: 0,
            },
            text: "proxy.internal:3024".into(),
            fix: "write \"host:port\" with a name this machine can resolve, or an IP",
        }]
    );
    // Until resolved, the backend is there, named as written, at no address.
    let b = &v.config.pools["client"].backends[0];
    assert_eq!(b.name, "proxy.internal:3024");
    assert_eq!(b.address, SocketAddr::from(([0, 0, 0, 0], 0)));
    // IP literals are parsed at once.
    assert_eq!(
        v.config.pools["tunnel"].backends[0].address,
        "127.0.0.1:3024".parse().unwrap()
    );

    let mut config = v.config;
    let addr: SocketAddr = "192.0.2.1:3024".parse().unwrap();
    config.set_address(
        &AddrSlot::Backend {
            pool: "client".into(),
            index: 0,
        },
        addr,
    );
    assert_eq!(config.pools["client"].backends[0].address, addr);
}

#[test]
fn every_address_key_takes_a_name() {
    let text = format!(
        "[admin]\naddress = \"admin.internal:9901\"\n\
         [heartbeat]\naddress = \"hb.internal:3025\"\ncert_file = \"{NOWHERE}/cert.pem\"\n\
         key_file = \"{NOWHERE}/key.pem\"\nclient_ca_file = \"{NOWHERE}/ca.pem\"\n\
         {}\n[[agent]]\nid = \"a1\"\naddress = \"agent.internal:3022\"\n",
        GOOD.replace("127.0.0.1:0", "edge.internal:443")
    );
    let v = validated(&text);
    let slots: Vec<(&AddrSlot, &str, &str)> = v
        .pending
        .iter()
        .filter_map(|p| match p {
            Pending::Resolve { at, slot, text, .. } => Some((slot, at.key.as_str(), text.as_str())),
            _ => None,
        })
        .collect();
    assert_eq!(
        slots,
        [
            (&AddrSlot::Admin, "admin.address", "admin.internal:9901"),
            (
                &AddrSlot::Backend {
                    pool: "client".into(),
                    index: 0
                },
                "pool.client.backends[0]",
                "localhost:3080"
            ),
            (
                &AddrSlot::Listener(0),
                "listener[0].address",
                "edge.internal:443"
            ),
            (
                &AddrSlot::Heartbeat,
                "heartbeat.address",
                "hb.internal:3025"
            ),
            (
                &AddrSlot::Agent(0),
                "agent[0].address",
                "agent.internal:3022"
            ),
        ]
    );
}

#[test]
fn files_are_left_to_read_not_read() {
    let text = format!(
        "[heartbeat]\naddress = \"127.0.0.1:3025\"\ntokens_file = \"{NOWHERE}/tokens\"\n\
         cert_file = \"{NOWHERE}/cert.pem\"\nkey_file = \"{NOWHERE}/key.pem\"\n{GOOD}"
    );
    let v = validated(&text);
    let place = |key: &str, needle: &str| Place {
        path: PathBuf::from("t.toml"),
        line: Some(line_of(&text, needle)),
        key: key.into(),
    };
    let nowhere = |f: &str| PathBuf::from(format!("{NOWHERE}/{f}"));
    assert!(v.pending.contains(&Pending::Tokens {
        at: place("heartbeat.tokens_file", "tokens_file"),
        file: nowhere("tokens"),
        fix: "check the path and its permissions",
        line_fix:
            "write one token of 16+ characters per line, then optional name=, kinds=a,b, labels=k=v",
    }));
    assert!(v.pending.contains(&Pending::HeartbeatTls {
        at: place("heartbeat.cert_file", "cert_file"),
        cert: nowhere("cert.pem"),
        key: nowhere("key.pem"),
        client_ca: None,
        fix: "give a PEM certificate chain and its PEM private key",
    }));
    let hashed: Vec<_> = v
        .pending
        .iter()
        .filter_map(|p| match p {
            Pending::Hash { path } => Some(path.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        hashed,
        [nowhere("tokens"), nowhere("cert.pem"), nowhere("key.pem")]
    );
    let hb = &v.config.heartbeat;
    assert!(hb.tls.is_none() && hb.tokens.is_empty());
    assert_eq!(hb.tokens_file, Some(nowhere("tokens")));
}

#[test]
fn a_quic_terminating_route_leaves_its_certificate_to_read() {
    let text = GOOD.replace(
        "pool = \"client\"\n",
        &format!(
            "pool = \"client\"\nalpn = [\"h3\", \"h3-*\"]\nquic = \"terminate\"\n\
             cert_file = \"{NOWHERE}/q.pem\"\nkey_file = \"{NOWHERE}/q.key\"\n"
        ),
    );
    let v = validated(&text);
    let quic: Vec<_> = v
        .pending
        .iter()
        .filter(|p| matches!(p, Pending::QuicTls { .. }))
        .collect();
    assert_eq!(
        quic,
        [&Pending::QuicTls {
            at: Place {
                path: PathBuf::from("t.toml"),
                line: Some(line_of(&text, "q.pem")),
                key: "route[1].cert_file".into(),
            },
            route: 1,
            cert: PathBuf::from(format!("{NOWHERE}/q.pem")),
            key: PathBuf::from(format!("{NOWHERE}/q.key")),
            // Exact names only: a prefix cannot be offered.
            alpn: vec![b"h3".to_vec()],
            fix: "give a PEM certificate chain and its PEM private key",
        }]
    );
    let q = v.config.routes[1].quic_terminate.as_ref().unwrap();
    assert!(q.tls.is_none());
}

#[test]
fn what_no_resolver_would_take_is_an_error_at_once() {
    for (address, problem) in [
        ("proxy.internal", "`proxy.internal` has no port"),
        (
            "proxy.internal:99999",
            "cannot resolve `proxy.internal:99999`: invalid port value",
        ),
        (
            "127.0.0.1:http",
            "cannot resolve `127.0.0.1:http`: invalid port value",
        ),
    ] {
        let text = GOOD.replace("localhost:3080", address);
        let errs = parse(&text).unwrap_err().0;
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].key, "pool.client.backends[0]");
        assert_eq!(errs[0].problem, problem);
    }
}

#[test]
fn duplicates_among_names_are_checked_once_resolved() {
    // Two IP literals: a duplicate now.
    let text = GOOD.replace("\"localhost:3080\"", "\"127.0.0.9:80\", \"127.0.0.9:80\"");
    let errs = parse(&text).unwrap_err().0;
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].key, "pool.client.backends[1]");
    assert_eq!(
        errs[0].problem,
        "backend `127.0.0.9:80` (127.0.0.9:80) is listed twice"
    );

    // A name and an IP: only resolving tells.
    let text = GOOD.replace("\"localhost:3080\"", "\"127.0.0.9:80\", \"b.internal:80\"");
    let v = validated(&text);
    let Some(Pending::Distinct { among, places }) = v
        .pending
        .iter()
        .find(|p| matches!(p, Pending::Distinct { .. }))
    else {
        panic!("{:?}", v.pending);
    };
    assert_eq!(
        among,
        &Among::Backends {
            pool: "client".into()
        }
    );
    assert_eq!(places[1].key, "pool.client.backends[1]");
    let mut config = v.config;
    let slot = AddrSlot::Backend {
        pool: "client".into(),
        index: 1,
    };
    assert!(config.duplicates(among, places, &[]).is_empty());
    config.set_address(&slot, "127.0.0.9:80".parse().unwrap());
    let shown: Vec<String> = config
        .duplicates(among, places, &[])
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        shown,
        [format!(
            "t.toml:{}: pool.client.backends[1]: backend `b.internal:80` (127.0.0.9:80) is listed twice \
             — remove the duplicate, or use `weight` to give it more traffic",
            line_of(&text, "b.internal")
        )]
    );
    // A name that did not resolve is no address at all.
    assert!(config.duplicates(among, places, &[slot]).is_empty());
}

#[test]
fn listener_addresses_are_compared_once_resolved() {
    let text = GOOD.replace(
        "[[route]]\nname = \"tunnels\"",
        "[[listener]]\nname = \"second\"\naddress = \"edge.internal:443\"\n\n\
         [[route]]\nname = \"tunnels\"",
    );
    let text = text
        .replace("127.0.0.1:0", "127.0.0.1:443")
        .replace("localhost:3080", "127.0.0.1:3080");
    let v = validated(&text);
    let Some(Pending::Distinct { among, places }) = v
        .pending
        .iter()
        .find(|p| matches!(p, Pending::Distinct { .. }))
    else {
        panic!("{:?}", v.pending);
    };
    assert_eq!(among, &Among::Listeners);
    let mut config = v.config;
    config.set_address(&AddrSlot::Listener(1), "127.0.0.1:443".parse().unwrap());
    let errs = config.duplicates(among, places, &[]);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].key, "listener[1].address");
    assert_eq!(errs[0].line, Some(line_of(&text, "edge.internal")));
    assert_eq!(
        errs[0].to_string().split(": ").nth(2),
        Some("127.0.0.1:443 is already used by another listener — give each listener its own address")
    );
}

#[test]
fn pending_work_in_a_conf_d_file_points_into_it() {
    let extra = "[pool.more]\nbackends = [\n  \"127.0.0.3:80\",\n  \"more.internal:80\",\n]\n";
    let files = [
        (PathBuf::from("main.toml"), GOOD.to_owned()),
        (PathBuf::from("conf.d/10-more.toml"), extra.to_owned()),
    ];
    let v = Config::parse_files(&files).unwrap();
    let at = v
        .pending
        .iter()
        .find_map(|p| match p {
            Pending::Resolve { at, text, .. } if text == "more.internal:80" => Some(at),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        at,
        &Place {
            path: PathBuf::from("conf.d/10-more.toml"),
            line: Some(4),
            key: "pool.more.backends[1]".into(),
        }
    );
    assert_eq!(
        at.error("no such host", "fix it").to_string(),
        "conf.d/10-more.toml:4: pool.more.backends[1]: no such host — fix it"
    );
}

#[test]
fn errors_and_pending_work_come_together() {
    let text = GOOD.replace("balance = \"p2c\"", "balance = \"fastest\"");
    let v = Config::validate_files(&[(PathBuf::from("t.toml"), text)]).unwrap();
    assert_eq!(v.errors.len(), 1, "{:?}", v.errors);
    assert!(v
        .pending
        .iter()
        .any(|p| matches!(p, Pending::Resolve { text, .. } if text == "localhost:3080")));
    assert!(v.into_validated().is_err());
}

#[test]
fn the_hash_covers_the_files_in_order() {
    let a = validated(GOOD).config.hash;
    assert_eq!(a, content_hash([(Path::new("t.toml"), GOOD.as_bytes())]));
    let b = Config::parse(Path::new("u.toml"), GOOD)
        .unwrap()
        .config
        .hash;
    assert_ne!(a, b, "the path counts");
    assert_eq!(a.len(), 16);
}

#[test]
fn the_store_is_memory_by_default_and_etcd_makes_rendezvous_the_default_pick() {
    let resource = "\n[[route]]\nname = \"apps\"\nresource = { kind = \"app\", sni = \"*.apps.example.com\" }\n";
    let memory = parse(&format!("{resource}{GOOD}")).unwrap();
    assert_eq!(memory.store.kind, StoreKind::Memory);
    assert_eq!(memory.cluster.name, "default");
    let pick = |c: &Config| match &c.routes[0].target {
        RouteTarget::Resource(r) => r.pick,
        _ => panic!("a resource route"),
    };
    assert_eq!(pick(&memory), Pick::Random);
    let etcd = format!(
        "[cluster]\nname = \"prod\"\n[store]\nkind = \"etcd\"\nendpoints = [\"http://10.0.0.1:2379\"]\nedge_id = \"edge-a\"\n{resource}{GOOD}"
    );
    let v = validated(&etcd);
    assert_eq!(v.config.store.kind, StoreKind::Etcd);
    assert_eq!(v.config.store.prefix, "/sluice/");
    assert_eq!(v.config.store.timeout, Duration::from_secs(3));
    assert_eq!(v.config.cluster.name, "prod");
    assert_eq!(pick(&v.config), Pick::Rendezvous);
    // An explicit pick stays.
    let random = etcd.replace(
        "*.apps.example.com\" }\n",
        "*.apps.example.com\" }\npick = \"random\"\n",
    );
    assert_eq!(pick(&parse(&random).unwrap()), Pick::Random);
}

#[test]
fn store_mistakes_are_errors_at_their_keys() {
    let cases = [
        (
            "kind = \"etcd\"",
            "store.endpoints",
            "needs the etcd members",
        ),
        ("kind = \"redis\"", "store.kind", "unknown store kind"),
        (
            "endpoints = [\"10.0.0.1:2379\"]",
            "store.endpoints[0]",
            "not an etcd endpoint",
        ),
        ("prefix = \"/sluice\"", "store.prefix", "not a key prefix"),
        ("edge_id = \"a b\"", "store.edge_id", "not an edge id"),
        (
            "username = \"sluice\"",
            "store.password_file",
            "go together",
        ),
        (
            "endpoints = [\"https://10.0.0.1:2379\"]",
            "store.ca_file",
            "need the CA",
        ),
        (
            "endpoints = [\"http://10.0.0.1:2379\"]\nca_file = \"/ca.pem\"",
            "store.ca_file",
            "endpoints are http",
        ),
        ("timeout = \"10ms\"", "store.timeout", "100ms to 60s"),
    ];
    for (keys, key, problem) in cases {
        let text = format!("[store]\n{keys}\n{GOOD}");
        let errs = parse(&text).unwrap_err().0;
        assert!(
            errs.iter()
                .any(|e| e.key == key && e.problem.contains(problem)),
            "{keys}: {errs:?}"
        );
    }
    let bad_cluster = format!("[cluster]\nname = \"a/b\"\n{GOOD}");
    let errs = parse(&bad_cluster).unwrap_err().0;
    assert_eq!(errs[0].key, "cluster.name", "{errs:?}");
    // The files are read by the loader, with their place.
    let tls = format!("[store]\nkind = \"etcd\"\nendpoints = [\"https://e:2379\"]\nca_file = \"/ca.pem\"\nusername = \"u\"\npassword_file = \"/pw\"\n{GOOD}");
    let v = validated(&tls);
    let reads: Vec<FileSlot> = v
        .pending
        .iter()
        .filter_map(|p| match p {
            Pending::ReadFile { slot, .. } => Some(*slot),
            _ => None,
        })
        .collect();
    assert_eq!(reads, [FileSlot::StoreCa, FileSlot::StorePassword]);
    let mut c = v.config;
    assert_eq!(
        c.set_file(FileSlot::StorePassword, b"secret\n".to_vec()),
        Ok(())
    );
    assert_eq!(c.store.secrets.password.as_deref(), Some("secret"));
    assert!(c.set_file(FileSlot::StorePassword, b"\n".to_vec()).is_err());
}

#[test]
fn allow_and_deny_lists_parse_and_bad_entries_are_errors_at_their_index() {
    let text = GOOD
        .replace(
            "address = \"127.0.0.1:0\"\n",
            "address = \"127.0.0.1:0\"\nallow = [\"10.0.0.0/8\", \"192.0.2.7\"]\ndeny = [\"10.9.0.0/16\"]\n",
        )
        .replace("name = \"clients\"\n", "name = \"clients\"\ndeny = [\"2001:db8::/32\"]\n");
    let c = parse(&format!("[admin]\nallow = [\"127.0.0.1\"]\n{text}")).unwrap();
    let l = &c.listeners[0].acl;
    assert_eq!((l.allow.len(), l.deny.len()), (2, 1));
    assert!(l.permits("10.1.1.1".parse().unwrap()));
    assert!(!l.permits("10.9.1.1".parse().unwrap()));
    assert_eq!(c.routes[1].acl.deny.len(), 1);
    assert!(c.admin.allow.permits("127.0.0.1".parse().unwrap()));
    assert!(!c.admin.allow.permits("127.0.0.2".parse().unwrap()));
    let bad = GOOD.replace(
        "address = \"127.0.0.1:0\"\n",
        "address = \"127.0.0.1:0\"\nallow = [\"10.0.0.0/8\", \"ten\"]\n",
    );
    let errs = parse(&bad).unwrap_err().0;
    assert_eq!(errs[0].key, "listener[0].allow[1]", "{errs:?}");
    assert!(errs[0].problem.contains("not an address or CIDR block"));
}

#[test]
fn version_channels_have_one_source_each() {
    let with = |text: &str| format!("{GOOD}\n{text}");
    let errs = |text: &str| parse(&with(text)).unwrap_err().to_string();
    let both = "[versions.channels.\"default\"]\nstatic_version = \"17.1.0\"\nforward_url = \"https://u.example/v1\"\n";
    let e = errs(both);
    assert!(
        e.contains("versions.channels.default.forward_url") && e.contains("not both"),
        "{e}"
    );
    assert!(errs("[versions.channels.\"x\"]\ncritical = true\n").contains("has no version"));
    let e = errs(
        "[versions.channels.\"x\"]\nforward_url = \"https://u.example/v1\"\ncritical = true\n",
    );
    assert!(e.contains("comes from upstream"), "{e}");
    let e = errs("[versions.channels.\"x\"]\nstatic_version = \"latest\"\n");
    assert!(e.contains("`latest` is not a version"), "{e}");
    let e = errs("[versions]\ncache_ttl = \"2h\"\n");
    assert!(e.contains("max_stale is shorter than cache_ttl"), "{e}");
    let ok = validated(&with(
        "[versions]\ncache_ttl = \"30s\"\n[versions.channels.\"stable/cloud\"]\nforward_url = \"http://127.0.0.1:9/v1/stable/cloud/\"\n",
    ));
    let v = &ok.config.versions;
    assert_eq!(v.cache_ttl, Duration::from_secs(30));
    assert_eq!(v.max_stale, Duration::from_secs(3600));
    assert_eq!(v.rate_limit, 10);
    assert_eq!(
        v.channels.get("stable/cloud"),
        Some(&Channel::Forward {
            url: "http://127.0.0.1:9/v1/stable/cloud".into()
        })
    );
}
