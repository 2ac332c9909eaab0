//! Settings: the TOML configuration file, how flags, environment, file and
//! defaults combine into a [`Config`], and the pools the file declares,
//! applied idempotently at start.
//!
//! A configuration file looks like this (every key optional):
//!
//! ```toml
//! listen = "127.0.0.1:7070"
//! data_dir = "/var/lib/allot"          # relative paths: to the file's directory
//! store = "auto"                       # or "log", "redb", "postgres://allot@db/allot", "etcd://h1:2379,h2:2379"
//! token_file = "/etc/allot/token"
//! max_body_bytes = 1048576
//!
//! [[pools]]
//! name = "vlans"
//! kind = { type = "range", lo = 100, hi = 4094 }
//! reserved = ["1000-1099"]
//! strategy = "next"
//! labels = { team = "net" }
//!
//! [[pools]]
//! name = "teid"
//! kind = { type = "range", lo = 1, hi = 4294967295 }
//! member_blocks = "block"              # members allocate from blocks they own
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use allot::{Allot, Durability, PoolKind, PoolSpec, Strategy};
use allot_backends::StoreUrl;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{one_line, ServerError};
use crate::Config;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";
/// Default data dir (relative to the working directory).
pub const DEFAULT_DATA_DIR: &str = "./allot-data";
/// Default largest request body.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// Default time in-flight requests get to finish after a shutdown signal.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// A pool definition: the body of `POST /v1/pools`, and one `[[pools]]`
/// table of the configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolDecl {
    /// Pool name: 1-128 of `A-Z a-z 0-9 . _ -`.
    #[schema(example = "vlans")]
    pub name: String,
    /// What the pool hands out, tagged by `type`.
    #[schema(value_type = crate::openapi::PoolKindDoc)]
    pub kind: serde_json::Value,
    /// Values, ranges (`A-B`) or prefixes never handed out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reserved: Vec<String>,
    /// How the next free value is chosen (default `lowest`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<crate::openapi::StrategyDoc>)]
    pub strategy: Option<Strategy>,
    /// Seconds a released value stays unavailable (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine_secs: Option<u64>,
    /// Values per storage block, a power of two (default 65536).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u64>,
    /// Hand values out from blocks members own, with this durability
    /// (`sync`: every allocation stored; `block`: only ownership).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<crate::openapi::DurabilityDoc>)]
    pub member_blocks: Option<Durability>,
    /// Descriptive labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl PoolDecl {
    /// Checks everything that can be checked without the store and returns
    /// the spec and labels to create the pool with. The error is a message
    /// for an `invalid_argument` answer.
    pub fn to_spec(&self) -> Result<(PoolSpec, BTreeMap<String, String>), String> {
        allot::validate_pool_name(&self.name).map_err(|e| e.to_string())?;
        let kind = parse_kind(&self.kind)?;
        let mut spec = PoolSpec::new(kind);
        spec.reserved = self.reserved.iter().map(|r| r.trim().to_string()).collect();
        if let Some(s) = self.strategy {
            spec.strategy = s;
        }
        if let Some(q) = self.quarantine_secs {
            spec.quarantine_secs = q;
        }
        if let Some(b) = self.block_size {
            spec.block_size = b;
        }
        spec.member_blocks = self.member_blocks;
        spec.validate().map_err(|e| one_line(&e.to_string()))?;
        // The engine's own checks, made here too so that a set of config
        // pools is refused whole before any of them is created.
        for (k, v) in &self.labels {
            check_label("label name", k, allot::MAX_NAME_LEN)?;
            check_label("label value", v, allot::MAX_OWNER_LEN)?;
        }
        Ok((spec, self.labels.clone()))
    }
}

fn check_label(what: &str, s: &str, max: usize) -> Result<(), String> {
    if s.is_empty() {
        return Err(format!("{what} must not be empty"));
    }
    if s.len() > max {
        return Err(format!("{what} '{s}' is longer than {max} bytes"));
    }
    if s.chars().any(char::is_control) {
        return Err(format!("{what} must not contain control characters"));
    }
    Ok(())
}

/// Parses a pool kind as `allot_core` serializes it, with messages that
/// name the field at fault, and refuses fields the kind does not have.
pub(crate) fn parse_kind(v: &serde_json::Value) -> Result<PoolKind, String> {
    let obj = v
        .as_object()
        .ok_or("kind must be an object such as {\"type\": \"range\", \"lo\": 1, \"hi\": 100}")?;
    let ty = obj
        .get("type")
        .and_then(|t| t.as_str())
        .ok_or("kind needs a \"type\": one of \"range\", \"addresses\", \"prefixes\", \"set\"")?;
    if matches!(ty, "addresses" | "prefixes") {
        // The strict parser: a typo or host bits are refused with a hint
        // rather than reported as a bare deserialization error.
        if let Some(c) = obj.get("cidr").and_then(|c| c.as_str()) {
            allot::parse_cidr(c).map_err(|e| format!("invalid kind.cidr: {e}"))?;
        }
    }
    let kind: PoolKind =
        serde_json::from_value(v.clone()).map_err(|e| format!("invalid kind: {e}"))?;
    // Unknown fields: whatever the parsed kind does not write back.
    let known = serde_json::to_value(&kind).map_err(|e| format!("invalid kind: {e}"))?;
    if let Some(known) = known.as_object() {
        if let Some(extra) = obj.keys().find(|k| !known.contains_key(*k)) {
            return Err(format!(
                "invalid kind: unknown field `{extra}` for a {ty} pool"
            ));
        }
    }
    Ok(kind)
}

/// The configuration file (TOML). Every key is optional.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Address to listen on.
    pub listen: Option<String>,
    /// Data dir (relative to the file's directory).
    pub data_dir: Option<PathBuf>,
    /// Store URL (see [`StoreUrl`]).
    pub store: Option<String>,
    /// File holding the bearer token (relative to the file's directory).
    pub token_file: Option<PathBuf>,
    /// Largest request body accepted.
    pub max_body_bytes: Option<usize>,
    /// Pools created at start if missing.
    #[serde(default)]
    pub pools: Vec<PoolDecl>,
}

impl FileConfig {
    /// Reads and parses a configuration file; relative paths in it are
    /// resolved against the file's directory.
    pub fn load(path: &Path) -> Result<FileConfig, ServerError> {
        let text = std::fs::read_to_string(path).map_err(|e| ServerError::ConfigFile {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new(""));
        Self::parse(&text, base).map_err(|message| ServerError::ConfigFile {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses configuration text; relative paths are joined to `base`.
    pub fn parse(text: &str, base: &Path) -> Result<FileConfig, String> {
        let mut cfg: FileConfig = toml::from_str(text).map_err(|e| one_line(&e.to_string()))?;
        for p in [&mut cfg.data_dir, &mut cfg.token_file]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(cfg)
    }
}

/// Settings given on the command line or in the environment (`None`: not
/// given). They override the configuration file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen` / `ALLOT_LISTEN`.
    pub listen: Option<String>,
    /// `--data-dir` / `ALLOT_DATA_DIR`.
    pub data_dir: Option<PathBuf>,
    /// `--store` / `ALLOT_STORE`.
    pub store: Option<String>,
    /// `--token-file` (beats `token`).
    pub token_file: Option<PathBuf>,
    /// `ALLOT_TOKEN`: the token itself.
    pub token: Option<String>,
    /// `--max-body-bytes` / `ALLOT_MAX_BODY_BYTES`.
    pub max_body_bytes: Option<usize>,
}

impl Config {
    /// Combines settings: `given` (flags, then environment) over `file` over
    /// defaults. The token comes from `--token-file`, else `ALLOT_TOKEN`,
    /// else the file's `token_file`.
    pub fn resolve(given: Overrides, file: Option<FileConfig>) -> Result<Config, ServerError> {
        let file = file.unwrap_or_default();
        let token = match (given.token_file, given.token, file.token_file) {
            (Some(path), _, _) => Some(read_token(&path)?),
            (None, Some(t), _) => Some(checked_token(t, "ALLOT_TOKEN")?),
            (None, None, Some(path)) => Some(read_token(&path)?),
            (None, None, None) => None,
        };
        let max_body_bytes = given
            .max_body_bytes
            .or(file.max_body_bytes)
            .unwrap_or(DEFAULT_MAX_BODY_BYTES);
        if max_body_bytes == 0 {
            return Err(ServerError::Config(
                "max body bytes must be at least 1".into(),
            ));
        }
        let store = match given.store.or(file.store) {
            Some(url) => url
                .parse::<StoreUrl>()
                .map_err(|e| ServerError::Config(e.to_string()))?,
            None => StoreUrl::default(),
        };
        Ok(Config {
            store,
            listen: given
                .listen
                .or(file.listen)
                .unwrap_or_else(|| DEFAULT_LISTEN.to_string()),
            data_dir: given
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            token,
            max_body_bytes,
            pools: file.pools,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
        })
    }
}

fn read_token(path: &Path) -> Result<String, ServerError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ServerError::Config(format!("cannot read token file {}: {e}", path.display()))
    })?;
    checked_token(text, &format!("token file {}", path.display()))
}

fn checked_token(text: String, from: &str) -> Result<String, ServerError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(ServerError::Config(format!(
            "{from} is empty; unset it to run without authentication"
        )));
    }
    if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ServerError::Config(format!(
            "{from}: the token must be one word without spaces or control characters"
        )));
    }
    Ok(t.to_string())
}

/// Creates the declared pools that are missing. Checks every declaration
/// first: an invalid one, a name declared twice, or an existing pool with a
/// different spec or labels refuses the whole set and changes nothing.
/// Returns the names of the pools created.
pub async fn apply_pools(allot: &Allot, pools: &[PoolDecl]) -> Result<Vec<String>, ServerError> {
    let mut seen = BTreeSet::new();
    let mut to_create = Vec::new();
    for decl in pools {
        if !seen.insert(decl.name.as_str()) {
            return Err(ServerError::InvalidPool {
                pool: decl.name.clone(),
                message: "declared twice".into(),
            });
        }
        let (spec, labels) = decl.to_spec().map_err(|message| ServerError::InvalidPool {
            pool: decl.name.clone(),
            message,
        })?;
        match allot.pool(&decl.name).await {
            Ok(existing) => {
                let diff = difference(
                    &existing.record.spec,
                    &existing.record.labels,
                    &spec,
                    &labels,
                );
                if !diff.is_empty() {
                    return Err(ServerError::PoolConflict {
                        pool: decl.name.clone(),
                        difference: diff,
                    });
                }
            }
            Err(allot::Error::PoolNotFound(_)) => to_create.push((decl.name.clone(), spec, labels)),
            Err(e) => return Err(e.into()),
        }
    }
    let mut created = Vec::new();
    for (name, spec, labels) in to_create {
        allot.create_pool(&name, spec, labels).await?;
        tracing::info!(pool = %name, "created pool declared in the config file");
        created.push(name);
    }
    Ok(created)
}

/// Every field that differs, as `field: existing X, config Y`, joined by
/// `; `. Compares the serialized specs field by field, so fields the
/// engine adds later are compared too.
fn difference(
    have_spec: &PoolSpec,
    have_labels: &BTreeMap<String, String>,
    want_spec: &PoolSpec,
    want_labels: &BTreeMap<String, String>,
) -> String {
    let to_map = |s: &PoolSpec| match serde_json::to_value(s) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    let (have, want) = (to_map(have_spec), to_map(want_spec));
    let mut fields: BTreeSet<&String> = have.keys().collect();
    fields.extend(want.keys());
    let null = serde_json::Value::Null;
    let mut out = Vec::new();
    for f in fields {
        let (h, w) = (have.get(f).unwrap_or(&null), want.get(f).unwrap_or(&null));
        if h != w {
            out.push(format!("{f}: existing {h}, config {w}"));
        }
    }
    if have_labels != want_labels {
        let show = |l: &BTreeMap<String, String>| serde_json::to_string(l).unwrap_or_default();
        out.push(format!(
            "labels: existing {}, config {}",
            show(have_labels),
            show(want_labels)
        ));
    }
    out.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn decl(kind: serde_json::Value) -> PoolDecl {
        PoolDecl {
            name: "p".into(),
            kind,
            reserved: vec![],
            strategy: None,
            quarantine_secs: None,
            block_size: None,
            member_blocks: None,
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn kinds_parse_strictly() {
        assert!(decl(json!({"type": "range", "lo": 1, "hi": 10}))
            .to_spec()
            .is_ok());
        let e = decl(json!({"type": "range", "lo": 10, "hi": 1}))
            .to_spec()
            .unwrap_err();
        assert!(e.contains("inverted"), "{e}");
        let e = decl(json!({"type": "addresses", "cidr": "10.0.0.1/24"}))
            .to_spec()
            .unwrap_err();
        assert!(e.contains("host bits") && e.contains("10.0.0.0/24"), "{e}");
        let e = decl(json!({"type": "addresses", "cidr": "10.0.0.300/24"}))
            .to_spec()
            .unwrap_err();
        assert!(e.contains("is not a CIDR"), "{e}");
        let e = decl(json!({"type": "range", "lo": 1, "hi": 2, "step": 3}))
            .to_spec()
            .unwrap_err();
        assert!(e.contains("unknown field `step`"), "{e}");
        let e = decl(json!({"type": "ranges"})).to_spec().unwrap_err();
        assert!(e.contains("ranges"), "{e}");
        let e = decl(json!("range")).to_spec().unwrap_err();
        assert!(e.contains("object"), "{e}");
    }

    #[test]
    fn file_config_resolves_relative_paths() {
        let cfg = FileConfig::parse(
            "data_dir = \"d\"\ntoken_file = \"/abs/t\"\n[[pools]]\nname = \"v\"\nkind = { type = \"range\", lo = 1, hi = 5 }\nstrategy = \"next\"\n",
            Path::new("/etc/allot"),
        )
        .unwrap();
        assert_eq!(cfg.data_dir, Some(PathBuf::from("/etc/allot/d")));
        assert_eq!(cfg.token_file, Some(PathBuf::from("/abs/t")));
        let (spec, _) = cfg.pools[0].to_spec().unwrap();
        assert_eq!(spec.strategy, Strategy::Next);
        assert!(FileConfig::parse("listen = 5", Path::new("")).is_err());
        assert!(FileConfig::parse("lissen = \"x\"", Path::new("")).is_err());
    }

    #[test]
    fn precedence_is_given_then_file_then_default() {
        let file = FileConfig {
            listen: Some("127.0.0.1:1".into()),
            max_body_bytes: Some(10),
            ..Default::default()
        };
        let c = Config::resolve(
            Overrides {
                listen: Some("127.0.0.1:2".into()),
                ..Default::default()
            },
            Some(file),
        )
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:2");
        assert_eq!(c.max_body_bytes, 10);
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(c.token, None);
        let c = Config::resolve(
            Overrides {
                token: Some(" s3cret\n".into()),
                ..Default::default()
            },
            None,
        )
        .unwrap();
        assert_eq!(c.token.as_deref(), Some("s3cret"));
        assert!(Config::resolve(
            Overrides {
                token: Some(" ".into()),
                ..Default::default()
            },
            None
        )
        .is_err());
    }

    #[test]
    fn differences_name_every_field() {
        let a = PoolSpec::new(PoolKind::Range { lo: 1, hi: 10 });
        let mut b = a.clone();
        b.strategy = Strategy::Next;
        b.quarantine_secs = 5;
        let l = BTreeMap::from([("team".to_string(), "net".to_string())]);
        let d = difference(&a, &BTreeMap::new(), &b, &l);
        assert_eq!(
            d,
            "quarantine_secs: existing 0, config 5; strategy: existing \"lowest\", config \"next\"; labels: existing {}, config {\"team\":\"net\"}"
        );
        assert_eq!(difference(&a, &l, &a, &l), "");
    }
}
