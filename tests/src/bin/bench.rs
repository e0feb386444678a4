//! `cargo run --release -p avsync-tests --bin bench -- --help`: measures avsync against the
//! limits of the local RabbitMQ and PostgreSQL (see the README's Performance section).

use avsync_shared::config::parse_or_exit;
use avsync_tests::bench::{run, BenchArgs};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: BenchArgs = parse_or_exit("bench");
    // The in-process ingress logs every request at info, and sqlx warns of every statement over
    // a second (a DROP DATABASE is one): only problems belong beside the table. Set before the
    // runtime starts any thread that could read the environment.
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "warn,sqlx::query=error");
    }
    avsync_shared::telemetry::init("text");
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run::bench(args, command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    }
}
