//! Why a connection ended: one typed reason, written by the access log (`end=`) and counted by
//! `sluice_connections_closed_total{reason}`, so the two can never disagree.

use std::fmt;

/// Who is to blame for an error, for labels and alerts: a client sent something wrong, a
/// backend failed, the config does not cover the case, or sluice itself failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    Client,
    Backend,
    Config,
    Internal,
}

impl ErrorClass {
    pub fn label(self) -> &'static str {
        match self {
            ErrorClass::Client => "client",
            ErrorClass::Backend => "backend",
            ErrorClass::Config => "config",
            ErrorClass::Internal => "internal",
        }
    }
}

macro_rules! reasons {
    ($($(#[$doc:meta])* $variant:ident = $label:literal, $class:expr;)*) => {
        /// How a TCP connection ended.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum CloseReason {
            $($(#[$doc])* $variant,)*
        }

        impl CloseReason {
            /// Every reason, for tests and for metrics that must exist before their first use.
            pub const ALL: &'static [CloseReason] = &[$(CloseReason::$variant,)*];

            /// The label of the access log's `end` field and of the metric.
            #[inline]
            pub fn label(self) -> &'static str {
                match self {
                    $(CloseReason::$variant => $label,)*
                }
            }

            /// `None` for an orderly end.
            pub fn class(self) -> Option<ErrorClass> {
                match self {
                    $(CloseReason::$variant => $class,)*
                }
            }
        }
    };
}

use ErrorClass::{Backend, Client, Config, Internal};

reasons! {
    /// Both directions finished with a FIN.
    Closed = "closed", None;
    /// A read or write on the client's leg failed (reset, broken pipe).
    ClientError = "client_error", Some(Client);
    /// A read or write on the backend's leg failed.
    BackendError = "backend_error", Some(Backend);
    /// The route's `idle_timeout` passed with no byte either way.
    IdleTimeout = "idle_timeout", None;
    /// The process stopped the connection (the end of a drain).
    Shutdown = "shutdown", None;
    /// A reload removed its backend and the pool's `removed_drain_timeout` passed.
    BackendRemoved = "backend_removed", None;
    /// sluice could not go on (a parked connection the reactor refused, a PROXY header that
    /// could not be encoded).
    InternalError = "internal_error", Some(Internal);
    /// An agent's heartbeat session on the main port ended normally.
    HeartbeatApi = "heartbeat_api", None;
    /// An agent's heartbeat session on the main port failed (TLS, HTTP).
    HeartbeatApiError = "heartbeat_api_error", Some(Client);
    /// A PROXY header from a source outside `trusted_proxies`, or none from it where required.
    ProxyUntrusted = "proxy_untrusted", Some(Client);
    /// The client's address is refused by the listener's or the route's `allow`/`deny`.
    Denied = "denied", Some(Client);
    /// It had not sent its hello when a newer connection needed its place (a pending cap, or
    /// the connection cap).
    PendingEvicted = "pending_evicted", Some(Client);
    /// sluice had no descriptor (or memory) left to open the backend connection: the
    /// open-file limit is too low for the load (`limits.max_connections`).
    LocalResources = "local_resources", Some(Internal);
    /// No PROXY header where the listener requires one.
    ProxyMissing = "proxy_missing", Some(Client);
    /// A PROXY header that does not parse, is too large or is of the wrong version.
    ProxyMalformed = "proxy_malformed", Some(Client);
    /// No complete PROXY header within `hello_timeout`.
    ProxyTimeout = "proxy_timeout", Some(Client);
    /// The client closed (or failed) before its hello was complete.
    ClientClosedEarly = "client_closed_early", Some(Client);
    /// No complete hello within `hello_timeout`.
    HelloTimeout = "hello_timeout", Some(Client);
    /// A hello larger than `max_hello_size`.
    HelloTooLarge = "hello_too_large", Some(Client);
    /// A hello the parser refuses.
    HelloMalformed = "hello_malformed", Some(Client);
    /// A TLS connection no route matches.
    NoRoute = "no_route", Some(Config);
    /// Not TLS, and no `tls = false` route takes it.
    NotTls = "not_tls", Some(Client);
    /// No backend (or agent) could be connected.
    BackendUnavailable = "backend_unavailable", Some(Backend);
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for r in CloseReason::ALL {
            let l = r.label();
            assert!(seen.insert(l), "{l} twice");
            assert!(
                l.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{l}"
            );
            assert_eq!(r.to_string(), l);
        }
        assert_eq!(seen.len(), 23);
    }

    #[test]
    fn orderly_ends_have_no_error_class() {
        assert_eq!(CloseReason::Closed.class(), None);
        assert_eq!(CloseReason::Shutdown.class(), None);
        assert_eq!(CloseReason::NoRoute.class(), Some(ErrorClass::Config));
        assert_eq!(
            CloseReason::BackendUnavailable
                .class()
                .map(ErrorClass::label),
            Some("backend")
        );
    }
}
