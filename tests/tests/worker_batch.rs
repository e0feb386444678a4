//! The batch path's SQL against the model: random histories, shuffled with duplicates, applied
//! through `apply_batch` in random batch splits (alone, mixed with single applies, and from
//! racing connections) end exactly where the model does, values and field versions alike.

use avsync_tests::worker_harness::{
    effect_of, model_of, random_history, shuffled_with_duplicates, TestDatabases,
};
use avsync_worker::apply::{self, Model};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::{Connection, PgConnection};
use std::collections::BTreeMap;

/// Cuts `bodies` into consecutive batches of random sizes between 1 and `max`.
fn random_splits(seed: u64, bodies: &[Vec<u8>], max: usize) -> Vec<Vec<Vec<u8>>> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xba7c);
    let mut out = Vec::new();
    let mut rest = bodies;
    while !rest.is_empty() {
        let n = rng.random_range(1..=max).min(rest.len());
        let (batch, tail) = rest.split_at(n);
        out.push(batch.to_vec());
        rest = tail;
    }
    out
}

async fn apply_bodies(conn: &mut PgConnection, batch: &[Vec<u8>], single: bool) {
    let effects: Vec<_> = batch.iter().filter_map(|b| effect_of(b)).collect();
    if single {
        for e in &effects {
            apply::apply(conn, e).await.expect("apply");
        }
    } else {
        apply::apply_batch(conn, &effects)
            .await
            .expect("apply_batch");
    }
}

async fn assert_matches(conn: &mut PgConnection, model: &Model, seed: u64) {
    assert_eq!(
        apply::load_all(conn).await.expect("load"),
        model.identities(),
        "seed {seed}"
    );
    for identity in model.identities() {
        let stored: sqlx::types::Json<BTreeMap<String, String>> =
            sqlx::query_scalar("SELECT field_versions FROM av_identities WHERE id = $1")
                .bind(&identity.id)
                .fetch_one(&mut *conn)
                .await
                .expect("versions");
        assert_eq!(stored.0, model.versions(&identity.id), "seed {seed}");
    }
}

#[tokio::test]
async fn random_histories_in_random_batches_equal_the_model() {
    let dbs = TestDatabases::new("wbatch");
    for seed in 0..16u64 {
        let bodies = random_history(seed, "acme", 5, 80);
        let arrived = shuffled_with_duplicates(seed, &bodies, 40);
        let model = model_of(&bodies);
        let name = format!("s{seed}");
        let mut conn = dbs.migrated(&name).await;
        let batches = random_splits(seed, &arrived, 1 + (seed as usize % 4) * 12);
        match seed % 3 {
            0 => {
                for batch in &batches {
                    apply_bodies(&mut conn, batch, false).await;
                }
            }
            1 => {
                for (i, batch) in batches.iter().enumerate() {
                    apply_bodies(&mut conn, batch, i % 2 == 0).await;
                }
            }
            _ => {
                let url = avsync_tests::support::database_url(&dbs.name(&name));
                let mut tasks = Vec::new();
                for lane in 0..3usize {
                    let mine: Vec<Vec<Vec<u8>>> = batches
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| i % 3 == lane)
                        .map(|(_, b)| b.clone())
                        .collect();
                    let url = url.clone();
                    tasks.push(tokio::spawn(async move {
                        let mut c = PgConnection::connect(&url).await.expect("connect");
                        for batch in &mine {
                            apply_bodies(&mut c, batch, false).await;
                        }
                        let _ = c.close().await;
                    }));
                }
                for t in tasks {
                    t.await.expect("lane");
                }
            }
        }
        assert_matches(&mut conn, &model, seed).await;

        // The whole history once more, as one batch, changes nothing.
        apply_bodies(&mut conn, &arrived, false).await;
        assert_matches(&mut conn, &model, seed).await;
        let _ = conn.close().await;
        avsync_tests::support::drop_database(&dbs.name(&name)).await;
    }
}

/// `updated_at` moves only when a batch changes a value; `synced_at` moves on every batch.
#[tokio::test]
async fn a_replayed_batch_moves_synced_at_but_not_updated_at() {
    let dbs = TestDatabases::new("wbts");
    let mut conn = dbs.migrated("a").await;
    let bodies = random_history(7, "acme", 3, 30);
    apply_bodies(&mut conn, &bodies, false).await;
    let before: Vec<(
        String,
        chrono::DateTime<chrono::Utc>,
        chrono::DateTime<chrono::Utc>,
    )> = sqlx::query_as("SELECT id, updated_at, synced_at FROM av_identities ORDER BY id")
        .fetch_all(&mut conn)
        .await
        .expect("times");
    apply_bodies(&mut conn, &bodies, false).await;
    let after: Vec<(
        String,
        chrono::DateTime<chrono::Utc>,
        chrono::DateTime<chrono::Utc>,
    )> = sqlx::query_as("SELECT id, updated_at, synced_at FROM av_identities ORDER BY id")
        .fetch_all(&mut conn)
        .await
        .expect("times");
    assert_eq!(before.len(), after.len());
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b.1, a.1, "updated_at of {}", b.0);
        assert!(a.2 > b.2, "synced_at of {}", b.0);
    }
    let _ = conn.close().await;
    avsync_tests::support::drop_database(&dbs.name("a")).await;
}
