//! The common hand-written alternative to allot on PostgreSQL, measured on
//! the same server in the same run: a table with one row per value, claimed
//! with `SELECT ... FOR UPDATE SKIP LOCKED`, one autocommitted statement
//! (one transaction, one WAL flush) per claim, one connection per client.
//!
//! ```sql
//! CREATE TABLE skip_ids (value bigint PRIMARY KEY,
//!                        taken boolean NOT NULL DEFAULT false,
//!                        key text UNIQUE);
//! CREATE INDEX skip_ids_free ON skip_ids (value) WHERE NOT taken;
//! -- keyed claim
//! UPDATE skip_ids SET taken = true, key = $1
//!  WHERE value = (SELECT value FROM skip_ids WHERE NOT taken
//!                 ORDER BY value LIMIT 1 FOR UPDATE SKIP LOCKED)
//!  RETURNING value;
//! -- claim(n)
//! UPDATE skip_ids SET taken = true
//!  WHERE value IN (SELECT value FROM skip_ids WHERE NOT taken
//!                  ORDER BY value LIMIT $1 FOR UPDATE SKIP LOCKED)
//!  RETURNING value;
//! ```
//!
//! This is the better variant of the pattern: the partial index finds a free
//! value without scanning the claimed ones, and the unique index on `key`
//! gives keyed claims the same one-value-per-key guarantee as allot's. A
//! statement can come back short when a row it picked was claimed and
//! committed by another connection after its snapshot (PostgreSQL re-checks
//! `NOT taken` on the locked row and drops it): the client then claims the
//! rest with another statement, counted as a retry.

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio_postgres::{Client, NoTls};

/// Claims one value per call (`count` 0: keyed) or `count` values.
pub struct SkipLocked {
    client: Arc<Client>,
    keyed: tokio_postgres::Statement,
    many: tokio_postgres::Statement,
}

/// Opens one connection (its driver runs on the current runtime).
pub async fn connect(url: &str) -> Result<Client, String> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|e| format!("connecting to {url}: {e}"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("  skip-locked connection ended: {e}");
        }
    });
    Ok(client)
}

/// (Re)creates the table with `values` free values (1..=values).
pub async fn setup(url: &str, values: u64) -> Result<(), String> {
    let client = connect(url).await?;
    let values = i64::try_from(values).map_err(|_| "too many values".to_string())?;
    client
        .batch_execute(
            "DROP TABLE IF EXISTS skip_ids;
             CREATE TABLE skip_ids (value bigint PRIMARY KEY,
                                    taken boolean NOT NULL DEFAULT false,
                                    key text UNIQUE);",
        )
        .await
        .map_err(|e| format!("creating skip_ids: {}", pg_error(&e)))?;
    client
        .execute(
            "INSERT INTO skip_ids (value) SELECT generate_series(1, $1::bigint)",
            &[&values],
        )
        .await
        .map_err(|e| format!("filling skip_ids: {}", pg_error(&e)))?;
    // One by one: VACUUM refuses to run inside the implicit transaction of
    // a multi-statement query.
    for sql in [
        "CREATE INDEX skip_ids_free ON skip_ids (value) WHERE NOT taken",
        "VACUUM ANALYZE skip_ids",
        "CHECKPOINT",
    ] {
        client
            .batch_execute(sql)
            .await
            .map_err(|e| format!("{sql}: {}", pg_error(&e)))?;
    }
    Ok(())
}

/// The server's message, which `Display` of a database error leaves out.
pub fn pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{e}: {}", db.message()),
        None => e.to_string(),
    }
}

/// How many values the table has handed out.
pub async fn taken(url: &str) -> Result<u64, String> {
    let client = connect(url).await?;
    let row = client
        .query_one("SELECT count(*) FROM skip_ids WHERE taken", &[])
        .await
        .map_err(|e| format!("counting: {e}"))?;
    Ok(row.get::<_, i64>(0) as u64)
}

impl SkipLocked {
    pub async fn new(url: &str) -> Result<SkipLocked, String> {
        let client = connect(url).await?;
        let keyed = client
            .prepare(
                "UPDATE skip_ids SET taken = true, key = $1 \
                 WHERE value = (SELECT value FROM skip_ids WHERE NOT taken \
                                ORDER BY value LIMIT 1 FOR UPDATE SKIP LOCKED) \
                 RETURNING value",
            )
            .await
            .map_err(|e| format!("preparing: {}", pg_error(&e)))?;
        let many = client
            .prepare(
                "UPDATE skip_ids SET taken = true \
                 WHERE value IN (SELECT value FROM skip_ids WHERE NOT taken \
                                 ORDER BY value LIMIT $1 FOR UPDATE SKIP LOCKED) \
                 RETURNING value",
            )
            .await
            .map_err(|e| format!("preparing: {}", pg_error(&e)))?;
        Ok(SkipLocked {
            client: Arc::new(client),
            keyed,
            many,
        })
    }

    /// One keyed claim, or `count` values; returns (values, statements).
    pub fn claim(&self, key: Option<String>, count: u64) -> BoxFuture<'static, ClaimResult> {
        let client = self.client.clone();
        let (keyed, many) = (self.keyed.clone(), self.many.clone());
        Box::pin(async move {
            let mut statements = 0u64;
            match key {
                Some(key) => loop {
                    statements += 1;
                    let rows = client
                        .query(&keyed, &[&key])
                        .await
                        .map_err(|e| format!("keyed claim: {}", pg_error(&e)))?;
                    if rows.len() == 1 {
                        return Ok((1, statements));
                    }
                    if statements > 1000 {
                        return Err(EXHAUSTED.into());
                    }
                },
                None => {
                    let mut got = 0u64;
                    while got < count {
                        statements += 1;
                        let want = (count - got) as i64;
                        let rows = client
                            .query(&many, &[&want])
                            .await
                            .map_err(|e| format!("claim({count}): {}", pg_error(&e)))?;
                        got += rows.len() as u64;
                        if statements > 1000 {
                            return Err(EXHAUSTED.into());
                        }
                    }
                    Ok((got, statements))
                }
            }
        })
    }
}

const EXHAUSTED: &str =
    "values missing after 1000 statements: table exhausted? (raise ALLOT_BENCH_SKIP_VALUES)";

/// Values claimed and statements run, or an error.
pub type ClaimResult = Result<(u64, u64), String>;
