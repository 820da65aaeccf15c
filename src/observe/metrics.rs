//! Metrics: every Prometheus family sluice exports, defined in one place.
//!
//! Owns: names, help texts, label sets. Labels are bounded by configuration (listener, route,
//! pool, backend address as configured) or by code (result, reason, direction) — never a client
//! address or an SNI. One `Metrics` per process (tests create several, each with its own
//! registry).

use prometheus::core::Collector;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub const CONNECTIONS_ACCEPTED: &str = "sluice_connections_accepted_total";
pub const CONNECTIONS_ACTIVE: &str = "sluice_connections_active";
pub const CONNECTIONS_CLOSED: &str = "sluice_connections_closed_total";
pub const ROUTE_CONNECTIONS_ACTIVE: &str = "sluice_route_connections_active";
pub const ACCEPT_ERRORS: &str = "sluice_accept_errors_total";
pub const ACCEPT_PAUSED: &str = "sluice_accept_paused_total";
pub const HELLO: &str = "sluice_hello_total";
pub const ROUTE_DECISIONS: &str = "sluice_route_decisions_total";
pub const UPSTREAM_CONNECT_SECONDS: &str = "sluice_upstream_connect_duration_seconds";
pub const UPSTREAM_CONNECT_FAILURES: &str = "sluice_upstream_connect_failures_total";
pub const UPSTREAM_EXHAUSTED: &str = "sluice_upstream_unavailable_total";
pub const BYTES: &str = "sluice_bytes_total";
pub const POOL_BACKENDS: &str = "sluice_pool_backends";
pub const BACKEND_ACTIVE: &str = "sluice_backend_connections_active";
pub const BACKEND_DRAINING: &str = "sluice_backend_draining";
pub const BACKEND_CONNECTIONS: &str = "sluice_backend_connections_total";
pub const BACKEND_CONNECT_FAILURES: &str = "sluice_backend_connect_failures_total";
pub const BACKEND_BYTES: &str = "sluice_backend_bytes_total";
pub const CONNECTION_DURATION: &str = "sluice_connection_duration_seconds";
pub const BUILD_INFO: &str = "sluice_build_info";
pub const LIFECYCLE_STATE: &str = "sluice_lifecycle_state";
pub const MAX_CONNECTIONS: &str = "sluice_max_connections";
pub const CONFIG_RELOADS: &str = "sluice_config_reloads_total";
pub const CONFIG_LAST_RELOAD_SUCCESSFUL: &str = "sluice_config_last_reload_successful";
pub const CONFIG_LAST_RELOAD_SUCCESS_TIMESTAMP: &str =
    "sluice_config_last_reload_success_timestamp_seconds";
pub const CONFIG_INFO: &str = "sluice_config_info";
pub const PROXY_INBOUND: &str = "sluice_proxy_protocol_inbound_total";
pub const BACKEND_EJECTIONS: &str = "sluice_backend_ejections_total";
pub const BACKEND_HEALTHY: &str = "sluice_backend_healthy";
pub const HEALTH_CHECKS: &str = "sluice_health_checks_total";
pub const DNS_RESOLUTIONS: &str = "sluice_dns_resolutions_total";
pub const LOG_LINES_DROPPED: &str = "sluice_log_lines_dropped_total";
pub const RELAY_PIPES: &str = "sluice_relay_pipes";
pub const RELAY_SPLICED_BYTES: &str = "sluice_relay_spliced_bytes_total";
pub const RELAY_PIPES_UNAVAILABLE: &str = "sluice_relay_pipes_unavailable_total";
pub const RELAY_PARKED: &str = "sluice_relay_parked";
pub const RELAY_PARKS: &str = "sluice_relay_parks_total";
pub const AGENTS: &str = "sluice_agents";
pub const RESOURCES: &str = "sluice_resources";
pub const HEARTBEATS: &str = "sluice_heartbeats_total";
pub const AGENT_VERSIONS: &str = "sluice_agent_versions";
pub const VERSION_REQUESTS: &str = "sluice_version_requests_total";
pub const VERSION_CLAMPED: &str = "sluice_version_clamped_total";
pub const VERSION_FORWARD_FAILURES: &str = "sluice_version_forward_failures_total";
pub const SESSIONS_ACTIVE: &str = "sluice_sessions_active";
pub const SESSION_REPINS: &str = "sluice_session_repins_total";
pub const RESOURCE_MISSES: &str = "sluice_resource_misses_total";
pub const AGENT_CONNECT_FAILURES: &str = "sluice_agent_connect_failures_total";
pub const QUIC_FLOWS_ACTIVE: &str = "sluice_quic_flows_active";
pub const QUIC_FLOWS: &str = "sluice_quic_flows_total";
pub const QUIC_INITIALS: &str = "sluice_quic_initials_total";
pub const QUIC_PACKETS: &str = "sluice_quic_packets_total";
pub const QUIC_BYTES: &str = "sluice_quic_bytes_total";
pub const QUIC_MIGRATIONS: &str = "sluice_quic_migrations_total";
pub const QUIC_HANDOVER: &str = "sluice_quic_handover_datagrams_total";
pub const QUIC_STREAM_RESETS: &str = "sluice_quic_stream_resets_total";
pub const PENDING_HELLOS: &str = "sluice_pending_hellos";
pub const PENDING_EVICTIONS: &str = "sluice_pending_hello_evictions_total";
pub const ACCESS_DENIED: &str = "sluice_access_denied_total";
pub const STORE_CONNECTED: &str = "sluice_store_connected";
pub const STORE_OPERATIONS: &str = "sluice_store_operations_total";
pub const STORE_RELISTS: &str = "sluice_store_relists_total";
pub const STORE_LAST_EVENT_AGE: &str = "sluice_store_last_event_age_seconds";

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Mirrors `logging::dropped_lines()` at each scrape.
    log_lines_dropped: IntCounter,
    /// Mirror the relay's pipe count and spliced bytes at each scrape (`mirror_relay`).
    relay_pipes: IntGauge,
    relay_spliced_bytes: IntCounter,
    /// Times a bulk relay found no splice pipe (the cap, or the system refused) and copied.
    relay_pipes_unavailable: IntCounter,
    /// Connections in the parking lot now, and parkings so far (see `parking`).
    pub relay_parked: IntGauge,
    pub relay_parks: IntCounter,
    /// {listener}
    pub accepted: IntCounterVec,
    /// {listener}
    pub active: IntGaugeVec,
    /// {listener, route, reason}: route is "none" for connections that never got one.
    pub closed: IntCounterVec,
    /// {route}
    pub route_active: IntGaugeVec,
    /// {listener, kind}
    pub accept_errors: IntCounterVec,
    /// {listener, cap}: the accept loop had to wait for a connection slot.
    pub accept_paused: IntCounterVec,
    /// {listener, result}: ok, not_tls, malformed, too_large, timeout, eof
    pub hello: IntCounterVec,
    /// {listener, route}: route "none" when nothing matched (the connection is closed).
    pub route_decisions: IntCounterVec,
    /// {pool}
    pub connect_seconds: HistogramVec,
    /// {pool, reason}: refused, timeout, unreachable, reset, other
    pub connect_failures: IntCounterVec,
    /// {pool}: every backend was tried or none was available.
    pub unavailable: IntCounterVec,
    /// {route, direction}: to_backend, to_client
    pub bytes: IntCounterVec,
    /// {pool}
    pub pool_backends: IntGaugeVec,
    /// {pool, backend}
    pub backend_active: IntGaugeVec,
    /// {pool, backend}: 1 while drained (admin API, or `weight = 0`).
    pub backend_draining: IntGaugeVec,
    /// {pool, backend}: connections established to it.
    pub backend_connections: IntCounterVec,
    /// {pool, backend}: connects to it that failed (refused, timed out, reset, unreachable).
    pub backend_connect_failures: IntCounterVec,
    /// {pool, backend, direction}: bytes relayed through it, counted when each connection ends.
    pub backend_bytes: IntCounterVec,
    /// {route}: how long connections lasted, from accept to close.
    pub connection_duration: HistogramVec,
    /// {state}: 1 for the current one of starting, ready, draining, closing
    pub lifecycle_state: IntGaugeVec,
    pub max_connections: IntGauge,
    /// {result}: success, failure, unchanged
    pub reloads: IntCounterVec,
    pub last_reload_successful: IntGauge,
    pub last_reload_success_timestamp: IntGauge,
    /// {hash}: 1 for the config running now
    pub config_info: IntGaugeVec,
    /// {listener, result}: ok, local, absent, untrusted, missing, malformed, timeout, eof
    pub proxy_inbound: IntCounterVec,
    /// {pool, backend}: passive ejections after consecutive connect failures
    pub ejections: IntCounterVec,
    /// {pool, backend}: 1 healthy, 0 unhealthy (absent until the first verdict)
    pub backend_healthy: IntGaugeVec,
    /// {pool, result}: ok, fail
    pub health_checks: IntCounterVec,
    /// {pool, result}: ok, empty, error
    pub dns_resolutions: IntCounterVec,
    /// {state}: ready, warming, expired, version_skew (counted at each scrape)
    pub agents: IntGaugeVec,
    /// Distinct (kind, name) resources in the agent table.
    pub resources: IntGauge,
    /// {version, state}: agents by the version they announce (`unknown`: none) and state;
    /// bounded by the versions in the table now.
    pub agent_versions: IntGaugeVec,
    /// {result}: ok, goodbye, stream_ended, unauthorized, forbidden, malformed, too_large,
    /// too_many_resources, table_full, tls_error
    pub heartbeats: IntCounterVec,
    /// {channel, endpoint, answer}: version server requests; `answer` is version, none, yes,
    /// no, stale (a cached answer served while upstream fails), unavailable, rate_limited or
    /// not_found (`channel` is then `unknown`: names from the path are not labels).
    pub version_requests: IntCounterVec,
    /// {channel}: answers lowered to `cluster.version`.
    pub version_clamped: IntCounterVec,
    /// {channel}: failed refreshes of a forwarded channel.
    pub version_forward_failures: IntCounterVec,
    /// {route}
    pub sessions_active: IntGaugeVec,
    /// {route}: a session's agent was no longer eligible; the client got a new one.
    pub session_repins: IntCounterVec,
    /// {route, reason}: no_name, unknown_resource, no_eligible_agent, all_agents_failed
    pub resource_misses: IntCounterVec,
    /// {route, reason}: refused, timeout, unreachable, reset, other
    pub agent_connect_failures: IntCounterVec,
    /// {listener}
    pub quic_flows_active: IntGaugeVec,
    /// {listener, route}
    pub quic_flows: IntCounterVec,
    /// {listener, result}
    pub quic_initials: IntCounterVec,
    /// {listener, direction}: from_client, to_client
    pub quic_packets: IntCounterVec,
    /// {listener, direction}
    pub quic_bytes: IntCounterVec,
    /// {listener}
    pub quic_migrations: IntCounterVec,
    /// {listener, direction}: in a binary upgrade, datagrams asked about across (`sent`),
    /// served here when asked (`received`), asked about and sent back (`returned`), lost
    /// (`dropped`: the socket pair's buffer full, or a malformed message)
    pub quic_handover: IntCounterVec,
    /// {route, reason}: streams of terminated QUIC connections sluice reset because their
    /// backend failed: `backend_unavailable` (no connect), `backend_error` (broke mid-stream)
    pub quic_stream_resets: IntCounterVec,
    /// Connections waiting for their hello (or PROXY header) now.
    pub pending_hellos: IntGauge,
    /// {reason}: pending connections closed to make room: pending_cap, source_cap,
    /// connection_cap.
    pub pending_evictions: IntCounterVec,
    /// {scope, name}: connections refused by an `allow`/`deny` list: scope `listener` or
    /// `route` (name: its name), `admin`, `heartbeat` (the API's own listener).
    pub access_denied: IntCounterVec,
    /// 1 while the shared store's watch is live (`store.kind = "etcd"`).
    pub store_connected: IntGauge,
    /// {op, result}: op is list, watch, get, txn, grant, keepalive, revoke; result is ok,
    /// error, timeout, conflict (a guarded write lost to another edge's).
    pub store_operations: IntCounterVec,
    /// Full relists of the store (at start, after a compaction, after a break too long to
    /// resume).
    pub store_relists: IntCounter,
    /// Seconds since the store's watch last delivered anything (an event or a progress
    /// notification), set at each scrape.
    pub store_last_event_age: prometheus::Gauge,
}

/// Register a metric as its `new` built it, and return it. Definitions are constants, so
/// an error here is a bug in this file.
fn registered<M: Collector + Clone + 'static>(r: &Registry, metric: prometheus::Result<M>) -> M {
    let m = metric.expect("valid metric definition");
    r.register(Box::new(m.clone())).expect("unique metric");
    m
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    registered(r, IntCounterVec::new(Opts::new(name, help), labels))
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    registered(r, IntGaugeVec::new(Opts::new(name, help), labels))
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        // process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds,
        // process_max_fds, process_start_time_seconds, ... (Linux /proc).
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("unique metric");
        let connect_seconds = registered(
            &r,
            HistogramVec::new(
                HistogramOpts::new(
                    UPSTREAM_CONNECT_SECONDS,
                    "Time to establish the TCP connection to a backend.",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ]),
                &["pool"],
            ),
        );
        let build = gauge(&r, BUILD_INFO, "Build information; always 1.", &["version"]);
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let max_connections = registered(
            &r,
            IntGauge::new(
                MAX_CONNECTIONS,
                "The global cap on connections being handled.",
            ),
        );
        let last_reload_successful = registered(
            &r,
            IntGauge::new(
                CONFIG_LAST_RELOAD_SUCCESSFUL,
                "1 if the last reload attempt loaded its config, 0 if it was rejected.",
            ),
        );
        last_reload_successful.set(1);
        let last_reload_success_timestamp = registered(
            &r,
            IntGauge::new(
                CONFIG_LAST_RELOAD_SUCCESS_TIMESTAMP,
                "Unix time of the last successful config load (startup counts).",
            ),
        );
        let log_lines_dropped = registered(
            &r,
            IntCounter::new(
                LOG_LINES_DROPPED,
                "Log lines dropped because the log queue was full (a stalled stderr).",
            ),
        );
        let relay_pipes = registered(
            &r,
            IntGauge::new(
                RELAY_PIPES,
                "Pipes open for zero-copy relaying (in use by bulk transfers, or pooled).",
            ),
        );
        let relay_spliced_bytes = registered(
            &r,
            IntCounter::new(
                RELAY_SPLICED_BYTES,
                "Relayed bytes moved with splice(2), without a copy through sluice's memory.",
            ),
        );
        let relay_pipes_unavailable = registered(
            &r,
            IntCounter::new(
                RELAY_PIPES_UNAVAILABLE,
                "Times a bulk relay found no splice pipe (at the cap, a quarter of max_connections, or refused by the system) and copied instead.",
            ),
        );
        let relay_parked = registered(
            &r,
            IntGauge::new(
                RELAY_PARKED,
                "Established connections parked: idle for park_idle_after, held without a task.",
            ),
        );
        let relay_parks = registered(
            &r,
            IntCounter::new(
                RELAY_PARKS,
                "Times an idle established connection was parked (it wakes on its next byte).",
            ),
        );
        let resources = registered(
            &r,
            IntGauge::new(RESOURCES, "Distinct resources in the agent table."),
        );
        Metrics {
            log_lines_dropped,
            relay_pipes,
            relay_spliced_bytes,
            relay_pipes_unavailable,
            relay_parked,
            relay_parks,
            resources,
            agents: gauge(
                &r,
                AGENTS,
                "Agents in the heartbeat table, by state (ready, warming, expired, version_skew).",
                &["state"],
            ),
            agent_versions: gauge(
                &r,
                AGENT_VERSIONS,
                "Agents in the heartbeat table by announced version and state (a rollout's progress).",
                &["version", "state"],
            ),
            version_requests: counter(
                &r,
                VERSION_REQUESTS,
                "Version server requests of agents' updaters, by channel, endpoint and answer.",
                &["channel", "endpoint", "answer"],
            ),
            version_clamped: counter(
                &r,
                VERSION_CLAMPED,
                "Version server answers lowered to cluster.version, by channel.",
                &["channel"],
            ),
            version_forward_failures: counter(
                &r,
                VERSION_FORWARD_FAILURES,
                "Failed refreshes of a forwarded version channel from its upstream.",
                &["channel"],
            ),
            heartbeats: counter(
                &r,
                HEARTBEATS,
                "Heartbeat API requests and stream events, by result.",
                &["result"],
            ),
            sessions_active: gauge(
                &r,
                SESSIONS_ACTIVE,
                "Client sessions pinned to an agent, by route.",
                &["route"],
            ),
            session_repins: counter(
                &r,
                SESSION_REPINS,
                "Sessions moved to another agent because theirs was no longer eligible.",
                &["route"],
            ),
            resource_misses: counter(
                &r,
                RESOURCE_MISSES,
                "Connections of resource routes that found no agent, by reason.",
                &["route", "reason"],
            ),
            quic_flows_active: gauge(
                &r,
                QUIC_FLOWS_ACTIVE,
                "QUIC flows (client connections routed to a backend) open now.",
                &["listener"],
            ),
            quic_flows: counter(&r, QUIC_FLOWS, "QUIC flows created, by route.", &["listener", "route"]),
            quic_initials: counter(
                &r,
                QUIC_INITIALS,
                "Client Initial packets from unknown addresses, by outcome (ok: a flow was created).",
                &["listener", "result"],
            ),
            quic_packets: counter(
                &r,
                QUIC_PACKETS,
                "QUIC datagrams forwarded, by direction.",
                &["listener", "direction"],
            ),
            quic_bytes: counter(
                &r,
                QUIC_BYTES,
                "QUIC bytes forwarded, by direction.",
                &["listener", "direction"],
            ),
            quic_migrations: counter(
                &r,
                QUIC_MIGRATIONS,
                "QUIC flows followed to a new client address by connection ID (migration, NAT rebinding).",
                &["listener"],
            ),
            quic_handover: counter(
                &r,
                QUIC_HANDOVER,
                "QUIC datagrams passed between the old and the new process in a binary upgrade: sent (asked about across), received (served here when asked), returned (asked about and sent back), dropped.",
                &["listener", "direction"],
            ),
            quic_stream_resets: counter(
                &r,
                QUIC_STREAM_RESETS,
                "Streams of terminated QUIC connections reset because their backend failed, by reason.",
                &["route", "reason"],
            ),
            pending_hellos: registered(
                &r,
                IntGauge::new(
                    PENDING_HELLOS,
                    "Connections that have not sent their hello (or PROXY header) yet.",
                ),
            ),
            pending_evictions: counter(
                &r,
                PENDING_EVICTIONS,
                "Pending connections closed to make room for a new one, by the cap reached.",
                &["reason"],
            ),
            access_denied: counter(
                &r,
                ACCESS_DENIED,
                "Connections refused by a source address allow/deny list, before any byte was relayed.",
                &["scope", "name"],
            ),
            store_connected: registered(
                &r,
                IntGauge::new(
                    STORE_CONNECTED,
                    "1 while the shared heartbeat store (etcd) is connected and watched.",
                ),
            ),
            store_operations: counter(
                &r,
                STORE_OPERATIONS,
                "Operations on the shared heartbeat store, by kind and result.",
                &["op", "result"],
            ),
            store_relists: registered(
                &r,
                IntCounter::new(
                    STORE_RELISTS,
                    "Full lists of the shared heartbeat store (start, compaction, resume impossible).",
                ),
            ),
            store_last_event_age: registered(
                &r,
                prometheus::Gauge::new(
                    STORE_LAST_EVENT_AGE,
                    "Seconds since the store's watch last delivered an event or a progress notification.",
                ),
            ),
            agent_connect_failures: counter(
                &r,
                AGENT_CONNECT_FAILURES,
                "Failed dials to agents (another eligible agent is tried next).",
                &["route", "reason"],
            ),
            dns_resolutions: counter(
                &r,
                DNS_RESOLUTIONS,
                "DNS discovery lookups, by result (empty and error keep the last good addresses).",
                &["pool", "result"],
            ),
            backend_healthy: gauge(
                &r,
                BACKEND_HEALTHY,
                "Active health check verdict: 1 healthy, 0 unhealthy.",
                &["pool", "backend"],
            ),
            health_checks: counter(
                &r,
                HEALTH_CHECKS,
                "Active health check probes, by result.",
                &["pool", "result"],
            ),
            ejections: counter(
                &r,
                BACKEND_EJECTIONS,
                "Backends ejected after consecutive connect failures.",
                &["pool", "backend"],
            ),
            proxy_inbound: counter(
                &r,
                PROXY_INBOUND,
                "Inbound PROXY protocol headers on listeners with accept_proxy, by outcome.",
                &["listener", "result"],
            ),
            reloads: counter(
                &r,
                CONFIG_RELOADS,
                "Config reload attempts, by result (success, failure, unchanged).",
                &["result"],
            ),
            last_reload_successful,
            last_reload_success_timestamp,
            config_info: gauge(
                &r,
                CONFIG_INFO,
                "1, labelled with the hash of the config files running now.",
                &["hash"],
            ),
            accepted: counter(&r, CONNECTIONS_ACCEPTED, "Connections accepted.", &["listener"]),
            active: gauge(&r, CONNECTIONS_ACTIVE, "Connections open now.", &["listener"]),
            closed: counter(
                &r,
                CONNECTIONS_CLOSED,
                "Connections closed, by the route they took and why they ended.",
                &["listener", "route", "reason"],
            ),
            route_active: gauge(
                &r,
                ROUTE_CONNECTIONS_ACTIVE,
                "Relayed connections open now, by route.",
                &["route"],
            ),
            accept_errors: counter(
                &r,
                ACCEPT_ERRORS,
                "accept(2) failures, by kind.",
                &["listener", "kind"],
            ),
            accept_paused: counter(
                &r,
                ACCEPT_PAUSED,
                "Times a listener stopped accepting because a connection cap was reached.",
                &["listener", "cap"],
            ),
            hello: counter(
                &r,
                HELLO,
                "ClientHello reads, by outcome.",
                &["listener", "result"],
            ),
            route_decisions: counter(
                &r,
                ROUTE_DECISIONS,
                "Routing decisions; route=\"none\" means no route matched and the connection was closed.",
                &["listener", "route"],
            ),
            connect_seconds,
            connect_failures: counter(
                &r,
                UPSTREAM_CONNECT_FAILURES,
                "Failed connection attempts to backends.",
                &["pool", "reason"],
            ),
            unavailable: counter(
                &r,
                UPSTREAM_EXHAUSTED,
                "Connections closed because no backend of the pool could be reached.",
                &["pool"],
            ),
            bytes: counter(
                &r,
                BYTES,
                "Bytes relayed, by route and direction.",
                &["route", "direction"],
            ),
            pool_backends: gauge(&r, POOL_BACKENDS, "Backends configured per pool.", &["pool"]),
            backend_draining: gauge(
                &r,
                BACKEND_DRAINING,
                "1 while a backend is drained (no new connections; established ones kept): by the admin API, or weight = 0.",
                &["pool", "backend"],
            ),
            backend_connections: counter(
                &r,
                BACKEND_CONNECTIONS,
                "Connections established to a pool backend.",
                &["pool", "backend"],
            ),
            backend_connect_failures: counter(
                &r,
                BACKEND_CONNECT_FAILURES,
                "Connects to a pool backend that failed (refused, timed out, reset, unreachable).",
                &["pool", "backend"],
            ),
            backend_bytes: counter(
                &r,
                BACKEND_BYTES,
                "Bytes relayed through a pool backend, by direction, counted when each connection ends.",
                &["pool", "backend", "direction"],
            ),
            connection_duration: registered(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        CONNECTION_DURATION,
                        "How long relayed connections lasted, from accept to close, by route.",
                    )
                    .buckets(vec![
                        0.001, 0.01, 0.1, 1.0, 10.0, 60.0, 600.0, 3600.0, 21600.0, 86400.0,
                    ]),
                    &["route"],
                ),
            ),
            backend_active: gauge(
                &r,
                BACKEND_ACTIVE,
                "Connections open to each backend.",
                &["pool", "backend"],
            ),
            lifecycle_state: gauge(
                &r,
                LIFECYCLE_STATE,
                "1 for the lifecycle state sluice is in.",
                &["state"],
            ),
            max_connections,
            registry: r,
        }
    }

    /// Mirror the relay's process-wide figures (`edge::splice`): pipes open now, bytes
    /// spliced so far. The admin API calls it before each `render`.
    pub fn mirror_relay(&self, open_pipes: usize, spliced_bytes: u64, no_pipe: u64) {
        self.relay_pipes.set(open_pipes as i64);
        let seen = self.relay_pipes_unavailable.get();
        if no_pipe > seen {
            self.relay_pipes_unavailable.inc_by(no_pipe - seen);
        }
        let seen = self.relay_spliced_bytes.get();
        if spliced_bytes > seen {
            self.relay_spliced_bytes.inc_by(spliced_bytes - seen);
        }
    }

    /// The Prometheus text exposition of everything registered.
    pub fn render(&self) -> String {
        // Counters kept outside the registry (process-wide atomics), mirrored here.
        let mirror = |counter: &IntCounter, total: u64| {
            let seen = counter.get();
            if total > seen {
                counter.inc_by(total - seen);
            }
        };
        mirror(
            &self.log_lines_dropped,
            crate::observe::logging::dropped_lines(),
        );
        let mut out = Vec::new();
        let families = self.registry.gather();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&families, &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Create, at 0, every series the config makes possible whose labels are known in
    /// advance, so that a rate or an alert has a series before the first event (start and
    /// every reload). Series that depend on traffic (a route's close reasons) appear with
    /// their first connection.
    pub fn init_known(&self, config: &crate::config::Config) {
        use crate::config::{ListenerProtocol, RouteTarget};
        use sluice_core::close::CloseReason;
        for result in ["success", "failure", "unchanged"] {
            self.reloads.with_label_values(&[result]);
        }
        for result in [
            "ok",
            "goodbye",
            "stream_ended",
            "unauthorized",
            "forbidden",
            "malformed",
            "too_large",
            "too_many_resources",
            "table_full",
            "store_unavailable",
            "stream_idle",
            "tls_error",
        ] {
            self.heartbeats.with_label_values(&[result]);
        }
        let channels = config.versions.channels.keys().map(String::as_str);
        for channel in channels.chain([sluice_core::agents::versions::DEFAULT_CHANNEL]) {
            self.version_clamped.with_label_values(&[channel]);
            self.version_requests
                .with_label_values(&[channel, "version", "version"]);
            self.version_requests
                .with_label_values(&[channel, "version", "unavailable"]);
        }
        for (channel, c) in &config.versions.channels {
            if matches!(c, crate::config::Channel::Forward { .. }) {
                self.version_forward_failures.with_label_values(&[channel]);
            }
        }
        // Ways a connection ends before any route took it.
        let early = [
            CloseReason::HelloTimeout,
            CloseReason::HelloMalformed,
            CloseReason::HelloTooLarge,
            CloseReason::ClientClosedEarly,
            CloseReason::NotTls,
            CloseReason::NoRoute,
            CloseReason::Denied,
            CloseReason::PendingEvicted,
        ];
        for l in &config.listeners {
            let name = l.name.as_str();
            if l.protocol == ListenerProtocol::Quic {
                continue;
            }
            for result in ["ok", "not_tls", "timeout", "too_large", "malformed", "eof"] {
                self.hello.with_label_values(&[name, result]);
            }
            for reason in early {
                self.closed
                    .with_label_values(&[name, "none", reason.label()]);
            }
            self.route_decisions.with_label_values(&[name, "none"]);
            for r in &config.routes {
                self.route_decisions
                    .with_label_values(&[name, r.name.as_str()]);
            }
            if !l.acl.is_open() {
                self.access_denied.with_label_values(&["listener", name]);
            }
        }
        for r in &config.routes {
            let route = r.name.as_str();
            if !r.acl.is_open() {
                self.access_denied.with_label_values(&["route", route]);
            }
            if let RouteTarget::Resource(_) = &r.target {
                for reason in [
                    "no_name",
                    "unknown_resource",
                    "no_eligible_agent",
                    "all_agents_failed",
                ] {
                    self.resource_misses.with_label_values(&[route, reason]);
                }
                for reason in ["refused", "timeout", "unreachable", "reset", "other"] {
                    self.agent_connect_failures
                        .with_label_values(&[route, reason]);
                }
                self.session_repins.with_label_values(&[route]);
            }
        }
        if !config.admin.allow.is_open() {
            self.access_denied.with_label_values(&["admin", "admin"]);
        }
        if !config.heartbeat.allow.is_open() {
            self.access_denied
                .with_label_values(&["heartbeat", "heartbeat"]);
        }
        for (name, p) in &config.pools {
            if p.health.is_some() {
                for result in ["ok", "fail"] {
                    self.health_checks
                        .with_label_values(&[name.as_str(), result]);
                }
            }
            if p.discovery.is_some() {
                for result in ["ok", "empty", "error"] {
                    self.dns_resolutions
                        .with_label_values(&[name.as_str(), result]);
                }
            }
        }
    }
}
