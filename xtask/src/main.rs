//! `cargo xtask <command>`: set-up, tests, the demo and benchmarks.
//!
//! xtask depends on nothing that needs the eBPF toolchain, so it builds on a fresh machine before
//! `setup` has installed bpf-linker and friends.
use clap::{Parser, Subcommand};

mod bench;
mod demo;
mod k8s;
mod setup;
mod test;
mod util;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, test, demo and benchmark the dataplane", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what this machine lacks (Debian packages, bpf-linker, rust-src, the Kubernetes binaries the
    /// tests run); skips what is there.
    Setup,
    /// Set up, then build everything including the eBPF object.
    Build {
        /// Build in release mode.
        #[arg(long)]
        release: bool,
    },
    /// Set up, then run every test: unit tests first, then the kernel and integration tests.
    Test {
        /// Extra arguments passed to each `cargo nextest run` (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, build, and run the demo: a real kube-apiserver and a 3-node virtual cluster in
    /// network namespaces, with real traffic through the data plane.
    Demo {
        /// Feed the agents a manifests directory instead of the API server (no Kubernetes binaries).
        #[arg(long)]
        standalone: bool,
    },
    /// Run a benchmark in release mode and write target/bench/<name>.json.
    Bench {
        /// Which benchmark.
        #[arg(value_enum)]
        name: bench::Name,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    util::prepare_env();
    match cli.command {
        Command::Setup => setup::run(),
        Command::Build { release } => {
            setup::run()?;
            util::cargo(&["build"], release)
        }
        Command::Test { args } => {
            setup::run()?;
            test::run(&args)
        }
        Command::Demo { standalone } => {
            setup::run_with(!standalone)?;
            demo::run(standalone)
        }
        Command::Bench { name } => {
            setup::run()?;
            bench::run(name)
        }
    }
}
