//! Commands in two steps: [`prepare`] checks everything that can be checked
//! without the store (so bad input is refused before anything is opened or
//! created), then [`execute`] runs the validated [`Action`] on the engine.

mod claim;
mod pool;

use std::collections::BTreeMap;

use allot::{AllocRequest, Allot, PoolSpec, Target};
use anyhow::Result;

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
    },
    /// `pool list`.
    ListPools,
    /// `pool show`.
    ShowPool { name: String },
    /// `pool delete`.
    DeletePool { name: String, force: bool },
    /// `alloc`.
    Alloc { pool: String, req: AllocRequest },
    /// `release`.
    Release { pool: String, target: Target },
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
        Command::Pool(PoolCommand::List) => Action::ListPools,
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
        // Runs on its own (crate::serve), never as a one-shot action.
        Command::Serve(_) => anyhow::bail!("`serve` is not a one-shot command"),
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
        Action::CreatePool { name, spec, labels } => {
            Report::PoolCreated(allot.create_pool(&name, spec, labels).await?)
        }
        Action::ListPools => Report::Pools(allot.list_pools().await?),
        Action::ShowPool { name } => Report::Pool(allot.pool(&name).await?),
        Action::DeletePool { name, force } => {
            allot.delete_pool(&name, force).await?;
            Report::Deleted(name)
        }
        Action::Alloc { pool, req } => {
            let claims = allot.allocate(&pool, req).await?;
            Report::Allocated { pool, claims }
        }
        Action::Release { pool, target } => Report::Released(allot.release(&pool, target).await?),
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
    })
}
