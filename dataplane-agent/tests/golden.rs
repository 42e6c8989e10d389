//! Golden tests: Kubernetes YAML in (through the manifests source), the model dump out.
use std::path::Path;

use dataplane_agent::model::{self, ModelConfig};
use dataplane_agent::source::manifests;

#[test]
fn golden_cases() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let nodes = std::fs::read_to_string(root.join("nodes.yaml")).unwrap();
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let config = ModelConfig { node_name: Some("node-a".into()), ..Default::default() };
    let mut cases = 0;
    let mut failures = Vec::new();
    let mut dirs: Vec<_> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
    dirs.sort();
    for dir in dirs {
        cases += 1;
        let mut objects = manifests::load_dir(&dir.join("input")).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        manifests::add_documents(&root.join("nodes.yaml"), &nodes, &mut objects).unwrap();
        let got = model::build(&objects, &config).to_json() + "\n";
        let expected_path = dir.join("expected.json");
        if update {
            std::fs::write(&expected_path, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1 to create it)", expected_path.display()));
        if got != want {
            failures.push(format!("{}:\n--- want\n{want}\n--- got\n{got}", dir.display()));
        }
    }
    assert!(cases >= 5, "only {cases} golden cases found under {}", root.display());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
