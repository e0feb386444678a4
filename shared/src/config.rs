//! Settings shared by both processes, the duration syntax, and the one-line report of a bad
//! setting.

use crate::topology::{Topology, TopologyError};
use clap::builder::TypedValueParser;
use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Arg, Args, Command, Parser};
use std::net::SocketAddr;
use std::time::Duration;

pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// An integer followed by `ms`, `s`, `m` or `h`.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("`{value}` has no unit (ms, s, m or h)"))?;
    let (number, unit) = value.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{value}` does not start with a whole number"))?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(format!("`{value}` has an unknown unit (use ms, s, m or h)")),
    };
    ms.map(Duration::from_millis)
        .ok_or_else(|| format!("`{value}` is too large"))
}

/// Broker, topology and private listener: the same for ingress and worker.
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// The RabbitMQ broker: one URL, or the comma-separated URLs of one cluster's nodes.
    #[arg(long, global = true, env = "AVSYNC_AMQP_URL", value_name = "URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true)]
    pub amqp_url: String,

    /// Prefix of every exchange and queue name.
    #[arg(
        long,
        global = true,
        env = "AVSYNC_TOPOLOGY",
        value_name = "PREFIX",
        default_value = "avsync"
    )]
    pub topology: String,

    /// Number of partition queues; ingress and workers of one topology must agree.
    #[arg(
        long,
        global = true,
        env = "AVSYNC_PARTITIONS",
        value_name = "N",
        default_value_t = 16
    )]
    pub partitions: u16,

    /// The private listener: /metrics, /healthz, /readyz.
    #[arg(
        long,
        global = true,
        env = "AVSYNC_METRICS_LISTEN",
        value_name = "ADDR",
        default_value = "0.0.0.0:9090"
    )]
    pub metrics_listen: SocketAddr,

    /// Log format: `text` or `json`.
    #[arg(long, global = true, env = "AVSYNC_LOG_FORMAT", value_name = "FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

impl CommonArgs {
    pub fn topology(&self) -> Result<Topology, TopologyError> {
        Topology::new(&self.topology, self.partitions)
    }

    /// The shared settings clap cannot check, each failure naming its setting. The broker URL is
    /// parsed here because the broker client's own parse error quotes the whole URL, password
    /// included, and would be logged at every reconnect attempt.
    pub fn check(&self) -> Result<Topology, BadSetting> {
        crate::broker::Nodes::parse(&self.amqp_url)
            .map_err(|e| BadSetting::new("AVSYNC_AMQP_URL", e.to_string()))?;
        self.topology().map_err(|e| {
            let name = match e {
                TopologyError::BadPrefix => "AVSYNC_TOPOLOGY",
                TopologyError::BadPartitions => "AVSYNC_PARTITIONS",
            };
            BadSetting::new(name, e.to_string())
        })
    }
}

/// A setting that parsed but is not usable. Its text names the setting and never holds a secret.
#[derive(Debug, thiserror::Error)]
#[error("bad setting {name}: {reason}")]
pub struct BadSetting {
    pub name: &'static str,
    pub reason: String,
}

impl BadSetting {
    pub fn new(name: &'static str, reason: impl Into<String>) -> Self {
        Self {
            name,
            reason: reason.into(),
        }
    }
}

/// Parses flags and environment. `--help` and `--version` print as usual, and so does a wrong
/// command line (a missing or unknown argument: clap's whole message, with the usage). A value
/// that does not parse becomes one line on stderr naming its environment variable and flag, as
/// [`BadSetting`] does; the process exits with status 2.
pub fn parse_or_exit<T: Parser>(program: &str) -> T {
    match T::try_parse() {
        Ok(parsed) => parsed,
        Err(e) => match bad_value(&T::command(), &e) {
            Some(line) => exit_bad_setting(program, &line),
            None => e.exit(),
        },
    }
}

pub fn exit_bad_setting(program: &str, message: &str) -> ! {
    eprintln!("{program}: {message}");
    std::process::exit(2)
}

/// The one line for a value clap refused, or `None` when `e` is not about a value.
fn bad_value(command: &Command, e: &clap::Error) -> Option<String> {
    if !matches!(
        e.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation | ErrorKind::InvalidUtf8
    ) {
        return None;
    }
    let Some(ContextValue::String(shown)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    // clap shows the argument as `--flag <VALUE>`.
    let flag = shown.split_whitespace().next().unwrap_or(shown);
    let arg = find_flag(command, flag.trim_start_matches('-'));
    let setting = match arg.and_then(Arg::get_env) {
        Some(env) => format!("{} ({flag})", env.to_string_lossy()),
        None => flag.to_owned(),
    };
    // clap's text, less its "error: " and the flag (named above), on one line.
    let rendered = e.render().to_string();
    let reason = rendered
        .lines()
        .map(str::trim)
        .take_while(|line| !line.starts_with("Usage:") && !line.starts_with("For more information"))
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let reason = reason
        .trim_start_matches("error: ")
        .replace(&format!(" for '{shown}'"), "");
    Some(format!("bad setting {setting}: {reason}"))
}

fn find_flag<'a>(command: &'a Command, long: &str) -> Option<&'a Arg> {
    command
        .get_arguments()
        .find(|arg| arg.get_long() == Some(long))
        .or_else(|| {
            command
                .get_subcommands()
                .find_map(|sub| find_flag(sub, long))
        })
}

/// A whole number from `min` to `max`, both included, said so when refused (clap's own ranges
/// print as `5..50`, which reads as if 50 were allowed).
/// A size in bytes: a whole number, optionally followed by `KiB`, `MiB` or `GiB`.
pub fn parse_bytes(value: &str) -> Result<usize, String> {
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let n: usize = number
        .parse()
        .map_err(|_| format!("`{value}` does not start with a whole number"))?;
    let scale: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => {
            return Err(format!(
                "`{value}` has an unknown unit (use KiB, MiB or GiB)"
            ))
        }
    };
    n.checked_mul(scale)
        .filter(|b| *b > 0)
        .ok_or_else(|| format!("`{value}` must be above zero and fit in memory"))
}

pub fn number_from_to<N>(min: N, max: N) -> impl TypedValueParser<Value = N>
where
    N: std::str::FromStr + PartialOrd + std::fmt::Display + Copy + Send + Sync + 'static,
{
    move |value: &str| -> Result<N, String> {
        value
            .parse::<N>()
            .ok()
            .filter(|n| (min..=max).contains(n))
            .ok_or_else(|| format!("must be a whole number from {min} to {max}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_units() {
        assert_eq!(parse_bytes("512"), Ok(512));
        assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes("2 GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("8KiB"), Ok(8 << 10));
        for bad in ["", "0", "MiB", "5MB", "-1", "1.5MiB"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }

    fn common(amqp_url: &str, topology: &str, partitions: u16) -> CommonArgs {
        CommonArgs {
            amqp_url: amqp_url.to_owned(),
            topology: topology.to_owned(),
            partitions,
            metrics_listen: "127.0.0.1:0".parse().unwrap(),
            log_format: "text".to_owned(),
        }
    }

    #[test]
    fn check_names_the_setting_and_never_shows_the_broker_password() {
        assert!(common(DEFAULT_AMQP_URL, "avsync", 16).check().is_ok());
        let cluster = "amqp://u:p@a:5672/%2f,amqp://u:p@b:5672/%2f, amqp://u:p@c:5672/%2f";
        assert!(common(cluster, "avsync", 16).check().is_ok());
        for url in [
            "not a url hidden-pass",
            "http://u:hidden-pass@h/",
            "amqp://u:hidden-pass@h:notaport/",
            "amqp://u:hidden-pass@a:5672/%2f,amqp://u:hidden-pass@b:notaport/",
            "amqp://u:hidden-pass@a:5672/%2f,,amqp://u:hidden-pass@b:5672/%2f",
        ] {
            let err = common(url, "avsync", 16).check().unwrap_err();
            assert_eq!(err.name, "AVSYNC_AMQP_URL", "{url}");
            assert!(!err.to_string().contains("hidden-pass"), "{err}");
        }
        assert_eq!(
            common(DEFAULT_AMQP_URL, "a b", 16)
                .check()
                .unwrap_err()
                .name,
            "AVSYNC_TOPOLOGY"
        );
        assert_eq!(
            common(DEFAULT_AMQP_URL, "a", 0).check().unwrap_err().name,
            "AVSYNC_PARTITIONS"
        );
    }

    #[derive(Parser, Debug)]
    struct Probe {
        #[command(flatten)]
        common: CommonArgs,
        #[arg(long, global = true, env = "AVSYNC_PROBE_N", value_parser = number_from_to(5u32, 49))]
        n: Option<u32>,
        #[command(subcommand)]
        command: Option<ProbeCommand>,
    }

    #[derive(clap::Subcommand, Debug)]
    enum ProbeCommand {
        Sub {
            #[arg(long)]
            limit: Option<u32>,
        },
    }

    fn refusal(args: &[&str]) -> Option<String> {
        let e = Probe::try_parse_from(std::iter::once("probe").chain(args.iter().copied()))
            .unwrap_err();
        bad_value(&<Probe as clap::CommandFactory>::command(), &e)
    }

    #[test]
    fn a_refused_value_names_its_variable_and_flag_on_one_line() {
        for args in [&["--n", "50"][..], &["sub", "--n", "4"], &["--n", "x"]] {
            let line = refusal(args).expect("a value error");
            assert!(
                line.starts_with("bad setting AVSYNC_PROBE_N (--n): invalid value '"),
                "{line}"
            );
            assert!(
                line.ends_with("must be a whole number from 5 to 49"),
                "{line}"
            );
        }
        let line = refusal(&["--log-format", "xml"]).expect("a value error");
        assert_eq!(
            line,
            "bad setting AVSYNC_LOG_FORMAT (--log-format): invalid value 'xml' [possible values: text, json]"
        );
        let line = refusal(&["sub", "--limit", "x"]).expect("a value error");
        assert!(
            line.starts_with("bad setting --limit: invalid value 'x'"),
            "{line}"
        );
        assert_eq!(
            refusal(&["--nope"]),
            None,
            "a wrong command line is clap's to print"
        );
        assert_eq!(refusal(&["sub", "extra"]), None);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in [
            "",
            "10",
            "s",
            "1.5s",
            "-1s",
            "10 s",
            "10sec",
            "1d",
            "99999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
