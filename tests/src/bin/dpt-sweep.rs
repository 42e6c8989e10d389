//! `dpt-sweep [--all]`: removes test namespaces, cgroups, pins and links left by killed runs.
//! `cargo xtask test` runs it before the tests (for earlier crashed runs) and, with `--all`,
//! after them (for tests killed in this run).
fn main() {
    let all = std::env::args().any(|a| a == "--all");
    let swept = dataplane_tests::sweep::sweep_leftovers(all);
    if swept.is_empty() {
        println!("sweep: nothing left behind");
    } else {
        println!("sweep: removed leftovers: {swept:?}");
    }
}
