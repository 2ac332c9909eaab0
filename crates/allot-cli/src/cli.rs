//! Command-line grammar (clap derive). Parsing only: nothing here touches
//! the data dir, so a usage error can never change anything.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// How results are printed on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Short tables and lines for people.
    Human,
    /// Exactly one JSON document, for scripts.
    Json,
}

/// How the next free value is chosen (mirrors [`allot::Strategy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StrategyArg {
    /// The lowest free value.
    Lowest,
    /// Continue after the last value handed out; avoids immediate reuse.
    Next,
    /// A random free value.
    Random,
}

/// `--member-blocks` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DurabilityArg {
    /// Every allocation committed (shared commits).
    Sync,
    /// Only block ownership stored.
    Block,
}

impl From<DurabilityArg> for allot::Durability {
    fn from(d: DurabilityArg) -> Self {
        match d {
            DurabilityArg::Sync => allot::Durability::Sync,
            DurabilityArg::Block => allot::Durability::Block,
        }
    }
}

impl From<StrategyArg> for allot::Strategy {
    fn from(s: StrategyArg) -> Self {
        match s {
            StrategyArg::Lowest => allot::Strategy::Lowest,
            StrategyArg::Next => allot::Strategy::Next,
            StrategyArg::Random => allot::Strategy::Random,
        }
    }
}

const TOP_EXAMPLES: &str = "\
Examples:
  allot pool create vlans --range 100-4094
  allot alloc vlans --key site-a
  allot lookup vlans --key site-a --output json
  allot pool list
  ALLOT_SERVER=http://127.0.0.1:7070 allot pool list    # the same, through a server
  allot watch --server http://127.0.0.1:7070";

/// The `allot` command line.
#[derive(Debug, Parser)]
#[command(
    name = "allot",
    version,
    about = "allot hands out unique values (integers, IP addresses, prefixes, set members) from named pools, \
             durably and idempotently by key.",
    long_about = "allot hands out unique values (integers, IP addresses, prefixes, set members) from named pools.\n\
                  Claims survive restarts, a claim bound to a key returns the same value when repeated, and \
                  a mark-and-sweep resync releases what a client no longer holds.\n\
                  Commands work on a local data dir (the embedded store), on a shared PostgreSQL or etcd store \
                  (--store), or through an `allot serve` with --server (ALLOT_SERVER), with the same output.",
    after_help = TOP_EXAMPLES
)]
pub struct Cli {
    /// Directory holding the embedded store (DATA_DIR/allot-log, or
    /// DATA_DIR/allot.redb for data dirs made with redb).
    #[arg(
        long,
        global = true,
        env = "ALLOT_DATA_DIR",
        default_value = "./allot-data",
        value_name = "DIR"
    )]
    pub data_dir: PathBuf,

    /// Where state lives: `auto` (the embedded store in --data-dir: redb if
    /// it holds DATA_DIR/allot.redb, else the log-structured store), `log`
    /// (the embedded log-structured store: faster commits, every key in
    /// memory), `redb` (the embedded B-tree store, one file),
    /// `postgres://USER@HOST:PORT/DB[?schema=NAME]` or
    /// `etcd://HOST:PORT[,HOST:PORT...][/NAMESPACE]`. Several `allot serve`
    /// processes and local commands may share a PostgreSQL or etcd store.
    #[arg(
        long,
        global = true,
        env = "ALLOT_STORE",
        default_value = "auto",
        value_name = "URL",
        hide_env_values = true
    )]
    pub store: String,

    /// Output format.
    #[arg(long, global = true, env = "ALLOT_OUTPUT", value_enum, default_value_t = Format::Human)]
    pub output: Format,

    /// Work through the allot server at this URL (e.g. http://127.0.0.1:7070)
    /// instead of the local data dir (--data-dir is then ignored).
    #[arg(long, global = true, env = "ALLOT_SERVER", value_name = "URL")]
    pub server: Option<String>,

    /// Bearer token for --server (prefer the ALLOT_TOKEN environment
    /// variable: arguments are visible to other local users).
    #[arg(
        long,
        global = true,
        env = "ALLOT_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, list, show and delete pools.
    #[command(
        subcommand,
        after_help = "Examples:\n  allot pool create vlans --range 100-4094\n  allot pool list"
    )]
    Pool(PoolCommand),

    /// Allocate one or more values from a pool.
    #[command(after_help = ALLOC_EXAMPLES)]
    Alloc(AllocArgs),

    /// Release a claimed value, by value or by key.
    #[command(
        after_help = "Examples:\n  allot release vlans --value 100\n  allot release vlans --key site-a\n  allot release vlans --value 100 --request-id rel-7   # safe to retry"
    )]
    Release(ReleaseArgs),

    /// Show who holds a value, or which value a key holds.
    #[command(
        after_help = "Examples:\n  allot lookup vlans --key site-a\n  allot lookup subnets --value 10.0.3.0/24 --output json"
    )]
    Lookup(TargetArgs),

    /// List a pool's claims in value order, a page at a time.
    #[command(
        after_help = "Examples:\n  allot claims vlans\n  allot claims vlans --limit 10 --after 109"
    )]
    Claims(ClaimsArgs),

    /// Mark-and-sweep: release the keyed claims a client no longer re-claims.
    #[command(subcommand, after_help = RESYNC_EXAMPLES)]
    Resync(ResyncCommand),

    /// List the live members: name, incarnation, address, age and the
    /// blocks each owns.
    #[command(
        after_help = "Examples:\n  allot members\n  allot members --server http://127.0.0.1:7070 --output json"
    )]
    Members,

    /// Which member owns the block holding a value of a member-blocks pool.
    #[command(
        after_help = "Examples:\n  allot owner teid 305419896\n  allot owner teid 305419896 --server http://127.0.0.1:7070 --output json"
    )]
    Owner(OwnerArgs),

    /// Print every change as it happens (needs --server): one line per
    /// event, or one JSON object per line with --output json.
    #[command(after_help = WATCH_EXAMPLES)]
    Watch(WatchArgs),

    /// Serve the REST API (JSON under /v1, /openapi.json, /metrics) on the data dir.
    #[command(after_help = crate::serve::SERVE_EXAMPLES)]
    Serve(crate::serve::ServeArgs),
}

const WATCH_EXAMPLES: &str = "\
Examples:
  allot watch --server http://127.0.0.1:7070             # changes from now on
  allot watch --server http://127.0.0.1:7070 --from 1    # everything the server still remembers
  allot watch --output json | jq -c 'select(.type == \"claims\")'";

/// Arguments of `allot owner`.
#[derive(Debug, Args)]
pub struct OwnerArgs {
    /// Pool name (a pool created with --member-blocks).
    pub pool: String,
    /// The value whose owner is wanted.
    pub value: String,
}

/// Arguments of `allot watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The first revision to print (default: only changes from now). After
    /// a dropped connection the watch resumes where it stopped by itself.
    #[arg(long, value_name = "REV")]
    pub from: Option<u64>,
}

const ALLOC_EXAMPLES: &str = "\
Examples:
  allot alloc vlans                        # the next free value
  allot alloc vlans --count 10             # ten values, all or nothing
  allot alloc vlans --key site-a           # idempotent: same value every time
  allot alloc vlans --value 200 --owner agent-1 --meta '{\"site\":\"a\"}'
  allot alloc subnets --prefix-len 26      # a /26 from a prefix pool
  allot alloc vlans --request-id req-42    # safe to retry: a repeat returns the first answer";

const RESYNC_EXAMPLES: &str = "\
Examples:
  allot resync begin vlans --owner agent-1
  allot alloc vlans --key site-a --owner agent-1   # re-claim what is still live
  allot resync end vlans --owner agent-1           # releases everything not re-claimed";

/// `allot pool ...`
#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Create a pool of integers (--range), addresses or prefixes (--cidr), or strings (--values).
    #[command(after_help = CREATE_EXAMPLES)]
    Create(CreateArgs),

    /// List every pool with its usage.
    #[command(
        after_help = "Examples:\n  allot pool list\n  allot pool list --label team=net --output json"
    )]
    List {
        /// Only pools having this KEY=VALUE label; repeatable (all must match).
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
    },

    /// Show a pool's definition and counters.
    #[command(after_help = "Examples:\n  allot pool show vlans")]
    Show {
        /// Pool name.
        name: String,
    },

    /// Delete a pool and everything in it (refused while values are claimed, unless --force).
    #[command(
        after_help = "Examples:\n  allot pool delete vlans\n  allot pool delete vlans --force"
    )]
    Delete {
        /// Pool name.
        name: String,
        /// Delete even though values are still claimed.
        #[arg(long)]
        force: bool,
    },
}

const CREATE_EXAMPLES: &str = "\
Examples:
  allot pool create vlans --range 100-4094 --reserve 1000-1099
  allot pool create hosts --cidr 10.0.0.0/24 --strategy next --quarantine 300
  allot pool create subnets --cidr 10.0.0.0/16 --prefix-len 24 --max-prefix-len 28
  allot pool create colors --values red,green,blue --label team=net
  allot alloc supernets                                  # say it gives 10.0.3.0/24
  allot pool create lan3 --cidr 10.0.3.0/24 --parent-pool supernets --parent-value 10.0.3.0/24";

/// Arguments of `allot pool create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Pool name: 1-128 of A-Z a-z 0-9 . _ -
    pub name: String,

    #[command(flatten)]
    pub kind: KindArgs,

    /// With --cidr: hand out prefixes of this length instead of single addresses.
    #[arg(long, value_name = "N")]
    pub prefix_len: Option<u8>,

    /// With --prefix-len: the longest prefix that may be requested
    /// (default 32 for IPv4, prefix-len + 16 for IPv6).
    #[arg(long, requires = "prefix_len", value_name = "N")]
    pub max_prefix_len: Option<u8>,

    /// With --cidr (addresses): also hand out the IPv4 network and broadcast addresses.
    #[arg(long, conflicts_with = "prefix_len")]
    pub all_addresses: bool,

    /// A value, range (A-B) or prefix never handed out; repeat or separate with commas.
    #[arg(long = "reserve", value_name = "V", value_delimiter = ',')]
    pub reserve: Vec<String>,

    /// How the next free value is chosen.
    #[arg(long, value_enum, default_value_t = StrategyArg::Lowest)]
    pub strategy: StrategyArg,

    /// Seconds a released value stays unavailable before reuse.
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    pub quarantine: u64,

    /// Values per storage block (a power of two).
    #[arg(long, value_name = "N", default_value_t = allot::DEFAULT_BLOCK_SIZE)]
    pub block_size: u64,

    /// Hand values out from blocks that members own and allocate from in
    /// their own memory: `sync` stores every allocation, `block` only the
    /// ownership (a new owner asks the application which values are in use).
    #[arg(long, value_enum, value_name = "DURABILITY")]
    pub member_blocks: Option<DurabilityArg>,

    /// A descriptive KEY=VALUE label; repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,

    /// Nest the pool in a claimed value of this pool (with --parent-value):
    /// the value cannot be released while the nested pool exists.
    #[arg(long, value_name = "POOL", requires = "parent_value")]
    pub parent_pool: Option<String>,

    /// The claimed value of --parent-pool the pool is carved from.
    #[arg(long, value_name = "VALUE", requires = "parent_pool")]
    pub parent_value: Option<String>,
}

/// What a pool hands out: exactly one of the three.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct KindArgs {
    /// Integers LO-HI, inclusive (e.g. 100-4094).
    #[arg(long, value_name = "LO-HI")]
    pub range: Option<String>,

    /// An IPv4 or IPv6 network (host bits zero), e.g. 10.0.0.0/24.
    #[arg(long, value_name = "CIDR")]
    pub cidr: Option<String>,

    /// An explicit list of strings, comma-separated.
    #[arg(long = "values", value_name = "A,B,C", value_delimiter = ',')]
    pub set: Option<Vec<String>>,
}

/// Arguments of `allot alloc`.
#[derive(Debug, Args)]
pub struct AllocArgs {
    /// Pool name.
    pub pool: String,

    /// How many values, all or nothing.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub count: u64,

    /// Claim exactly this value.
    #[arg(long, value_name = "V")]
    pub value: Option<String>,

    /// Bind the claim to a key: repeating the request returns the same value.
    #[arg(long, value_name = "K")]
    pub key: Option<String>,

    /// Prefix pools: the length to hand out instead of the pool's default.
    #[arg(long, value_name = "N")]
    pub prefix_len: Option<u8>,

    /// Who holds the claim (used by resync --owner).
    #[arg(long, value_name = "TAG")]
    pub owner: Option<String>,

    /// JSON metadata stored with the claim.
    #[arg(long, value_name = "JSON")]
    pub meta: Option<String>,

    /// Idempotency key: repeating the command with the same id (within
    /// about an hour) returns the first answer and claims nothing more.
    #[arg(long, value_name = "ID")]
    pub request_id: Option<String>,
}

/// Arguments of `allot release`.
#[derive(Debug, Args)]
pub struct ReleaseArgs {
    /// Pool name.
    pub pool: String,

    #[command(flatten)]
    pub target: TargetSel,

    /// Idempotency key: repeating the command with the same id returns the
    /// first answer instead of "not allocated".
    #[arg(long, value_name = "ID")]
    pub request_id: Option<String>,
}

/// A pool plus one claim, addressed by value or by key.
#[derive(Debug, Args)]
pub struct TargetArgs {
    /// Pool name.
    pub pool: String,

    #[command(flatten)]
    pub target: TargetSel,
}

/// `--value V` or `--key K`, exactly one.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct TargetSel {
    /// The claimed value.
    #[arg(long, value_name = "V")]
    pub value: Option<String>,

    /// The key the claim is bound to.
    #[arg(long, value_name = "K")]
    pub key: Option<String>,
}

/// Arguments of `allot claims`.
#[derive(Debug, Args)]
pub struct ClaimsArgs {
    /// Pool name.
    pub pool: String,

    /// Start after this value (the "next" cursor of the previous page).
    #[arg(long, value_name = "VALUE")]
    pub after: Option<String>,

    /// Claims per page (1-10000).
    #[arg(long, default_value_t = 100, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub limit: u64,
}

/// `allot resync ...`
#[derive(Debug, Subcommand)]
pub enum ResyncCommand {
    /// Open a pass: every keyed claim (of --owner, or all) is stale until claimed again.
    #[command(after_help = "Examples:\n  allot resync begin vlans --owner agent-1")]
    Begin(ResyncArgs),

    /// Close the pass: release every claim it marked that was not claimed again.
    #[command(after_help = "Examples:\n  allot resync end vlans --owner agent-1")]
    End(ResyncArgs),
}

/// Arguments of `allot resync begin|end`.
#[derive(Debug, Args)]
pub struct ResyncArgs {
    /// Pool name.
    pub pool: String,

    /// Only claims made with this owner tag.
    #[arg(long, value_name = "TAG")]
    pub owner: Option<String>,
}
