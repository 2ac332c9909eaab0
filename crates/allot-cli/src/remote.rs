//! Running commands through an allot server (`--server URL`): the same
//! validated [`Action`]s, sent with `allot_client`, rendered by the same
//! [`Report`](crate::output::Report) code, so the output is identical to a
//! local run. `allot watch` lives here too: it only runs remotely.

use std::io::Write;

use allot_client::Client;
use anyhow::{Context, Result};
use futures::StreamExt;

use crate::cli::Format;
use crate::commands::{self, Action};
use crate::output::write_event;

/// Runs `action` on the server at `url`.
pub async fn run(url: &str, token: Option<String>, format: Format, action: Action) -> Result<()> {
    let mut client = Client::new(url)?;
    if let Some(t) = token {
        client = client.with_token(t);
    }
    if let Action::Watch { from } = action {
        return watch(&client, from, format).await;
    }
    let report = commands::execute_remote(&client, action).await?;
    let mut out = std::io::stdout().lock();
    report.write(format, &mut out)?;
    out.flush().context("writing output")
}

/// Prints every change from `from` on, one line each, flushed at once so
/// a pipe sees it live. The client resumes after dropped connections by
/// itself; this returns only when the stream fails for good (history
/// compacted, server gone for longer than the retries, ...).
async fn watch(client: &Client, from: u64, format: Format) -> Result<()> {
    let mut events = client.watch(from);
    let mut out = std::io::stdout().lock();
    while let Some(event) = events.next().await {
        write_event(format, &event?, &mut out)?;
        out.flush().context("writing output")?;
    }
    Ok(())
}
