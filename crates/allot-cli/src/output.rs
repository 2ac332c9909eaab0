//! Rendering results: short tables and lines for people, or exactly one JSON
//! document for scripts.

use std::io::Write;

use allot::{
    Change, Claim, ClaimPage, Event, EventClaim, MemberInfo, OwnerInfo, PoolInfo, ResyncReport,
};
use anyhow::{Context, Result};
use serde::Serialize;

use crate::cli::Format;

/// The result of a successful command.
#[derive(Debug)]
pub enum Report {
    /// The new pool.
    PoolCreated(PoolInfo),
    /// Every pool.
    Pools(Vec<PoolInfo>),
    /// One pool.
    Pool(PoolInfo),
    /// The name of the deleted pool.
    Deleted(String),
    /// What `alloc` claimed, in order.
    Allocated { pool: String, claims: Vec<Claim> },
    /// The released claim.
    Released(Claim),
    /// The claim found.
    Lookup(Claim),
    /// One page of claims.
    Claims { pool: String, page: ClaimPage },
    /// How many claims a new pass marked.
    ResyncBegun(ResyncReport),
    /// What a closed pass released.
    ResyncEnded(ResyncReport),
    /// The live members.
    Members(Vec<MemberInfo>),
    /// The owner of a value's block.
    Owner(OwnerInfo),
}

/// JSON shape of `alloc`: the values alone for simple scripts, the full
/// claims for the rest.
#[derive(Serialize)]
struct AllocJson<'a> {
    pool: &'a str,
    values: Vec<&'a str>,
    claims: &'a [Claim],
}

#[derive(Serialize)]
struct DeletedJson<'a> {
    deleted: &'a str,
}

impl Report {
    /// Writes the report to `w` in `format`.
    pub fn write(&self, format: Format, w: &mut impl Write) -> Result<()> {
        match format {
            Format::Json => self.write_json(w),
            Format::Human => self.write_human(w).map_err(Into::into),
        }
        .context("writing output")
    }

    fn write_json(&self, w: &mut impl Write) -> Result<()> {
        match self {
            Report::PoolCreated(info) | Report::Pool(info) => json(w, info),
            Report::Pools(list) => json(w, list),
            Report::Deleted(name) => json(w, &DeletedJson { deleted: name }),
            Report::Allocated { pool, claims } => {
                let values = claims.iter().map(|c| c.value.as_str()).collect();
                json(
                    w,
                    &AllocJson {
                        pool,
                        values,
                        claims,
                    },
                )
            }
            Report::Released(c) | Report::Lookup(c) => json(w, c),
            Report::Claims { page, .. } => json(w, page),
            Report::ResyncBegun(r) | Report::ResyncEnded(r) => json(w, r),
            Report::Members(list) => json(w, list),
            Report::Owner(o) => json(w, o),
        }
    }

    fn write_human(&self, w: &mut impl Write) -> std::io::Result<()> {
        match self {
            Report::PoolCreated(info) => writeln!(
                w,
                "created pool {}: {} ({} values)",
                info.record.name, info.description, info.stats.size
            ),
            Report::Pools(list) => pools_table(w, list),
            Report::Pool(info) => pool_details(w, info),
            Report::Deleted(name) => writeln!(w, "deleted pool {name}"),
            Report::Allocated { claims, .. } => {
                claims.iter().try_for_each(|c| writeln!(w, "{}", c.value))
            }
            Report::Released(c) => writeln!(w, "released {}{}", c.value, key_suffix(c)),
            Report::Lookup(c) => claim_details(w, c),
            Report::Claims { pool, page } => claims_table(w, pool, page),
            Report::ResyncBegun(r) => resync_begun(w, r),
            Report::ResyncEnded(r) => resync_ended(w, r),
            Report::Members(list) => members_table(w, list),
            Report::Owner(o) => owner_details(w, o),
        }
    }
}

fn json<T: Serialize + ?Sized>(w: &mut impl Write, value: &T) -> Result<()> {
    // serde_json writes u128 counters (pool sizes up to 2^64) as plain
    // integers when serializing straight to a writer.
    // Converted to io::Error so a closed pipe stays recognizable upstream.
    serde_json::to_writer_pretty(&mut *w, value).map_err(std::io::Error::from)?;
    writeln!(w)?;
    Ok(())
}

fn key_suffix(c: &Claim) -> String {
    c.key
        .as_ref()
        .map_or(String::new(), |k| format!(" (key {k})"))
}

fn or_dash(s: Option<&str>) -> &str {
    s.unwrap_or("-")
}

fn percent(fraction: f64) -> String {
    format!("{:.1}%", fraction * 100.0)
}

fn meta_text(c: &Claim) -> String {
    c.meta
        .as_ref()
        .map_or_else(|| "-".to_string(), |m| m.to_string())
}

/// Left-aligned columns separated by two spaces; the last column is not
/// padded so lines carry no trailing blanks.
fn table(w: &mut impl Write, header: &[&str], rows: &[Vec<String>]) -> std::io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let last = row.len().saturating_sub(1);
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == last {
                    c.clone()
                } else {
                    format!("{c:<0$}", widths[i])
                }
            })
            .collect();
        writeln!(w, "{}", cells.join("  "))?;
    }
    Ok(())
}

fn pools_table(w: &mut impl Write, list: &[PoolInfo]) -> std::io::Result<()> {
    if list.is_empty() {
        return writeln!(w, "no pools");
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|p| {
            vec![
                p.record.name.clone(),
                p.description.clone(),
                p.stats.size.to_string(),
                p.stats.allocated.to_string(),
                p.stats.free.to_string(),
                percent(p.utilization),
            ]
        })
        .collect();
    table(
        w,
        &["NAME", "KIND", "SIZE", "ALLOCATED", "FREE", "UTIL"],
        &rows,
    )
}

fn pool_details(w: &mut impl Write, p: &PoolInfo) -> std::io::Result<()> {
    let spec = &p.record.spec;
    let labels: Vec<String> = p
        .record
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let lines = [
        ("name", p.record.name.clone()),
        ("kind", p.description.clone()),
        ("size", p.stats.size.to_string()),
        ("reserved", reserved_text(p)),
        ("allocated", p.stats.allocated.to_string()),
        ("quarantined", p.stats.quarantined.to_string()),
        ("free", p.stats.free.to_string()),
        ("utilization", percent(p.utilization)),
        ("strategy", spec.strategy.to_string()),
        ("block size", spec.block_size.to_string()),
        (
            "quarantine",
            if spec.quarantine_secs == 0 {
                "none".into()
            } else {
                format!("{}s", spec.quarantine_secs)
            },
        ),
        (
            "labels",
            if labels.is_empty() {
                "-".into()
            } else {
                labels.join(", ")
            },
        ),
    ];
    lines
        .iter()
        .try_for_each(|(k, v)| writeln!(w, "{:<12} {v}", format!("{k}:")))?;
    if let Some(d) = spec.member_blocks {
        writeln!(
            w,
            "{:<12} {d} (members allocate from blocks they own)",
            "members:"
        )?;
    }
    if let Some(parent) = &p.record.parent {
        writeln!(
            w,
            "{:<12} {} in pool {}",
            "parent:", parent.value, parent.pool
        )?;
    }
    Ok(())
}

fn reserved_text(p: &PoolInfo) -> String {
    let reserved = &p.record.spec.reserved;
    if reserved.is_empty() {
        p.stats.reserved.to_string()
    } else {
        format!("{} ({})", p.stats.reserved, reserved.join(", "))
    }
}

fn claim_details(w: &mut impl Write, c: &Claim) -> std::io::Result<()> {
    writeln!(w, "value:  {}", c.value)?;
    writeln!(w, "key:    {}", or_dash(c.key.as_deref()))?;
    writeln!(w, "owner:  {}", or_dash(c.owner.as_deref()))?;
    writeln!(w, "meta:   {}", meta_text(c))?;
    writeln!(w, "stale:  {}", c.stale)
}

fn claim_row(c: &Claim) -> Vec<String> {
    vec![
        c.value.clone(),
        or_dash(c.key.as_deref()).to_string(),
        or_dash(c.owner.as_deref()).to_string(),
        if c.stale { "yes".into() } else { "no".into() },
        meta_text(c),
    ]
}

fn claims_table(w: &mut impl Write, pool: &str, page: &ClaimPage) -> std::io::Result<()> {
    if page.claims.is_empty() {
        writeln!(w, "no claims")?;
    } else {
        let rows: Vec<Vec<String>> = page.claims.iter().map(claim_row).collect();
        table(w, &["VALUE", "KEY", "OWNER", "STALE", "META"], &rows)?;
    }
    if let Some(next) = &page.next {
        writeln!(w, "more: allot claims {pool} --after {next}")?;
    }
    Ok(())
}

fn owner_flag(owner: Option<&str>) -> String {
    owner.map_or(String::new(), |o| format!(" --owner {o}"))
}

fn resync_begun(w: &mut impl Write, r: &ResyncReport) -> std::io::Result<()> {
    writeln!(
        w,
        "resync begun on pool {}: {} keyed claim(s) marked stale",
        r.pool, r.count
    )?;
    writeln!(
        w,
        "re-claim the live keys, then run: allot resync end {}{}",
        r.pool,
        owner_flag(r.owner.as_deref())
    )
}

fn resync_ended(w: &mut impl Write, r: &ResyncReport) -> std::io::Result<()> {
    writeln!(
        w,
        "resync ended on pool {}: released {} stale claim(s)",
        r.pool, r.count
    )?;
    r.released
        .iter()
        .try_for_each(|c| writeln!(w, "  {}{}", c.value, key_suffix(c)))
}

/// Writes one change of `allot watch` as one line: `REVISION POOL: what`
/// for people, or the event as one compact JSON object.
pub fn write_event(format: Format, event: &Event, w: &mut impl Write) -> Result<()> {
    match format {
        Format::Json => {
            serde_json::to_writer(&mut *w, event).map_err(std::io::Error::from)?;
            writeln!(w)
        }
        Format::Human => writeln!(w, "{} {}", event.revision, change_text(&event.change)),
    }
    .context("writing output")
}

fn change_text(c: &Change) -> String {
    let for_owner = |o: &Option<String>| {
        o.as_ref()
            .map_or(String::new(), |o| format!(" for owner {o}"))
    };
    match c {
        Change::PoolCreated { pool, description } => format!("{pool}: created ({description})"),
        Change::PoolDeleted { pool } => format!("{pool}: deleted"),
        Change::Claims {
            pool,
            allocated,
            released,
        } => {
            let mut parts = Vec::new();
            if !allocated.is_empty() {
                parts.push(format!("allocated {}", event_claims(allocated)));
            }
            if !released.is_empty() {
                parts.push(format!("released {}", event_claims(released)));
            }
            format!("{pool}: {}", parts.join("; "))
        }
        Change::ResyncBegun { pool, owner } => format!("{pool}: resync begun{}", for_owner(owner)),
        Change::ResyncEnded {
            pool,
            owner,
            released,
        } => format!(
            "{pool}: resync ended{}, released {released}",
            for_owner(owner)
        ),
        Change::MemberUp {
            member,
            incarnation,
            address,
        } => format!(
            "member {member}: up (incarnation {incarnation}{})",
            address
                .as_ref()
                .map_or(String::new(), |a| format!(", address {a}"))
        ),
        Change::MemberDown {
            member,
            incarnation,
        } => format!(
            "member {member}: down{}",
            incarnation.map_or(String::new(), |i| format!(" (incarnation {i})"))
        ),
    }
}

/// `1, 2 (key k, owner o), 3`.
fn event_claims(claims: &[EventClaim]) -> String {
    claims
        .iter()
        .map(|c| {
            let extra: Vec<String> = [("key", &c.key), ("owner", &c.owner)]
                .into_iter()
                .filter_map(|(what, v)| v.as_ref().map(|v| format!("{what} {v}")))
                .collect();
            if extra.is_empty() {
                c.value.clone()
            } else {
                format!("{} ({})", c.value, extra.join(", "))
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn members_table(w: &mut impl Write, list: &[MemberInfo]) -> std::io::Result<()> {
    if list.is_empty() {
        return writeln!(w, "no members");
    }
    let now_ms = allot::Clock::now_ms(&allot::SystemClock);
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|m| {
            let r = &m.record;
            vec![
                r.name.clone(),
                r.incarnation.to_string(),
                or_dash(r.address.as_deref()).to_string(),
                or_dash(r.zone.as_deref()).to_string(),
                age(now_ms.saturating_sub(r.joined_ms)),
                m.blocks.to_string(),
            ]
        })
        .collect();
    table(
        w,
        &["NAME", "INCARNATION", "ADDRESS", "ZONE", "AGE", "BLOCKS"],
        &rows,
    )
}

/// `1h02m`, `3m05s`, `12s`.
fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn owner_details(w: &mut impl Write, o: &OwnerInfo) -> std::io::Result<()> {
    writeln!(w, "member:      {}", o.member)?;
    writeln!(w, "incarnation: {}", o.incarnation)?;
    writeln!(w, "address:     {}", or_dash(o.address.as_deref()))?;
    writeln!(w, "block:       {} (epoch {})", o.block, o.epoch)?;
    writeln!(
        w,
        "state:       {}",
        if o.live {
            "live"
        } else {
            "orphan (the owner's lease expired; a live member takes it over)"
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(change: Change) -> String {
        let mut out = Vec::new();
        let event = Event {
            revision: 7,
            change,
        };
        write_event(Format::Human, &event, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn claim(value: &str, key: Option<&str>, owner: Option<&str>) -> EventClaim {
        EventClaim {
            value: value.into(),
            key: key.map(Into::into),
            owner: owner.map(Into::into),
        }
    }

    #[test]
    fn events_are_one_line_each() {
        let p = || "ids".to_string();
        assert_eq!(
            line(Change::PoolCreated {
                pool: p(),
                description: "integers 1-9".into()
            }),
            "7 ids: created (integers 1-9)\n"
        );
        assert_eq!(
            line(Change::Claims {
                pool: p(),
                allocated: vec![claim("1", None, None), claim("2", Some("k"), Some("o"))],
                released: vec![claim("3", None, Some("o"))],
            }),
            "7 ids: allocated 1, 2 (key k, owner o); released 3 (owner o)\n"
        );
        assert_eq!(
            line(Change::ResyncEnded {
                pool: p(),
                owner: Some("o".into()),
                released: 2
            }),
            "7 ids: resync ended for owner o, released 2\n"
        );
        assert_eq!(
            line(Change::ResyncBegun {
                pool: p(),
                owner: None
            }),
            "7 ids: resync begun\n"
        );
        assert_eq!(line(Change::PoolDeleted { pool: p() }), "7 ids: deleted\n");
        let mut out = Vec::new();
        let event = Event {
            revision: 7,
            change: Change::PoolDeleted { pool: p() },
        };
        write_event(Format::Json, &event, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"revision\":7,\"type\":\"pool_deleted\",\"pool\":\"ids\"}\n"
        );
    }
}
