//! The README's promises about configuration, checked against the code: its configuration block
//! loads, and it shows exactly the defaults.

use edgeproxy::config::{Config, Overrides};

/// The first ```json block after the "### Configuration file" heading.
fn readme_config_block() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme.split("### Configuration file").nth(1).expect("README has a Configuration file section");
    let start = section.find("```json\n").expect("a json block in that section") + "```json\n".len();
    let len = section[start..].find("```").expect("the block ends");
    section[start..start + len].to_string()
}

#[test]
fn the_readme_configuration_block_loads_and_shows_the_defaults() {
    let text = readme_config_block();
    let loaded = Config::from_text(&text, "README.md", &Overrides::default())
        .unwrap_or_else(|e| panic!("the README's configuration does not load: {e}\n{text}"));
    assert_eq!(loaded, Config::defaults(), "the README's block is not the defaults");
}
