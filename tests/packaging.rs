//! Shipping checks: the OpenWrt .ipk built from the real binary, the procd init script (under
//! shellcheck and against a stub of procd's and UCI's shell helpers), the systemd unit
//! (`systemd-analyze verify` and `security`), its tmpfiles entry and sample config.
//!
//! Needs shellcheck, GNU tar, gzip and systemd-analyze / systemd-tmpfiles (Debian's systemd);
//! tests/setup.sh installs them. A missing tool fails the test, never skips it.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

const BIN: &str = env!("CARGO_BIN_EXE_edgeproxy");

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("ep-pkg-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn output(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (is it installed? see tests/setup.sh)"))
}

/// Run; panic with its output unless it succeeds; return stdout.
fn ok(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cargo_version() -> String {
    let toml = fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    toml.lines()
        .find_map(|l| l.strip_prefix("version = \"").and_then(|v| v.strip_suffix('"')))
        .expect("version in Cargo.toml")
        .to_string()
}

// ----------------------------------------------------------------------------------------------
// .ipk

/// `tar -tv` lines -> (path, mode string, owner/group).
fn tar_listing(archive: &Path) -> Vec<(String, String, String)> {
    let text = ok(Command::new("tar").arg("--numeric-owner").arg("-tvzf").arg(archive));
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() >= 6, "unexpected tar line {l:?}");
            (f[f.len() - 1].to_string(), f[0].to_string(), f[1].to_string())
        })
        .collect()
}

fn control_fields(text: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with(' ')) {
        let (k, v) = line.split_once(": ").unwrap_or_else(|| panic!("bad control line {line:?}"));
        assert!(m.insert(k.to_string(), v.to_string()).is_none(), "field {k} twice");
    }
    m
}

#[test]
fn ipk_from_built_binary_has_control_fields_files_and_modes() {
    let out = TempDir::new("ipk");
    let printed =
        ok(Command::new(repo().join("openwrt/build-ipk.sh")).arg(BIN).arg(out.path()).arg("aarch64_cortex-a53"));
    let version = format!("{}-1", cargo_version());
    let ipk = out.path().join(format!("edgeproxy_{version}_aarch64_cortex-a53.ipk"));
    assert_eq!(printed.trim(), ipk.to_str().unwrap());

    // Outer archive: gzip'ed tar of exactly these three members, in opkg's order.
    let outer = tar_listing(&ipk);
    let names: Vec<&str> = outer.iter().map(|(p, _, _)| p.as_str()).collect();
    assert_eq!(names, ["./debian-binary", "./data.tar.gz", "./control.tar.gz"]);
    let unpacked = TempDir::new("ipk-x");
    ok(Command::new("tar").arg("-xzf").arg(&ipk).arg("-C").arg(unpacked.path()));
    assert_eq!(fs::read_to_string(unpacked.path().join("debian-binary")).unwrap(), "2.0\n");

    // Control.
    let ctl = unpacked.path().join("control.tar.gz");
    let ctl_names: Vec<String> = tar_listing(&ctl).into_iter().map(|(p, _, _)| p).collect();
    assert_eq!(ctl_names, ["./", "./conffiles", "./control", "./postinst", "./prerm"]);
    let control = ok(Command::new("tar").arg("-xOzf").arg(&ctl).arg("./control"));
    let f = control_fields(&control);
    assert_eq!(f["Package"], "edgeproxy");
    assert_eq!(f["Version"], version);
    assert_eq!(f["Architecture"], "aarch64_cortex-a53");
    assert_eq!(f["Depends"], "iptables-nft, kmod-ipt-nat");
    assert_eq!(f["License"], "Apache-2.0");
    assert_eq!(f["Section"], "net");
    assert!(f["Description"].contains("ClusterIP"), "{control}");
    for k in ["Maintainer", "Source", "SourceName", "Priority"] {
        assert!(f.contains_key(k), "{k} missing from\n{control}");
    }
    let conffiles = ok(Command::new("tar").arg("-xOzf").arg(&ctl).arg("./conffiles"));
    assert_eq!(conffiles, "/etc/config/edgeproxy\n");
    let postinst = ok(Command::new("tar").arg("-xOzf").arg(&ctl).arg("./postinst"));
    assert!(postinst.contains("default_postinst"), "{postinst}");

    // Data: files, modes, owners; the binary is the one we gave.
    let data = unpacked.path().join("data.tar.gz");
    let listing = tar_listing(&data);
    let files: BTreeMap<&str, (&str, &str)> = listing
        .iter()
        .filter(|(_, m, _)| m.starts_with('-'))
        .map(|(p, m, o)| (p.as_str(), (m.as_str(), o.as_str())))
        .collect();
    let expect = BTreeMap::from([
        ("./etc/config/edgeproxy", ("-rw-------", "0/0")),
        ("./etc/init.d/edgeproxy", ("-rwxr-xr-x", "0/0")),
        ("./usr/sbin/edgeproxy", ("-rwxr-xr-x", "0/0")),
    ]);
    assert_eq!(files, expect);
    for (p, m, o) in &listing {
        assert_eq!(o, "0/0", "{p} owned by root");
        if m.starts_with('d') {
            assert_eq!(m, "drwxr-xr-x", "{p}");
        }
    }
    let bytes = output(Command::new("tar").arg("-xOzf").arg(&data).arg("./usr/sbin/edgeproxy")).stdout;
    assert!(bytes == fs::read(BIN).unwrap(), "the packaged binary differs from {BIN}");
    let init = output(Command::new("tar").arg("-xOzf").arg(&data).arg("./etc/init.d/edgeproxy")).stdout;
    assert_eq!(init, fs::read(repo().join("openwrt/edgeproxy/files/edgeproxy.init")).unwrap());
    let installed: u64 = f["Installed-Size"].parse().unwrap();
    let sum = bytes.len() as u64
        + init.len() as u64
        + fs::metadata(repo().join("openwrt/edgeproxy/files/edgeproxy.config")).unwrap().len();
    assert_eq!(installed, sum, "Installed-Size is the sum of the file sizes");
}

#[test]
fn ipk_is_reproducible() {
    let (a, b) = (TempDir::new("ipk-a"), TempDir::new("ipk-b"));
    let build = |d: &Path| {
        let p = ok(Command::new(repo().join("openwrt/build-ipk.sh"))
            .arg(BIN)
            .arg(d)
            .arg("x86_64")
            .env("SOURCE_DATE_EPOCH", "1700000000"));
        fs::read(p.trim()).unwrap()
    };
    assert!(build(a.path()) == build(b.path()), "two builds of the same input differ");
}

#[test]
fn build_ipk_refuses_bad_input_with_a_reason() {
    let out = TempDir::new("ipk-bad");
    let script = repo().join("openwrt/build-ipk.sh");
    let cases: [(&str, Option<&str>, &str); 4] = [
        ("/nonexistent/edgeproxy", Some("x86_64"), "no such file"),
        ("Cargo.toml", Some("x86_64"), "not executable"),
        ("openwrt/build-ipk.sh", Some("x86_64"), "not an ELF binary"),
        (BIN, Some("x86 64"), "not a valid architecture name"),
    ];
    for (bin, arch, why) in cases {
        let mut cmd = Command::new(&script);
        cmd.current_dir(repo()).arg(bin).arg(out.path());
        if let Some(a) = arch {
            cmd.arg(a);
        }
        let o = output(&mut cmd);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(why),
            "{bin} {arch:?}: want failure with {why:?}, got {}: {err}",
            o.status
        );
    }
    let o = output(Command::new(&script).arg(BIN));
    assert_eq!(o.status.code(), Some(2), "usage error without OUTDIR");
    assert!(fs::read_dir(out.path()).unwrap().next().is_none(), "no package left behind");
}

// ----------------------------------------------------------------------------------------------
// Shell scripts

#[test]
#[ignore = "needs shellcheck (tests/setup.sh installs it)"]
fn shell_scripts_are_shellcheck_clean() {
    let scripts = [
        "openwrt/edgeproxy/files/edgeproxy.init",
        "openwrt/build-ipk.sh",
        "cross/build.sh",
        "cross/test-aarch64.sh",
        "cross/smoke-armv7.sh",
        "tests/setup.sh",
        "tests/run-all.sh",
        "tests/demo.sh",
        "tests/fresh-machine.sh",
        "fuzz/run.sh",
        "tests/systemd/boot.sh",
        ".ci/run",
    ];
    for s in scripts {
        let path = repo().join(s);
        assert!(path.exists(), "{s} missing");
        ok(Command::new("shellcheck").arg("--severity=style").arg(&path));
    }
}

#[test]
#[ignore = "needs shellcheck (tests/setup.sh installs it)"]
fn shellcheck_catches_a_planted_problem() {
    // The check above only means something if shellcheck flags the init script's dialect.
    let dir = TempDir::new("sc");
    let text = fs::read_to_string(repo().join("openwrt/edgeproxy/files/edgeproxy.init")).unwrap();
    let bad = dir.path().join("bad.init");
    fs::write(
        &bad,
        text.replace("procd_append_param command \"--$2\" \"$value\"", "procd_append_param command --$2 $value"),
    )
    .unwrap();
    let o = output(Command::new("shellcheck").arg(&bad));
    assert!(!o.status.success(), "shellcheck accepted unquoted expansions");
}

// ----------------------------------------------------------------------------------------------
// procd init script against stubs

/// Stubs of OpenWrt's /lib/functions.sh (config_*) and /lib/functions/procd.sh (procd_*), with
/// the same semantics for what the init script uses. procd calls are recorded one per line,
/// arguments separated by \x1f, into $PROCD_LOG.
const STUB: &str = r#"
config_load() { _rec config_load "$@"; . "$UCI_STATE/$1.sh"; }
config_get() {
	case $# in
	4) eval "$1=\"\${CONFIG_${2}_${3}:-\$4}\"" ;;
	3) eval "$1=\"\${CONFIG_${2}_${3}:-}\"" ;;
	*) echo "stub config_get: bad arguments: $*" >&2; exit 99 ;;
	esac
}
config_get_bool() {
	local _b
	config_get _b "$2" "$3" "$4"
	case "$_b" in
	1|on|true|yes|enabled) _b=1 ;;
	0|off|false|no|disabled) _b=0 ;;
	*) _b="$4" ;;
	esac
	eval "$1=\$_b"
}
config_list_foreach() {
	local _s="$1" _o="$2" _f="$3" _n _i=1 _v
	shift 3
	eval "_n=\${CONFIG_${_s}_${_o}_LENGTH:-0}"
	while [ "$_i" -le "$_n" ]; do
		eval "_v=\${CONFIG_${_s}_${_o}_ITEM${_i}}"
		"$_f" "$_v" "$@"
		_i=$((_i + 1))
	done
}
_rec() {
	printf '%s' "$1" >>"$PROCD_LOG"
	shift
	for _a in "$@"; do printf '\037%s' "$_a" >>"$PROCD_LOG"; done
	printf '\n' >>"$PROCD_LOG"
}
procd_open_instance() { _rec procd_open_instance "$@"; }
procd_set_param() { _rec procd_set_param "$@"; }
procd_append_param() { _rec procd_append_param "$@"; }
procd_close_instance() { _rec procd_close_instance "$@"; }
procd_add_reload_trigger() { _rec procd_add_reload_trigger "$@"; }
"#;

/// UCI text -> shell assignments as OpenWrt's config_load leaves them (options of named
/// sections; lists as _LENGTH/_ITEMn).
fn uci_to_shell(uci: &str) -> String {
    let mut out = String::new();
    let mut section = String::new();
    let mut lists: BTreeMap<String, usize> = BTreeMap::new();
    let q = |s: &str| format!("'{}'", s.replace('\'', "'\\''"));
    for line in uci.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (kw, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let (name, value) = rest.trim().split_once(char::is_whitespace).unwrap_or((rest.trim(), ""));
        let value = value.trim().trim_matches('\'');
        let name = name.trim_matches('\'');
        match kw {
            "config" => section = value.to_string(),
            "option" => out += &format!("CONFIG_{section}_{name}={}\n", q(value)),
            "list" => {
                let n = lists.entry(format!("{section}_{name}")).or_default();
                *n += 1;
                out += &format!("CONFIG_{section}_{name}_ITEM{n}={}\nCONFIG_{section}_{name}_LENGTH={n}\n", q(value));
            }
            other => panic!("uci keyword {other:?} in {line:?}"),
        }
    }
    out
}

#[derive(Debug, Default, PartialEq)]
struct Procd {
    /// Each instance: param -> values (set replaces, append extends), as procd keeps them.
    instances: Vec<BTreeMap<String, Vec<String>>>,
    reload_triggers: Vec<String>,
    config_loads: Vec<String>,
}

/// Source the stubs and the init script in dash (the closest to busybox ash here), run `calls`,
/// and replay the record.
fn run_init(uci: &str, calls: &str, extra: &str) -> (Procd, Output) {
    let dir = TempDir::new("procd");
    let state = dir.path().join("uci");
    fs::create_dir_all(&state).unwrap();
    fs::write(state.join("edgeproxy.sh"), uci_to_shell(uci)).unwrap();
    fs::write(dir.path().join("stub.sh"), STUB).unwrap();
    let log = dir.path().join("procd.log");
    fs::write(&log, "").unwrap();
    let init = repo().join("openwrt/edgeproxy/files/edgeproxy.init");
    let script = format!(". \"$STUB\"\n. \"$INIT\"\n{extra}\n{calls}\n");
    let out = output(
        Command::new("dash")
            .arg("-c")
            .arg(script)
            .env("STUB", dir.path().join("stub.sh"))
            .env("INIT", &init)
            .env("UCI_STATE", &state)
            .env("PROCD_LOG", &log)
            .env("STUB_DIR", dir.path()),
    );
    assert!(out.status.success(), "init script failed: {}", String::from_utf8_lossy(&out.stderr));
    let mut p = Procd::default();
    let mut open: Option<BTreeMap<String, Vec<String>>> = None;
    for line in fs::read_to_string(&log).unwrap().lines() {
        let mut parts = line.split('\x1f');
        let call = parts.next().unwrap();
        let args: Vec<String> = parts.map(str::to_string).collect();
        match call {
            "config_load" => p.config_loads.push(args.join(" ")),
            "procd_open_instance" => {
                assert!(open.is_none(), "instance opened twice");
                open = Some(BTreeMap::new());
            }
            "procd_set_param" | "procd_append_param" => {
                let inst = open.as_mut().unwrap_or_else(|| panic!("{call} outside an instance"));
                let (k, v) = args.split_first().expect("param name");
                let e = inst.entry(k.clone()).or_default();
                if call == "procd_set_param" {
                    e.clear();
                }
                e.extend(v.iter().cloned());
            }
            "procd_close_instance" => p.instances.push(open.take().expect("close without open")),
            "procd_add_reload_trigger" => p.reload_triggers.extend(args),
            other => panic!("unexpected call {other}"),
        }
    }
    assert!(open.is_none(), "instance never closed");
    (p, out)
}

fn shipped_uci() -> String {
    fs::read_to_string(repo().join("openwrt/edgeproxy/files/edgeproxy.config")).unwrap()
}

fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string()
}

#[test]
fn procd_shipped_config_is_disabled_and_starts_nothing() {
    let (p, _) = run_init(&shipped_uci(), "start_service\nservice_triggers", "");
    assert_eq!(p.instances, Vec::<BTreeMap<String, Vec<String>>>::new());
    assert_eq!(p.reload_triggers, ["edgeproxy"]);
}

#[test]
fn procd_shipped_config_enabled_gives_defaults_with_metrics_off() {
    let uci = shipped_uci().replace("option enabled '0'", "option enabled '1'");
    let (p, _) = run_init(&uci, "start_service", "");
    assert_eq!(p.instances.len(), 1);
    let i = &p.instances[0];
    let host = hostname();
    let want = [
        "/usr/sbin/edgeproxy",
        "--log-level",
        "info",
        "--log-target",
        "syslog",
        "run",
        "--run-dir",
        "/var/run/edgeproxy",
        "--metaserver",
        "http://127.0.0.1:10550",
        "--watch",
        "true",
        "--node-name",
        host.as_str(),
        "--iptables-backend",
        "auto",
        "--metrics-address",
        "",
    ];
    assert_eq!(i["command"], want);
    assert_eq!(i["respawn"], ["3600", "5", "0"]);
    assert_eq!(i["term_timeout"], ["15"]);
    assert_eq!(i["limits"], ["nofile=65536 65536"]);
    assert_eq!(i["stdout"], ["1"]);
    assert_eq!(i["stderr"], ["1"]);
    assert_eq!(p.config_loads, ["edgeproxy"]);

    // And the binary accepts exactly these flags (argh): `--help` after them parses them all.
    let mut args: Vec<&str> = want[1..].to_vec();
    args.push("--help");
    let o = output(Command::new(BIN).args(&args));
    let all = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(!all.contains("Unrecognized"), "the binary rejects the init script's flags: {all}");
}

/// Every UCI option the init script knows, set.
const ALL_OPTIONS: &str = "
config edgeproxy 'main'
	option enabled 'yes'
	option log_level 'debug'
	option config_file '/etc/edgeproxy/config.json'
	option source 'kube'
	option kubeconfig '/etc/edgeproxy/kubeconfig'
	option server 'https://192.0.2.1:6443'
	option token_file '/etc/edgeproxy/token'
	option ca_file '/etc/edgeproxy/ca.crt'
	option client_cert '/etc/edgeproxy/client.crt'
	option client_key '/etc/edgeproxy/client.key'
	option metaserver 'http://127.0.0.1:10550'
	option watch 'off'
	option poll_interval '45s'
	option endpoints_api 'endpoints'
	option layout 'root-chain'
	option edgemesh 'v1.9'
	option service_filter_mode 'FilterIfLabelDoesNotExists'
	option node_name 'edge node 1'
	option listen_ip '169.254.96.17'
	option tcp_port '15101'
	option load_balancer 'random'
	option iptables_backend 'nft'
	option min_sync_period '500ms'
	option guard_period '5s'
	option resync_period '2m'
	option state_dir '/etc/edgeproxy/state'
	option offline_after '20s'
	option metrics_address '127.0.0.1:10551'
";

/// The command line [`ALL_OPTIONS`] must give.
fn all_options_command() -> Vec<&'static str> {
    vec![
        "/usr/sbin/edgeproxy",
        "--log-level",
        "debug",
        "--log-target",
        "syslog",
        "run",
        "--run-dir",
        "/var/run/edgeproxy",
        "--config",
        "/etc/edgeproxy/config.json",
        "--source",
        "kube",
        "--kubeconfig",
        "/etc/edgeproxy/kubeconfig",
        "--server",
        "https://192.0.2.1:6443",
        "--token-file",
        "/etc/edgeproxy/token",
        "--ca-file",
        "/etc/edgeproxy/ca.crt",
        "--client-cert",
        "/etc/edgeproxy/client.crt",
        "--client-key",
        "/etc/edgeproxy/client.key",
        "--metaserver",
        "http://127.0.0.1:10550",
        "--watch",
        "false",
        "--poll-interval",
        "45s",
        "--endpoints-api",
        "endpoints",
        "--layout",
        "root-chain",
        "--edgemesh",
        "v1.9",
        "--service-filter-mode",
        "FilterIfLabelDoesNotExists",
        "--node-name",
        "edge node 1",
        "--listen-ip",
        "169.254.96.17",
        "--tcp-port",
        "15101",
        "--load-balancer",
        "random",
        "--iptables-backend",
        "nft",
        "--min-sync-period",
        "500ms",
        "--guard-period",
        "5s",
        "--resync-period",
        "2m",
        "--state-dir",
        "/etc/edgeproxy/state",
        "--offline-after",
        "20s",
        "--metrics-address",
        "127.0.0.1:10551",
    ]
}

#[test]
fn procd_maps_every_uci_option_onto_its_flag() {
    let uci = ALL_OPTIONS;
    let (p, _) = run_init(uci, "start_service", "");
    let cmd = &p.instances[0]["command"];
    let want = all_options_command();
    assert_eq!(*cmd, want);
    // Every `run` flag of the binary is reachable from UCI.
    let help = output(Command::new(BIN).args(["run", "--help"]));
    let help = String::from_utf8_lossy(&help.stdout);
    let options = help.split_once("Options:").map_or("", |(_, o)| o);
    let flags: Vec<&str> = options
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(|w| w.trim_end_matches(','))
        .filter(|w| w.starts_with("--") && *w != "--help")
        .collect();
    assert!(flags.len() >= 18, "cannot read the flags from `run --help`:\n{help}");
    for flag in flags {
        assert!(want.contains(&flag), "`run {flag}` has no UCI option in the init script");
    }
}

#[test]
fn procd_service_stopped_cleans_up_with_the_configured_backend() {
    let uci = "config edgeproxy 'main'\n\toption enabled '1'\n\toption iptables_backend 'legacy'\n";
    // PROG replaced by a stub that records its arguments.
    let extra = "PROG=\"$STUB_DIR/fake-edgeproxy\"\nprintf '#!/bin/sh\\necho \"$*\" >\"$STUB_DIR/cleanup.args\"\\n' >\"$PROG\"\nchmod +x \"$PROG\"";
    let (_, out) = run_init(uci, "service_stopped\ncat \"$STUB_DIR/cleanup.args\"", extra);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "cleanup --iptables-backend legacy --run-dir /var/run/edgeproxy"
    );
    // A restart leaves the rules for the next agent: the marker is written, no cleanup runs.
    let marker = "RUN_DIR=\"$STUB_DIR/run\"";
    let (_, out) = run_init(
        uci,
        "mark_restart\nservice_stopped\nls \"$RUN_DIR\"; cat \"$STUB_DIR/cleanup.args\" 2>/dev/null || echo no-cleanup",
        &format!("{extra}\n{marker}"),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).split_whitespace().collect::<Vec<_>>(), ["restart", "no-cleanup"]);
}

// ----------------------------------------------------------------------------------------------
// systemd

/// The unit with its binary path pointed at the real, built binary.
fn unit_for_test(dir: &Path) -> PathBuf {
    let text = fs::read_to_string(repo().join("systemd/edgeproxy.service")).unwrap();
    assert!(text.contains("/usr/local/bin/edgeproxy"));
    let unit = dir.join("edgeproxy.service");
    fs::write(&unit, text.replace("/usr/local/bin/edgeproxy", BIN)).unwrap();
    unit
}

#[test]
#[ignore = "needs systemd-analyze (tests/setup.sh installs it)"]
fn systemd_unit_verifies_without_warnings() {
    let dir = TempDir::new("unit");
    let unit = unit_for_test(dir.path());
    let o = output(Command::new("systemd-analyze").arg("verify").arg(&unit));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.trim().is_empty(), "systemd-analyze verify: {}\n{err}", o.status);

    // Control: the same check notices an unknown directive and a missing binary.
    let text = fs::read_to_string(&unit).unwrap();
    fs::write(&unit, text.replace("LimitNOFILE=", "LimitNOFILEZ=")).unwrap();
    let o = output(Command::new("systemd-analyze").arg("verify").arg(&unit));
    assert!(String::from_utf8_lossy(&o.stderr).contains("Unknown key"), "verify did not flag an unknown key");
    fs::write(&unit, text.replace(BIN, "/nonexistent/edgeproxy")).unwrap();
    assert!(!output(Command::new("systemd-analyze").arg("verify").arg(&unit)).status.success());
}

#[test]
fn systemd_unit_has_what_the_issue_asks() {
    let text = fs::read_to_string(repo().join("systemd/edgeproxy.service")).unwrap();
    let directives: Vec<(&str, &str)> =
        text.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split_once('=')).collect();
    let get = |k: &str| directives.iter().filter(|(d, _)| *d == k).map(|(_, v)| *v).collect::<Vec<_>>();
    assert_eq!(get("Type"), ["notify"]);
    assert_eq!(get("Restart"), ["always"]);
    assert_eq!(get("WatchdogSec").len(), 1);
    assert_eq!(get("CapabilityBoundingSet"), ["CAP_NET_ADMIN CAP_NET_RAW"]);
    assert_eq!(get("ReadWritePaths"), ["-/run/xtables.lock"]);
    assert_eq!(get("ProtectSystem"), ["strict"]);
    // A restart with a broken config must not leave the node without a proxy: no ExecStartPre
    // check; the agent falls back to the last good config, and reload validates.
    assert!(get("ExecStartPre").is_empty(), "{:?}", get("ExecStartPre"));
    assert_eq!(get("ExecReload"), ["/bin/kill -HUP $MAINPID"]);
    assert_eq!(get("RuntimeDirectory"), ["edgeproxy"]);
    assert_eq!(get("RuntimeDirectoryPreserve"), ["restart"]);
    assert_eq!(get("StateDirectory"), ["edgeproxy"]);
    let after = get("After").join(" ");
    assert!(after.contains("kube-proxy.service") && after.contains("edgecore.service"), "{after}");
    assert_eq!(get("LimitNOFILE"), ["65536"]);
    let af = get("RestrictAddressFamilies").join(" ");
    assert!(af.contains("AF_UNIX"), "sd_notify needs AF_UNIX: {af}");
}

#[test]
#[ignore = "needs systemd-analyze (tests/setup.sh installs it)"]
fn systemd_security_exposure_is_at_most_2_5() {
    let dir = TempDir::new("sec");
    let unit = unit_for_test(dir.path());
    let out = ok(Command::new("systemd-analyze").args(["security", "--offline=yes", "--no-pager"]).arg(&unit));
    let line =
        out.lines().find(|l| l.contains("Overall exposure level")).unwrap_or_else(|| panic!("no score in\n{out}"));
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the score in {line:?}"));
    println!("systemd-analyze security: {score}");
    assert!(score <= 2.5, "exposure {score} > 2.5:\n{out}");
}

#[test]
#[ignore = "needs systemd-tmpfiles (tests/setup.sh installs it)"]
fn tmpfiles_creates_the_xtables_lock() {
    let root = TempDir::new("tmpfiles");
    ok(Command::new("systemd-tmpfiles")
        .arg("--create")
        .arg(format!("--root={}", root.path().display()))
        .arg(repo().join("systemd/edgeproxy.tmpfiles")));
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::metadata(root.path().join("run/xtables.lock")).expect("/run/xtables.lock created");
    assert!(meta.is_file());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
}

#[test]
fn systemd_sample_config_is_valid_and_turns_metrics_on() {
    let path = repo().join("systemd/config.json");
    let c = edgeproxy::config::Config::load(Some(&path), &Default::default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.metrics_address, Some("127.0.0.1:10551".parse().unwrap()));
    assert_eq!(c.source.meta_server, "http://127.0.0.1:10550");
}

// ----------------------------------------------------------------------------------------------
// OpenWrt feed Makefile

#[test]
fn openwrt_makefile_matches_the_crate() {
    let mk = fs::read_to_string(repo().join("openwrt/edgeproxy/Makefile")).unwrap();
    let var = |k: &str| {
        mk.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}:=")))
            .unwrap_or_else(|| panic!("{k} missing from the Makefile"))
            .trim()
            .to_string()
    };
    assert_eq!(var("PKG_VERSION"), cargo_version(), "PKG_VERSION follows Cargo.toml");
    assert_eq!(var("PKG_NAME"), "edgeproxy");
    assert_eq!(var("PKG_BUILD_DEPENDS"), "rust/host");
    assert!(mk.contains("include ../../lang/rust/rust-package.mk"));
    assert!(mk.contains("$(eval $(call RustBinPackage,edgeproxy))"));
    assert!(mk.contains("$(eval $(call BuildPackage,edgeproxy))"));
    let deps = var("  DEPENDS");
    for d in ["$(RUST_ARCH_DEPENDS)", "+iptables-nft", "+kmod-ipt-nat"] {
        assert!(deps.split_whitespace().any(|x| x == d), "{d} missing from DEPENDS {deps}");
    }
    // Recipe lines must start with a tab, or make fails on them.
    let mut in_define = false;
    for l in mk.lines() {
        if l.starts_with("define ") {
            in_define = true;
        } else if l == "endef" {
            in_define = false;
        } else if in_define && l.starts_with("\t$(") {
            // ok: recipe line
        } else if in_define && l.starts_with("    $(") {
            panic!("recipe indented with spaces: {l:?}");
        }
    }
}
