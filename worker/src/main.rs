use avsync_shared::config::{exit_bad_setting, parse_or_exit};
use avsync_worker::cli::{Cli, Command};
use std::process::ExitCode;

const PROGRAM: &str = "avsync-worker";

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = parse_or_exit(PROGRAM);
    if let Err(e) = cli.settings.validate() {
        exit_bad_setting(PROGRAM, &e.to_string());
    }
    avsync_shared::telemetry::init(&cli.settings.common.log_format);
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(cli.settings).await,
        Command::Migrate(args) => {
            avsync_worker::migrate::run(&args, &cli.settings, &mut std::io::stdout()).await
        }
        Command::Dlq(command) => avsync_worker::dlq_cli::run(command, &cli.settings.common).await,
        Command::Reconcile(args) => {
            if let Err(e) = cli.settings.reconcile_settings() {
                exit_bad_setting(PROGRAM, &e.to_string());
            }
            avsync_worker::reconcile_cli::run(&args, &cli.settings, &mut std::io::stdout()).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{PROGRAM}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(settings: avsync_worker::settings::Settings) -> anyhow::Result<()> {
    let shutdown = avsync_shared::shutdown::on_signal();
    avsync_worker::start(settings, shutdown).await?.wait().await
}
