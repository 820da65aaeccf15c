//! How far a rollout has got, from the heartbeat table: agents by version and state, and the
//! agents the version rule keeps from sessions, with the reason in words (what `tctl
//! autoupdate agents status` shows). Every edge sharing a store gives the same answer.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::table::{AgentState, Version};

/// Agents at one version, by state (`version` is `unknown` for agents that announce none).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionCount {
    pub version: String,
    pub ready: u64,
    pub warming: u64,
    pub expired: u64,
    pub version_skew: u64,
}

impl VersionCount {
    /// The counts by state, in `AgentState::ALL` order.
    pub fn by_state(&self) -> [(AgentState, u64); 4] {
        [
            (AgentState::Ready, self.ready),
            (AgentState::Warming, self.warming),
            (AgentState::Expired, self.expired),
            (AgentState::VersionSkew, self.version_skew),
        ]
    }
}

/// An agent the version rule keeps from sessions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skewed {
    pub agent: String,
    pub version: Option<String>,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub cluster_version: Option<String>,
    /// Highest version first.
    pub versions: Vec<VersionCount>,
    pub skewed: Vec<Skewed>,
    /// By channel name: the version server's target and how far the channel's agents are.
    #[serde(default)]
    pub channels: BTreeMap<String, ChannelRollout>,
}

/// The agent label naming the update channel an agent follows (`default` without it).
pub const CHANNEL_LABEL: &str = "channel";

/// One channel of the version server, and its agents.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChannelRollout {
    /// What updaters are answered now (`v17.1.0`, `none`); `None` when upstream cannot say.
    pub target: Option<String>,
    pub critical: Option<bool>,
    /// Why there is no target (an upstream failing with nothing cached).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The channel's target was above the cluster's version and is answered lowered.
    pub clamped: bool,
    /// The target is more than one major version below the cluster's.
    pub too_old: bool,
    pub adoption: Adoption,
}

/// Agents at the target among the channel's agents ready for `versions.stable_after`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Adoption {
    pub at_target: u64,
    pub stable: u64,
    /// `at_target / stable`, 0 to 1 (0 when no agent is stable).
    pub share: f64,
}

/// An agent as adoption sees it: its channel (from `CHANNEL_LABEL`), version, and whether it
/// has been ready for `stable_after`.
#[derive(Debug, Clone, Copy)]
pub struct Adopter<'a> {
    pub channel: Option<&'a str>,
    pub version: Option<Version>,
    pub stable: bool,
}

/// How far `channel`'s agents are towards `target`.
pub fn adoption<'a>(
    agents: impl IntoIterator<Item = Adopter<'a>>,
    channel: &str,
    target: Option<Version>,
) -> Adoption {
    let mut a = Adoption::default();
    for agent in agents {
        if !agent.stable || agent.channel.unwrap_or(super::versions::DEFAULT_CHANNEL) != channel {
            continue;
        }
        a.stable += 1;
        if target.is_some() && agent.version == target {
            a.at_target += 1;
        }
    }
    if a.stable > 0 {
        a.share = a.at_target as f64 / a.stable as f64;
    }
    a
}

/// Why an agent at `version` is skewed against `cluster` (`None`: it is not).
pub fn skew_reason(version: Option<Version>, cluster: Version) -> Option<String> {
    match version {
        None => Some("announces no version".into()),
        Some(v) if v > cluster => Some(format!("newer than cluster {cluster}")),
        Some(v) if v.0 + 1 < cluster.0 => Some(format!(
            "more than one major version older than cluster {cluster}"
        )),
        Some(_) => None,
    }
}

/// The rollout of `agents` (id, version, state), against `cluster`.
pub fn summarize<'a>(
    agents: impl IntoIterator<Item = (&'a str, Option<Version>, AgentState)>,
    cluster: Option<Version>,
) -> Rollout {
    let mut by_version: BTreeMap<Option<Version>, VersionCount> = BTreeMap::new();
    let mut skewed = Vec::new();
    for (id, version, state) in agents {
        let count = by_version.entry(version).or_insert_with(|| VersionCount {
            version: version.map_or_else(|| "unknown".into(), |v| v.to_string()),
            ..VersionCount::default()
        });
        match state {
            AgentState::Ready => count.ready += 1,
            AgentState::Warming => count.warming += 1,
            AgentState::Expired => count.expired += 1,
            AgentState::VersionSkew => count.version_skew += 1,
        }
        if state == AgentState::VersionSkew {
            if let Some(reason) = cluster.and_then(|c| skew_reason(version, c)) {
                skewed.push(Skewed {
                    agent: id.to_owned(),
                    version: version.map(|v| v.to_string()),
                    reason,
                });
            }
        }
    }
    skewed.sort_by(|a, b| a.agent.cmp(&b.agent));
    Rollout {
        cluster_version: cluster.map(|c| c.to_string()),
        versions: by_version.into_values().rev().collect(),
        skewed,
        channels: BTreeMap::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_counted_by_state_and_skew_is_explained() {
        let v = |s: &str| Version::parse(s);
        let cluster = v("17.2.0");
        let agents = [
            ("a1", v("17.2.0"), AgentState::Ready),
            ("a2", v("17.2.0"), AgentState::Warming),
            ("a3", v("17.1.0"), AgentState::Ready),
            ("a4", v("18.0.0"), AgentState::VersionSkew),
            ("a5", v("15.9.0"), AgentState::VersionSkew),
            ("a6", None, AgentState::VersionSkew),
            ("a7", v("17.1.0"), AgentState::Expired),
        ];
        let r = summarize(agents, cluster);
        assert_eq!(r.cluster_version.as_deref(), Some("17.2.0"));
        let versions: Vec<(&str, u64, u64, u64, u64)> = r
            .versions
            .iter()
            .map(|c| (&*c.version, c.ready, c.warming, c.expired, c.version_skew))
            .collect();
        assert_eq!(
            versions,
            [
                ("18.0.0", 0, 0, 0, 1),
                ("17.2.0", 1, 1, 0, 0),
                ("17.1.0", 1, 0, 1, 0),
                ("15.9.0", 0, 0, 0, 1),
                ("unknown", 0, 0, 0, 1),
            ]
        );
        let reasons: Vec<(&str, &str)> = r.skewed.iter().map(|s| (&*s.agent, &*s.reason)).collect();
        assert_eq!(
            reasons,
            [
                ("a4", "newer than cluster 17.2.0"),
                (
                    "a5",
                    "more than one major version older than cluster 17.2.0"
                ),
                ("a6", "announces no version"),
            ]
        );
        assert_eq!(skew_reason(v("16.0.0"), Version(17, 2, 0)), None);
    }

    #[test]
    fn adoption_counts_the_channels_stable_agents_at_the_target() {
        let v = |s: &str| Version::parse(s);
        let agent = |channel, version: &str, stable| Adopter {
            channel,
            version: v(version),
            stable,
        };
        let agents = || {
            [
                agent(None, "17.1.0", true),
                agent(Some("default"), "17.1.0", true),
                agent(None, "17.0.0", true),
                agent(None, "17.1.0", false),
                agent(Some("edge"), "17.1.0", true),
            ]
        };
        let a = adoption(agents(), "default", v("17.1.0"));
        assert_eq!((a.at_target, a.stable), (2, 3));
        assert!((a.share - 2.0 / 3.0).abs() < 1e-9);
        let e = adoption(agents(), "edge", v("17.2.0"));
        assert_eq!((e.at_target, e.stable, e.share), (0, 1, 0.0));
        let none = adoption(agents(), "nightly", None);
        assert_eq!((none.at_target, none.stable, none.share), (0, 0, 0.0));
    }
}
