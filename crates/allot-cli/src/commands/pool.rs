//! `allot pool create`: turning flags into a validated pool spec.

use std::collections::BTreeMap;

use allot::{parse_cidr, ParentRef, PoolKind, PoolSpec};
use anyhow::{anyhow, bail, Context, Result};

use super::Action;
use crate::cli::{CreateArgs, KindArgs};

/// Validates everything `pool create` was given, so a bad flag is reported
/// before the data dir is created or touched.
pub(crate) fn prepare_create(args: CreateArgs) -> Result<Action> {
    allot::validate_pool_name(&args.name)?;
    let kind = pool_kind(&args)?;
    let spec = PoolSpec {
        kind,
        reserved: args.reserve.iter().map(|r| r.trim().to_string()).collect(),
        strategy: args.strategy.into(),
        quarantine_secs: args.quarantine,
        block_size: args.block_size,
        member_blocks: args.member_blocks.map(Into::into),
    };
    // The same check the engine runs; done here too so nothing is created
    // for a spec that can never be accepted.
    spec.validate()?;
    let labels = parse_labels(&args.labels)?;
    // clap makes the two parent flags come together.
    let parent = match (args.parent_pool, args.parent_value) {
        (Some(pool), Some(value)) => {
            allot::validate_pool_name(&pool)?;
            if pool == args.name {
                bail!("a pool cannot be nested in itself");
            }
            Some(ParentRef { pool, value })
        }
        _ => None,
    };
    Ok(Action::CreatePool {
        name: args.name,
        spec,
        labels,
        parent,
    })
}

fn pool_kind(args: &CreateArgs) -> Result<PoolKind> {
    // Checked here rather than with clap's `requires`, which clap does not
    // enforce against a member of a group when another member is present.
    if args.kind.cidr.is_none() && (args.prefix_len.is_some() || args.all_addresses) {
        bail!("--prefix-len and --all-addresses only apply to --cidr pools");
    }
    match &args.kind {
        KindArgs { range: Some(r), .. } => {
            let (lo, hi) = parse_range(r)?;
            Ok(PoolKind::Range { lo, hi })
        }
        KindArgs { cidr: Some(c), .. } => cidr_kind(c, args),
        KindArgs {
            set: Some(values), ..
        } => Ok(PoolKind::Set {
            values: values.iter().map(|v| v.trim().to_string()).collect(),
        }),
        // clap's required group guarantees one of the three.
        _ => bail!("give one of --range, --cidr or --values"),
    }
}

fn cidr_kind(text: &str, args: &CreateArgs) -> Result<PoolKind> {
    let cidr = parse_cidr(text).map_err(|e| anyhow!("invalid --cidr: {e}"))?;
    let Some(prefix_len) = args.prefix_len else {
        return Ok(PoolKind::Addresses {
            cidr,
            all_addresses: args.all_addresses,
        });
    };
    let max_prefix_len = args.max_prefix_len.unwrap_or(match cidr.max_prefix_len() {
        32 => 32,
        // IPv6 goes 16 bits finer than the default: splitting a /48 all the
        // way down to /128 would exceed the 2^64 units a pool may hold.
        bits => prefix_len.saturating_add(16).min(bits),
    });
    Ok(PoolKind::Prefixes {
        cidr,
        prefix_len,
        max_prefix_len,
    })
}

/// Parses `LO-HI` (inclusive, LO <= HI).
pub(crate) fn parse_range(text: &str) -> Result<(u64, u64)> {
    let bad = || anyhow!("invalid --range '{text}': expected LO-HI with integers, e.g. 100-4094");
    let (lo, hi) = text.trim().split_once('-').ok_or_else(bad)?;
    let lo: u64 = lo.trim().parse().map_err(|_| bad())?;
    let hi: u64 = hi.trim().parse().map_err(|_| bad())?;
    if lo > hi {
        bail!("invalid --range '{text}': inverted, {lo} is greater than {hi}");
    }
    Ok((lo, hi))
}

/// Parses repeated `KEY=VALUE` labels; a key given twice is an error rather
/// than a silent overwrite.
pub(crate) fn parse_labels(items: &[String]) -> Result<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    for item in items {
        let (k, v) = item
            .split_once('=')
            .filter(|(k, _)| !k.trim().is_empty())
            .with_context(|| format!("invalid --label '{item}': expected KEY=VALUE"))?;
        if labels.insert(k.trim().to_string(), v.to_string()).is_some() {
            bail!(
                "invalid --label '{item}': label '{}' is given twice",
                k.trim()
            );
        }
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("100-199").unwrap(), (100, 199));
        assert_eq!(parse_range(" 5 - 5 ").unwrap(), (5, 5));
        assert!(parse_range("200-100")
            .unwrap_err()
            .to_string()
            .contains("inverted"));
        assert!(parse_range("100").is_err());
        assert!(parse_range("a-b").is_err());
        assert!(parse_range("-1-5").is_err());
    }

    #[test]
    fn labels() {
        let l = parse_labels(&["team=net".into(), "env=".into()]).unwrap();
        assert_eq!(l["team"], "net");
        assert_eq!(l["env"], "");
        assert!(parse_labels(&["novalue".into()]).is_err());
        assert!(parse_labels(&["=x".into()]).is_err());
        assert!(parse_labels(&["a=1".into(), "a=2".into()]).is_err());
    }
}
