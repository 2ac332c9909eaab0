//! `allot alloc`: turning flags into a validated allocation request.

use allot::AllocRequest;
use anyhow::{anyhow, Result};

use super::Action;
use crate::cli::AllocArgs;

/// Builds and checks the request (metadata JSON, count/key/value
/// combinations, lengths) before the store is opened.
pub(crate) fn prepare_alloc(args: AllocArgs) -> Result<Action> {
    allot::validate_pool_name(&args.pool)?;
    // Said in terms of the flags before the engine says it in general terms.
    if args.count > 1 && args.key.is_some() {
        anyhow::bail!(
            "--key claims exactly one value; do not combine it with --count {}",
            args.count
        );
    }
    if args.count > 1 && args.value.is_some() {
        anyhow::bail!(
            "--value names one value; do not combine it with --count {}",
            args.count
        );
    }
    let meta = args.meta.as_deref().map(parse_meta).transpose()?;
    let req = AllocRequest {
        count: args.count,
        value: args.value,
        key: args.key,
        prefix_len: args.prefix_len,
        owner: args.owner,
        meta,
        request_id: args.request_id.map(checked_request_id).transpose()?,
    };
    req.validate()?;
    Ok(Action::Alloc {
        pool: args.pool,
        req,
    })
}

/// Checks `--request-id` as the engine will (non-empty, at most 256 bytes,
/// no control characters), naming the flag.
pub(crate) fn checked_request_id(id: String) -> Result<String> {
    if id.is_empty() {
        anyhow::bail!("invalid --request-id: must not be empty");
    }
    if id.len() > allot::MAX_OWNER_LEN {
        anyhow::bail!(
            "invalid --request-id: {} bytes long; the limit is {}",
            id.len(),
            allot::MAX_OWNER_LEN
        );
    }
    if id.chars().any(char::is_control) {
        anyhow::bail!("invalid --request-id: must not contain control characters");
    }
    Ok(id)
}

/// Parses `--meta`; serde_json's message already says where it broke.
pub(crate) fn parse_meta(text: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| anyhow!("invalid --meta: not valid JSON ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta() {
        assert_eq!(parse_meta(r#"{"a":1}"#).unwrap()["a"], 1);
        let err = parse_meta("{a:1").unwrap_err().to_string();
        assert!(err.starts_with("invalid --meta"), "{err}");
    }
}
