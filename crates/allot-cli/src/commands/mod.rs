//! Commands in two steps: [`prepare`] checks everything that can be checked
//! without the store (so bad input is refused before anything is opened or
//! created), then [`execute`] runs the validated [`Action`] on the engine,
//! or [`execute_remote`] sends it to a server. Both give the same
//! [`Report`], so the output does not depend on where the command ran.

mod claim;
mod pool;

use std::collections::BTreeMap;

use allot::{AllocRequest, Allot, ParentRef, PoolSpec, Target};
use allot_client::Client;
use anyhow::{bail, Result};

use crate::cli::{Command, PoolCommand, ResyncCommand, TargetSel};
use crate::output::Report;

/// A fully validated request, ready for the engine.
#[derive(Debug)]
pub enum Action {
    /// `pool create`.
    CreatePool {
        name: String,
        spec: PoolSpec,
        labels: BTreeMap<String, String>,
        parent: Option<ParentRef>,
    },
    /// `pool list`: the pools having all these labels.
    ListPools { labels: BTreeMap<String, String> },
    /// `pool show`.
    ShowPool { name: String },
    /// `pool delete`.
    DeletePool { name: String, force: bool },
    /// `alloc`.
    Alloc { pool: String, req: AllocRequest },
    /// `release`.
    Release {
        pool: String,
        target: Target,
        request_id: Option<String>,
    },
    /// `lookup`.
    Lookup { pool: String, target: Target },
    /// `claims`: one page of at most `limit` claims after `after`.
    Claims {
        pool: String,
        after: Option<String>,
        limit: usize,
    },
    /// `resync begin`.
    ResyncBegin { pool: String, owner: Option<String> },
    /// `resync end`.
    ResyncEnd { pool: String, owner: Option<String> },
    /// `members`.
    Members,
    /// `owner`.
    Owner { pool: String, value: String },
    /// `watch`: changes from this revision on (0: from now).
    Watch { from: u64 },
}

impl Action {
    /// Only creating a pool may bring a new data dir into existence; every
    /// other command needs data that already exists.
    pub fn creates_data(&self) -> bool {
        matches!(self, Action::CreatePool { .. })
    }
}

/// Checks a parsed command line without touching the data dir.
pub fn prepare(command: Command) -> Result<Action> {
    Ok(match command {
        Command::Pool(PoolCommand::Create(args)) => pool::prepare_create(args)?,
        Command::Pool(PoolCommand::List { labels }) => Action::ListPools {
            labels: pool::parse_labels(&labels)?,
        },
        Command::Pool(PoolCommand::Show { name }) => Action::ShowPool {
            name: checked_pool(name)?,
        },
        Command::Pool(PoolCommand::Delete { name, force }) => Action::DeletePool {
            name: checked_pool(name)?,
            force,
        },
        Command::Alloc(args) => claim::prepare_alloc(args)?,
        Command::Release(args) => Action::Release {
            pool: checked_pool(args.pool)?,
            target: target(args.target),
            request_id: args.request_id.map(claim::checked_request_id).transpose()?,
        },
        Command::Lookup(args) => Action::Lookup {
            pool: checked_pool(args.pool)?,
            target: target(args.target),
        },
        Command::Claims(args) => Action::Claims {
            pool: checked_pool(args.pool)?,
            after: args.after,
            // clap bounds the limit to 1..=10000.
            limit: usize::try_from(args.limit).unwrap_or(usize::MAX),
        },
        Command::Resync(ResyncCommand::Begin(a)) => Action::ResyncBegin {
            pool: checked_pool(a.pool)?,
            owner: a.owner,
        },
        Command::Resync(ResyncCommand::End(a)) => Action::ResyncEnd {
            pool: checked_pool(a.pool)?,
            owner: a.owner,
        },
        Command::Members => Action::Members,
        Command::Owner(args) => Action::Owner {
            pool: checked_pool(args.pool)?,
            value: args.value,
        },
        Command::Watch(args) => Action::Watch {
            from: args.from.unwrap_or(0),
        },
        // Runs on its own (crate::serve), never as a one-shot action.
        Command::Serve(_) => bail!("`serve` is not a one-shot command"),
    })
}

fn checked_pool(name: String) -> Result<String> {
    allot::validate_pool_name(&name)?;
    Ok(name)
}

fn target(sel: TargetSel) -> Target {
    match (sel.value, sel.key) {
        (Some(v), _) => Target::Value(v),
        // clap's required group guarantees one of the two.
        (None, k) => Target::Key(k.unwrap_or_default()),
    }
}

/// Runs a validated action on the engine.
pub async fn execute(allot: &Allot, action: Action) -> Result<Report> {
    Ok(match action {
        Action::CreatePool {
            name,
            spec,
            labels,
            parent,
        } => Report::PoolCreated(allot.create_pool_in(&name, spec, labels, parent).await?),
        Action::ListPools { labels } => Report::Pools(allot.list_pools_labeled(&labels).await?),
        Action::ShowPool { name } => Report::Pool(allot.pool(&name).await?),
        Action::DeletePool { name, force } => {
            allot
                .delete_pool(&name, force)
                .await
                .map_err(|e| force_hint(e.code() == "pool_not_empty", e.into()))?;
            Report::Deleted(name)
        }
        Action::Alloc { pool, req } => {
            let claims = allot.allocate(&pool, req).await?;
            Report::Allocated { pool, claims }
        }
        Action::Release {
            pool,
            target,
            request_id,
        } => Report::Released(allot.release_once(&pool, target, request_id).await?),
        Action::Lookup { pool, target } => Report::Lookup(allot.lookup(&pool, target).await?),
        Action::Claims { pool, after, limit } => {
            let page = allot.list_claims(&pool, after.as_deref(), limit).await?;
            Report::Claims { pool, page }
        }
        Action::ResyncBegin { pool, owner } => {
            Report::ResyncBegun(allot.resync_begin(&pool, owner.as_deref()).await?)
        }
        Action::ResyncEnd { pool, owner } => {
            Report::ResyncEnded(allot.resync_end(&pool, owner.as_deref()).await?)
        }
        Action::Members => Report::Members(allot.list_members().await?),
        Action::Owner { pool, value } => Report::Owner(allot.owner(&pool, &value).await?),
        // The caller streams instead (crate::remote); a local watch would
        // hold the data dir's lock for as long as it runs.
        Action::Watch { .. } => bail!(WATCH_NEEDS_SERVER),
    })
}

/// Why `watch` does not run on a local data dir.
pub const WATCH_NEEDS_SERVER: &str =
    "watch needs --server URL (or ALLOT_SERVER): watching a local \
     data dir would hold its lock, so nothing could change while it runs; start `allot serve` \
     and watch through it";

/// Runs a validated action through a server: the same calls as
/// [`execute`], over the REST API.
pub async fn execute_remote(client: &Client, action: Action) -> Result<Report> {
    Ok(match action {
        Action::CreatePool {
            name,
            spec,
            labels,
            parent,
        } => Report::PoolCreated(client.create_pool(&name, spec, labels, parent).await?),
        Action::ListPools { labels } => Report::Pools(client.list_pools(&labels).await?),
        Action::ShowPool { name } => Report::Pool(client.pool(&name).await?),
        Action::DeletePool { name, force } => {
            client
                .delete_pool(&name, force)
                .await
                .map_err(|e| force_hint(e.code() == "pool_not_empty", e.into()))?;
            Report::Deleted(name)
        }
        Action::Alloc { pool, req } => {
            let claims = client.allocate(&pool, req).await?;
            Report::Allocated { pool, claims }
        }
        Action::Release {
            pool,
            target,
            request_id,
        } => Report::Released(client.release(&pool, target, request_id.as_deref()).await?),
        Action::Lookup { pool, target } => Report::Lookup(client.lookup(&pool, target).await?),
        Action::Claims { pool, after, limit } => {
            let page = client.list_claims(&pool, after.as_deref(), limit).await?;
            Report::Claims { pool, page }
        }
        Action::ResyncBegin { pool, owner } => {
            Report::ResyncBegun(client.resync_begin(&pool, owner.as_deref()).await?)
        }
        Action::ResyncEnd { pool, owner } => {
            Report::ResyncEnded(client.resync_end(&pool, owner.as_deref()).await?)
        }
        Action::Members => Report::Members(client.members().await?),
        Action::Owner { pool, value } => Report::Owner(client.owner(&pool, &value).await?),
        Action::Watch { .. } => bail!("`watch` streams; it is not a one-shot command"),
    })
}

/// Adds the flag that overrides a "pool not empty" refusal.
fn force_hint(not_empty: bool, e: anyhow::Error) -> anyhow::Error {
    if not_empty {
        anyhow::anyhow!("{e:#} (--force)")
    } else {
        e
    }
}
