//! The `allot` command line: pools, claims and resync on a local data dir
//! or a shared store (`--store`), or through an `allot serve` with
//! `--server URL`.
//!
//! Every command runs in two steps: the command line is parsed and checked
//! completely (clap, then [`commands::prepare`]) before the data dir is
//! opened or the server called, so bad input is reported without touching
//! anything; then the validated action runs on the engine (or the server,
//! see [`remote`]) and the result is rendered the same way either way.
//! Errors are one line on stderr (`error: ...`) with exit code 1, or clap's
//! code 2 for usage errors.

pub mod cli;
pub mod commands;
pub mod output;
pub mod remote;
pub mod serve;
pub mod store;

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::error::ErrorKind;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches};

use crate::cli::{Cli, Command, Format};
use crate::commands::Action;
use crate::store::Session;
use allot_backends::StoreUrl;

/// Parses the process arguments, runs the command and returns the exit code.
pub fn main() -> ExitCode {
    let matches = match Cli::command().try_get_matches() {
        Ok(m) => m,
        Err(e) => return usage_error(e),
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => return usage_error(e.format(&mut Cli::command())),
    };
    // `serve` lets a config file choose the data dir unless --data-dir or
    // ALLOT_DATA_DIR gave one.
    let data_dir_given = matches.value_source("data_dir") != Some(ValueSource::DefaultValue);
    let store_given = matches.value_source("store") != Some(ValueSource::DefaultValue);
    let typed = |id| matches.value_source(id) == Some(ValueSource::CommandLine);
    let result = match cli.command {
        // Refused rather than ignored: `serve --token X` would otherwise
        // start a server without authentication.
        Command::Serve(_) if typed("server") || typed("token") => Err(anyhow::anyhow!(
            "--server and --token are for client commands; `allot serve` takes its token \
             from --token-file or ALLOT_TOKEN"
        )),
        Command::Serve(args) => serve::run(
            args,
            data_dir_given.then_some(cli.data_dir),
            store_given.then_some(cli.store),
        ),
        command => run(Cli { command, ..cli }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`allot claims p | head`): the command itself
        // succeeded, so this is not worth an error.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&format!("{e:#}")));
            ExitCode::from(1)
        }
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    if let Command::Serve(args) = cli.command {
        return serve::run(args, Some(cli.data_dir), Some(cli.store));
    }
    let action = commands::prepare(cli.command)?;
    // Checked before anything is opened, like the rest of the command line.
    let store: StoreUrl = cli.store.parse()?;
    // An empty ALLOT_SERVER or ALLOT_TOKEN (exported but blank) means unset.
    let server = cli.server.filter(|s| !s.trim().is_empty());
    let token = cli.token.filter(|t| !t.trim().is_empty());
    if server.is_none() && matches!(action, Action::Watch { .. }) {
        bail!(commands::WATCH_NEEDS_SERVER);
    }
    // One thread is plenty for one request and starts fastest.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    match server {
        Some(url) => runtime.block_on(remote::run(&url, token, cli.output, action)),
        None => runtime.block_on(run_action(&store, &cli.data_dir, cli.output, action)),
    }
}

async fn run_action(
    store: &StoreUrl,
    data_dir: &Path,
    format: Format,
    action: Action,
) -> Result<()> {
    let session = Session::open(store, data_dir, action.creates_data()).await?;
    let result = commands::execute(&session.allot, action).await;
    // Closed before printing, so success is only reported once the store
    // has committed and released the file.
    let closed = session.close().await;
    let report = result?;
    closed?;
    let mut out = std::io::stdout().lock();
    report.write(format, &mut out)?;
    out.flush().context("writing output")
}

/// Prints help and version as clap does; squeezes real usage errors onto
/// one line so every failure of `allot` reads the same way.
fn usage_error(e: clap::Error) -> ExitCode {
    let code = u8::try_from(e.exit_code()).unwrap_or(2);
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            // Nothing useful can be done if the terminal is gone.
            let _ = e.print();
        }
        _ => eprintln!("{}", squeeze_usage(&e.render().to_string())),
    }
    ExitCode::from(code)
}

/// Joins clap's multi-line message: the message lines, then the usage line
/// and a pointer to --help in parentheses.
fn squeeze_usage(rendered: &str) -> String {
    let mut msg = String::new();
    let mut usage = None;
    for line in rendered.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.starts_with("For more information") {
            continue;
        }
        if let Some(u) = line.strip_prefix("Usage:") {
            usage = Some(u.trim().to_string());
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(if msg.ends_with(':') { " " } else { "; " });
        }
        msg.push_str(line);
    }
    match usage {
        Some(u) => format!("{msg} (usage: {u}; see --help)"),
        None => format!("{msg} (see --help)"),
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squeezes_clap_errors() {
        let r = "error: the following required arguments were not provided:\n  <NAME>\n\nUsage: allot pool show <NAME>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            squeeze_usage(r),
            "error: the following required arguments were not provided: <NAME> (usage: allot pool show <NAME>; see --help)"
        );
        let r = "error: invalid value 'x' for '--strategy <STRATEGY>'\n  [possible values: lowest, next, random]\n\nFor more information, try '--help'.\n";
        assert_eq!(
            squeeze_usage(r),
            "error: invalid value 'x' for '--strategy <STRATEGY>'; [possible values: lowest, next, random] (see --help)"
        );
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
