//! The README's metrics table (`### Metrics`): metric name -> type, the one list of names that
//! `/metrics` serves (tests/docs.rs) and the dashboard and alerts may use (tests/ops_rules.rs).

use std::collections::BTreeMap;

pub fn metrics_table() -> BTreeMap<String, String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme.split("### Metrics").nth(1).expect("README has a Metrics section");
    let mut listed = BTreeMap::new();
    for line in section.lines().take_while(|l| !l.starts_with("## ")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if let [_, name, kind, ..] = cells[..] {
            if let Some(name) = name.strip_prefix('`').and_then(|n| n.strip_suffix('`')) {
                listed.insert(name.to_string(), kind.to_string());
            }
        }
    }
    listed
}
