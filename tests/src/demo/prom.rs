//! Reading Prometheus text exposition: just enough to print a process's own series and to check
//! them in tests.

use std::collections::{BTreeMap, BTreeSet};

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line} of the metrics text is not a sample: {reason}")]
pub struct ParseError {
    pub line: usize,
    pub reason: &'static str,
}

/// Every sample of one `/metrics` answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scrape {
    pub samples: Vec<Sample>,
}

impl Scrape {
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let samples = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'))
            .map(|(i, l)| {
                parse_sample(l).map_err(|reason| ParseError {
                    line: i + 1,
                    reason,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { samples })
    }

    /// The names of every sample (histograms as `_bucket`, `_sum` and `_count`).
    pub fn names(&self) -> BTreeSet<&str> {
        self.samples.iter().map(|s| s.name.as_str()).collect()
    }

    /// Samples of `name` whose labels include every pair of `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &str,
        labels: &[(&str, &str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        let name = name.to_owned();
        let labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(k.as_str()) == Some(v))
        })
    }

    /// The value of the one sample of `name` with exactly these labels.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.matching(name, labels)
            .find(|s| s.labels.len() == labels.len())
            .map(|s| s.value)
    }

    /// The sum over every sample of `name` whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// Where the `q` quantile of a histogram lies, as the histogram measured it: the upper
    /// bound of the bucket that holds it (`q` of the observations were at most that), or
    /// infinity past the last bound. Interpolating within the bucket, as PromQL's
    /// `histogram_quantile` does, would invent a figure: 99 % of events between 10 s and 30 s
    /// reads as "29.8 s" whatever they were. None before the first observation.
    pub fn quantile_bound(&self, histogram: &str, q: f64) -> Option<f64> {
        let mut buckets: Vec<(f64, f64)> = self
            .matching(&format!("{histogram}_bucket"), &[])
            .filter_map(|s| {
                let le = match s.labels.get("le")?.as_str() {
                    "+Inf" => f64::INFINITY,
                    bound => bound.parse().ok()?,
                };
                Some((le, s.value))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let total = buckets.last()?.1;
        if total <= 0.0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total;
        buckets
            .into_iter()
            .find(|(_, count)| *count >= rank)
            .map(|(le, _)| le)
    }

    /// The mean of a histogram's observations (exact: its `_sum` over its `_count`).
    pub fn mean(&self, histogram: &str) -> Option<f64> {
        let count = self.sum(&format!("{histogram}_count"), &[]);
        (count > 0.0).then(|| self.sum(&format!("{histogram}_sum"), &[]) / count)
    }
}

fn parse_sample(line: &str) -> Result<Sample, &'static str> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or("no value")?;
    let name = &line[..name_end];
    if name.is_empty() {
        return Err("no metric name");
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(inner)?;
        labels = parsed;
        rest = after;
    }
    let value = rest.split_whitespace().next().ok_or("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other.parse().map_err(|_| "the value is not a number")?,
    };
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses `k="v",…}` and returns the labels and what follows the `}`.
fn parse_labels(mut s: &str) -> Result<(BTreeMap<String, String>, &str), &'static str> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start_matches([',', ' ']);
        if let Some(after) = s.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = s.find('=').ok_or("a label without `=`")?;
        let key = s[..eq].trim().to_owned();
        s = s[eq + 1..]
            .strip_prefix('"')
            .ok_or("an unquoted label value")?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => return Err("an unterminated label value"),
                },
                Some((_, c)) => value.push(c),
                None => return Err("an unterminated label value"),
            }
        };
        labels.insert(key, value);
        s = &s[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP avsync_worker_events_total Events handled.
# TYPE avsync_worker_events_total counter
avsync_worker_events_total{outcome="applied",type="member.joined"} 3
avsync_worker_events_total{outcome="ignored",type="license.assigned"} 2
avsync_worker_tenant_pools 1
avsync_worker_apply_seconds_bucket{le="+Inf"} 3
avsync_worker_apply_seconds_sum 0.03
avsync_worker_apply_seconds_count 3
odd{v="a \"quoted\" \\ back\nslash"} NaN
"#;

    #[test]
    fn reads_samples_labels_and_values() {
        let s = Scrape::parse(TEXT).unwrap();
        assert_eq!(s.samples.len(), 7);
        assert_eq!(
            s.get(
                "avsync_worker_events_total",
                &[("type", "member.joined"), ("outcome", "applied")]
            ),
            Some(3.0)
        );
        assert_eq!(s.get("avsync_worker_events_total", &[]), None);
        assert_eq!(s.sum("avsync_worker_events_total", &[]), 5.0);
        assert_eq!(
            s.sum("avsync_worker_events_total", &[("outcome", "ignored")]),
            2.0
        );
        assert_eq!(s.get("avsync_worker_tenant_pools", &[]), Some(1.0));
        assert_eq!(
            s.get("avsync_worker_apply_seconds_bucket", &[("le", "+Inf")]),
            Some(3.0)
        );
        assert_eq!(s.quantile_bound("avsync_worker_events_total", 0.5), None);
        let odd = s.matching("odd", &[]).next().unwrap();
        assert_eq!(odd.labels["v"], "a \"quoted\" \\ back\nslash");
        assert!(odd.value.is_nan());
        assert!(s.names().contains("avsync_worker_apply_seconds_count"));
    }

    #[test]
    fn quantiles_are_the_bound_of_their_bucket() {
        let text = "h_bucket{le=\"0.1\"} 50\nh_bucket{le=\"0.2\"} 90\nh_bucket{le=\"+Inf\"} 100\n\
                    h_sum 12.5\nh_count 100\n\
                    e_bucket{le=\"1\"} 0\ne_bucket{le=\"+Inf\"} 0\ne_sum 0\ne_count 0\n";
        let s = Scrape::parse(text).unwrap();
        assert_eq!(s.quantile_bound("h", 0.25), Some(0.1));
        assert_eq!(s.quantile_bound("h", 0.5), Some(0.1));
        assert_eq!(s.quantile_bound("h", 0.7), Some(0.2));
        assert_eq!(
            s.quantile_bound("h", 0.99),
            Some(f64::INFINITY),
            "beyond the last bound"
        );
        assert_eq!(s.mean("h"), Some(0.125));
        assert_eq!(s.quantile_bound("e", 0.5), None, "no observation yet");
        assert_eq!(s.mean("e"), None);
        assert_eq!(s.quantile_bound("missing", 0.5), None);
    }

    #[test]
    fn refuses_what_is_not_a_sample() {
        for bad in [
            "novalue",
            "x{a=\"1\" 2",
            "x{a=1} 2",
            "x 1.2.3",
            "{a=\"1\"} 2",
        ] {
            assert!(Scrape::parse(bad).is_err(), "{bad}");
        }
    }
}
