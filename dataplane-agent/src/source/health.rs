//! The kube source's health, from what its watches report: which of them fail, since when, and
//! whether the API server answers at all. Pure: the caller passes the time.
use std::collections::BTreeMap;

use super::SourceState;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Failure {
    since_unix_ms: u64,
    error: String,
}

#[derive(Debug, Default)]
pub struct Health {
    /// By resource kind; a kind is absent while its watch works.
    failing: BTreeMap<&'static str, Failure>,
    /// Whether the newest request of any watch got an answer; `None` before the first.
    reachable: Option<bool>,
}

impl Health {
    /// A watch failed. Returns whether this is news (the kind was working, or its error changed),
    /// which is worth a log line; repeats of the same error are not.
    pub fn failed(&mut self, kind: &'static str, error: String, reachable: bool, now_unix_ms: u64) -> bool {
        self.reachable = Some(reachable);
        match self.failing.get_mut(kind) {
            Some(f) if f.error == error => false,
            Some(f) => {
                f.error = error;
                true
            }
            None => {
                self.failing.insert(kind, Failure { since_unix_ms: now_unix_ms, error });
                true
            }
        }
    }

    /// The watch of `kind` works (an event, a list page, or it stayed up after a retry).
    /// Returns whether it was failing.
    pub fn working(&mut self, kind: &'static str) -> bool {
        self.reachable = Some(true);
        self.failing.remove(kind).is_some()
    }

    /// The server answered a request, which says nothing yet about whether the watch works.
    pub fn answered(&mut self) {
        self.reachable = Some(true);
    }

    /// Writes the health into `state`; returns whether it changed. The error shown is that of
    /// the watch failing longest, so several failing watches do not take turns in it.
    pub fn publish(&self, state: &mut SourceState) -> bool {
        let oldest = self.failing.iter().min_by_key(|(_, f)| f.since_unix_ms);
        let last_error = oldest.map(|(kind, f)| format!("{kind} watch: {}", f.error));
        let failing_since = oldest.map(|(_, f)| f.since_unix_ms);
        let changed = state.last_error != last_error || state.failing_since_unix_ms != failing_since || state.api_reachable != self.reachable;
        state.last_error = last_error;
        state.failing_since_unix_ms = failing_since;
        state.api_reachable = self.reachable;
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_and_the_recovery() {
        let mut h = Health::default();
        let mut st = SourceState::default();
        assert!(!h.publish(&mut st), "nothing known yet");
        assert_eq!(st.api_reachable, None);

        h.working("Service");
        assert!(h.publish(&mut st));
        assert_eq!((st.api_reachable, st.last_error.as_deref(), st.failing_since_unix_ms), (Some(true), None, None));

        // The server goes away: every watch fails; the first failure is the one shown.
        assert!(h.failed("Node", "no answer".into(), false, 1_000));
        assert!(h.failed("Service", "no answer".into(), false, 1_200));
        assert!(!h.failed("Node", "no answer".into(), false, 2_000), "a repeat is not news");
        assert!(h.publish(&mut st));
        assert_eq!((st.api_reachable, st.last_error.as_deref(), st.failing_since_unix_ms), (Some(false), Some("Node watch: no answer"), Some(1_000)));
        assert!(!h.publish(&mut st), "unchanged");

        // It answers again, but the watches are not confirmed yet: still failing.
        h.answered();
        assert!(h.publish(&mut st));
        assert_eq!((st.api_reachable, st.failing_since_unix_ms), (Some(true), Some(1_000)));
        assert!(h.working("Node"));
        h.publish(&mut st);
        assert_eq!((st.last_error.as_deref(), st.failing_since_unix_ms), (Some("Service watch: no answer"), Some(1_200)));
        assert!(h.working("Service"));
        assert!(!h.working("Service"));
        assert!(h.publish(&mut st));
        assert_eq!((st.api_reachable, st.last_error.as_deref(), st.failing_since_unix_ms), (Some(true), None, None));
    }

    #[test]
    fn a_refusal_is_reachable_but_failing() {
        let mut h = Health::default();
        let mut st = SourceState::default();
        h.failed("EndpointSlice", "the API server answered 403 Forbidden: no".into(), true, 5);
        h.publish(&mut st);
        assert_eq!(st.api_reachable, Some(true));
        assert_eq!(st.last_error.as_deref(), Some("EndpointSlice watch: the API server answered 403 Forbidden: no"));
        // A new error of a failing watch replaces its text but keeps the time it started failing.
        assert!(h.failed("EndpointSlice", "no answer".into(), false, 9));
        h.publish(&mut st);
        assert_eq!((st.api_reachable, st.failing_since_unix_ms), (Some(false), Some(5)));
    }
}
