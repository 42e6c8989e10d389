//! Error reporting helpers shared by the agent's modules.
use std::error::Error;

/// `error: cause: cause` on one line, for logs, `status` and the HTTP endpoints, where a
/// top-level message alone ("reading x failed") would hide the reason.
pub fn error_chain(e: &dyn Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
