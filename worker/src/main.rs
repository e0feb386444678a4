use avsync_shared::config::{exit_bad_setting, parse_or_exit};
use avsync_worker::cli::{Cli, Command};
use std::process::ExitCode;

const PROGRAM: &str = "avsync-worker";

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = parse_or_exit(PROGRAM);
    let checked = match cli.settings.check() {
        Ok(checked) => checked,
        Err(e) => exit_bad_setting(PROGRAM, &e.to_string()),
    };
    avsync_shared::telemetry::init(&checked.settings.common.log_format);
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(checked).await,
        Command::Migrate(args) => {
            avsync_worker::ops::migrate::run(&args, &checked, &mut std::io::stdout()).await
        }
        Command::Dlq(command) => {
            avsync_worker::ops::dlq_cli::run(command, &checked.settings.common).await
        }
        Command::Status(args) => {
            avsync_worker::ops::status::run(&args, &checked.settings.common, &mut std::io::stdout())
                .await
        }
        Command::Reconcile(args) => {
            if let Err(e) = checked.settings.reconcile_settings() {
                exit_bad_setting(PROGRAM, &e.to_string());
            }
            avsync_worker::ops::reconcile_cli::run(&args, &checked, &mut std::io::stdout()).await
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

async fn run(checked: avsync_worker::settings::Checked) -> anyhow::Result<()> {
    let shutdown = avsync_shared::shutdown::on_signal();
    avsync_worker::start(checked, shutdown).await?.wait().await
}
