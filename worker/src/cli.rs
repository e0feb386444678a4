//! The `avsync-worker` command line: consume (the default), `migrate`, `dlq`, `reconcile`,
//! `status`.

use crate::ops::dlq_cli::DlqCommand;
use crate::ops::migrate::MigrateArgs;
use crate::ops::reconcile_cli::ReconcileArgs;
use crate::ops::status::StatusArgs;
use crate::settings::Settings;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "avsync-worker",
    version,
    about = "Applies AuthVital identity events from RabbitMQ to each tenant's PostgreSQL database"
)]
pub struct Cli {
    // Global, so that a setting may follow the subcommand and shows in its `--help`.
    #[command(
        flatten,
        next_help_heading = "Settings (before or after the subcommand)"
    )]
    pub settings: Settings,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume and apply (the default).
    Run,
    /// Apply migrations to tenant databases.
    Migrate(MigrateArgs),
    /// Inspect, replay or purge dead letters.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Read tenants' members from AuthVital's integration API and fold them into their databases.
    Reconcile(ReconcileArgs),
    /// What a running worker is doing now: servers, tenants marked slow, messages.
    Status(StatusArgs),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("avsync-worker").chain(args.iter().copied()))
    }

    #[test]
    fn commands() {
        assert!(parse(&[]).unwrap().command.is_none());
        assert!(matches!(
            parse(&["run"]).unwrap().command,
            Some(Command::Run)
        ));
        assert!(matches!(
            parse(&["migrate", "--tenant", "t"]).unwrap().command,
            Some(Command::Migrate(MigrateArgs {
                tenant: Some(_),
                all: false
            }))
        ));
        assert!(matches!(
            parse(&["migrate", "--all"]).unwrap().command,
            Some(Command::Migrate(MigrateArgs { all: true, .. }))
        ));
        assert!(parse(&["migrate"]).is_err());
        assert!(parse(&["migrate", "--all", "--tenant", "t"]).is_err());
        assert!(matches!(
            parse(&["dlq", "list", "--json"]).unwrap().command,
            Some(Command::Dlq(DlqCommand::List(_)))
        ));
        assert!(matches!(
            parse(&["reconcile", "--all", "--dry-run", "--json", "--force"])
                .unwrap()
                .command,
            Some(Command::Reconcile(ReconcileArgs {
                all: true,
                dry_run: true,
                json: true,
                force: true,
                ..
            }))
        ));
        assert!(parse(&["reconcile"]).is_err());
        assert!(parse(&["reconcile", "--all", "--tenant", "t"]).is_err());
    }

    #[test]
    fn settings_go_before_or_after_the_subcommand() {
        for args in [
            &["--topology", "x", "--prefetch", "7", "dlq", "list"][..],
            &["dlq", "list", "--topology", "x", "--prefetch", "7"],
            &["dlq", "--topology", "x", "list", "--prefetch", "7"],
            &["migrate", "--all", "--topology", "x", "--prefetch", "7"],
            &["run", "--topology", "x", "--prefetch", "7"],
        ] {
            let cli = parse(args).unwrap();
            assert_eq!(cli.settings.common.topology, "x", "{args:?}");
            assert_eq!(cli.settings.prefetch, 7, "{args:?}");
        }
        let defaults = parse(&["dlq", "list"]).unwrap();
        assert_eq!(defaults.settings.common.topology, "avsync");
        assert_eq!(
            defaults.settings.prefetch,
            crate::settings::DEFAULT_PREFETCH
        );
    }
}
