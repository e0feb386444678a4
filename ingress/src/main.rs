use avsync_ingress::settings::Settings;
use avsync_shared::config::{exit_bad_setting, parse_or_exit};
use avsync_shared::{shutdown, telemetry};
use std::process::ExitCode;

const PROGRAM: &str = "avsync-ingress";

#[tokio::main]
async fn main() -> ExitCode {
    let settings: Settings = parse_or_exit(PROGRAM);
    let checked = match settings.check() {
        Ok(checked) => checked,
        Err(bad) => exit_bad_setting(PROGRAM, &bad.to_string()),
    };
    telemetry::init(&checked.settings.common.log_format);
    let result = async {
        let running = avsync_ingress::start(checked, shutdown::on_signal()).await?;
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
