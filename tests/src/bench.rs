//! The one shape every benchmark reports in (../shared/DESIGN.md "Benchmarks"): a table for people
//! and `target/bench/<name>.json` for machines.
//!
//! Figures carry their unit in the name (`miss_ns`, `add_del_p50_us`); each is a median (or a
//! percentile) over several repetitions, never a single run. Ratios compare our path with a
//! baseline measured in the same run. Goals are there to be read, not asserted.
use std::{collections::BTreeMap, path::PathBuf};

use serde_json::json;

#[derive(Debug, Default)]
pub struct Report {
    pub name: String,
    pub figures: BTreeMap<String, f64>,
    pub ratios: BTreeMap<String, f64>,
    pub goals: BTreeMap<String, String>,
}

impl Report {
    pub fn new(name: &str) -> Report {
        Report { name: name.to_owned(), ..Report::default() }
    }

    pub fn figure(&mut self, name: &str, value: f64) -> &mut Self {
        self.figures.insert(name.to_owned(), value);
        self
    }

    pub fn ratio(&mut self, name: &str, value: f64) -> &mut Self {
        self.ratios.insert(name.to_owned(), value);
        self
    }

    /// `goal` is a comparison such as `"<= 2.0"` on the ratio or figure called `name`.
    pub fn goal(&mut self, name: &str, goal: &str) -> &mut Self {
        self.goals.insert(name.to_owned(), goal.to_owned());
        self
    }

    fn met(&self, name: &str) -> Option<bool> {
        let goal = self.goals.get(name)?;
        let value = self.ratios.get(name).or_else(|| self.figures.get(name))?;
        let (op, rhs) = goal.trim().split_once(' ')?;
        let rhs: f64 = rhs.trim().parse().ok()?;
        Some(match op {
            "<=" => *value <= rhs,
            "<" => *value < rhs,
            ">=" => *value >= rhs,
            ">" => *value > rhs,
            _ => return None,
        })
    }

    /// The table a person reads: every figure and ratio, with its goal and whether it is met.
    pub fn table(&self) -> String {
        let mut out = format!("benchmark {}\n", self.name);
        let width = self.figures.keys().chain(self.ratios.keys()).map(String::len).max().unwrap_or(10);
        for (kind, map) in [("figure", &self.figures), ("ratio", &self.ratios)] {
            for (k, v) in map {
                let goal = match (self.goals.get(k), self.met(k)) {
                    (Some(g), Some(true)) => format!("goal {g}: met"),
                    (Some(g), Some(false)) => format!("goal {g}: NOT met"),
                    (Some(g), None) => format!("goal {g}"),
                    (None, _) => String::new(),
                };
                out.push_str(&format!("  {kind:6} {k:width$}  {v:>12.3}  {goal}\n"));
            }
        }
        out
    }

    pub fn to_json(&self) -> serde_json::Value {
        let unix_time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        json!({
            "name": self.name,
            "unix_time": unix_time,
            "machine": machine(),
            "figures": self.figures,
            "ratios": self.ratios,
            "goals": self.goals,
        })
    }

    /// Prints the table and writes `target/bench/<name>.json` under the workspace; returns its path.
    pub fn finish(&self) -> PathBuf {
        print!("{}", self.table());
        let dir = workspace_root().join("target").join("bench");
        std::fs::create_dir_all(&dir).expect("create target/bench");
        let path = dir.join(format!("{}.json", self.name));
        let text = serde_json::to_string_pretty(&self.to_json()).expect("serialise report");
        std::fs::write(&path, text + "\n").expect("write the benchmark report");
        println!("wrote {}", path.display());
        path
    }
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().map(PathBuf::from).unwrap_or_default()
}

/// Cores and kernel release of this machine.
pub fn machine() -> serde_json::Value {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    json!({ "cores": cores, "kernel": kernel })
}

/// The median of `values` (which it sorts). Panics on an empty slice: a benchmark without samples
/// is a bug, not a figure.
pub fn median(values: &mut [f64]) -> f64 {
    percentile(values, 50.0)
}

/// The `p`-th percentile (nearest rank) of `values`, which it sorts.
pub fn percentile(values: &mut [f64], p: f64) -> f64 {
    assert!(!values.is_empty(), "no samples");
    values.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v = vec![5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(median(&mut v), 3.0);
        assert_eq!(percentile(&mut v, 99.0), 5.0);
        assert_eq!(percentile(&mut v, 0.0), 1.0);
    }

    #[test]
    fn goals_are_judged_against_ratios_and_figures() {
        let mut r = Report::new("t");
        r.ratio("a_vs_b", 1.5).goal("a_vs_b", "<= 2.0").figure("x_ms", 3.0).goal("x_ms", "<= 2");
        assert_eq!(r.met("a_vs_b"), Some(true));
        assert_eq!(r.met("x_ms"), Some(false));
        let table = r.table();
        assert!(table.contains("goal <= 2.0: met"), "{table}");
        assert!(table.contains("NOT met"), "{table}");
        let j = r.to_json();
        assert_eq!(j["ratios"]["a_vs_b"], 1.5);
        assert!(j["machine"]["cores"].as_u64().unwrap() >= 1);
    }
}
