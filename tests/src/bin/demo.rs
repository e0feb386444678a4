//! `cargo run -p avsync-tests --bin demo`: avsync end to end on the local PostgreSQL
//! and RabbitMQ, in one command (`--help` for the options).

use avsync_shared::config::parse_or_exit;
use avsync_tests::demo::{run, DemoArgs};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: DemoArgs = parse_or_exit("demo");
    // Only problems belong beside the report (sqlx warns of every statement over a second, and
    // a DROP DATABASE is one; lapin is off as in `telemetry::DEFAULT_FILTER`), and the demo
    // configures its services itself. Both are set before the runtime starts any thread that
    // could read the environment.
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "warn,lapin=off,sqlx::query=error");
    }
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AVSYNC_") {
            std::env::remove_var(key);
        }
    }
    avsync_shared::telemetry::init("text");
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("demo: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut stdout = std::io::stdout();
    match runtime.block_on(run(&args, &mut stdout)) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::FAILURE
        }
    }
}
