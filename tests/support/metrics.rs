//! `/metrics` read the way Prometheus reads it: scraped over HTTP from the admin API, parsed
//! as the text exposition format, and a series that is not there is an error, not a zero (a
//! renamed metric must fail the tests that assert on it).

use std::net::SocketAddr;

/// One scrape: every sample, with its labels.
pub struct Scrape {
    pub text: String,
    samples: Vec<Sample>,
}

struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// GET `/metrics` from an admin address; panics unless it answers 200.
pub async fn scrape(admin: SocketAddr) -> Scrape {
    let (status, body) = super::http_get(admin, "/metrics").await;
    assert_eq!(status, 200, "GET /metrics: {body}");
    Scrape::parse(body)
}

impl Scrape {
    pub fn parse(text: String) -> Scrape {
        let samples = text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| parse_sample(l).unwrap_or_else(|| panic!("not an exposition line: {l}")))
            .collect();
        Scrape { text, samples }
    }

    /// The sample of `name` whose labels include `labels` (any order); `None` when there is
    /// none. Panics when several match: the labels given must pick one series.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = self.samples.iter().filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v))
        });
        let first = found.next()?;
        assert!(
            found.next().is_none(),
            "{name} {labels:?} matches several series"
        );
        Some(first.value)
    }

    /// A counter's or gauge's value, 0 while its series has not been created (sluice creates
    /// labelled series at their first use). The name must be one sluice declares, so that a
    /// renamed metric cannot pass an assertion that it is 0.
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        match self.get(name, labels) {
            Some(v) => v,
            None => {
                assert!(
                    declared(name),
                    "{name} is not a metric sluice declares (src/observe/metrics.rs)"
                );
                0.0
            }
        }
    }

    /// Like `get`, but a missing series fails the test.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or_else(|| {
            panic!(
                "no series {name} {labels:?} in /metrics:\n{}",
                self.family(name)
            )
        })
    }

    /// The sum over every series of `name` whose labels include `labels`; a metric with no
    /// series at all fails the test.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        assert!(
            self.samples.iter().any(|s| s.name == name),
            "no metric {name} in /metrics"
        );
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|s| s.value)
            .sum()
    }

    /// The exposition lines of one metric, for failure messages.
    pub fn family(&self, name: &str) -> String {
        self.text
            .lines()
            .filter(|l| {
                l.split(['{', ' ']).next() == Some(name) || l.contains(&format!(" {name} "))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Whether `src/metrics.rs` declares `name` (histograms' series add _bucket/_sum/_count).
fn declared(name: &str) -> bool {
    const SOURCE: &str = include_str!("../../src/observe/metrics.rs");
    let family = ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .unwrap_or(name);
    [name, family]
        .iter()
        .any(|n| SOURCE.contains(&format!("\"{n}\"")))
}

/// `name{k="v",...} value [timestamp]` with the format's escapes in label values.
fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices();
        let mut key = String::new();
        loop {
            let (i, c) = chars.next()?;
            match c {
                '}' => {
                    rest = &body[i + 1..];
                    break;
                }
                ',' if key.is_empty() => {}
                '=' => {
                    if chars.next()?.1 != '"' {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next()?.1 {
                            '"' => break,
                            '\\' => value.push(match chars.next()?.1 {
                                'n' => '\n',
                                other => other,
                            }),
                            other => value.push(other),
                        }
                    }
                    labels.push((std::mem::take(&mut key), value));
                }
                c => key.push(c),
            }
        }
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}
