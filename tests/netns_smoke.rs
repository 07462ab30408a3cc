//! The namespace helper itself: a namespace is created, isolated and removed.
mod support;
use support::netns::{require_root, veth, Netns};

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn namespaces_are_isolated_and_removed() {
    require_root();
    let name;
    {
        let a = Netns::new("smk");
        let b = Netns::new("smk");
        veth(&a, "eth0", "10.200.0.1/24", &b, "eth0", "10.200.0.2/24");
        a.ok(&["ping", "-c1", "-W2", "10.200.0.2"]);
        name = a.name.clone();
        let listed =
            String::from_utf8_lossy(&std::process::Command::new("ip").args(["netns", "list"]).output().unwrap().stdout)
                .into_owned();
        assert!(listed.contains(&name));
    }
    let listed =
        String::from_utf8_lossy(&std::process::Command::new("ip").args(["netns", "list"]).output().unwrap().stdout)
            .into_owned();
    assert!(!listed.contains(&name), "namespace {name} left behind");
}
