//! The proxy address over rtnetlink (`edgeproxy::address`), in a namespace the test creates,
//! checked against what `ip` sees: add (IPv4 and IPv6, the latter never tentative), adding
//! twice, the holders of an address, removal, and refusals that name the device.
mod support;

use std::net::IpAddr;

use edgeproxy::address::{devices_holding, ensure_address, remove_address};
use support::netns::{require_root, veth, Netns};

fn on<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    ns.thread(f).join().expect("thread in the namespace panicked")
}

#[test]
#[ignore = "needs root: network namespaces (sudo tests/run-all.sh)"]
fn addresses_are_added_listed_and_removed_as_ip_sees_them() {
    require_root();
    let ns = Netns::new("addr");
    let peer = Netns::new("addrp");
    veth(&ns, "edgemesh0", "10.9.0.1/24", &peer, "eth0", "10.9.0.2/24");
    let v4: IpAddr = "169.254.96.16".parse().unwrap();
    let v6: IpAddr = "fd00:e16e::16".parse().unwrap();

    assert!(on(&ns, move || ensure_address("lo", v4)).unwrap(), "added now");
    assert!(!on(&ns, move || ensure_address("lo", v4)).unwrap(), "already there: not ours");
    assert!(on(&ns, move || ensure_address("lo", v6)).unwrap());
    let shown = ns.ok(&["ip", "-o", "addr", "show", "dev", "lo"]);
    assert!(shown.contains("inet 169.254.96.16/32"), "{shown}");
    assert!(shown.contains("inet6 fd00:e16e::16/128"), "{shown}");
    assert!(!shown.contains("tentative"), "IPv6 is usable at once: {shown}");

    // EdgeMesh's bridge holding the same address with another prefix.
    ns.ok(&["ip", "addr", "add", "169.254.96.16/24", "dev", "edgemesh0"]);
    assert_eq!(on(&ns, move || devices_holding(v4)).unwrap(), ["lo", "edgemesh0"]);
    assert_eq!(on(&ns, move || devices_holding(v6)).unwrap(), ["lo"]);

    on(&ns, move || remove_address("lo", v4)).unwrap();
    on(&ns, move || remove_address("lo", v6)).unwrap();
    let shown = ns.ok(&["ip", "-o", "addr", "show", "dev", "lo"]);
    assert!(!shown.contains("169.254.96.16") && !shown.contains("fd00:e16e::16"), "{shown}");
    assert_eq!(on(&ns, move || devices_holding(v4)).unwrap(), ["edgemesh0"], "the other prefix stays");
    // Removing what is not there is no error (a restart after a crash may find it gone).
    on(&ns, move || remove_address("lo", v4)).unwrap();

    let err = on(&ns, move || ensure_address("nosuch0", v4)).unwrap_err().to_string();
    assert!(err.contains("\"nosuch0\"") && err.contains("no such device"), "{err}");
    let err = on(&ns, move || remove_address("nosuch0", v4)).unwrap_err().to_string();
    assert!(err.contains("nosuch0"), "{err}");
}
