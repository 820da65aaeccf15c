//! The route table: which route a connection takes, from its listener, ALPN list and SNI.
//!
//! Owns: pattern compilation and first-match evaluation, plus the shadowing analysis the config
//! validator uses. Pure: no I/O, no clock, no metrics. Routes are ordered; the first whose keys
//! all match wins. A TLS connection never matches a `tls = false` route and vice versa, so a
//! broken or non-TLS client can never fall into a TLS catch-all.

use rustc_hash::FxHashMap;
use serde::Serialize;

/// One ALPN pattern: an exact protocol name, or a prefix when written with a trailing `*`
/// (Teleport sends `teleport-auth@<cluster>` and `teleport-mysql-<version>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub enum AlpnPattern {
    Exact(String),
    Prefix(String),
}

impl AlpnPattern {
    pub fn parse(s: &str) -> Self {
        match s.strip_suffix('*') {
            Some(prefix) => AlpnPattern::Prefix(prefix.to_owned()),
            None => AlpnPattern::Exact(s.to_owned()),
        }
    }

    #[inline]
    pub fn matches(&self, offered: &str) -> bool {
        match self {
            AlpnPattern::Exact(p) => p == offered,
            AlpnPattern::Prefix(p) => offered.starts_with(p.as_str()),
        }
    }

    /// Whether every name this pattern matches is also matched by `other`.
    fn covered_by(&self, other: &AlpnPattern) -> bool {
        match (self, other) {
            (AlpnPattern::Exact(a), o) => o.matches(a),
            (AlpnPattern::Prefix(a), AlpnPattern::Prefix(b)) => a.starts_with(b.as_str()),
            (AlpnPattern::Prefix(_), AlpnPattern::Exact(_)) => false,
        }
    }
}

impl From<AlpnPattern> for String {
    fn from(p: AlpnPattern) -> String {
        match p {
            AlpnPattern::Exact(s) => s,
            AlpnPattern::Prefix(s) => format!("{s}*"),
        }
    }
}

/// One SNI pattern. Matching is case-insensitive and ignores a trailing dot (both are
/// normalised away at compile time here and by the hello parser for the offered name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub enum SniPattern {
    /// `tunnel.example.com`
    Exact(String),
    /// `*.example.com`: any name ending in `.example.com` (any depth), not `example.com` itself.
    Suffix(String),
    /// `kube-teleport-proxy-alpn.*`: any name starting with `kube-teleport-proxy-alpn.`.
    Prefix(String),
}

impl SniPattern {
    /// Compile a pattern; `Err` says what is wrong with it.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim_end_matches('.').to_ascii_lowercase();
        if s.is_empty() {
            return Err("empty server name".into());
        }
        let pattern = if let Some(rest) = s.strip_prefix("*.") {
            SniPattern::Suffix(format!(".{rest}"))
        } else if let Some(rest) = s.strip_suffix(".*") {
            SniPattern::Prefix(format!("{rest}."))
        } else {
            SniPattern::Exact(s.clone())
        };
        let body = match &pattern {
            SniPattern::Exact(b) => b.as_str(),
            SniPattern::Suffix(b) => &b[1..],
            SniPattern::Prefix(b) => &b[..b.len() - 1],
        };
        if body.is_empty()
            || !body
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        {
            return Err(format!(
                "`{s}` is not a host name, `*.suffix` or `prefix.*` pattern"
            ));
        }
        Ok(pattern)
    }

    /// `name` must already be lowercase without a trailing dot (the hello parser does that).
    #[inline]
    pub fn matches(&self, name: &str) -> bool {
        match self {
            SniPattern::Exact(p) => p == name,
            SniPattern::Suffix(p) => name.len() > p.len() && name.ends_with(p.as_str()),
            SniPattern::Prefix(p) => name.len() > p.len() && name.starts_with(p.as_str()),
        }
    }

    fn covered_by(&self, other: &SniPattern) -> bool {
        match (self, other) {
            (SniPattern::Exact(a), o) => o.matches(a),
            (SniPattern::Suffix(a), SniPattern::Suffix(b)) => a.ends_with(b.as_str()),
            (SniPattern::Prefix(a), SniPattern::Prefix(b)) => a.starts_with(b.as_str()),
            _ => false,
        }
    }
}

impl From<SniPattern> for String {
    fn from(p: SniPattern) -> String {
        match p {
            SniPattern::Exact(s) => s,
            SniPattern::Suffix(s) => format!("*{s}"),
            SniPattern::Prefix(s) => format!("{s}*"),
        }
    }
}

/// What a route requires of a connection. `None` means "any".
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Match {
    pub listeners: Option<Vec<String>>,
    pub alpn: Option<Vec<AlpnPattern>>,
    pub sni: Option<Vec<SniPattern>>,
    /// `true`: TLS connections only (the default); `false`: non-TLS connections only.
    pub tls: bool,
}

/// What is known about a connection when it is routed.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    pub listener: &'a str,
    /// `None` for a non-TLS connection.
    pub tls: Option<TlsFacts<'a>>,
}

#[derive(Debug, Clone, Copy)]
pub struct TlsFacts<'a> {
    pub sni: Option<&'a str>,
    pub alpn: &'a [String],
}

impl Match {
    pub fn is_catch_all(&self) -> bool {
        self.listeners.is_none() && self.alpn.is_none() && self.sni.is_none()
    }

    #[inline]
    pub fn matches(&self, facts: &Facts<'_>) -> bool {
        if let Some(ls) = &self.listeners {
            if !ls.iter().any(|l| l == facts.listener) {
                return false;
            }
        }
        match (&facts.tls, self.tls) {
            (None, false) => true,
            (None, true) | (Some(_), false) => false,
            (Some(t), true) => {
                if let Some(pats) = &self.alpn {
                    let hit = t
                        .alpn
                        .iter()
                        .any(|offered| pats.iter().any(|p| p.matches(offered)));
                    if !hit {
                        return false;
                    }
                }
                if let Some(pats) = &self.sni {
                    match t.sni {
                        Some(name) if pats.iter().any(|p| p.matches(name)) => {}
                        _ => return false,
                    }
                }
                true
            }
        }
    }

    /// Whether every connection `self` matches is already matched by `earlier`: if so, a route
    /// with `self` placed after `earlier` can never be chosen.
    pub fn shadowed_by(&self, earlier: &Match) -> bool {
        if self.tls != earlier.tls {
            return false;
        }
        let listeners = match (&self.listeners, &earlier.listeners) {
            (_, None) => true,
            (None, Some(_)) => false,
            (Some(mine), Some(theirs)) => mine.iter().all(|l| theirs.contains(l)),
        };
        let alpn = match (&self.alpn, &earlier.alpn) {
            (_, None) => true,
            (None, Some(_)) => false,
            (Some(mine), Some(theirs)) => {
                mine.iter().all(|m| theirs.iter().any(|t| m.covered_by(t)))
            }
        };
        let sni = match (&self.sni, &earlier.sni) {
            (_, None) => true,
            (None, Some(_)) => false,
            (Some(mine), Some(theirs)) => {
                mine.iter().all(|m| theirs.iter().any(|t| m.covered_by(t)))
            }
        };
        listeners && alpn && sni
    }
}

/// An ordered list of routes; `T` is whatever the caller attaches to a route (the runtime uses
/// its compiled route with pool and metric handles).
///
/// Selection is first match in order, as a linear scan would give, but routes that require a
/// server name are found through an index of their SNI patterns: a table of a thousand named
/// routes costs a few hash lookups per connection (one per label of the offered name), not a
/// thousand comparisons.
#[derive(Debug)]
pub struct RouteTable<T> {
    routes: Vec<(Match, T)>,
    index: SniIndex,
}

/// Route positions by SNI pattern, each list in route order. A TLS route with SNI patterns is
/// listed under each of them; every other route is in `always` (tried for every connection).
///
/// The maps hash with FxHash: their keys come from the config, and a lookup cannot change a
/// table's layout, so a client choosing names cannot make lookups slower than the table is.
#[derive(Debug, Default)]
struct SniIndex {
    always: Vec<usize>,
    exact: FxHashMap<String, Vec<usize>>,
    /// Keyed by the suffix with its leading dot (`.example.com` for `*.example.com`).
    suffix: FxHashMap<String, Vec<usize>>,
    /// Keyed by the prefix with its trailing dot (`kube.` for `kube.*`).
    prefix: FxHashMap<String, Vec<usize>>,
}

impl SniIndex {
    fn build<'a>(matches: impl Iterator<Item = &'a Match>) -> SniIndex {
        let mut index = SniIndex::default();
        for (i, m) in matches.enumerate() {
            let pats = match (m.sni.as_ref(), m.tls) {
                (Some(pats), true) => pats,
                _ => {
                    index.always.push(i);
                    continue;
                }
            };
            for p in pats {
                let (map, key) = match p {
                    SniPattern::Exact(k) => (&mut index.exact, k),
                    SniPattern::Suffix(k) => (&mut index.suffix, k),
                    SniPattern::Prefix(k) => (&mut index.prefix, k),
                };
                let list = map.entry(key.clone()).or_default();
                // Two patterns of one route can both hold a key (`a.b` listed twice).
                if list.last() != Some(&i) {
                    list.push(i);
                }
            }
        }
        index
    }

    /// Every list of positions whose SNI pattern matches `name`: the exact entry, then one
    /// per suffix and prefix of `name` cut at a dot (a pattern must leave at least one byte
    /// of the name outside it, as `SniPattern::matches` requires).
    #[inline]
    fn lists<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [usize]> + 'a {
        let dots = |map: &'a FxHashMap<String, Vec<usize>>| {
            let used = !map.is_empty();
            used.then(|| name.match_indices('.').map(|(at, _)| at))
                .into_iter()
                .flatten()
        };
        let suffixes = dots(&self.suffix)
            .filter(|&at| at > 0)
            .filter_map(|at| self.suffix.get(&name[at..]));
        let prefixes = dots(&self.prefix)
            .filter(|&at| at + 1 < name.len())
            .filter_map(|at| self.prefix.get(&name[..=at]));
        self.exact
            .get(name)
            .into_iter()
            .chain(suffixes)
            .chain(prefixes)
            .map(Vec::as_slice)
    }
}

impl<T> RouteTable<T> {
    pub fn new(routes: Vec<(Match, T)>) -> Self {
        let index = SniIndex::build(routes.iter().map(|(m, _)| m));
        Self { routes, index }
    }

    /// The first route whose match keys all hold.
    pub fn select(&self, facts: &Facts<'_>) -> Option<&T> {
        // The earliest matching position in each candidate list (each is in route order, so
        // a list is read only up to the best position found so far).
        let mut best: Option<usize> = None;
        let mut first_in = |list: &[usize]| {
            for &i in list {
                if best.is_some_and(|b| i >= b) {
                    return;
                }
                if self.routes[i].0.matches(facts) {
                    best = Some(i);
                    return;
                }
            }
        };
        if let Some(TlsFacts {
            sni: Some(name), ..
        }) = facts.tls
        {
            for list in self.index.lists(name) {
                first_in(list);
            }
        }
        first_in(&self.index.always);
        best.map(|i| &self.routes[i].1)
    }

    pub fn iter(&self) -> impl Iterator<Item = &(Match, T)> {
        self.routes.iter()
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(alpn: &[&str], sni: &[&str]) -> Match {
        Match {
            listeners: None,
            alpn: (!alpn.is_empty()).then(|| alpn.iter().map(|a| AlpnPattern::parse(a)).collect()),
            sni: (!sni.is_empty())
                .then(|| sni.iter().map(|s| SniPattern::parse(s).unwrap()).collect()),
            tls: true,
        }
    }

    fn tls<'a>(sni: Option<&'a str>, alpn: &'a [String]) -> Facts<'a> {
        Facts {
            listener: "edge",
            tls: Some(TlsFacts { sni, alpn }),
        }
    }

    #[test]
    fn alpn_exact_and_prefix() {
        let r = m(&["teleport-reversetunnel", "teleport-mysql-*"], &[]);
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(r.matches(&tls(None, &a(&["h2", "teleport-reversetunnel"]))));
        assert!(r.matches(&tls(None, &a(&["teleport-mysql-8.0.32"]))));
        assert!(!r.matches(&tls(None, &a(&["teleport-reversetunnelv2"]))));
        assert!(!r.matches(&tls(None, &a(&[]))));
    }

    #[test]
    fn sni_forms() {
        let r = m(
            &[],
            &["*.example.com", "kube-teleport-proxy-alpn.*", "Exact.Host."],
        );
        let none: Vec<String> = vec![];
        for ok in [
            "a.example.com",
            "a.b.example.com",
            "kube-teleport-proxy-alpn.x.y",
            "exact.host",
        ] {
            assert!(r.matches(&tls(Some(ok), &none)), "{ok}");
        }
        for no in [
            "example.com",
            "aexample.com",
            "kube-teleport-proxy-alpn.",
            "other.host",
        ] {
            assert!(!r.matches(&tls(Some(no), &none)), "{no}");
        }
        assert!(!r.matches(&tls(None, &none)));
        assert!(SniPattern::parse("*.").is_err());
        assert!(SniPattern::parse("a b").is_err());
    }

    #[test]
    fn tls_and_plain_never_mix() {
        let catch_all = m(&[], &[]);
        let plain = Match {
            tls: false,
            ..m(&[], &[])
        };
        let none: Vec<String> = vec![];
        let facts_plain = Facts {
            listener: "edge",
            tls: None,
        };
        assert!(!catch_all.matches(&facts_plain));
        assert!(plain.matches(&facts_plain));
        assert!(!plain.matches(&tls(None, &none)));
    }

    #[test]
    fn first_match_wins() {
        let table = RouteTable::new(vec![
            (m(&["teleport-reversetunnel*"], &[]), "tunnels"),
            (m(&[], &[]), "clients"),
        ]);
        let a = vec!["teleport-reversetunnelv2".to_string()];
        assert_eq!(table.select(&tls(None, &a)), Some(&"tunnels"));
        let b = vec!["h2".to_string()];
        assert_eq!(table.select(&tls(Some("x"), &b)), Some(&"clients"));
    }

    /// The index changes how candidates are found, never which route wins: for random tables
    /// (exact, suffix and prefix names, ALPN, listener scopes, plain routes, catch-alls) and
    /// random connections, `select` gives what a scan in order gives.
    #[test]
    fn the_sni_index_selects_what_a_scan_in_order_selects() {
        use proptest::prelude::*;
        let label = prop::sample::select(vec!["a", "b", "kube", "example", "com", "x-y"]);
        let name = prop::collection::vec(label, 1..4).prop_map(|l| l.join("."));
        let sni_pattern = (0..3u8, name.clone()).prop_map(|(form, n)| match form {
            0 => n,
            1 => format!("*.{n}"),
            _ => format!("{n}.*"),
        });
        let route = (
            prop::option::of(prop::collection::vec(sni_pattern, 1..3)),
            prop::option::of(prop::sample::subsequence(vec!["h2", "teleport-*"], 1..=2)),
            prop::option::of(prop::sample::subsequence(vec!["edge", "internal"], 1..=2)),
            prop::bool::weighted(0.9),
        )
            .prop_map(|(sni, alpn, listeners, tls)| Match {
                listeners: listeners.map(|l| l.into_iter().map(String::from).collect()),
                alpn: alpn.map(|a| a.into_iter().map(AlpnPattern::parse).collect()),
                sni: sni.map(|p| p.iter().map(|s| SniPattern::parse(s).unwrap()).collect()),
                tls,
            });
        let facts = (
            prop::option::of(name),
            prop::sample::subsequence(vec!["h2", "http/1.1", "teleport-proxy-ssh"], 0..=3),
            prop::sample::select(vec!["edge", "internal"]),
            prop::bool::weighted(0.9),
        );
        proptest!(|(routes in prop::collection::vec(route, 0..24), (sni, alpn, listener, is_tls) in facts)| {
            let alpn: Vec<String> = alpn.into_iter().map(String::from).collect();
            let facts = Facts {
                listener,
                tls: is_tls.then_some(TlsFacts { sni: sni.as_deref(), alpn: &alpn }),
            };
            let scanned = routes.iter().position(|m| m.matches(&facts));
            let table = RouteTable::new(routes.into_iter().enumerate().map(|(i, m)| (m, i)).collect());
            prop_assert_eq!(table.select(&facts).copied(), scanned);
        });
    }

    #[test]
    fn shadowing() {
        assert!(m(&["h2"], &[]).shadowed_by(&m(&[], &[])));
        assert!(m(&["h2"], &[]).shadowed_by(&m(&["h2", "http/1.1"], &[])));
        assert!(m(&["teleport-mysql-8"], &[]).shadowed_by(&m(&["teleport-*"], &[])));
        assert!(!m(&["teleport-*"], &[]).shadowed_by(&m(&["teleport-mysql-*"], &[])));
        assert!(m(&[], &["a.example.com"]).shadowed_by(&m(&[], &["*.example.com"])));
        assert!(!m(&[], &["*.example.com"]).shadowed_by(&m(&[], &["a.example.com"])));
        assert!(!m(&["h2"], &[]).shadowed_by(&m(&["h2"], &["a.b"])));
        let mut scoped = m(&[], &[]);
        scoped.listeners = Some(vec!["internal".into()]);
        assert!(!m(&["h2"], &[]).shadowed_by(&scoped));
    }
}
