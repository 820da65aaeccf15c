//! Keeping the edge's table equal to etcd's: list the cluster's keys at one revision (in
//! pages), then watch from the next revision. After a break the watch resumes from the last
//! revision applied; when etcd has compacted that revision away, the edge lists again and
//! brings its table to the new list (agents that vanished meanwhile are expired, or removed
//! at once when their goodbye marker is still there).
//!
//! The watch asks for a progress notification every second: an etcd that hangs without
//! closing the connection is noticed within `store.timeout` + 2 s, and the edge then keeps
//! routing from its table (nothing expires by its clock) until the watch is back.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, KeyValue, WatchOptions};
use tokio_util::sync::CancellationToken;

use super::etcd::{unix_ms, Etcd};
use crate::agents::Agents;
use sluice_core::agents::store::{changes, prefix_end, Change, Key, Record};

/// Keys per page when listing.
const PAGE: i64 = 1000;

pub async fn run(store: Arc<Etcd>, stop: CancellationToken) {
    let mut need_list = true;
    let mut backoff = Duration::from_millis(200);
    loop {
        let round = async {
            let client = store.client().await?;
            if need_list {
                list(&store, &client).await?;
                need_list = false;
            }
            watch(&store, &client, &mut need_list).await
        };
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = round => r,
        };
        match result {
            Ok(()) => backoff = Duration::from_millis(200),
            Err(why) => {
                store.set_connected(false, &why);
                tracing::debug!(reason = %why, "heartbeat store watch ended");
                if why.starts_with("connect") {
                    store.reset().await;
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// List every key of the cluster at one revision and bring the table to it. Pages are
/// applied as they come (each agent goes from its old record to its new one; memory holds
/// one page, not the whole list); agents absent from the list are then expired, or removed
/// at once when their goodbye marker is listed.
async fn list(store: &Etcd, client: &Client) -> Result<(), String> {
    let prefix = store.keys.cluster_prefix().as_bytes().to_vec();
    let end = prefix_end(&prefix);
    let kv = client.kv_client();
    let mut from = prefix.clone();
    let mut revision = 0;
    let mut present: HashSet<String> = HashSet::new();
    let mut gone: HashSet<String> = HashSet::new();
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let mut resp = store
            .op("list", || {
                let (mut kv, from, options) = (kv.clone(), from.clone(), options.clone());
                async move { kv.get(from, Some(options)).await }
            })
            .await?;
        if revision == 0 {
            revision = resp.header().map_or(0, |h| h.revision());
        }
        let more = resp.more();
        let page = resp.take_kvs();
        for kv in &page {
            match store.keys.parse(kv.key()) {
                Key::Agent(id) => {
                    present.insert(id.to_owned());
                    put(store, id, kv);
                }
                Key::Gone(id) => {
                    gone.insert(id.to_owned());
                }
                Key::Other => {}
            }
        }
        if let Some(last) = page.last() {
            from = last.key().to_vec();
            from.push(0);
        }
        if !more || page.is_empty() {
            break;
        }
    }
    let now = Agents::now();
    for agent in store.table.agents() {
        if agent.stored.is_some() && !present.contains(&*agent.id) {
            // Deleted since this edge last saw it (at or before `revision`).
            let left = gone.contains(&*agent.id);
            store
                .table
                .delete_stored(&agent.id, revision + 1, left, now);
        }
    }
    store.revision.store(revision, Ordering::Relaxed);
    store.last_event.store(Agents::now(), Ordering::Relaxed);
    store.relists.fetch_add(1, Ordering::Relaxed);
    store.metrics.store_relists.inc();
    if !store.listed.swap(true, Ordering::Relaxed) {
        tracing::info!(agents = store.table.agent_count(), revision, edge_id = %store.edge_id, "heartbeat store listed: this edge's table is complete");
    } else {
        tracing::info!(
            agents = store.table.agent_count(),
            revision,
            "heartbeat store listed again"
        );
    }
    Ok(())
}

/// Install one agent's key.
fn put(store: &Etcd, id: &str, kv: &KeyValue) {
    let record = match Record::decode(kv.value()) {
        Ok(r) => r,
        Err(e) => {
            store.count("decode", "error");
            tracing::warn!(agent = %id, error = %e, "unreadable record in the heartbeat store; ignored");
            return;
        }
    };
    let Some(hb) = record.heartbeat(id) else {
        store.count("decode", "error");
        tracing::warn!(agent = %id, "invalid record in the heartbeat store; ignored");
        return;
    };
    let meta = record.meta(kv.mod_revision(), kv.lease());
    let joined = store.table.put_stored(
        hb,
        &record.owner,
        meta,
        (Agents::now(), unix_ms()),
        &|id, a| (store.new_backend)(id, a),
    );
    if joined == Some(sluice_core::agents::table::Applied::Joined) {
        tracing::debug!(agent = %id, "agent joined (through the store)");
    }
}

/// Watch from the revision after the last applied, until the stream breaks, falls silent, or
/// etcd says the revision was compacted (then `need_list`).
async fn watch(store: &Etcd, client: &Client, need_list: &mut bool) -> Result<(), String> {
    let prefix = store.keys.cluster_prefix().as_bytes().to_vec();
    let from = store.revision.load(Ordering::Relaxed) + 1;
    let options = WatchOptions::new()
        .with_range(prefix_end(&prefix))
        .with_start_revision(from)
        .with_progress_notify();
    let watcher = client.watch_client();
    let stream = store
        .op("watch", || {
            let (mut w, prefix, options) = (watcher.clone(), prefix.clone(), options.clone());
            async move { w.watch(prefix, Some(options)).await }
        })
        .await?;
    let (mut requests, mut responses) = stream.split();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut heard = Agents::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if Agents::now().saturating_sub(heard) > store.silence_limit() {
                    return Err("the watch fell silent".into());
                }
                if let Err(e) = requests.request_progress().await {
                    return Err(format!("watch: {e}"));
                }
            }
            msg = responses.message() => {
                let resp = match msg {
                    Ok(Some(r)) => r,
                    Ok(None) => return Err("etcd closed the watch".into()),
                    Err(e) => return Err(format!("watch: {e}")),
                };
                heard = Agents::now();
                store.last_event.store(heard, Ordering::Relaxed);
                if resp.compact_revision() > 0 {
                    tracing::warn!(
                        compacted = resp.compact_revision(),
                        wanted = store.revision.load(Ordering::Relaxed) + 1,
                        "the heartbeat store compacted past this edge's revision: listing again"
                    );
                    *need_list = true;
                    return Err("compacted".into());
                }
                if resp.canceled() {
                    return Err(format!("etcd cancelled the watch: {}", resp.cancel_reason()));
                }
                if resp.created() {
                    store.set_connected(true, "");
                }
                apply_events(store, resp.events());
                let progress = resp.events().is_empty() && !resp.created();
                if let Some(h) = resp.header().filter(|_| progress) {
                    // A progress notification comes only to a watcher that has every event
                    // up to its revision (an event batch's header may be ahead of events
                    // still to come, so only the events' own revisions count).
                    store.revision.fetch_max(h.revision(), Ordering::Relaxed);
                }
            }
        }
    }
}

/// Apply a batch of events, one revision at a time.
fn apply_events(store: &Etcd, events: &[etcd_client::Event]) {
    let mut start = 0;
    while start < events.len() {
        let rev = events[start].kv().map_or(0, |kv| kv.mod_revision());
        let mut end = start + 1;
        while end < events.len() && events[end].kv().map_or(0, |kv| kv.mod_revision()) == rev {
            end += 1;
        }
        let group = &events[start..end];
        let keyed: Vec<(bool, &[u8])> = group
            .iter()
            .map(|e| {
                let deleted = e.event_type() == EventType::Delete;
                (deleted, e.kv().map_or(&[][..], |kv| kv.key()))
            })
            .collect();
        let now = Agents::now();
        for (i, change) in changes(&store.keys, &keyed) {
            match change {
                Change::Put(id) => {
                    if let Some(kv) = group[i].kv() {
                        put(store, id, kv);
                    }
                }
                Change::Left(id) => {
                    if store.table.delete_stored(id, rev, true, now) {
                        tracing::info!(agent = %id, "agent left (goodbye or stream end, through the store)");
                    }
                }
                Change::Expired(id) => {
                    if store.table.delete_stored(id, rev, false, now) {
                        tracing::info!(agent = %id, "agent expired (its lease ran out)");
                    }
                }
            }
        }
        store.revision.fetch_max(rev, Ordering::Relaxed);
        start = end;
    }
}
