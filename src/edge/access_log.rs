//! The access-log record of a TCP connection: filled in as the connection progresses,
//! written once when it closes (target `sluice::access`), with the same `CloseReason` the
//! metric counts. Every client-controlled value is recorded as a string field, which both
//! formats escape (text: quoted with `\n`, `\"` and `\u{1b}`; JSON: string escaping), so a
//! client can never forge a line or reach the terminal.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::snapshot::Route;
use crate::upstream::Backend;
use sluice_core::close::CloseReason;

/// The hello's SNI and ALPN list as the log prints them, `sni '\n' alpn,alpn` (`-` for
/// none; empty before a hello is parsed). Inline when it fits, as nearly all do: a parked
/// connection then holds no allocation of its own (see `parking`).
pub enum Names {
    Inline { len: u8, bytes: [u8; NAMES_INLINE] },
    Boxed(Box<str>),
}

/// Room for a long SNI and Teleport's two tunnel ALPN names.
const NAMES_INLINE: usize = 94;

impl Names {
    pub fn new(text: &str) -> Names {
        if text.len() > NAMES_INLINE {
            return Names::Boxed(text.into());
        }
        let mut bytes = [0; NAMES_INLINE];
        bytes[..text.len()].copy_from_slice(text.as_bytes());
        Names::Inline {
            len: text.len() as u8,
            bytes,
        }
    }

    fn as_str(&self) -> &str {
        match self {
            // Copied from a `str` whole: always valid UTF-8.
            Names::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..*len as usize]).unwrap_or("")
            }
            Names::Boxed(b) => b,
        }
    }
}

/// The access-log record, filled in as the connection progresses.
pub struct Log {
    pub id: u64,
    pub client: SocketAddr,
    pub tls_names: Names,
    /// Names come from these at emit time: no per-connection string copies.
    pub route: Option<Arc<Route>>,
    pub backend: Option<Arc<Backend>>,
    pub to_backend: u64,
    pub to_client: u64,
    pub started: Instant,
    pub end: CloseReason,
    pub detail: String,
}

impl Log {
    /// Record the hello's names.
    pub fn set_tls_names(&mut self, sni: Option<&str>, alpn: &[String]) {
        let mut names = String::with_capacity(
            sni.map_or(1, str::len) + 1 + alpn.iter().map(|a| a.len() + 1).sum::<usize>(),
        );
        names.push_str(sni.unwrap_or("-"));
        names.push('\n');
        if alpn.is_empty() {
            names.push('-');
        }
        for (i, a) in alpn.iter().enumerate() {
            if i > 0 {
                names.push(',');
            }
            names.push_str(a);
        }
        self.tls_names = Names::new(&names);
    }

    /// (SNI, ALPN list) as logged.
    pub fn tls_names(&self) -> (&str, &str) {
        self.tls_names
            .as_str()
            .split_once('\n')
            .unwrap_or(("-", "-"))
    }

    pub fn route_name(&self) -> &str {
        self.route.as_ref().map_or("none", |r| r.name.as_str())
    }

    pub fn emit(&self, listener: &str) {
        let (sni, alpn) = self.tls_names();
        tracing::info!(
            target: "sluice::access",
            conn = self.id,
            client = %self.client,
            listener,
            sni,
            alpn,
            route = self.route_name(),
            pool = self.route.as_ref().map_or("-", |r| r.pool_name()),
            backend = self.backend.as_ref().map_or("-", |b| b.name.as_str()),
            bytes_to_backend = self.to_backend,
            bytes_to_client = self.to_client,
            duration_ms = self.started.elapsed().as_millis() as u64,
            end = self.end.label(),
            detail = self.detail.as_str(),
            "connection closed"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::Names;

    #[test]
    fn names_are_inline_when_short_and_exact_either_way() {
        let short = "tunnel.example.com\nteleport-reversetunnelv2,teleport-reversetunnel";
        assert!(matches!(Names::new(short), Names::Inline { .. }));
        assert_eq!(Names::new(short).as_str(), short);
        let long = format!("{}.example.com\nh2", "a".repeat(200));
        assert!(matches!(Names::new(&long), Names::Boxed(_)));
        assert_eq!(Names::new(&long).as_str(), long);
        assert_eq!(Names::new("").as_str(), "");
    }
}
