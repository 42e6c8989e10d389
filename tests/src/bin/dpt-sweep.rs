//! `dpt-sweep [--all] [--quiet]`: removes test namespaces, cgroups, pins and links left by runs
//! that were killed. `cargo xtask test` runs it before the tests (for earlier crashed runs) and
//! after them (for tests killed in this run; their pids are dead by then). `--all` also removes
//! objects of live processes: use it only when no test run is going on. `--quiet` prints nothing
//! when there was nothing to remove.
fn main() {
    let all = std::env::args().any(|a| a == "--all");
    let quiet = std::env::args().any(|a| a == "--quiet");
    let swept = dataplane_tests::sweep::sweep_leftovers(all);
    if swept.is_empty() {
        if !quiet {
            println!("sweep: nothing left behind");
        }
    } else {
        println!("sweep: removed leftovers: {swept:?}");
    }
}
