//! A heartbeat as agents send it, and the rules it must follow before it reaches the table:
//! the agent id and address, the version, the TTL (capped at `max_ttl`), the number and names
//! of resources, the credential's scope, and never one of sluice's own addresses. Pure: the
//! HTTP layer (the binary's `agents::api`) turns a `Refusal` into a response and a count.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::auth::{in_scope, Token};
use super::table::{labels_from, Announced, Heartbeat, ResourceKey, Version};
use super::{agent_id_ok, resource_name_ok};

/// One heartbeat as agents send it (and `sluice heartbeat` writes it).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatBody {
    pub agent: String,
    /// Where sluice dials the agent: `IP:port`.
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// How long the records live without another heartbeat (`"90s"`); capped at `max_ttl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    #[serde(default)]
    pub resources: Vec<ResourceBody>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceBody {
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// The `[heartbeat]` limits a heartbeat is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A heartbeat without `ttl` lives this long.
    pub default_ttl: Duration,
    /// No heartbeat lives longer.
    pub max_ttl: Duration,
    /// Resources per agent.
    pub max_resources: usize,
}

/// Why a heartbeat is refused: the HTTP status, the label of
/// `sluice_heartbeats_total{result}`, and the reason sent back (one line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub result: &'static str,
    pub message: String,
}

impl Refusal {
    fn new(status: u16, result: &'static str, message: String) -> Refusal {
        Refusal {
            status,
            result,
            message: message + "\n",
        }
    }
}

/// Parse one heartbeat (JSON; unknown fields are refused).
pub fn parse(text: &[u8]) -> Result<HeartbeatBody, Refusal> {
    serde_json::from_slice(text)
        .map_err(|e| Refusal::new(400, "malformed", format!("not a heartbeat: {e}")))
}

/// Check a heartbeat against the limits, the credential's scope, and sluice's own addresses.
pub fn validate(
    body: HeartbeatBody,
    cfg: &Limits,
    token: Option<&Token>,
    own: &[SocketAddr],
) -> Result<Heartbeat, Refusal> {
    let bad = |m: String| Refusal::new(400, "malformed", m);
    if !agent_id_ok(&body.agent) {
        return Err(bad(format!(
            "`agent` {:?} must be 1 to 256 of [A-Za-z0-9._:-] (it goes in URL paths)",
            body.agent
        )));
    }
    let address: SocketAddr = body
        .address
        .parse()
        .map_err(|_| bad(format!("`address` {:?} is not IP:port", body.address)))?;
    if own.iter().any(|o| {
        o.port() == address.port()
            && (o.ip() == address.ip() || o.ip().is_unspecified() || address.ip().is_unspecified())
    }) {
        return Err(bad(format!(
            "`address` {address} is one of sluice's own listeners (it would dial itself)"
        )));
    }
    let version = match body.version.as_deref() {
        None | Some("") => None,
        Some(v) => Some(
            Version::parse(v).ok_or_else(|| bad(format!("`version` {v:?} is not a version")))?,
        ),
    };
    let ttl = match body.ttl.as_deref() {
        None => cfg.default_ttl,
        Some(t) => humantime::parse_duration(t)
            .map_err(|e| bad(format!("`ttl` {t:?} is not a duration: {e}")))?,
    };
    if ttl.is_zero() {
        return Err(bad("`ttl` must be more than 0".into()));
    }
    let ttl = ttl.min(cfg.max_ttl);
    if body.resources.len() > cfg.max_resources {
        return Err(Refusal::new(
            422,
            "too_many_resources",
            format!(
                "{} resources; at most {} per agent (heartbeat.max_resources)",
                body.resources.len(),
                cfg.max_resources
            ),
        ));
    }
    let mut resources = Vec::with_capacity(body.resources.len());
    for r in &body.resources {
        let kind_ok = !r.kind.is_empty()
            && r.kind.len() <= 64
            && r.kind
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !kind_ok || !resource_name_ok(&r.name) {
            return Err(bad(format!(
                "resource {:?}/{:?}: kind is [A-Za-z0-9._-]{{1,64}}; name is 1 to 253 of [a-z0-9._-] (it is matched against a lowercased SNI)",
                r.kind, r.name
            )));
        }
        // The scope applies to what the router will see: resource labels over agent labels.
        let mut merged = body.labels.clone();
        merged.extend(r.labels.clone());
        in_scope(token, &r.kind, &merged).map_err(|m| Refusal::new(403, "forbidden", m))?;
        resources.push(Announced {
            key: ResourceKey::new(&r.kind, &r.name),
            labels: labels_from(&r.labels),
        });
    }
    Ok(Heartbeat {
        agent: body.agent,
        address,
        version,
        labels: labels_from(&body.labels),
        ttl: ttl.as_millis() as u64,
        resources,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::auth::parse_tokens;

    const LIMITS: Limits = Limits {
        default_ttl: Duration::from_secs(90),
        max_ttl: Duration::from_secs(900),
        max_resources: 2,
    };

    fn body(json: &str) -> HeartbeatBody {
        parse(json.as_bytes()).unwrap()
    }

    fn refused(json: &str, token: Option<&Token>, own: &[SocketAddr]) -> (u16, &'static str) {
        let r = validate(body(json), &LIMITS, token, own).unwrap_err();
        assert!(r.message.ends_with('\n') && !r.message.trim().is_empty());
        (r.status, r.result)
    }

    #[test]
    fn a_good_heartbeat_becomes_a_record_with_a_capped_ttl() {
        let hb = validate(
            body(r#"{"agent":"a1","address":"10.0.0.1:3022","version":"17.1.0","ttl":"1h","resources":[{"kind":"app","name":"grafana","labels":{"env":"prod"}}]}"#),
            &LIMITS,
            None,
            &[],
        )
        .unwrap();
        assert_eq!(hb.agent, "a1");
        assert_eq!(hb.ttl, 900_000, "capped at max_ttl");
        assert_eq!(hb.version, Version::parse("17.1.0"));
        assert_eq!(hb.resources[0].key, ResourceKey::new("app", "grafana"));
        let hb = validate(
            body(r#"{"agent":"a1","address":"10.0.0.1:3022"}"#),
            &LIMITS,
            None,
            &[],
        )
        .unwrap();
        assert_eq!(hb.ttl, 90_000, "default_ttl");
    }

    #[test]
    fn bad_fields_are_refused_with_their_reason() {
        let bad = (400, "malformed");
        for json in [
            r#"{"agent":"a b","address":"10.0.0.1:1"}"#,
            r#"{"agent":"a1","address":"agent.example:1"}"#,
            r#"{"agent":"a1","address":"10.0.0.1:1","version":"seventeen"}"#,
            r#"{"agent":"a1","address":"10.0.0.1:1","ttl":"0s"}"#,
            r#"{"agent":"a1","address":"10.0.0.1:1","ttl":"soon"}"#,
            r#"{"agent":"a1","address":"10.0.0.1:1","resources":[{"kind":"app","name":"Grafana"}]}"#,
            r#"{"agent":"a1","address":"10.0.0.1:1","resources":[{"kind":"","name":"x"}]}"#,
        ] {
            assert_eq!(refused(json, None, &[]), bad, "{json}");
        }
        assert_eq!(
            parse(br#"{"agent":"a1","address":"10.0.0.1:1","colour":"red"}"#)
                .unwrap_err()
                .result,
            "malformed"
        );
        let three = r#"{"agent":"a1","address":"10.0.0.1:1","resources":[{"kind":"app","name":"a"},{"kind":"app","name":"b"},{"kind":"app","name":"c"}]}"#;
        assert_eq!(refused(three, None, &[]), (422, "too_many_resources"));
    }

    #[test]
    fn sluices_own_addresses_and_out_of_scope_resources_are_refused() {
        let own: Vec<SocketAddr> = vec!["0.0.0.0:443".parse().unwrap()];
        let json = r#"{"agent":"a1","address":"10.0.0.1:443"}"#;
        assert_eq!(refused(json, None, &own), (400, "malformed"));
        assert!(validate(body(json), &LIMITS, None, &["0.0.0.0:444".parse().unwrap()]).is_ok());
        let tokens = parse_tokens("0123456789abcdef0123 kinds=db labels=env=prod\n").unwrap();
        let app = r#"{"agent":"a1","address":"10.0.0.1:1","labels":{"env":"prod"},"resources":[{"kind":"app","name":"a"}]}"#;
        assert_eq!(refused(app, Some(&tokens[0]), &[]), (403, "forbidden"));
        // Resource labels count over the agent's.
        let db = r#"{"agent":"a1","address":"10.0.0.1:1","labels":{"env":"dev"},"resources":[{"kind":"db","name":"a","labels":{"env":"prod"}}]}"#;
        assert!(validate(body(db), &LIMITS, Some(&tokens[0]), &[]).is_ok());
    }
}
