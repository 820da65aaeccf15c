//! The heartbeat table as several edges share it through a key-value store (etcd): the key
//! layout, the record each agent's key holds, what a heartbeat has to write, and what a
//! watched change means. Pure: the binary's store client does the I/O with these decisions.
//!
//! One key per agent, `<prefix><cluster>/agents/<id>`, attached to the agent's own lease
//! (TTL: the heartbeat's, capped at `max_ttl`). A heartbeat that repeats the stored record is
//! only a lease keep-alive; one that changes something rewrites the record, guarded on the
//! key's `mod_revision`. A goodbye (or the end of the agent's stream) deletes the key and, in
//! the same transaction, writes a short-lived marker `<prefix><cluster>/gone/<id>`: a watcher
//! that sees the key deleted in the same revision as a marker written knows the agent left
//! (gone at once on every edge); a deletion without one is the lease expiring (listed as
//! `expired` for `keep_expired`, as an edge alone does).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

pub use super::table::StreamOwner;
use super::table::{labels_from, Agent, Announced, Heartbeat, ResourceKey, StoreMeta, Version};
use super::Endpoint;

/// The keys of one cluster under a prefix (`[store] prefix`, `[cluster] name`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    base: String,
}

/// What a key of the store is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key<'a> {
    /// An agent's record.
    Agent(&'a str),
    /// The marker a goodbye leaves for the agent.
    Gone(&'a str),
    /// Not one of sluice's (another cluster's keys share no prefix; anything else is ignored).
    Other,
}

impl Keys {
    /// `prefix` ends with `/` (validated); `cluster` is a plain name.
    pub fn new(prefix: &str, cluster: &str) -> Keys {
        Keys {
            base: format!("{prefix}{cluster}/"),
        }
    }

    /// Everything of this cluster: what an edge lists and watches.
    pub fn cluster_prefix(&self) -> &str {
        &self.base
    }

    pub fn agent(&self, id: &str) -> String {
        format!("{}agents/{id}", self.base)
    }

    pub fn gone(&self, id: &str) -> String {
        format!("{}gone/{id}", self.base)
    }

    /// What `key` is.
    pub fn parse<'a>(&self, key: &'a [u8]) -> Key<'a> {
        let Ok(key) = std::str::from_utf8(key) else {
            return Key::Other;
        };
        let Some(rest) = key.strip_prefix(self.base.as_str()) else {
            return Key::Other;
        };
        let ok = |id: &'a str| super::agent_id_ok(id).then_some(id);
        if let Some(id) = rest.strip_prefix("agents/").and_then(ok) {
            Key::Agent(id)
        } else if let Some(id) = rest.strip_prefix("gone/").and_then(ok) {
            Key::Gone(id)
        } else {
            Key::Other
        }
    }
}

/// One resource in a stored record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredResource {
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// What an agent's key holds: everything every edge must agree on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub address: SocketAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub resources: Vec<StoredResource>,
    /// The heartbeat's TTL (ms), capped at `max_ttl`: the lease's.
    pub ttl_ms: u64,
    /// The credential that announced it: another scoped credential may not change it.
    pub owner: String,
    /// When it was first announced (ms since the Unix epoch, the first edge's clock), kept
    /// across changes: `heartbeat.min_ready` counts from it on every edge.
    pub first_seen_unix_ms: u64,
    /// The edge and stream that announced it, when it came on a stream: only that stream's
    /// end removes it (another edge may have taken the agent over meanwhile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamOwner>,
}

/// What a heartbeat asks of the store, given the agent's stored record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Nothing changed: keep the lease alive (no write, no watch event on any edge).
    KeepAlive,
    /// Write this record (new, or changed), on a new lease when the TTL changed.
    Put { record: Record, new_lease: bool },
}

impl Record {
    /// The record `hb` describes, announced by `owner` (on `stream`), first seen at
    /// `first_seen_unix_ms` unless `previous` says earlier.
    pub fn of(
        hb: &Heartbeat,
        owner: &str,
        stream: Option<StreamOwner>,
        previous: Option<&Record>,
        now_unix_ms: u64,
    ) -> Record {
        let mut hb = hb.clone();
        hb.normalize();
        Record {
            address: hb.address,
            version: hb.version.map(|v| v.to_string()),
            labels: hb
                .labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            resources: hb
                .resources
                .iter()
                .map(|r| StoredResource {
                    kind: r.key.kind().to_owned(),
                    name: r.key.name().to_owned(),
                    labels: r
                        .labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                })
                .collect(),
            ttl_ms: hb.ttl,
            owner: owner.to_owned(),
            first_seen_unix_ms: previous.map_or(now_unix_ms, |p| p.first_seen_unix_ms),
            stream,
        }
    }

    /// What an agent the store announced holds, as its key does (`None`: not the store's).
    pub fn of_agent<B: Endpoint>(agent: &Agent<B>) -> Option<Record> {
        let meta = agent.stored.as_deref()?;
        let map = |labels: &[(Box<str>, Box<str>)]| {
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        Some(Record {
            address: agent.backend.address(),
            version: agent.version.map(|v| v.to_string()),
            labels: map(&agent.labels),
            resources: agent
                .resources
                .iter()
                .map(|r| StoredResource {
                    kind: r.key.kind().to_owned(),
                    name: r.key.name().to_owned(),
                    labels: map(&r.labels),
                })
                .collect(),
            ttl_ms: meta.ttl_ms,
            owner: agent.owner.to_string(),
            first_seen_unix_ms: meta.first_seen_unix_ms,
            stream: meta.stream.clone(),
        })
    }

    /// The table's view of this record at `mod_revision` on `lease`.
    pub fn meta(&self, mod_revision: i64, lease: i64) -> StoreMeta {
        StoreMeta {
            mod_revision,
            lease,
            ttl_ms: self.ttl_ms,
            first_seen_unix_ms: self.first_seen_unix_ms,
            stream: self.stream.clone(),
        }
    }

    /// The heartbeat this record stands for, for the edge's own table (`agent` is the id the
    /// key names).
    pub fn heartbeat(&self, agent: &str) -> Option<Heartbeat> {
        let version = match &self.version {
            Some(v) => Some(Version::parse(v)?),
            None => None,
        };
        let names_ok = self.resources.iter().all(|r| {
            super::resource_name_ok(&r.name) && !r.kind.is_empty() && !r.kind.contains('\0')
        });
        if !super::agent_id_ok(agent) || !names_ok || self.ttl_ms == 0 {
            return None;
        }
        Some(Heartbeat {
            agent: agent.to_owned(),
            address: self.address,
            version,
            labels: labels_from(&self.labels),
            ttl: self.ttl_ms,
            resources: self
                .resources
                .iter()
                .map(|r| Announced {
                    key: ResourceKey::new(&r.kind, &r.name),
                    labels: labels_from(&r.labels),
                })
                .collect(),
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        // A record of strings, numbers and maps always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Record, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }
}

/// What `hb` from `owner` has to write, given the stored record: a keep-alive when nothing
/// but the expiry would change, else the new record (keeping when it was first seen).
pub fn write_for(
    stored: Option<&Record>,
    hb: &Heartbeat,
    owner: &str,
    stream: Option<StreamOwner>,
    now_unix_ms: u64,
) -> Write {
    let record = Record::of(hb, owner, stream, stored, now_unix_ms);
    match stored {
        Some(s) if *s == record => Write::KeepAlive,
        Some(s) => Write::Put {
            new_lease: s.ttl_ms != record.ttl_ms,
            record,
        },
        None => Write::Put {
            record,
            new_lease: true,
        },
    }
}

/// What one watched revision did to an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change<'a> {
    /// Announced or changed.
    Put(&'a str),
    /// Said goodbye, or its stream ended: gone at once.
    Left(&'a str),
    /// Its lease expired: listed as expired for `keep_expired`.
    Expired(&'a str),
}

/// The changes of one revision's events (`(deleted?, key)` in their order), each with the
/// index of its event: a deleted agent key is a goodbye when the same revision wrote its
/// `gone` marker, else an expiry.
pub fn changes<'a>(keys: &Keys, events: &[(bool, &'a [u8])]) -> Vec<(usize, Change<'a>)> {
    let marked: Vec<&str> = events
        .iter()
        .filter(|(deleted, _)| !deleted)
        .filter_map(|(_, k)| match keys.parse(k) {
            Key::Gone(id) => Some(id),
            _ => None,
        })
        .collect();
    events
        .iter()
        .enumerate()
        .filter_map(|(i, &(deleted, k))| match keys.parse(k) {
            Key::Agent(id) if !deleted => Some((i, Change::Put(id))),
            Key::Agent(id) if marked.contains(&id) => Some((i, Change::Left(id))),
            Key::Agent(id) => Some((i, Change::Expired(id))),
            _ => None,
        })
        .collect()
}

/// The end of the key range of everything under `prefix` (etcd's "prefix end").
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): everything from the prefix on.
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb(address: &str, version: &str, apps: &[&str], ttl: u64) -> Heartbeat {
        Heartbeat {
            agent: "a1".into(),
            address: address.parse().unwrap(),
            version: Version::parse(version),
            labels: labels_from(&[("env".to_owned(), "prod".to_owned())].into()),
            ttl,
            resources: apps
                .iter()
                .map(|n| Announced {
                    key: ResourceKey::new("app", n),
                    labels: Box::new([]),
                })
                .collect(),
        }
    }

    #[test]
    fn keys_are_per_cluster_and_parse_back() {
        let k = Keys::new("/sluice/", "prod");
        assert_eq!(k.agent("a1"), "/sluice/prod/agents/a1");
        assert_eq!(k.gone("a1"), "/sluice/prod/gone/a1");
        assert_eq!(k.parse(b"/sluice/prod/agents/a1"), Key::Agent("a1"));
        assert_eq!(k.parse(b"/sluice/prod/gone/a1"), Key::Gone("a1"));
        // Another cluster, a bad id, a foreign key, bytes that are not UTF-8.
        assert_eq!(k.parse(b"/sluice/staging/agents/a1"), Key::Other);
        assert_eq!(k.parse(b"/sluice/prod/agents/a b"), Key::Other);
        assert_eq!(k.parse(b"/other"), Key::Other);
        assert_eq!(k.parse(&[0xff, 0xfe]), Key::Other);
    }

    #[test]
    fn a_repeated_heartbeat_is_a_keep_alive_and_a_change_a_put_that_keeps_first_seen() {
        let first = hb("10.0.0.1:3022", "17.1.0", &["grafana"], 90_000);
        let Write::Put { record, new_lease } = write_for(None, &first, "east", None, 1_000) else {
            panic!("a new agent is written")
        };
        assert!(new_lease);
        assert_eq!(record.first_seen_unix_ms, 1_000);
        // Round trip through the store's bytes and back to the table's form.
        let stored = Record::decode(&record.encode()).unwrap();
        assert_eq!(stored, record);
        let back = stored.heartbeat("a1").unwrap();
        assert_eq!(back.resources, first.resources);
        assert_eq!(
            (back.address, back.version, back.ttl),
            (first.address, first.version, 90_000)
        );
        // The same heartbeat later: only the lease.
        assert_eq!(
            write_for(Some(&stored), &first, "east", None, 50_000),
            Write::KeepAlive
        );
        // A new resource: a put on the same lease, first seen unchanged.
        let more = hb("10.0.0.1:3022", "17.1.0", &["grafana", "kibana"], 90_000);
        let Write::Put { record, new_lease } =
            write_for(Some(&stored), &more, "east", None, 60_000)
        else {
            panic!("a change is written")
        };
        assert!(!new_lease);
        assert_eq!(record.first_seen_unix_ms, 1_000);
        // A new TTL needs a new lease.
        let longer = hb("10.0.0.1:3022", "17.1.0", &["grafana"], 300_000);
        assert!(matches!(
            write_for(Some(&stored), &longer, "east", None, 60_000),
            Write::Put {
                new_lease: true,
                ..
            }
        ));
        // Another owner or stream is a change too (the record says who owns it).
        assert!(matches!(
            write_for(Some(&stored), &first, "west", None, 60_000),
            Write::Put { .. }
        ));
        let s = StreamOwner {
            edge: "edge-b".into(),
            id: 7,
        };
        assert!(matches!(
            write_for(Some(&stored), &first, "east", Some(s), 60_000),
            Write::Put { .. }
        ));
    }

    #[test]
    fn a_deletion_with_a_marker_is_a_goodbye_and_one_without_an_expiry() {
        let k = Keys::new("/sluice/", "prod");
        let (a1, a2, g1) = (k.agent("a1"), k.agent("a2"), k.gone("a1"));
        let events = [
            (true, a1.as_bytes()),
            (false, g1.as_bytes()),
            (true, a2.as_bytes()),
            (false, b"/elsewhere".as_slice()),
        ];
        assert_eq!(
            changes(&k, &events),
            vec![(0, Change::Left("a1")), (2, Change::Expired("a2"))]
        );
        assert_eq!(
            changes(&k, &[(false, a2.as_bytes())]),
            vec![(0, Change::Put("a2"))]
        );
        assert_eq!(prefix_end(b"/sluice/prod/"), b"/sluice/prod0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        // The marker expiring later means nothing.
        assert_eq!(changes(&k, &[(true, g1.as_bytes())]), vec![]);
        // A record another version of sluice wrote with fields this one does not know is
        // refused, not half-read.
        assert!(Record::decode(br#"{"address":"10.0.0.1:1","ttl_ms":1,"owner":"t","first_seen_unix_ms":0,"colour":"red"}"#).is_err());
    }
}
