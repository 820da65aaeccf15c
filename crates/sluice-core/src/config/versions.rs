//! `[versions]`: the version server agents' updaters ask (RFD 109), mirroring Teleport's
//! `automatic_upgrades_channels`: each channel has a static version (and critical flag) or
//! forwards to an upstream version server, whose answers are cached.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::collect::Errors;
use super::error::KeyPath;
use super::pending::{FileSlot, Pending};
use super::raw::RawVersions;
use super::values::{duration, human, int_in};
use crate::agents::versions::Target;

#[derive(Debug, Clone, Serialize)]
pub struct VersionsConfig {
    pub channels: BTreeMap<String, Channel>,
    /// How long a forwarded answer is served without asking upstream again.
    #[serde(with = "human")]
    pub cache_ttl: Duration,
    /// How long a forwarded answer may still be served while upstream fails.
    #[serde(with = "human")]
    pub max_stale: Duration,
    /// The rollout view counts an agent as adopting once it has been ready this long.
    #[serde(with = "human")]
    pub stable_after: Duration,
    /// Version requests per second from one source address (twice that in a burst).
    pub rate_limit: u32,
    /// The CAs that sign `https` upstreams' certificates (default: the system's).
    pub ca_file: Option<PathBuf>,
    /// `ca_file`'s content, read by the loader.
    #[serde(skip)]
    pub ca: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    Static { target: Target, critical: bool },
    Forward { url: String },
}

/// A channel name: what follows `/channel/` in the path, so it may hold `/` (`stable/cloud`)
/// but no empty segment.
pub fn channel_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('/')
        && !name.ends_with('/')
        && !name.contains("//")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
}

/// An upstream: `http(s)://host[:port][/path]`, no query; the endpoint's name is appended.
fn forward_url_ok(text: &str) -> bool {
    let Ok(uri) = text.parse::<http::Uri>() else {
        return false;
    };
    matches!(uri.scheme_str(), Some("http" | "https"))
        && uri.host().is_some_and(|h| !h.is_empty())
        && uri.query().is_none()
}

impl RawVersions {
    pub(super) fn build(&self, errs: &mut Errors<'_>, root: &KeyPath) -> VersionsConfig {
        let at = root.key("versions");
        let mut channels = BTreeMap::new();
        for (name, raw) in self.channels.iter().flatten() {
            let cat = at.key("channels").key(name);
            if !channel_name_ok(name) {
                errs.push(
                    &cat,
                    format!("`{name}` is not a channel name"),
                    "use 1 to 128 of [A-Za-z0-9._-] and / between parts, e.g. \"stable/cloud\"",
                );
                continue;
            }
            let channel = match (&raw.static_version, &raw.forward_url) {
                (Some(_), Some(_)) => {
                    errs.push(
                        &cat.key("forward_url"),
                        "a channel has static_version or forward_url, not both",
                        "keep static_version (served as set) or forward_url (asked upstream)",
                    );
                    continue;
                }
                (None, None) => {
                    errs.push(
                        &cat,
                        format!("channel `{name}` has no version"),
                        "set static_version = \"17.1.0\", or forward_url = \"https://...\"",
                    );
                    continue;
                }
                (Some(v), None) => match Target::parse(v) {
                    Some(target) => Channel::Static {
                        target,
                        critical: raw.critical.unwrap_or(false),
                    },
                    None => {
                        errs.push(
                            &cat.key("static_version"),
                            format!("`{v}` is not a version"),
                            "write major.minor.patch, e.g. \"17.1.0\"",
                        );
                        continue;
                    }
                },
                (None, Some(url)) => {
                    if raw.critical.is_some() {
                        errs.push(
                            &cat.key("critical"),
                            "a forwarded channel's critical flag comes from upstream",
                            "remove critical, or replace forward_url by static_version",
                        );
                    }
                    if !forward_url_ok(url) {
                        errs.push(
                            &cat.key("forward_url"),
                            format!("`{url}` is not an upstream URL"),
                            "write http(s)://host[:port]/path, e.g. \"https://updates.releases.teleport.dev/v1/stable/cloud\"",
                        );
                        continue;
                    }
                    Channel::Forward {
                        url: url.trim_end_matches('/').to_owned(),
                    }
                }
            };
            channels.insert(name.clone(), channel);
        }
        let cache_ttl = duration(
            errs,
            &at.key("cache_ttl"),
            self.cache_ttl.as_deref(),
            Duration::from_secs(60),
        );
        let max_stale = duration(
            errs,
            &at.key("max_stale"),
            self.max_stale.as_deref(),
            Duration::from_secs(3600),
        );
        if max_stale < cache_ttl {
            errs.push(
                &at.key("max_stale"),
                "max_stale is shorter than cache_ttl",
                "make max_stale at least cache_ttl (it is how long a cached answer outlives a failing upstream)",
            );
        }
        let stable_after = duration(
            errs,
            &at.key("stable_after"),
            self.stable_after.as_deref(),
            Duration::from_secs(60),
        );
        let rate_limit = int_in(
            errs,
            &at.key("rate_limit"),
            self.rate_limit,
            10,
            1,
            1_000_000,
        ) as u32;
        let ca_file = self
            .ca_file
            .as_deref()
            .filter(|s| !s.is_empty())
            .map(PathBuf::from);
        if let Some(file) = &ca_file {
            let place = errs.place(&at.key("ca_file"));
            errs.later(Pending::ReadFile {
                at: place,
                path: file.clone(),
                slot: FileSlot::VersionsCa,
                fix: "check the path and its permissions",
            });
        }
        VersionsConfig {
            channels,
            cache_ttl,
            max_stale,
            stable_after,
            rate_limit,
            ca_file,
            ca: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_may_hold_slashes_between_parts() {
        for ok in ["default", "stable/cloud", "stable/cloud/v17", "a.b_c-d"] {
            assert!(channel_name_ok(ok), "{ok}");
        }
        for bad in ["", "/x", "x/", "a//b", "a b", "ü"] {
            assert!(!channel_name_ok(bad), "{bad}");
        }
    }

    #[test]
    fn upstreams_are_http_urls_without_a_query() {
        assert!(forward_url_ok(
            "https://updates.releases.teleport.dev/v1/stable/cloud"
        ));
        assert!(forward_url_ok("http://127.0.0.1:8080"));
        for bad in ["ftp://x/y", "updates.example.com/v1", "https://x/y?z=1", ""] {
            assert!(!forward_url_ok(bad), "{bad}");
        }
    }
}
