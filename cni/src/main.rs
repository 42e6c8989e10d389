//! `dataplane-cni`: the CNI plugin binary. Reads the `CNI_*` environment and the network config on
//! stdin, prints the result (or a CNI error object) on stdout, and exits non-zero on failure.
#![forbid(unsafe_code)]

use std::io::{Read, Write};

use dataplane_cni::spec::{CURRENT_VERSION, Code, ErrorObject};

fn main() {
    let mut stdin = Vec::new();
    let error = |code: Code, msg: String| ErrorObject {
        cni_version: CURRENT_VERSION.into(),
        code: code as u32,
        msg,
        details: String::new(),
    };
    let outcome = match std::io::stdin().read_to_end(&mut stdin) {
        // The runtime must get an error object even from a bug; the default hook's message goes
        // to stderr, which runtimes log.
        Ok(_) => std::panic::catch_unwind(|| {
            dataplane_cni::plugin::run(|k| std::env::var(k).ok(), &stdin)
        })
        .unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(error(Code::Internal, format!("internal error: {what}")))
        }),
        Err(e) => Err(error(Code::Io, format!("cannot read stdin: {e}"))),
    };
    let mut out = std::io::stdout().lock();
    match outcome {
        Ok(text) => {
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        }
        Err(err) => {
            let _ = out.write_all(
                serde_json::to_string(&err)
                    .expect("serialisable")
                    .as_bytes(),
            );
            let _ = out.flush();
            std::process::exit(1);
        }
    }
}
