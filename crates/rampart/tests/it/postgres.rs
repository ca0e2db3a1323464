//! `rampart_core::postgres` against a real PostgreSQL (Debian's, installed by
//! `scripts/install-test-tools`): the connection strings it writes connect with every
//! value as written, the WAL positions PostgreSQL prints parse and give lag in bytes, and
//! every `synchronous_standby_names` it gives is one PostgreSQL accepts as written.

use rampart_core::postgres::{conninfo, synchronous_standby_names, Fallback, Lsn, Synchronous};
use rampart_testkit::postgres::Postgres;

/// `text` as an SQL string literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[test]
fn the_core_postgres_pieces_hold_against_a_real_postgresql() {
    let pg = Postgres::start().expect("a PostgreSQL server");
    let port = pg.port.to_string();
    let odd_name = r"pg-'1\x";
    let info = conninfo(&[
        ("host", "127.0.0.1"),
        ("port", &port),
        ("user", "postgres"),
        ("dbname", "postgres"),
        ("application_name", odd_name),
    ]);
    let sql = |text: &str| pg.psql(&info, text).expect(text);
    assert_eq!(sql("SELECT current_setting('application_name')"), odd_name);

    let before_text = sql("SELECT pg_current_wal_lsn()");
    let before: Lsn = before_text.parse().expect("a WAL position");
    assert_eq!(before.to_string(), before_text, "printed as PostgreSQL prints it");
    sql("CREATE TABLE t (v text); INSERT INTO t SELECT repeat('x', 1000) FROM generate_series(1, 200)");
    let after: Lsn = sql("SELECT pg_current_wal_lsn()").parse().expect("a WAL position");
    let bytes = sql(&format!("SELECT pg_wal_lsn_diff('{after}', '{before}')::bigint"));
    assert_eq!(
        before.behind(after).to_string(),
        bytes,
        "lag in bytes as PostgreSQL counts it"
    );
    assert!(before.behind(after) > 100_000);

    let forms = [
        synchronous_standby_names(Synchronous::On, Fallback::Block, &["pg-2", "pg-3"]),
        synchronous_standby_names(Synchronous::Quorum, Fallback::Async, &["pg-2", "pg \"3\""]),
        synchronous_standby_names(Synchronous::On, Fallback::Block, &[]),
        synchronous_standby_names(Synchronous::On, Fallback::Async, &[]),
    ];
    for names in forms {
        sql(&format!(
            "ALTER SYSTEM SET synchronous_standby_names = {}",
            literal(&names)
        ));
        let kept = sql("SELECT setting FROM pg_file_settings WHERE name = 'synchronous_standby_names'");
        assert_eq!(kept, names, "kept as written");
    }
    // And PostgreSQL does refuse a malformed one: the check above can fail.
    let refused = pg.psql(&info, "ALTER SYSTEM SET synchronous_standby_names = 'FIRST 1 ('");
    assert!(refused.is_err(), "{refused:?}");
}
