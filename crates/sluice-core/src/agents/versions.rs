//! The version server's decisions (RFD 109, what Teleport's proxy serves at
//! `/v1/webapi/automaticupgrades/channel/<channel>/{version,critical}`): which channel a name
//! means, what an upstream's answer says, whether a cached answer may still be served, and the
//! clamp to the cluster's version. No I/O and no clock: the binary's `agents::versions` asks
//! upstreams and keeps the cache.

use std::time::Duration;

use serde::Serialize;

use super::table::Version;
use crate::config::{Channel, VersionsConfig};

/// The path prefix updaters ask under; the channel name follows and may contain `/`.
pub const PATH_PREFIX: &str = "/v1/webapi/automaticupgrades/channel/";

/// The channel every updater asks when it is not told another.
pub const DEFAULT_CHANNEL: &str = "default";

/// Teleport's `default` falls back to this channel when it has no entry of its own.
pub const CLOUD_CHANNEL: &str = "stable/cloud";

/// What RFD 109 answers when there is no target version.
pub const NO_VERSION: &str = "none";

/// A target version as written (`17.1.0-beta.1`, without the `v`), and its order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Target {
    pub text: String,
    #[serde(skip)]
    pub version: Version,
}

impl Target {
    /// `17.1.0`, `v17.1.0`, `17.1.0-beta.1`; `None` for anything else.
    pub fn parse(text: &str) -> Option<Target> {
        let text = text.trim();
        let bare = text.strip_prefix('v').unwrap_or(text);
        let version = Version::parse(bare)?;
        // Version::parse reads a missing minor or patch as 0; a target names all three.
        let core = bare.split(['-', '+']).next().unwrap_or("");
        if core.split('.').count() != 3
            || !bare
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-+".contains(&b))
        {
            return None;
        }
        Some(Target {
            text: bare.to_owned(),
            version,
        })
    }

    /// The cluster's version as a target.
    pub fn of(version: Version) -> Target {
        Target {
            text: version.to_string(),
            version,
        }
    }

    /// The answer's text: `v17.1.0`.
    pub fn wire(&self) -> String {
        format!("v{}", self.text)
    }
}

/// Which endpoint of a channel is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Version,
    Critical,
}

impl Endpoint {
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::Version => "version",
            Endpoint::Critical => "critical",
        }
    }
}

/// `<channel>/version` or `<channel>/critical` after `PATH_PREFIX`; `None` when the path is
/// not a version-server path at all, `Some(Err)` for one under the prefix that names no
/// endpoint.
pub fn parse_path(path: &str) -> Option<Result<(&str, Endpoint), ()>> {
    let rest = path.strip_prefix(PATH_PREFIX)?;
    let parsed = if let Some(channel) = rest.strip_suffix("/version") {
        Ok((channel, Endpoint::Version))
    } else if let Some(channel) = rest.strip_suffix("/critical") {
        Ok((channel, Endpoint::Critical))
    } else {
        Err(())
    };
    Some(parsed.and_then(|(c, e)| if c.is_empty() { Err(()) } else { Ok((c, e)) }))
}

/// Where a channel's answer comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source<'a> {
    /// A version set here (`None`: `none`).
    Static {
        target: Option<&'a Target>,
        critical: bool,
    },
    /// Asked of `<url>/version` and `<url>/critical`, cached under the channel's name.
    Forward { name: &'a str, url: &'a str },
}

/// The channel a request names. `default` always exists: its own entry, else `stable/cloud`'s,
/// else the cluster's version, else no version. `None`: no such channel (404).
pub fn resolve<'a>(
    cfg: &'a VersionsConfig,
    cluster: Option<&'a Target>,
    name: &str,
) -> Option<Source<'a>> {
    let of = |(name, ch): (&'a String, &'a Channel)| match ch {
        Channel::Static { target, critical } => Source::Static {
            target: Some(target),
            critical: *critical,
        },
        Channel::Forward { url } => Source::Forward { name, url },
    };
    if let Some(found) = cfg.channels.get_key_value(name) {
        return Some(of(found));
    }
    if name != DEFAULT_CHANNEL {
        return None;
    }
    if let Some(cloud) = cfg.channels.get_key_value(CLOUD_CHANNEL) {
        return Some(of(cloud));
    }
    Some(Source::Static {
        target: cluster,
        critical: false,
    })
}

/// An upstream's answer to `/version`: `v17.1.0` (or without the `v`), or `none`.
pub fn parse_version_answer(body: &str) -> Result<Option<Target>, String> {
    let text = body.trim();
    if text.eq_ignore_ascii_case(NO_VERSION) {
        return Ok(None);
    }
    Target::parse(text)
        .map(Some)
        .ok_or_else(|| format!("`{}` is not a version", shorten(text)))
}

/// An upstream's answer to `/critical`: `yes` or `no` (as Teleport's updaters read it, any
/// other word is no; sluice refuses it instead, so a broken upstream is seen).
pub fn parse_critical_answer(body: &str) -> Result<bool, String> {
    match body.trim().to_ascii_lowercase().as_str() {
        "yes" => Ok(true),
        "no" => Ok(false),
        other => Err(format!("`{}` is neither yes nor no", shorten(other))),
    }
}

fn shorten(text: &str) -> String {
    text.chars().take(40).collect()
}

/// What a version request is answered, after the clamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// `None`: `none`.
    pub target: Option<Target>,
    /// The channel's target was above the cluster's version and was lowered to it.
    pub clamped: bool,
    /// More than one major version below the cluster's (served, flagged in the view).
    pub too_old: bool,
}

/// Never above the cluster's version: a higher target is answered with the cluster's.
pub fn clamp(target: Option<Target>, cluster: Option<&Target>) -> Answer {
    match (target, cluster) {
        (Some(t), Some(c)) if t.version > c.version => Answer {
            target: Some(c.clone()),
            clamped: true,
            too_old: false,
        },
        (Some(t), Some(c)) => Answer {
            too_old: t.version.0 + 1 < c.version.0,
            target: Some(t),
            clamped: false,
        },
        (target, _) => Answer {
            target,
            clamped: false,
            too_old: false,
        },
    }
}

/// A forwarded channel's last good answer, on the caller's clock (ms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cached {
    pub target: Option<Target>,
    pub critical: bool,
    pub fetched_at: u64,
}

/// May a cached answer be served at `now`?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Younger than `cache_ttl`: served without asking upstream.
    Fresh,
    /// Older, but within `max_stale`: served when asking upstream fails.
    Stale,
    /// Older than `max_stale`: never served.
    Expired,
}

pub fn freshness(cached: &Cached, now: u64, cache_ttl: Duration, max_stale: Duration) -> Freshness {
    let age = now.saturating_sub(cached.fetched_at);
    if age < cache_ttl.as_millis() as u64 {
        Freshness::Fresh
    } else if age <= max_stale.as_millis() as u64 {
        Freshness::Stale
    } else {
        Freshness::Expired
    }
}

/// After a failed refresh, how long requests are answered from the stale value (or refused)
/// before upstream is asked again: an upstream that is down is not asked by every updater.
pub fn retry_after_failure(cache_ttl: Duration) -> Duration {
    cache_ttl.min(Duration::from_secs(10))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn versions(text: &str) -> VersionsConfig {
        let base = "[[listener]]\nname = \"tls\"\naddress = \"127.0.0.1:0\"\n\
                    [pool.p]\nbackends = [\"127.0.0.1:1\"]\n[[route]]\npool = \"p\"\n";
        Config::parse(std::path::Path::new("t.toml"), &format!("{base}{text}"))
            .expect("config")
            .config
            .versions
    }

    #[test]
    fn targets_are_three_part_versions_with_an_optional_v() {
        assert_eq!(
            Target::parse("v17.1.0").map(|t| t.wire()).as_deref(),
            Some("v17.1.0")
        );
        assert_eq!(
            Target::parse("17.1.0-beta.1").map(|t| t.wire()).as_deref(),
            Some("v17.1.0-beta.1")
        );
        for bad in [
            "17",
            "17.1",
            "v",
            "",
            "17.1.0 extra",
            "17.1.0\nx",
            "seventeen",
        ] {
            assert_eq!(Target::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn paths_name_a_channel_that_may_hold_slashes() {
        assert_eq!(
            parse_path("/v1/webapi/automaticupgrades/channel/stable/cloud/version"),
            Some(Ok(("stable/cloud", Endpoint::Version)))
        );
        assert_eq!(
            parse_path("/v1/webapi/automaticupgrades/channel/default/critical"),
            Some(Ok(("default", Endpoint::Critical)))
        );
        assert_eq!(
            parse_path("/v1/webapi/automaticupgrades/channel/default"),
            Some(Err(()))
        );
        assert_eq!(
            parse_path("/v1/webapi/automaticupgrades/channel//version"),
            Some(Err(()))
        );
        assert_eq!(parse_path("/v1/heartbeats"), None);
    }

    #[test]
    fn default_falls_back_to_stable_cloud_then_the_cluster_then_none() {
        let cluster = Target::parse("17.2.0");
        let own = versions(
            "[versions.channels.\"default\"]\nstatic_version = \"17.1.0\"\ncritical = true\n\
             [versions.channels.\"stable/cloud\"]\nforward_url = \"http://u.example/v1/stable/cloud\"\n",
        );
        assert_eq!(
            resolve(&own, cluster.as_ref(), "default"),
            Some(Source::Static {
                target: Target::parse("17.1.0").as_ref(),
                critical: true
            })
        );
        let cloud = versions(
            "[versions.channels.\"stable/cloud\"]\nforward_url = \"http://u.example/v1/stable/cloud\"\n",
        );
        assert_eq!(
            resolve(&cloud, cluster.as_ref(), "default"),
            Some(Source::Forward {
                name: "stable/cloud",
                url: "http://u.example/v1/stable/cloud"
            })
        );
        let none = versions("");
        assert_eq!(
            resolve(&none, cluster.as_ref(), "default"),
            Some(Source::Static {
                target: cluster.as_ref(),
                critical: false
            })
        );
        assert_eq!(
            resolve(&none, None, "default"),
            Some(Source::Static {
                target: None,
                critical: false
            })
        );
        assert_eq!(resolve(&none, None, "stable/cloud"), None);
        assert_eq!(resolve(&cloud, None, "nightly"), None);
    }

    #[test]
    fn upstream_answers_are_read_strictly() {
        assert_eq!(
            parse_version_answer("v17.3.1\n").map(|t| t.map(|t| t.text)),
            Ok(Some("17.3.1".into()))
        );
        assert_eq!(parse_version_answer(" none "), Ok(None));
        assert!(parse_version_answer("<html>").is_err());
        assert_eq!(parse_critical_answer("yes\n"), Ok(true));
        assert_eq!(parse_critical_answer("No"), Ok(false));
        assert!(parse_critical_answer("maybe").is_err());
    }

    #[test]
    fn the_clamp_never_serves_above_the_cluster_and_flags_the_too_old() {
        let t = |s: &str| Target::parse(s);
        let cluster = t("17.2.0");
        let high = clamp(t("18.0.0"), cluster.as_ref());
        assert!(high.clamped);
        assert_eq!(high.target, cluster);
        let old = clamp(t("15.4.0"), cluster.as_ref());
        assert!(old.too_old && !old.clamped);
        assert_eq!(old.target, t("15.4.0"));
        let ok = clamp(t("16.0.0"), cluster.as_ref());
        assert!(!ok.too_old && !ok.clamped);
        assert_eq!(clamp(None, cluster.as_ref()).target, None);
        assert!(!clamp(t("99.0.0"), None).clamped);
    }

    #[test]
    fn cached_answers_age_from_fresh_to_stale_to_expired() {
        let c = Cached {
            target: None,
            critical: false,
            fetched_at: 1_000,
        };
        let (ttl, stale) = (Duration::from_secs(60), Duration::from_secs(3600));
        assert_eq!(freshness(&c, 1_000, ttl, stale), Freshness::Fresh);
        assert_eq!(freshness(&c, 60_999, ttl, stale), Freshness::Fresh);
        assert_eq!(freshness(&c, 61_000, ttl, stale), Freshness::Stale);
        assert_eq!(freshness(&c, 3_601_000, ttl, stale), Freshness::Stale);
        assert_eq!(freshness(&c, 3_601_001, ttl, stale), Freshness::Expired);
        assert_eq!(retry_after_failure(ttl), Duration::from_secs(10));
        assert_eq!(
            retry_after_failure(Duration::from_secs(2)),
            Duration::from_secs(2)
        );
    }
}
