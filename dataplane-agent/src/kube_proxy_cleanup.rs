//! `cleanup-kube-proxy`: removes what a kube-proxy left on this node, so that its rules no longer
//! catch Service traffic once this agent serves it: its iptables chains (both address families,
//! and both the nft-based and the legacy iptables backends), its nftables tables, and its IPVS
//! virtual servers, dummy interface and ipsets.
//!
//! The iptables part works like `kube-proxy --cleanup`: first the jumps from the built-in chains
//! into kube-proxy's chains go, then those chains are flushed and deleted, all in one
//! `iptables-restore --noflush` transaction per table. The kubelet's own chains (`KUBE-FIREWALL`,
//! `KUBE-KUBELET-CANARY`, `KUBE-IPTABLES-HINT`, `KUBE-MARK-DROP`) and every rule not about kube-proxy
//! are left as they are.
use std::collections::BTreeSet;
use std::io::Write as _;
use std::process::{Command, Stdio};

use serde::Serialize;

/// `KUBE-` chains that belong to the kubelet, not to kube-proxy.
const KUBELET_CHAINS: &[&str] = &["KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT", "KUBE-MARK-DROP"];

fn is_kube_proxy_chain(chain: &str) -> bool {
    chain.starts_with("KUBE-") && !KUBELET_CHAINS.contains(&chain)
}

/// The `iptables-restore --noflush` input that removes kube-proxy's chains from one
/// `iptables-save` dump, per table; `None` for a table with nothing of kube-proxy's.
pub fn iptables_plan(save: &str) -> Vec<(String, String)> {
    let mut plans = Vec::new();
    let mut table: Option<String> = None;
    let (mut chains, mut unjump) = (BTreeSet::new(), Vec::new());
    for line in save.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = Some(t.to_owned());
            chains.clear();
            unjump.clear();
        } else if let Some(decl) = line.strip_prefix(':') {
            let chain = decl.split_whitespace().next().unwrap_or_default();
            if is_kube_proxy_chain(chain) {
                chains.insert(chain.to_owned());
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or_default();
            let target = rule.split_whitespace().skip_while(|w| *w != "-j" && *w != "-g").nth(1).unwrap_or_default();
            // A rule in a chain that stays (built-in or someone else's) that leads into
            // kube-proxy's chains: delete it first, or the chains cannot be deleted.
            if !is_kube_proxy_chain(chain) && is_kube_proxy_chain(target) {
                unjump.push(format!("-D {rule}"));
            }
        } else if line == "COMMIT"
            && let Some(t) = table.take()
            && !chains.is_empty()
        {
            let mut script = format!("*{t}\n");
            for r in &unjump {
                script.push_str(r);
                script.push('\n');
            }
            for c in &chains {
                script.push_str(&format!("-F {c}\n"));
            }
            for c in &chains {
                script.push_str(&format!("-X {c}\n"));
            }
            script.push_str("COMMIT\n");
            plans.push((t, script));
        }
    }
    plans
}

/// What was removed (or, with `dry_run`, would be).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// `(tool, table, chains removed)`: e.g. `("iptables-nft", "nat", 42)`.
    pub iptables: Vec<(String, String, usize)>,
    /// nftables tables deleted, as `family name`.
    pub nftables: Vec<String>,
    /// IPVS: virtual servers flushed, the dummy interface and ipsets deleted.
    pub ipvs: Vec<String>,
    /// Tools that were not there or failed to read the state; nothing was changed through them.
    pub skipped: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error("{tool} failed ({status}): {stderr}")]
    Tool { tool: String, status: String, stderr: String },
    #[error("running {tool}: {source}")]
    Spawn {
        tool: String,
        #[source]
        source: std::io::Error,
    },
}

fn run(tool: &str, args: &[&str], stdin: Option<&str>) -> Result<String, CleanupError> {
    let spawn = |source| CleanupError::Spawn { tool: tool.to_owned(), source };
    let mut child = Command::new(tool)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).map_err(spawn)?;
    }
    let out = child.wait_with_output().map_err(spawn)?;
    if !out.status.success() {
        return Err(CleanupError::Tool {
            tool: format!("{tool} {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Removes kube-proxy's rules from this network namespace. A tool that is not installed is
/// skipped and reported; a tool that fails while changing something is an error.
pub fn cleanup(dry_run: bool) -> Result<Report, CleanupError> {
    let mut report = Report::default();
    // Both backends: a node may have switched, and either may hold kube-proxy's rules.
    for (save, restore) in [
        ("iptables-nft-save", "iptables-nft-restore"),
        ("ip6tables-nft-save", "ip6tables-nft-restore"),
        ("iptables-legacy-save", "iptables-legacy-restore"),
        ("ip6tables-legacy-save", "ip6tables-legacy-restore"),
    ] {
        let dump = match run(save, &[], None) {
            Ok(d) => d,
            Err(e) => {
                report.skipped.push(format!("{save}: {e}"));
                continue;
            }
        };
        for (table, script) in iptables_plan(&dump) {
            let chains = script.lines().filter(|l| l.starts_with("-X ")).count();
            if !dry_run {
                run(restore, &["--noflush"], Some(&script))?;
            }
            report.iptables.push((restore.trim_end_matches("-restore").to_owned(), table, chains));
        }
    }
    match run("nft", &["list", "tables"], None) {
        Ok(tables) => {
            for t in tables.lines().filter_map(|l| l.strip_prefix("table ")) {
                let mut parts = t.split_whitespace();
                let (Some(family), Some(name)) = (parts.next(), parts.next()) else { continue };
                // kube-proxy's nftables mode keeps everything in one table per family.
                if name == "kube-proxy" && (family == "ip" || family == "ip6") {
                    if !dry_run {
                        run("nft", &["delete", "table", family, name], None)?;
                    }
                    report.nftables.push(format!("{family} {name}"));
                }
            }
        }
        Err(e) => report.skipped.push(format!("nft: {e}")),
    }
    ipvs(dry_run, &mut report)?;
    Ok(report)
}

/// IPVS mode's leftovers: its virtual servers (kube-proxy flushes them all, as here), the
/// `kube-ipvs0` dummy interface holding the Service addresses, and its `KUBE-` ipsets.
fn ipvs(dry_run: bool, report: &mut Report) -> Result<(), CleanupError> {
    match run("ipvsadm", &["-Ln"], None) {
        Ok(list) if list.lines().any(|l| l.starts_with("TCP") || l.starts_with("UDP") || l.starts_with("SCTP")) => {
            if !dry_run {
                run("ipvsadm", &["-C"], None)?;
            }
            report.ipvs.push("virtual servers".into());
        }
        Ok(_) => {}
        Err(e) => report.skipped.push(format!("ipvsadm: {e}")),
    }
    if run("ip", &["link", "show", "kube-ipvs0"], None).is_ok() {
        if !dry_run {
            run("ip", &["link", "delete", "kube-ipvs0"], None)?;
        }
        report.ipvs.push("interface kube-ipvs0".into());
    }
    match run("ipset", &["list", "-n"], None) {
        Ok(sets) => {
            for set in sets.lines().filter(|s| s.starts_with("KUBE-")) {
                if !dry_run {
                    run("ipset", &["destroy", set], None)?;
                }
                report.ipvs.push(format!("ipset {set}"));
            }
        }
        Err(e) => report.skipped.push(format!("ipset: {e}")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::iptables_plan;

    const SAVE: &str = "\
# Generated by iptables-nft-save
*mangle
:PREROUTING ACCEPT [0:0]
:KUBE-IPTABLES-HINT - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:OTHER - [0:0]
-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS
-A INPUT -j KUBE-FIREWALL
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A OTHER -j ACCEPT
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-ABC - [0:0]
:KUBE-SEP-DEF - [0:0]
:KUBE-POSTROUTING - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -j KUBE-SVC-ABC
-A KUBE-SVC-ABC -j KUBE-SEP-DEF
-A KUBE-SEP-DEF -p tcp -j DNAT --to-destination 10.0.0.1:6443
COMMIT
";

    #[test]
    fn removes_kube_proxy_chains_and_the_jumps_into_them_and_nothing_else() {
        let plans = iptables_plan(SAVE);
        let tables: Vec<&str> = plans.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(tables, ["filter", "nat"], "mangle holds only the kubelet's chains");
        let filter = &plans[0].1;
        assert_eq!(
            filter,
            "*filter\n\
             -D INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n\
             -D FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
             -F KUBE-FORWARD\n-F KUBE-NODEPORTS\n-F KUBE-SERVICES\n\
             -X KUBE-FORWARD\n-X KUBE-NODEPORTS\n-X KUBE-SERVICES\n\
             COMMIT\n"
        );
        let nat = &plans[1].1;
        assert!(nat.contains("-D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n"));
        assert!(nat.contains("-X KUBE-SVC-ABC\n") && nat.contains("-X KUBE-SEP-DEF\n") && nat.contains("-X KUBE-POSTROUTING\n"));
        // Jumps between kube-proxy's own chains go with the flush, not one by one.
        assert!(!nat.contains("-D KUBE-SERVICES"), "{nat}");
        assert!(!filter.contains("KUBE-FIREWALL") && !filter.contains("OTHER"), "{filter}");
    }

    #[test]
    fn nothing_of_kube_proxy_means_no_plan() {
        assert!(iptables_plan("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\nCOMMIT\n").is_empty());
        assert!(iptables_plan("").is_empty());
    }
}
