//! The `ferry` command line: `serve` runs a node, `admin` talks to a node's admin listener,
//! `migrate` prepares the database.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use ferry::admin_cli::{self, Action};
use ferry::config::{Config, Overrides};
use ferry::{server, store};

/// jemalloc instead of the system allocator: the server allocates and frees many small buffers
/// per message (frames, pushes, futures) on two or more threads at once, where glibc's malloc
/// took about 15 % of the server's CPU samples under fan-out load (`docs/benchmarks.md`).
/// The `system-alloc` feature keeps the system allocator, for heap profilers that hook `malloc`
/// (`heaptrack`; `docs/benchmarks.md`, "Memory").
#[cfg(all(unix, not(feature = "system-alloc")))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Durable, real-time conversation backbone"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    Serve(ServeArgs),
    /// Operate the cluster through a node's admin listener (needs an admin API key).
    Admin(AdminArgs),
    /// Run the database migrations and exit.
    Migrate(MigrateArgs),
}

#[derive(Args)]
struct AdminArgs {
    #[command(subcommand)]
    action: AdminAction,
    /// The admin listener [default: http://$FERRY_ADMIN_LISTEN, else http://127.0.0.1:4001].
    #[arg(long, env = "FERRY_ADMIN_URL", global = true)]
    admin_url: Option<String>,
    /// An admin API key [default: $FERRY_BOOTSTRAP_API_KEY].
    #[arg(long, env = "FERRY_API_KEY", global = true, hide_env_values = true)]
    api_key: Option<String>,
    /// Print the JSON answer as the node sent it instead of a table.
    #[arg(long, env = "FERRY_JSON", global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum AdminAction {
    /// The nodes, their state and load.
    Status,
    /// Every slot: owner, epoch, state, conversations, appends.
    Slots,
    /// Move a node's slots to the other nodes and stop routing new ones to it.
    Drain {
        node: String,
        /// Return only once the node owns no slot.
        #[arg(long)]
        wait: bool,
    },
    /// Let a drained node own slots again.
    Undrain { node: String },
    /// Move slots toward the ring's placement over the active nodes.
    Rebalance,
    /// Hand a dead node's slots to the live nodes (only a node that ran
    /// cluster.durability = archive; a live node is refused).
    Failover { node: String },
    /// API keys: create, list, revoke, rotate.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
}

#[derive(Subcommand)]
enum KeysAction {
    /// Create a key; its secret is printed once.
    Create {
        name: String,
        /// admin | service | read
        #[arg(long, default_value = "service")]
        scope: String,
    },
    /// Every key, without secrets.
    List,
    /// Refuse a key on every node (within a second) and close its sockets.
    Revoke { id: String },
    /// Replace a key with a new one; the old one keeps working for --grace.
    Rotate {
        id: String,
        /// How long the old key keeps working (e.g. 10m, 1h) [default: 0].
        #[arg(long, default_value = "0")]
        grace: String,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// TOML configuration file (see config/ferry.toml).
    #[arg(long, env = "FERRY_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long)]
    listen: Option<String>,
    #[arg(long)]
    admin_listen: Option<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long)]
    node_id: Option<String>,
    #[arg(long)]
    database_url: Option<String>,
    #[arg(long)]
    redis_url: Option<String>,
    /// Shared by every node of a cluster; opens the node-to-node API and nothing else.
    #[arg(long, hide_env_values = true)]
    cluster_secret: Option<String>,
    /// Where the other nodes reach this node's admin listener [default: http://ADMIN_ADDR].
    #[arg(long)]
    advertise_url: Option<String>,
    #[arg(long)]
    object_store: Option<String>,
    #[arg(long)]
    bootstrap_api_key: Option<String>,
    /// Do not run migrations on start.
    #[arg(long)]
    no_migrate: bool,
    /// Quarantine corrupt WAL segments instead of refusing to start (reports what was lost).
    /// Also `FERRY_WAL__REPAIR` in the config's naming.
    #[arg(long, env = "FERRY_REPAIR_WAL")]
    repair_wal: bool,
}

#[derive(Args)]
struct MigrateArgs {
    #[arg(long, env = "FERRY_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long)]
    database_url: Option<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

fn init_tracing(json: bool) {
    let filter = EnvFilter::try_from_env("FERRY_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal: in a file or a container log the escape codes
    // would split the fields a parser looks for (`ferry ready listen=…`). NO_COLOR turns them
    // off there too.
    let ansi = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => {
            let overrides = Overrides {
                listen: args.listen,
                admin_listen: args.admin_listen,
                data_dir: args.data_dir,
                node_id: args.node_id,
                database_url: args.database_url,
                redis_url: args.redis_url,
                cluster_secret: args.cluster_secret,
                advertise_url: args.advertise_url,
                object_store: args.object_store,
                bootstrap_api_key: args.bootstrap_api_key,
                no_migrate: args.no_migrate,
                repair: args.repair_wal,
            };
            Config::load(args.config.as_deref(), &overrides).and_then(|config| {
                init_tracing(config.log_format == "json");
                runtime()?.block_on(server::serve(config))
            })
        }
        Command::Admin(args) => {
            let options = admin_cli::Options {
                // An empty flag or variable counts as unset.
                admin_url: args
                    .admin_url
                    .filter(|u| !u.trim().is_empty())
                    .or_else(|| non_empty_env("FERRY_ADMIN_LISTEN").map(|l| format!("http://{l}")))
                    .unwrap_or_else(|| "http://127.0.0.1:4001".to_owned()),
                api_key: args
                    .api_key
                    .filter(|k| !k.is_empty())
                    .or_else(|| non_empty_env("FERRY_BOOTSTRAP_API_KEY")),
                json: args.json,
            };
            let action = match args.action {
                AdminAction::Status => Action::Status,
                AdminAction::Slots => Action::Slots,
                AdminAction::Drain { node, wait } => Action::Drain(node, wait),
                AdminAction::Undrain { node } => Action::Undrain(node),
                AdminAction::Rebalance => Action::Rebalance,
                AdminAction::Failover { node } => Action::Failover(node),
                AdminAction::Keys { action } => match action {
                    KeysAction::Create { name, scope } => Action::KeyCreate(name, scope),
                    KeysAction::List => Action::KeyList,
                    KeysAction::Revoke { id } => Action::KeyRevoke(id),
                    KeysAction::Rotate { id, grace } => {
                        match ferry::config::parse_duration(&grace) {
                            Ok(d) => Action::KeyRotate(id, d.as_secs()),
                            Err(e) => {
                                eprintln!("error: --grace: {e}");
                                std::process::exit(2);
                            }
                        }
                    }
                },
            };
            runtime()
                .and_then(|rt| rt.block_on(admin_cli::run(action, &options)))
                .map(|out| print!("{out}"))
        }
        Command::Migrate(args) => {
            let overrides = Overrides {
                database_url: args.database_url,
                data_dir: args.data_dir,
                ..Overrides::default()
            };
            Config::load(args.config.as_deref(), &overrides).and_then(|config| {
                init_tracing(config.log_format == "json");
                runtime()?.block_on(async {
                    ferry_shards::wal::io::create_dir_all_durably(&config.data_dir)?;
                    let url = config.database_url();
                    let mut options = config.store_options();
                    options.pool_size = 2;
                    let store = store::Store::connect_with(&url, &options).await?;
                    store.migrate().await?;
                    store.close().await;
                    println!("migrations applied to {}", store::redact_url(&url));
                    Ok(())
                })
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
