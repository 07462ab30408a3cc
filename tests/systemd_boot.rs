//! The systemd unit as an operator uses it, under a real systemd: `tests/systemd/boot.sh` boots
//! Debian 12 with systemd as PID 1 in a systemd-nspawn container (its own network namespace:
//! nothing touches the host's rules or addresses), installs this build of `edgeproxy` with
//! `systemd/edgeproxy.service` and `edgeproxy.tmpfiles`, enables the unit and checks: it is up
//! after boot; `systemctl start` returns after READY=1 (Type=notify); the watchdog (30 s as
//! shipped, and 2 s from a drop-in) never fires; `systemctl stop` leaves the nat table and lo's
//! addresses as they were before the first start; journal priorities are real (the guard's
//! "rules repaired" at warning, "ready" at info only); `systemctl reload` with an invalid config
//! keeps serving; `systemctl restart` under a connection every 10 ms loses at most 500 ms; a
//! second `edgeproxy run` by hand is refused by the lock. The script prints PASS or FAIL with the
//! figures for each check; this test passes when all of them pass.
//!
//! Cost: root, network (once) and about 300 MB of disk. The first run makes the container's root
//! with debootstrap from the machine's Debian mirror (about 70 s) and caches it as a tarball in
//! `${EDGEPROXY_CACHE:-~/.cache/edgeproxy}/systemd-root/`; later runs unpack it (a few seconds),
//! boot it and run the checks in about 45 s. Needs systemd-nspawn (Debian's systemd-container)
//! and debootstrap; tests/setup.sh installs both.

use std::path::Path;
use std::process::Command;

#[test]
#[ignore = "needs root: systemd-nspawn boots Debian 12 (sudo tests/run-all.sh)"]
fn the_unit_under_systemd_in_a_debian_12_container() {
    assert!(
        edgeproxy::sys::is_root(),
        "this test needs root (debootstrap, systemd-nspawn): run it with sudo tests/run-all.sh"
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/systemd/boot.sh");
    let status = Command::new("bash")
        .arg(&script)
        .arg(env!("CARGO_BIN_EXE_edgeproxy"))
        .status()
        .unwrap_or_else(|e| panic!("cannot run bash {}: {e}", script.display()));
    assert!(status.success(), "{} failed ({status}): see the FAIL lines above", script.display());
}
