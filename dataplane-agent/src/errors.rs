//! Error reporting helpers shared by the agent's modules.
use std::error::Error;

/// `error: cause: cause` on one line, for logs, `status` and the HTTP endpoints, where a
/// top-level message alone ("reading x failed") would hide the reason.
pub fn error_chain(e: &dyn Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        // Some errors print their source in their own message (kube's, hyper's): once is enough.
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer: {0}")]
    struct Echo(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("reading x")]
    struct Plain(#[source] std::io::Error);

    #[test]
    fn each_cause_once() {
        let io = || std::io::Error::other("refused");
        assert_eq!(error_chain(&Echo(io())), "outer: refused");
        assert_eq!(error_chain(&Plain(io())), "reading x: refused");
    }
}
