//! What may be printed, and what is refused.

use std::time::Duration;

use proxypal_ledger::{Backend, Ledger, LedgerConfig, LedgerError};

use crate::common::bounded;

#[test]
fn debug_of_a_postgres_config_hides_the_password() {
    let config = LedgerConfig::postgres("postgres://u:secretpw@host/db");
    let debug = format!("{config:?}");
    assert!(!debug.contains("secretpw"), "{debug}");
    assert!(debug.contains("u:***@host/db"), "{debug}");
    assert!(!format!("{:?}", config.backend).contains("secretpw"));
    assert!(!config.backend.target().contains("secretpw"));

    let conninfo = LedgerConfig::postgres("host=127.0.0.1 user=u password=secretpw dbname=db");
    assert!(!format!("{conninfo:?}").contains("secretpw"));
    let query = LedgerConfig::postgres("postgres://127.0.0.1/db?user=u&password=secretpw");
    assert!(!format!("{query:?}").contains("secretpw"));
}

#[tokio::test]
async fn an_unreachable_postgres_at_start_is_an_error_without_the_password() {
    bounded(Duration::from_secs(30), async {
        // Port 1 on loopback: refused at once.
        let config = LedgerConfig::postgres("postgres://u:secretpw@127.0.0.1:1/db");
        let error = Ledger::start(config).await.unwrap_err();
        let (shown, debug) = (error.to_string(), format!("{error:?}"));
        assert!(matches!(error, LedgerError::Postgres { operation: "connect", .. }), "{debug}");
        assert!(shown.contains("PostgreSQL postgres://u:***@127.0.0.1:1/db"), "{shown}");
        assert!(!shown.contains("secretpw") && !debug.contains("secretpw"), "{shown}\n{debug}");
    })
    .await;
}

#[tokio::test]
async fn a_bad_config_names_the_field() {
    let mut config = LedgerConfig::sqlite(":memory:");
    config.buffer = 0;
    let error = Ledger::start(config).await.unwrap_err();
    assert!(matches!(error, LedgerError::Config { field: "buffer", .. }), "{error}");

    let config =
        LedgerConfig::new(Backend::Postgres { url: "postgres://u:secretpw@127.0.0.1:notaport/db".into() });
    let error = Ledger::start(config).await.unwrap_err();
    assert!(error.to_string().contains("parse the URL"), "{error}");
    assert!(!format!("{error} {error:?}").contains("secretpw"), "{error:?}");
}
