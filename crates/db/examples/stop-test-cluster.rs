//! Stops the shared private PostgreSQL test cluster (`target/tuna-test-pg`) if it runs.
//! `cargo run -p tuna-db --example stop-test-cluster` (scripts/test.sh runs it at the end).
fn main() {
    match tuna_db::testing::stop_test_cluster() {
        Ok(()) => println!(
            "test cluster in {} stopped",
            tuna_db::testing::test_cluster_dir().display()
        ),
        Err(e) => {
            eprintln!("stopping the test cluster failed: {e}");
            std::process::exit(1);
        }
    }
}
