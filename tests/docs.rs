//! The README's promises about configuration, checked against the code: its configuration block
//! loads, and it shows exactly the defaults.

mod support;

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

/// `run --help`'s options, each with its description on one line.
fn run_help_options() -> Vec<(String, String)> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edgeproxy")).args(["run", "--help"]).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let mut options: Vec<(String, String)> = Vec::new();
    for line in text.lines().skip_while(|l| !l.starts_with("Options:")).skip(1) {
        let trimmed = line.trim();
        if let Some(rest) = trimmed.strip_prefix("--") {
            let (flag, desc) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            options.push((flag.trim_end_matches(',').to_string(), desc.trim().to_string()));
        } else if let Some(last) = options.last_mut() {
            last.1.push(' ');
            last.1.push_str(trimmed);
        }
    }
    options
}

/// The value a description names as the default: `X (default)`, `(X, default)`, `(default X)`;
/// `None` when it names none or an environment variable.
fn stated_default(desc: &str) -> Option<String> {
    let at = desc.find("(default")?;
    let after = &desc[at + "(default".len()..];
    if let Some(v) = after.strip_prefix(' ') {
        return Some(v.split(')').next()?.trim().to_string());
    }
    if after.starts_with(':') && after.contains('$') {
        return None;
    }
    // `X (default)` or `X (default: ...)`: the word before.
    desc[..at].split_whitespace().last().map(|w| w.trim_end_matches(':').to_string())
}

/// The flag help and the code say the same defaults: each default the help states, given as the
/// flag, yields exactly the built-in configuration.
#[test]
fn the_flag_help_states_the_defaults_the_code_has() {
    let mut checked = Vec::new();
    for (flag, desc) in run_help_options() {
        if flag == "config" {
            assert!(desc.contains(edgeproxy::config::defaults::PATH), "--config: {desc}");
            continue;
        }
        let value = match stated_default(&desc) {
            Some(v) => v,
            None if desc.contains("(true, default)") => "true".into(),
            None => continue,
        };
        let mut o = Overrides::default();
        let name: &'static str = Box::leak(flag.clone().into_boxed_str());
        o.set(name, Some(value.clone()));
        let c = Config::from_text("{}", "test", &o).unwrap_or_else(|e| panic!("--{flag} {value}: {e}"));
        assert_eq!(c, Config::defaults(), "--{flag}: the help says the default is {value:?}, the code differs");
        checked.push(flag);
    }
    assert!(checked.len() >= 14, "too few stated defaults found: {checked:?}");
}

/// The README's metrics table lists every metric `/metrics` serves, with its type, and nothing
/// else.
#[test]
fn the_readme_lists_every_metric_with_its_type() {
    let listed = support::readme::metrics_table();
    // Everything /metrics can serve: the registry, the proxy's counters, the process.
    let ops = edgeproxy::ops::Ops::new();
    ops.metrics.plan(&edgeproxy::ops::PlanCounts::default(), "portals");
    ops.metrics.watch_restart("services");
    ops.metrics.relist("services");
    ops.metrics.request("LIST", Some(200), std::time::Duration::ZERO);
    ops.metrics.refused(&[("a/web:http".to_string(), 1)]);
    let web = ops.proxy.service("a/web:http");
    web.tcp.store(true, std::sync::atomic::Ordering::Relaxed);
    ops.proxy.endpoint("a/web:http", "192.0.2.1:80".parse().unwrap());
    let mut text = ops.metrics.registry.render();
    edgeproxy::ops::render_proxy(&ops.proxy, &mut text);
    edgeproxy::ops::process::render_process(&mut text);
    let served: std::collections::BTreeMap<String, String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(n, k)| (n.to_string(), k.to_string()))
        .collect();
    assert_eq!(listed, served, "README's metrics table vs what /metrics serves");
}
