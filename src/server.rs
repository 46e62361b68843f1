//! `ferry serve`: opens the archive, starts the node (WAL recovery, actors, archiver), binds the
//! public and admin listeners, logs the `ferry ready` line, and on SIGTERM/SIGINT stops taking
//! traffic, finishes in-flight work and exits 0.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use ferry_shards::node::{Node, NodeConfig};
use ferry_shards::record::now_ms;
use ferry_shards::wal::WalOptions;

use crate::admin::{self, AdminState};
use crate::auth::{Auth, JwtVerifier};
use crate::cold::ColdTier;
use crate::compactor::{self, CompactorConfig};
use crate::config::Config;
use crate::http::{self, AppState};
use crate::store::Store;

pub async fn serve(config: Config) -> anyhow::Result<()> {
    let prometheus = crate::metrics::install()?;
    let config = Arc::new(config);
    ferry_shards::wal::io::create_dir_all_durably(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;

    let database_url = config.database_url();
    let store = Store::connect_with(&database_url, &config.store_options())
        .await
        .with_context(|| {
            format!(
                "cannot open the archive database {}",
                crate::store::redact_url(&database_url)
            )
        })?;
    tracing::info!(
        backend = store.backend().as_str(),
        database = %crate::store::redact_url(&database_url),
        pool_size = config.archive.pool_size,
        "archive database open"
    );
    if !config.no_migrate {
        store.migrate().await.context("migrations failed")?;
    }
    let object_store = config.object_store_url();
    let cold = Arc::new(
        ColdTier::open(&object_store)
            .with_context(|| format!("cannot open the object store {object_store}"))?,
    );
    let store = store.with_cold_tier(cold.clone());
    let store = if config.clustered() {
        store.in_cluster(config.slots.count)
    } else {
        store
    };
    tracing::info!(object_store = %object_store, "cold tier open");
    let jwt = JwtVerifier::from_config(&config)?;
    let rate = Arc::new(crate::rate::RateLimits::from_config(&config.rate)?);
    let pepper = crate::auth::Pepper::resolve(
        config.auth.api_key_pepper.as_deref(),
        config.cluster_secret.as_deref(),
        &config.data_dir,
    )?;
    // Credentials are checked on a pool of their own: a flood of unknown keys waits for these
    // few connections and never for the archiver's.
    let auth_store = Store::connect_with(&database_url, &config.auth_store_options())
        .await
        .context("cannot open the auth pool")?;
    let auth = Arc::new(Auth::new(
        crate::auth::ApiKeys::new(auth_store, pepper),
        jwt,
        rate.clone(),
    ));
    let (jwks_stop_tx, jwks_stop) = tokio::sync::watch::channel(false);
    if let Some(jwks) = auth.key_set() {
        // Not fatal: an identity provider that is down at our start may be up a moment later
        // (an unknown kid fetches again); until then every token is refused, and the log says so.
        jwks.refresh().await;
        tokio::spawn(jwks.run_refresh(config.auth.jwt_jwks_refresh, jwks_stop));
    }
    if let Some(key) = auth
        .keys
        .bootstrap(config.bootstrap_api_key.as_deref())
        .await?
    {
        // Printed once, on the first start of an empty database; it is stored only as a hash.
        println!("ferry admin-key {key}");
        tracing::warn!("generated an admin api key and printed it once on stdout; store it now");
    }

    let public = TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let admin_listener = TcpListener::bind(&config.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.admin_listen))?;
    let public_addr = public.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let node_id = config.node_id();

    let mut wal = WalOptions::new(config.data_dir.join("wal"));
    wal.fsync = config.fsync_policy()?;
    wal.segment_bytes = config.wal.segment_bytes;
    wal.queue_capacity = config.wal.queue_capacity;
    wal.max_batch_bytes = config.wal.max_batch_bytes;
    wal.repair = config.wal.repair;
    let node_config = NodeConfig {
        slot_count: config.slots.count,
        ring_bytes_per_conversation: config.runtime.ring_bytes_per_conversation,
        ring_budget_bytes: config.runtime.ring_budget_bytes,
        mailbox_capacity: config.limits.mailbox_capacity,
        dedupe_window: config.runtime.dedupe_window,
        idle_timeout: config.runtime.idle_timeout,
        archive_backlog_bytes: config.archive.backlog_bytes,
        archive_batch_records: config.archive.batch_records,
        archive_linger: config.archive.linger,
        clustered: config.clustered(),
        hold_timeout: config.cluster.move_hold,
        ack_after_archive: config.ack_after_archive(),
        max_unarchived: if config.clustered() {
            config.cluster.max_unarchived
        } else {
            0
        },
        // Each starting conversation loads from the archive over the pool; 32 waiting per
        // connection (256 with the default 8) keeps a flood of first touches from queuing
        // without end, far above what normal traffic starts at once.
        max_activations: (config.archive.pool_size as usize)
            .saturating_mul(32)
            .max(64),
        ..NodeConfig::default()
    };
    metrics::gauge!(ferry_shards::metrics::ARCHIVE_BACKLOG_LIMIT_BYTES)
        .set(config.archive.backlog_bytes as f64);
    // Cluster tasks stop only after the node has drained and shut down (its lease must hold
    // while its slots move away and its last writes are archived).
    let (cluster_stop_tx, cluster_stop) = tokio::sync::watch::channel(false);
    let joining = if config.clustered() {
        let advertise = config
            .advertise_url
            .clone()
            .unwrap_or_else(|| format!("http://{admin_addr}"));
        Some(
            join_cluster(
                &config,
                &node_id,
                &advertise,
                &database_url,
                cluster_stop.clone(),
            )
            .await?,
        )
    } else {
        None
    };
    let gates = match &joining {
        Some(j) => j.gates.clone(),
        None => ferry_shards::gate::Gates::standalone(config.slots.count),
    };
    let archive: Arc<dyn ferry_shards::archive::Archive> = match &joining {
        Some(j) => Arc::new(crate::cluster::reserve::ReservingArchive::new(
            store.clone().with_fence(crate::store::Fence {
                node_id: node_id.clone(),
                gates: gates.clone(),
                db: j.db.clone(),
            }),
            j.db.clone(),
            config.slots.count,
        )),
        None => Arc::new(store.clone()),
    };
    let (node, report) = Node::start_with_gates(node_config, wal, archive, gates)
        .await
        .context("cannot start the node")?;
    tracing::info!(
        recovered_records = report.recovered_records,
        recovered_conversations = report.recovered_conversations,
        checkpoint = report.checkpoint,
        torn_tail_bytes = report.torn_tail_bytes,
        bytes_scanned = report.bytes_scanned,
        scan_ms = report.scan_duration.as_millis() as u64,
        "wal recovered"
    );
    let events = crate::inbox::Events::default();
    tokio::spawn(events.router.clone().route_durable(node.clone()));
    let cluster = match joining {
        Some(j) => Some(
            start_cluster(
                &config,
                j,
                node.clone(),
                store.clone(),
                events.clone(),
                cluster_stop.clone(),
            )
            .await?,
        ),
        None => None,
    };

    let (compactor_stop, compactor_stop_rx) = tokio::sync::watch::channel(false);
    let compactor_task = tokio::spawn(compactor::run(
        store.clone(),
        cold,
        CompactorConfig {
            sql_retention: config.archive.sql_retention,
            interval: config.archive.compact_interval,
            segment_records: config.archive.segment_records,
            retention: config.retention,
            only_while: cluster.as_ref().map(|c| c.leading_flag()),
        },
        compactor_stop_rx,
    ));

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn({
        let auth = auth.clone();
        let stop = stop_rx.clone();
        async move { auth.keys.run(stop).await }
    });
    tokio::spawn(crate::rate::run(
        rate.clone(),
        config
            .clustered()
            .then(|| config.redis_url.clone())
            .flatten(),
        stop_rx.clone(),
    ));
    let state = AppState::new(crate::http::Shared {
        node: node.clone(),
        store: store.clone(),
        auth,
        config: config.clone(),
        events,
        shutdown: stop_rx.clone(),
        cluster: cluster.clone(),
        rate,
        sockets: Arc::new(crate::rate::OpenSockets::new(
            config.limits.max_sockets_per_principal,
        )),
    });
    let admin_state = AdminState {
        node: node.clone(),
        prometheus,
        auth: state.auth.clone(),
        info: Arc::new(admin::NodeInfo {
            id: config.node_id(),
            listen: public_addr.to_string(),
            admin: admin_addr.to_string(),
            started_at_ms: now_ms(),
        }),
        rates: admin::SlotRates::spawn(node.clone(), stop_rx.clone()),
        shutdown: stop_rx.clone(),
        cluster: cluster.clone(),
    };
    let mut admin_app = admin::router(admin_state.clone());
    if let Some(cluster) = &cluster {
        admin_app = admin_app.merge(crate::cluster::internal::router(
            crate::cluster::internal::InternalState {
                app: state.clone(),
                cluster: cluster.clone(),
                secret: config.cluster_secret.clone().unwrap_or_default(),
                admin: admin_state,
            },
        ));
    }
    let app = http::router(state);

    let public_stop = stop_rx.clone();
    let admin_stop = stop_rx;
    let limits = crate::http::transport::ConnLimits::from_config(&config.limits);
    let public_task = tokio::spawn(crate::http::transport::serve(
        public,
        app,
        limits,
        "public",
        public_stop,
    ));
    let admin_task = tokio::spawn(crate::http::transport::serve(
        admin_listener,
        admin_app,
        limits,
        "admin",
        admin_stop,
    ));

    println!("ferry ready listen={public_addr} admin={admin_addr} node={node_id}");
    tracing::info!(listen = %public_addr, admin = %admin_addr, node = %node_id, "ferry ready");

    wait_for_signal().await;
    if let Some(cluster) = &cluster {
        // Hand every slot to the other nodes first; the listeners keep serving meanwhile (the
        // hand-overs and the forwarded requests need them).
        cluster.leave().await;
    }
    tracing::info!("shutting down: finishing in-flight work");
    let _ = stop_tx.send(true);
    // In-flight requests finish (their appends are answered once the WAL drains); bounded so a
    // stuck client cannot hold the process.
    let drained = tokio::time::timeout(Duration::from_secs(20), async {
        let _ = public_task.await;
        let _ = admin_task.await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!("some connections did not finish within 20s");
    }
    node.shutdown().await;
    if let Some(cluster) = &cluster {
        cluster.left().await;
    }
    let _ = cluster_stop_tx.send(true);
    let _ = compactor_stop.send(true);
    let _ = jwks_stop_tx.send(true);
    if tokio::time::timeout(Duration::from_secs(20), compactor_task)
        .await
        .is_err()
    {
        tracing::warn!("the compaction pass did not finish within 20s");
    }
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// What a cluster member sets up before its WAL is recovered: its membership row and lease,
/// and the slots it owned (reclaimed at a new epoch), so recovery knows which are still its own.
struct Joining {
    db: crate::cluster::db::ClusterDb,
    gates: Arc<ferry_shards::gate::Gates>,
    advertise_url: String,
    incarnation: u64,
    state: ferry_shards::ownership::NodeState,
    /// What `nodes.durability` says this node acknowledges after (see `ClusterDb::register`).
    durability: crate::cluster::db::Durability,
}

async fn join_cluster(
    config: &Config,
    node_id: &str,
    advertise_url: &str,
    database_url: &str,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Joining> {
    use crate::cluster::{
        db::{ClusterDb, Durability},
        membership,
    };
    let c = &config.cluster;
    let durability = Durability::parse(&c.durability)
        .with_context(|| format!("cluster.durability {:?}", c.durability))?;
    let db = ClusterDb::connect(database_url, 4, c.lease)
        .await
        .context("cannot open the cluster tables")?;
    db.init_slots(config.slots.count)
        .await
        .context("cannot prepare the slot table")?;
    let sent = std::time::Instant::now();
    let registered = db
        .register(
            node_id,
            advertise_url,
            c.lease,
            durability,
            c.max_unarchived,
        )
        .await
        .context("cannot register this node")?;
    let gates = ferry_shards::gate::Gates::clustered(config.slots.count);
    let owned = db
        .reclaim(node_id)
        .await
        .context("cannot reclaim this node's slots")?;
    for row in &owned {
        gates.set_serving(row.slot, row.epoch);
    }
    gates.extend_lease(sent + c.lease - membership::lease_margin(c.lease));
    tracing::info!(
        node = node_id,
        incarnation = registered.incarnation,
        state = %registered.state,
        durability = %registered.durability,
        slots = owned.len(),
        advertise_url,
        "joined the cluster"
    );
    tokio::spawn(membership::run_lease(
        db.clone(),
        gates.clone(),
        node_id.to_owned(),
        registered.incarnation,
        c.heartbeat,
        c.lease,
        stop,
    ));
    Ok(Joining {
        db,
        gates,
        advertise_url: advertise_url.to_owned(),
        incarnation: registered.incarnation,
        state: registered.state,
        durability: registered.durability,
    })
}

/// Once the node runs: fan-out, the view of the tables, the rebalancer; then `active`.
async fn start_cluster(
    config: &Config,
    joining: Joining,
    node: Node,
    store: Store,
    events: crate::inbox::Events,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<crate::cluster::Cluster> {
    use crate::cluster::{db::Durability, fanout::Fanout, membership, rebalancer, Cluster};
    use crate::metrics as m;
    // Every cluster series exists from the start (at zero), so dashboards and alerts see them.
    for result in ["ok", "cancelled", "failover"] {
        metrics::counter!(m::SLOT_MOVES_TOTAL, "result" => result).increment(0);
    }
    for op in ["append", "read", "inbox"] {
        metrics::counter!(m::FORWARDED_TOTAL, "op" => op).increment(0);
    }
    metrics::counter!(m::FANOUT_GAP_FILLS_TOTAL).increment(0);
    metrics::counter!(m::FANOUT_STALE_TOTAL).increment(0);
    metrics::counter!(m::RESTORED_MESSAGES_TOTAL).increment(0);
    let node_id = config.node_id();
    let redis_url = config.redis_url.clone().unwrap_or_default();
    let fanout = Fanout::start(
        &redis_url,
        node_id.clone(),
        node.clone(),
        events.clone(),
        stop.clone(),
    )
    .with_context(|| format!("invalid redis url {}", crate::store::redact_url(&redis_url)))?;
    let cluster = Cluster::new(
        node_id,
        joining.advertise_url,
        config.cluster_secret.clone().unwrap_or_default(),
        config.cluster.clone(),
        config.slots.count,
        joining.db,
        node.clone(),
        fanout,
        joining.incarnation,
        joining.state,
    );
    membership::refresh_view(&cluster).await;
    tokio::spawn(membership::run_view(cluster.clone(), stop.clone()));
    if config.cluster.durability == Durability::Archive.as_str()
        && joining.durability != Durability::Archive
    {
        tokio::spawn(membership::record_archive_durability(
            cluster.clone(),
            stop.clone(),
        ));
    }
    tokio::spawn(rebalancer::run(cluster.clone(), stop.clone()));
    tokio::spawn(crate::cluster::restore::run(cluster.clone(), stop.clone()));
    tokio::spawn(refresh_changed_meta(node, store, events, stop));
    cluster.activate().await;
    Ok(cluster)
}

/// Drops cached descriptions of conversations another node changed.
async fn refresh_changed_meta(
    node: Node,
    store: Store,
    events: crate::inbox::Events,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut changes = events.meta_changes();
    loop {
        let id = tokio::select! {
            c = changes.recv() => match c {
                Ok(id) => id,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return,
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        if node.active_handle(&id).is_some() {
            if let Ok(Some(meta)) = store.conversation(&id).await {
                node.refresh_meta(meta);
            }
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
