//! A throwaway Postgres database per benchmark run, on a server the caller names with a URL of a
//! user that may `CREATE DATABASE`.

use sqlx::{Connection, Executor, PgConnection};

/// Creates `ferry_bench_<random>` on the server `admin_url` names; returns its name and URL.
pub async fn create_database(admin_url: &str) -> (String, String) {
    let name = format!("ferry_bench_{:016x}", rand::random::<u64>());
    let mut conn = PgConnection::connect(admin_url).await.expect("connect");
    conn.execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .expect("create database");
    let base = admin_url.rsplit_once('/').map_or(admin_url, |(b, _)| b);
    (name.clone(), format!("{base}/{name}"))
}

/// Drops a database made by [`create_database`] (best effort).
pub async fn drop_database(admin_url: &str, name: &str) {
    if let Ok(mut conn) = PgConnection::connect(admin_url).await {
        let _ = conn
            .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
            .await;
    }
}
