//! Parsing `--store` values.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use crate::OpenError;

/// Where allot keeps its state, as given to `--store` / `ALLOT_STORE`.
///
/// ```
/// use allot_backends::StoreUrl;
/// assert_eq!("redb".parse::<StoreUrl>().unwrap(), StoreUrl::Redb);
/// assert_eq!("".parse::<StoreUrl>().unwrap(), StoreUrl::Auto);
/// let pg: StoreUrl = "postgres://allot:secret@db:5432/allot?schema=edge".parse().unwrap();
/// // The password never reaches logs or error messages.
/// assert_eq!(pg.to_string(), "postgres://allot:***@db:5432/allot?schema=edge");
/// let etcd: StoreUrl = "etcd://10.0.0.1:2379,10.0.0.2:2379/prod".parse().unwrap();
/// assert_eq!(etcd.to_string(), "etcd://10.0.0.1:2379,10.0.0.2:2379/prod/");
/// assert!("mysql://db".parse::<StoreUrl>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StoreUrl {
    /// The embedded store the data dir already holds: redb if it has a
    /// redb database (data made before the log store became the default),
    /// else the log store. See [`StoreUrl::resolve`].
    #[default]
    Auto,
    /// The embedded B-tree store: one redb file in the data dir.
    Redb,
    /// The embedded log-structured store: a write-ahead log with snapshots
    /// in the data dir, every key in memory (faster commits than redb).
    Log,
    /// A PostgreSQL database.
    Postgres {
        /// The connection URL as tokio-postgres takes it (allot's own
        /// `schema` parameter removed).
        url: String,
        /// The PostgreSQL schema holding allot's tables (`?schema=`), so
        /// several deployments can share one database.
        schema: Option<String>,
        /// Connections this process keeps at most (`?pool_size=`, default
        /// 16): many small processes on one server need few each.
        pool_size: Option<usize>,
    },
    /// An etcd cluster.
    Etcd {
        /// `host:port` of each member to talk to.
        endpoints: Vec<String>,
        /// Prefix of every key allot writes (the URL's path, ending in
        /// `/`), so several deployments can share one cluster; the etcd
        /// backend's default (`allot/`) when absent.
        namespace: Option<String>,
    },
}

const FORMS: &str = "use `auto`, `redb` or `log` (embedded stores in the data dir), \
                     `postgres://USER@HOST:PORT/DB[?schema=NAME][&pool_size=N]` or \
                     `etcd://HOST:PORT[,HOST:PORT...][/NAMESPACE]`";

impl FromStr for StoreUrl {
    type Err = OpenError;

    fn from_str(s: &str) -> Result<Self, OpenError> {
        let s = s.trim();
        let bad = |why: &str| OpenError::Invalid(format!("--store {s:?}: {why}; {FORMS}"));
        if s.is_empty() || s == "auto" {
            return Ok(StoreUrl::Auto);
        }
        if s == "redb" {
            return Ok(StoreUrl::Redb);
        }
        if s == "log" {
            return Ok(StoreUrl::Log);
        }
        let Some((scheme, rest)) = s.split_once("://") else {
            return Err(bad("not a known store"));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "postgres" | "postgresql" => parse_postgres(s, rest).map_err(|why| bad(&why)),
            "etcd" => parse_etcd(rest).map_err(|why| bad(&why)),
            "auto" | "redb" | "log" => Err(bad(
                "the embedded stores live in the data dir: use `--store auto|redb|log --data-dir DIR`",
            )),
            other => Err(bad(&format!("unknown store scheme {other}://"))),
        }
    }
}

impl StoreUrl {
    /// The embedded store [`StoreUrl::Auto`] stands for in `data_dir`:
    /// redb if `DATA_DIR/allot.redb` exists, so that existing data dirs
    /// keep working, else the log store, the faster of the two (see
    /// ARCHITECTURE.md). Any other value is returned as it is.
    pub fn resolve(&self, data_dir: &Path) -> StoreUrl {
        match self {
            StoreUrl::Auto if data_dir.join(crate::REDB_FILE).exists() => StoreUrl::Redb,
            StoreUrl::Auto => StoreUrl::Log,
            other => other.clone(),
        }
    }
}

fn parse_postgres(whole: &str, rest: &str) -> Result<StoreUrl, String> {
    if rest.is_empty() {
        return Err("a host is missing".into());
    }
    let (base, query) = match whole.split_once('?') {
        Some((base, query)) => (base, query),
        None => (whole, ""),
    };
    let mut schema = None;
    let mut pool_size = None;
    let mut kept = Vec::new();
    for param in query.split('&').filter(|p| !p.is_empty()) {
        match param.split_once('=') {
            Some(("schema", name)) if !name.is_empty() => schema = Some(name.to_string()),
            Some(("pool_size", n)) => match n.parse::<usize>() {
                Ok(n) if n > 0 => pool_size = Some(n),
                _ => return Err(format!("`pool_size={n}` is not a positive number")),
            },
            Some(("schema", _)) | None if param.starts_with("schema") => {
                return Err("`schema=` needs a name".into())
            }
            _ => kept.push(param),
        }
    }
    let url = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok(StoreUrl::Postgres {
        url,
        schema,
        pool_size,
    })
}

fn parse_etcd(rest: &str) -> Result<StoreUrl, String> {
    let (hosts, path) = match rest.split_once('/') {
        Some((hosts, path)) => (hosts, path),
        None => (rest, ""),
    };
    let mut endpoints = Vec::new();
    for host in hosts.split(',') {
        let host = host.trim();
        let Some((name, port)) = host.rsplit_once(':') else {
            return Err(format!("endpoint {host:?} needs a port (HOST:PORT)"));
        };
        if name.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(format!("endpoint {host:?} is not HOST:PORT"));
        }
        endpoints.push(host.to_string());
    }
    // A namespace is a key prefix: end it with '/' so `prod` and
    // `production` cannot see each other's keys.
    let namespace = (!path.is_empty()).then(|| {
        let mut ns = path.to_string();
        if !ns.ends_with('/') {
            ns.push('/');
        }
        ns
    });
    Ok(StoreUrl::Etcd {
        endpoints,
        namespace,
    })
}

impl fmt::Display for StoreUrl {
    /// The URL with any password masked, fit for logs and messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::Auto => f.write_str("auto"),
            StoreUrl::Redb => f.write_str("redb"),
            StoreUrl::Log => f.write_str("log"),
            StoreUrl::Postgres {
                url,
                schema,
                pool_size,
            } => {
                f.write_str(&mask_password(url))?;
                let mut sep = if url.contains('?') { '&' } else { '?' };
                if let Some(schema) = schema {
                    write!(f, "{sep}schema={schema}")?;
                    sep = '&';
                }
                if let Some(n) = pool_size {
                    write!(f, "{sep}pool_size={n}")?;
                }
                Ok(())
            }
            StoreUrl::Etcd {
                endpoints,
                namespace,
            } => {
                write!(f, "etcd://{}", endpoints.join(","))?;
                if let Some(ns) = namespace {
                    write!(f, "/{ns}")?;
                }
                Ok(())
            }
        }
    }
}

/// `scheme://user:secret@host` → `scheme://user:***@host`.
fn mask_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> StoreUrl {
        s.parse().unwrap()
    }

    #[test]
    fn auto_is_the_default() {
        assert_eq!(parse(""), StoreUrl::Auto);
        assert_eq!(parse(" auto "), StoreUrl::Auto);
        assert_eq!(parse(" redb "), StoreUrl::Redb);
        assert_eq!(parse("log"), StoreUrl::Log);
        assert_eq!(StoreUrl::default(), StoreUrl::Auto);
        assert_eq!(StoreUrl::Auto.to_string(), "auto");
    }

    #[test]
    fn auto_keeps_an_existing_redb_data_dir_and_takes_the_log_store_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(StoreUrl::Auto.resolve(dir.path()), StoreUrl::Log);
        // A log store already there (or nothing at all): the log store.
        std::fs::create_dir(dir.path().join(crate::LOG_DIR)).unwrap();
        assert_eq!(StoreUrl::Auto.resolve(dir.path()), StoreUrl::Log);
        std::fs::write(dir.path().join(crate::REDB_FILE), b"").unwrap();
        assert_eq!(StoreUrl::Auto.resolve(dir.path()), StoreUrl::Redb);
        // Explicit choices are kept whatever the data dir holds.
        assert_eq!(StoreUrl::Log.resolve(dir.path()), StoreUrl::Log);
        let missing = dir.path().join("missing");
        assert_eq!(StoreUrl::Redb.resolve(&missing), StoreUrl::Redb);
        assert_eq!(StoreUrl::Auto.resolve(&missing), StoreUrl::Log);
    }

    #[test]
    fn postgres_urls_keep_their_parameters_but_not_ours() {
        assert_eq!(
            parse("postgresql://u@h/db?sslmode=disable&schema=a1&connect_timeout=3"),
            StoreUrl::Postgres {
                url: "postgresql://u@h/db?sslmode=disable&connect_timeout=3".into(),
                schema: Some("a1".into()),
                pool_size: None,
            }
        );
        assert_eq!(
            parse("postgres://h"),
            StoreUrl::Postgres {
                url: "postgres://h".into(),
                schema: None,
                pool_size: None,
            }
        );
    }

    #[test]
    fn passwords_are_masked() {
        assert_eq!(
            parse("postgres://u:p%40ss@h:5432/db?sslmode=disable").to_string(),
            "postgres://u:***@h:5432/db?sslmode=disable"
        );
        assert_eq!(parse("postgres://u@h/db").to_string(), "postgres://u@h/db");
    }

    #[test]
    fn etcd_endpoints_and_namespace() {
        assert_eq!(
            parse("etcd://127.0.0.1:2379"),
            StoreUrl::Etcd {
                endpoints: vec!["127.0.0.1:2379".into()],
                namespace: None
            }
        );
        assert_eq!(
            parse("etcd://a:1,b:2/team/allot/"),
            StoreUrl::Etcd {
                endpoints: vec!["a:1".into(), "b:2".into()],
                namespace: Some("team/allot/".into())
            }
        );
    }

    #[test]
    fn bad_urls_say_what_is_accepted() {
        for bad in [
            "mysql://h/db",
            "/var/lib/allot",
            "etcd://",
            "etcd://host",
            "etcd://host:0",
            "etcd://host:99999",
            "etcd://:2379",
            "postgres://",
            "postgres://h/db?schema=",
            "postgres://h/db?pool_size=0",
            "redb:///tmp/x",
        ] {
            let err = bad.parse::<StoreUrl>().unwrap_err().to_string();
            assert!(err.contains("postgres://USER@HOST"), "{bad}: {err}");
        }
    }
}
