use avsync_shared::config::{exit_bad_setting, parse_or_exit};
use avsync_worker::cli::{Cli, Command};
use std::process::ExitCode;

const PROGRAM: &str = "avsync-worker";

/// glibc's malloc kept about 100 MB more resident than the worker used at its peak, draining
/// 1,000 tenants with a full window (the held messages' small blocks are freed in another order
/// than allocated, and the space between them is not given back): 280 MB RSS for 178 MB of heap.
/// jemalloc kept 208 MB in the same drain.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options (its prefixed `malloc_conf`, read once at its start). By default it keeps
/// freed pages for ten seconds, purging them only as a side effect of allocating, and spreads
/// threads over eight arenas on two cores, each keeping its own free space: draining 1,000
/// tenants it held 40 MB more resident than it had in use. A background thread that gives pages
/// back after a second, and one arena, held the peak at 149 MB against 159-171 (paired runs).
#[export_name = "_rjem_malloc_conf"]
pub static MALLOC_CONF: &[u8; 53] = b"background_thread:true,dirty_decay_ms:1000,narenas:1\0";

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
