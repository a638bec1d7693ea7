pub mod audit;
pub mod backup;
pub mod cluster;
pub mod credentials;
pub mod dashboard;
pub mod install;
pub mod launch;
pub mod node;
pub mod takeownership;
pub mod update;
pub mod user;
pub mod watch;

use std::io::{BufRead, IsTerminal, Write};

use anyhow::bail;

/// Asks a yes/no question on the terminal; `--yes` answers it.
pub fn confirm(ctx: &crate::conn::Ctx, question: &str) -> anyhow::Result<bool> {
    if ctx.assume_yes {
        return Ok(true);
    }
    if !std::io::stdin().is_terminal() {
        bail!("{question} — cannot ask: standard input is not a terminal; pass --yes to confirm");
    }
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(matches!(line.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}
