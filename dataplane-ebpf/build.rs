fn main() {
    // Re-link when bpf-linker changes (e.g. after `cargo xtask setup` installs a new one).
    println!("cargo:rerun-if-env-changed=PATH");
}
