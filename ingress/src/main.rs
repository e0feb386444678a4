use avsync_ingress::settings::Settings;
use avsync_shared::config::{exit_bad_setting, parse_or_exit};
use avsync_shared::{shutdown, telemetry};
use std::process::ExitCode;

const PROGRAM: &str = "avsync-ingress";

#[tokio::main]
async fn main() -> ExitCode {
    let settings: Settings = parse_or_exit(PROGRAM);
    if let Err(bad) = settings.check() {
        exit_bad_setting(PROGRAM, &bad.to_string());
    }
    telemetry::init(&settings.common.log_format);
    let result = async {
        let running = avsync_ingress::start(settings, shutdown::on_signal()).await?;
        running.handle.await?
    }
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, as the worker prints it: a port in use names its setting.
            eprintln!("{PROGRAM}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
