//! `dataplane-cni`: the CNI plugin binary. Reads the `CNI_*` environment and the network config on
//! stdin, prints the result (or a CNI error object) on stdout, and exits non-zero on failure.
use std::io::{Read, Write};

fn main() {
    let mut stdin = Vec::new();
    let outcome = match std::io::stdin().read_to_end(&mut stdin) {
        Ok(_) => dataplane_cni::plugin::run(|k| std::env::var(k).ok(), &stdin),
        Err(e) => Err(dataplane_cni::spec::ErrorObject {
            cni_version: dataplane_cni::spec::CURRENT_VERSION.into(),
            code: dataplane_cni::spec::Code::Io as u32,
            msg: format!("cannot read stdin: {e}"),
            details: String::new(),
        }),
    };
    let mut out = std::io::stdout().lock();
    match outcome {
        Ok(text) => {
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        }
        Err(err) => {
            let _ = out.write_all(serde_json::to_string(&err).expect("serialisable").as_bytes());
            let _ = out.flush();
            std::process::exit(1);
        }
    }
}
