//! The writer's group commit, its failures, and migrations, against a database in a temp dir.

use super::schema::{MIGRATIONS, SCHEMA};
use super::*;

#[tokio::test]
async fn a_database_of_the_first_release_is_migrated_on_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let old = Connection::open(dir.path().join("characterbot.db")).unwrap();
        old.execute_batch(SCHEMA).unwrap();
        old.execute(
            "INSERT INTO queue_messages (id, queue, body, visible_ms, sent_ms)
             VALUES ('m1', 'persona', '{}', 0, 0)",
            [],
        )
        .unwrap();
    }
    for _ in 0..2 {
        // Twice: opening a migrated database changes nothing.
        let db = Db::open(dir.path()).await.unwrap();
        let (version, attributes) = db
            .call(|c| {
                let v: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0))?;
                let a: String = c.query_row(
                    "SELECT attributes FROM queue_messages WHERE id = 'm1'",
                    [],
                    |r| r.get(0),
                )?;
                Ok((v, a))
            })
            .await
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        assert_eq!(attributes, "{}", "old messages get no attributes");
    }
}

async fn counter_db() -> (tempfile::TempDir, Db) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path()).await.unwrap();
    db.write(|c| Ok(c.execute_batch("CREATE TABLE t (caller INTEGER, n INTEGER)")?))
        .await
        .unwrap();
    (dir, db)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_are_grouped_and_a_failing_one_fails_alone() {
    let (_dir, db) = counter_db().await;
    let mut tasks = tokio::task::JoinSet::new();
    for caller in 0..50i64 {
        let db = db.clone();
        tasks.spawn(async move {
            let mut outcomes = Vec::new();
            for n in 0..20i64 {
                let out = db
                    .write(move |c| {
                        c.execute("INSERT INTO t VALUES (?1, ?2)", [caller, n])?;
                        if n % 7 == 3 {
                            // Fails after writing: its row must be rolled back alone.
                            return Err(Error::Conflict("refused".into()));
                        }
                        Ok(n)
                    })
                    .await;
                outcomes.push(out.is_ok());
            }
            outcomes
        });
    }
    while let Some(outcomes) = tasks.join_next().await {
        let outcomes = outcomes.unwrap();
        let expected: Vec<bool> = (0..20).map(|n| n % 7 != 3).collect();
        assert_eq!(outcomes, expected, "only the refused writes fail");
    }
    let (rows, failed_rows): (i64, i64) = db
        .call(|c| {
            Ok(c.query_row(
                "SELECT COUNT(*), COALESCE(SUM(n % 7 = 3), 0) FROM t",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?)
        })
        .await
        .unwrap();
    assert_eq!((rows, failed_rows), (50 * 17, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_callers_writes_commit_in_the_order_made() {
    let (_dir, db) = counter_db().await;
    let mut tasks = tokio::task::JoinSet::new();
    for caller in 0..20i64 {
        let db = db.clone();
        tasks.spawn(async move {
            for n in 0..25i64 {
                db.write(move |c| {
                    c.execute("INSERT INTO t VALUES (?1, ?2)", [caller, n])?;
                    Ok(())
                })
                .await
                .unwrap();
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let per_caller: Vec<Vec<i64>> = db
        .call(|c| {
            let mut out = vec![Vec::new(); 20];
            let mut stmt = c.prepare("SELECT caller, n FROM t ORDER BY rowid")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?;
            for row in rows {
                let (caller, n) = row?;
                out[caller as usize].push(n);
            }
            Ok(out)
        })
        .await
        .unwrap();
    for ns in per_caller {
        assert_eq!(ns, (0..25).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn reads_cannot_write_and_a_panicking_write_does_not_stop_the_writer() {
    let (_dir, db) = counter_db().await;
    let read_write = db
        .call(|c| Ok(c.execute("INSERT INTO t VALUES (1, 1)", [])?))
        .await;
    assert!(read_write.is_err(), "read connections are read-only");
    let panicked = db
        .write(|c| -> Result<()> {
            c.execute("INSERT INTO t VALUES (2, 2)", [])?;
            panic!("a bug in a write");
        })
        .await;
    assert!(panicked.is_err());
    db.write(|c| Ok(c.execute("INSERT INTO t VALUES (3, 3)", [])?))
        .await
        .unwrap();
    let callers: Vec<i64> = db
        .call(|c| {
            let mut stmt = c.prepare("SELECT caller FROM t")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
        .unwrap();
    assert_eq!(
        callers,
        [3],
        "the panicked write was rolled back, the next one committed"
    );
}

#[tokio::test]
async fn a_failed_commit_keeps_sqlites_error_as_the_source() {
    let (_dir, db) = counter_db().await;
    db.write(|c| {
        Ok(c.execute_batch(
            "CREATE TABLE parent (id INTEGER PRIMARY KEY);
             CREATE TABLE child (parent INTEGER
                 REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)",
        )?)
    })
    .await
    .unwrap();
    // A deferred foreign key is checked at COMMIT: the write itself succeeds, its commit
    // fails.
    let e = db
        .write(|c| Ok(c.execute("INSERT INTO child VALUES (1)", [])?))
        .await
        .expect_err("the commit breaks a foreign key");
    assert!(matches!(e, Error::Storage { .. }) && e.is_transient());
    let source = std::error::Error::source(&e).expect("the commit's error");
    let shared = source
        .downcast_ref::<SharedError<rusqlite::Error>>()
        .expect("sqlite's error, shared by the commit's writes");
    assert_eq!(
        shared.0.sqlite_error_code(),
        Some(rusqlite::ErrorCode::ConstraintViolation)
    );
    let report = crate::error::Report(&e).to_string();
    assert!(
        report.starts_with("storage error: sqlite write failed: FOREIGN KEY constraint failed"),
        "{report}"
    );
}

/// Counts how often a cached statement with `LIMIT ?` is prepared again when run with
/// another bound value.
fn reprepares(c: &Connection) -> Result<i32> {
    use deadpool_sqlite::rusqlite::StatementStatus;
    let sql = "SELECT id FROM queue_messages WHERE queue = ?1 ORDER BY sent_ms LIMIT ?2";
    for limit in [1_i64, 2, 3, 2] {
        let mut stmt = c.prepare_cached(sql)?;
        stmt.query_map(deadpool_sqlite::rusqlite::params!["persona", limit], |r| {
            r.get::<_, String>(0)
        })?
        .for_each(drop);
    }
    let stmt = c.prepare_cached(sql)?;
    Ok(stmt.get_status(StatementStatus::RePrepare))
}

#[tokio::test]
async fn a_cached_statement_is_not_prepared_again_for_each_limit() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path()).await.unwrap();
    assert_eq!(db.write(reprepares).await.unwrap(), 0, "writer");
    assert_eq!(
        db.call(|c| reprepares(c)).await.unwrap(),
        0,
        "pooled reader"
    );
    assert_eq!(db.read_here(reprepares).unwrap(), 0, "reader");
}

/// Whether a statement run before `others` other statements is still prepared after them.
fn kept_among(c: &Connection, others: usize) -> Result<bool> {
    use deadpool_sqlite::rusqlite::StatementStatus;
    let first = "SELECT count(*) FROM queue_messages";
    c.prepare_cached(first)?.query_row([], |_| Ok(()))?;
    for i in 0..others {
        c.prepare_cached(&format!("SELECT {i} FROM queue_messages LIMIT 1"))?
            .query_map([], |_| Ok(()))?
            .for_each(drop);
    }
    // A statement prepared anew has never run.
    let stmt = c.prepare_cached(first)?;
    Ok(stmt.get_status(StatementStatus::Run) == 1)
}

#[tokio::test]
async fn every_statement_of_a_chat_turn_stays_prepared() {
    // A chat turn runs more distinct statements on the writer than rusqlite's default cache
    // (16) holds: most were dropped and parsed again between turns.
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path()).await.unwrap();
    assert!(db.write(|c| kept_among(c, 100)).await.unwrap(), "writer");
    assert!(db.read_here(|c| kept_among(c, 100)).unwrap(), "reader");
}

#[tokio::test]
async fn the_writer_keeps_its_savepoint_journal_in_memory() {
    // 2: MEMORY (see `schema::open_writer`); a journal in a temporary file cost the writer
    // about 30 % of its time under load.
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path()).await.unwrap();
    let temp_store = db
        .write(|c| Ok(c.query_row("PRAGMA temp_store", [], |r| r.get::<_, i64>(0))?))
        .await
        .unwrap();
    assert_eq!(temp_store, 2);
}
