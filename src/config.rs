//! Loading the config: the I/O around `sluice_core::config`, whose model, validation and
//! error messages this module re-exports.
//!
//! Validation in the core is pure; it leaves what needs I/O as `Pending` work. Here that work
//! is done: host names are resolved (at load, as HAProxy does at start, so a typo fails the
//! check instead of the first connection), the tokens file is read, the TLS server configs
//! are built from their certificate files, and the files the config names are hashed. A
//! failure is reported where the core said the work came from, as `file:line: key: problem
//! — fix`; a `Config` is returned only when nothing failed, with every error collected.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use sluice_core::config::*;

/// Whether host names are looked up at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Names {
    Resolve,
    /// `sluice check --no-resolve`: for CI outside the cluster, where the names in the config
    /// do not resolve. Names stay unresolved (`0.0.0.0:0`) and are checked for form only.
    Skip,
}

/// Read, parse and validate a config file, and the `conf.d/*.toml` files beside it.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    load_with(path, Names::Resolve)
}

/// `load`, resolving host names or not.
pub fn load_with(path: &Path, names: Names) -> Result<Config, ConfigErrors> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                path: p.to_path_buf(),
                line: None,
                key: "(file)".into(),
                problem: format!("cannot read: {e}"),
                fix: "check the path given to --config and its permissions".into(),
            }])
        })
    };
    let mut files = vec![(path.to_path_buf(), read(path)?)];
    for extra in conf_d_files(path) {
        files.push((extra.clone(), read(&extra)?));
    }
    parse_files_with(&files, names)
}

/// Parse and validate config text; `path` is only used in messages.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
    parse_files(&[(path.to_path_buf(), text.to_owned())])
}

/// Parse the main file and extra files (`conf.d`), merge them, validate the whole, and do
/// the work validation left (see the module docs).
pub fn parse_files(files: &[(PathBuf, String)]) -> Result<Config, ConfigErrors> {
    parse_files_with(files, Names::Resolve)
}

/// `parse_files`, resolving host names or not.
pub fn parse_files_with(files: &[(PathBuf, String)], names: Names) -> Result<Config, ConfigErrors> {
    let Validation {
        mut config,
        mut errors,
        pending,
    } = Config::validate_files(files)?;
    // Names first: the other checks want their addresses.
    let mut failed = Vec::new();
    for work in &pending {
        if let Pending::Resolve {
            at,
            slot,
            text,
            fix,
        } = work
        {
            if names == Names::Skip {
                // Unresolved: no address to compare either.
                failed.push(slot.clone());
                continue;
            }
            match resolve(text) {
                Ok(addr) => config.set_address(slot, addr),
                Err(problem) => {
                    errors.push(at.error(problem, *fix));
                    failed.push(slot.clone());
                }
            }
        }
    }
    let mut hashed = Vec::new();
    for work in pending {
        match work {
            Pending::Resolve { .. } => {}
            Pending::Distinct { among, places } => {
                errors.extend(config.duplicates(&among, &places, &failed));
            }
            Pending::Tokens {
                at,
                file,
                fix,
                line_fix,
            } => match std::fs::read_to_string(&file) {
                Ok(text) => match sluice_core::agents::auth::parse_tokens(&text) {
                    Ok(tokens) => config.heartbeat.tokens = tokens,
                    Err(list) => {
                        errors.extend(list.into_iter().map(|(line, problem)| ConfigError {
                            path: file.clone(),
                            line: Some(line),
                            key: "(token)".into(),
                            problem,
                            fix: line_fix.into(),
                        }))
                    }
                },
                Err(e) => {
                    errors.push(at.error(format!("cannot read {}: {e}", file.display()), fix))
                }
            },
            Pending::HeartbeatTls {
                at,
                cert,
                key,
                client_ca,
                fix,
            } => match crate::tls::server::server_tls(&cert, &key, client_ca.as_deref()) {
                Ok(tls) => config.heartbeat.tls = Some(tls),
                Err(problem) => errors.push(at.error(problem, fix)),
            },
            Pending::QuicTls {
                at,
                route,
                cert,
                key,
                alpn,
                fix,
            } => match crate::tls::server::server_tls(&cert, &key, None) {
                Ok(tls) => {
                    let mut tls = (*tls).clone();
                    // The route's exact ALPN names are what sluice can negotiate.
                    tls.alpn_protocols = alpn;
                    tls.max_early_data_size = u32::MAX;
                    if let Some(q) = config
                        .routes
                        .get_mut(route)
                        .and_then(|r| r.quic_terminate.as_mut())
                    {
                        q.tls = Some(Arc::new(tls));
                    }
                }
                Err(problem) => errors.push(at.error(problem, fix)),
            },
            Pending::Hash { path } => {
                let content = std::fs::read(&path).unwrap_or_default();
                hashed.push((path, content));
            }
            Pending::ReadFile {
                at,
                path,
                slot,
                fix,
            } => match std::fs::read(&path) {
                Ok(content) => {
                    if let Err(problem) = config.set_file(slot, content) {
                        errors.push(at.error(format!("{} {problem}", path.display()), fix));
                    }
                }
                Err(e) => {
                    errors.push(at.error(format!("cannot read {}: {e}", path.display()), fix))
                }
            },
        }
    }
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    config.hash = content_hash(
        files
            .iter()
            .map(|(p, t)| (p.as_path(), t.as_bytes()))
            .chain(hashed.iter().map(|(p, c)| (p.as_path(), c.as_slice()))),
    );
    Ok(config)
}

/// The `conf.d/*.toml` files beside the main config, in name order (none if no such directory).
pub fn conf_d_files(main: &Path) -> Vec<PathBuf> {
    let dir = main.parent().unwrap_or(Path::new(".")).join("conf.d");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "toml")
                && !p
                    .file_name()
                    .is_some_and(|n| n.as_encoded_bytes().starts_with(b"."))
                && p.is_file()
        })
        .collect();
    files.sort();
    files
}

/// `host:port` → the first address it resolves to (as HAProxy does at start).
fn resolve(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if !text.contains(':') {
        return Err(format!("`{text}` has no port"));
    }
    match text.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("`{text}` resolved to no address")),
        Err(e) => Err(format!("cannot resolve `{text}`: {e}")),
    }
}

#[cfg(test)]
mod tests {
    //! What needs the file system or a resolver; the rest is in `sluice_core::config`.

    use super::*;

    const GOOD: &str = r#"
[[listener]]
name = "edge"
address = "127.0.0.1:0"

[[route]]
name = "clients"
pool = "client"

[pool.client]
backends = ["localhost:3080"]
"#;

    fn errors(text: &str) -> Vec<String> {
        parse(Path::new("t.toml"), text)
            .unwrap_err()
            .0
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn names_are_resolved_at_load() {
        let c = parse(Path::new("t.toml"), GOOD).unwrap();
        let b = &c.pools["client"].backends[0];
        assert_eq!(b.name, "localhost:3080");
        assert_eq!(b.address, resolve("localhost:3080").unwrap());
        assert_eq!(b.address.port(), 3080);
    }

    #[test]
    fn a_name_that_does_not_resolve_is_an_error_at_its_key() {
        let text = GOOD.replace("localhost:3080", "no-such-host.invalid:3080");
        let shown = errors(&text);
        assert_eq!(shown.len(), 1, "{shown:?}");
        assert!(
            shown[0].starts_with(
                "t.toml:11: pool.client.backends[0]: cannot resolve `no-such-host.invalid:3080`: "
            ) && shown[0]
                .ends_with(" — write \"host:port\" with a name this machine can resolve, or an IP"),
            "{shown:?}"
        );
    }

    #[test]
    fn duplicates_that_resolution_reveals_are_errors() {
        let text = GOOD.replace(
            "\"localhost:3080\"",
            "\"localhost:3080\", \"localhost:3080\"",
        );
        let addr = resolve("localhost:3080").unwrap();
        assert_eq!(
            errors(&text),
            [format!(
                "t.toml:11: pool.client.backends[1]: backend `localhost:3080` ({addr}) is listed \
                 twice — remove the duplicate, or use `weight` to give it more traffic"
            )]
        );
        // Two listeners on one address, one of them by name.
        let text = GOOD.replace(
            "address = \"127.0.0.1:0\"\n",
            "address = \"127.0.0.1:8443\"\n\n[[listener]]\nname = \"other\"\naddress = \"localhost:8443\"\n",
        );
        if resolve("localhost:8443").unwrap().ip().is_ipv4() {
            assert_eq!(
                errors(&text),
                [
                    "t.toml:8: listener[1].address: 127.0.0.1:8443 is already used by another \
                  listener — give each listener its own address"
                ]
            );
        }
    }

    /// The core says what no resolver would take in the resolver's words.
    #[test]
    fn the_core_words_address_errors_as_the_resolver_does() {
        for text in [
            "127.0.0.1",
            "proxy.internal",
            "h:99999",
            "h:http",
            "[::1]:x",
            "h:",
        ] {
            let core = literal_address(text).map_err(|e| e.to_string());
            assert_eq!(core, resolve(text).map(Some), "{text}");
        }
    }

    #[test]
    fn the_hash_covers_the_files_read_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::write(&tokens, "agents-token-0123456789 name=agents\n").unwrap();
        let text = format!(
            "[heartbeat]\ntokens_file = \"{}\"\n{GOOD}",
            tokens.display()
        );
        let first = parse(Path::new("t.toml"), &text).unwrap();
        assert_eq!(first.heartbeat.tokens.len(), 1);
        assert_eq!(
            first.hash,
            content_hash([
                (Path::new("t.toml"), text.as_bytes()),
                (
                    tokens.as_path(),
                    b"agents-token-0123456789 name=agents\n".as_slice()
                ),
            ])
        );
        std::fs::write(&tokens, "agents-token-9876543210 name=agents\n").unwrap();
        let second = parse(Path::new("t.toml"), &text).unwrap();
        assert_ne!(first.hash, second.hash, "a rotated token is a change");
    }
}
