//! Progress of the long operator commands (`dlq replay`, `dlq purge`, `reconcile --all`) on
//! stderr: a bar on a terminal, nothing when stderr is not one (piped, a CI log) or when the
//! command prints JSON, so that what scripts read stays clean.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

/// A bar for `total` steps of `what`, or a hidden one when `quiet` or stderr is no terminal.
pub fn bar(what: &'static str, total: u64, quiet: bool) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{prefix} [{wide_bar}] {pos}/{len} {msg} ({eta} left)")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(what);
    bar
}
