//! The store on a real PostgreSQL server (started by the test on a free loopback port): the same
//! round trip and lease as on SQLite, and a server restart survived without a restart of ours.

use understudy_testkit::postgres::PgServer;

use super::*;

fn target(server: &PgServer) -> PgTarget {
    server
        .url()
        .parse()
        .expect("the harness gives a postgres URL")
}

#[test]
fn the_store_keeps_and_fences_alike_on_postgres_and_outlives_a_server_restart() {
    let mut server = PgServer::start();
    let mut store = Store::open_postgres(&target(&server)).unwrap();
    assert_eq!(store.dialect(), Dialect::Postgres);
    super::tests::round_trip(&mut store);
    // A second controller opening the same database finds the tables and the data there.
    let mut other = Store::open_postgres(&target(&server)).unwrap();
    assert_eq!(other.rollouts().unwrap(), store.rollouts().unwrap());
    crate::store::lease::tests::take_turns(&mut store, &mut other);
    store.set_fence(Fence::Open);

    // u64 values (hub sequence numbers) keep every bit, and a number never moves back.
    let high = u64::MAX / 2 + 7;
    store
        .write(|tx| save_hub_sequences(tx, &[("m-1".into(), high)]))
        .unwrap();
    store
        .write(|tx| save_hub_sequences(tx, &[("m-1".into(), 5)]))
        .unwrap();
    assert_eq!(store.hub_sequences().unwrap()["m-1"], high);

    server.stop();
    let away = store.services();
    assert!(
        matches!(
            away,
            Err(StoreError::Unreachable { .. }) | Err(StoreError::Postgres(_))
        ),
        "{away:?}"
    );
    let shown = away.unwrap_err().to_string();
    assert!(shown.contains(&server.port().to_string()), "{shown}");
    server.start_again();
    // The next call connects again by itself.
    let again = (0..20).find_map(|_| {
        let r = store.services().ok();
        if r.is_none() {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        r
    });
    assert_eq!(again.map(|s| s.len()), Some(1));
}

#[test]
fn a_store_that_cannot_be_reached_is_named_at_once() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/understudy");
    let err = Store::open_postgres(&url.parse().unwrap())
        .err()
        .expect("nothing listens there");
    let shown = err.to_string();
    assert!(matches!(err, StoreError::Unreachable { .. }), "{shown}");
    assert!(shown.contains(&format!("127.0.0.1:{port}")), "{shown}");
}
