//! The OpenWrt feed Makefile (openwrt/edgeproxy/Makefile) under GNU make, against a stub SDK: a
//! temporary `$(TOPDIR)` with `rules.mk`, `include/package.mk` and a packages feed whose
//! `lang/rust/rust-package.mk` (and the `rust-values.mk` it includes) define just what the
//! Makefile uses. The stub's `BuildPackage` adds three targets: `stub-info` prints what the
//! Makefile set, `stub-prepare` runs its `Build/Prepare`, `stub-install` its
//! `Package/edgeproxy/install`. Both setups of openwrt/README.md are built, as the SDK enters a
//! package: through `package/feeds/<feed>/edgeproxy`, a symlink into `feeds/`.
//!
//! Needs GNU make (Debian package `make`); without it the tests fail, they never skip.

mod support;

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use support::tempdir::{cargo_version, repo, TempDir};

/// `$(TOPDIR)/rules.mk`: the variables the Makefile's recipes use, as OpenWrt's rules.mk sets
/// them.
const RULES_MK: &str = "\
INCLUDE_DIR:=$(TOPDIR)/include
BUILD_DIR:=$(TOPDIR)/build_dir
INSTALL_DIR:=install -d -m0755
INSTALL_BIN:=install -m0755
INSTALL_DATA:=install -m0644
INSTALL_CONF:=install -m0600
CP:=cp -fpR
";

/// `$(INCLUDE_DIR)/package.mk`: the build directories, a default Build/Prepare, and a
/// BuildPackage that evaluates Package/NAME and adds the stub's targets.
const PACKAGE_MK: &str = "\
PKG_BUILD_DIR?=$(BUILD_DIR)/$(PKG_NAME)-$(PKG_VERSION)
PKG_INSTALL_DIR?=$(PKG_BUILD_DIR)/ipkg-install

define Build/Prepare
	@echo 'stub: the default Build/Prepare (unpack PKG_SOURCE)'
endef

define BuildPackage
$(eval $(Package/$(1)))
stub-info:
	$$(info PKG_NAME=$$(PKG_NAME))
	$$(info PKG_VERSION=$$(PKG_VERSION))
	$$(info PKG_BUILD_DEPENDS=$$(PKG_BUILD_DEPENDS))
	$$(info DEPENDS=$$(DEPENDS))
	$$(info USERID=$$(USERID))
	$$(info RUST_MK=$$(EDGEPROXY_RUST_PACKAGE_MK))
	$$(info RUST_STUB_LOADED=$$(STUB_RUST_LOADED))
	$$(info CARGO_PKG_VARS=$$(strip $$(CARGO_PKG_VARS)))
	$$(info EDGEPROXY_SRC=$$(EDGEPROXY_SRC))
	@:
stub-prepare:
	mkdir -p $$(PKG_BUILD_DIR)
	$$(Build/Prepare)
stub-install:
	$$(call Package/$(1)/install,$$(STUB_IPKG))
endef
";

/// `lang/rust/rust-package.mk`: finds rust-values.mk beside itself, as the real one does, and
/// says it was loaded (with its own path, from `MAKEFILE_LIST`).
const RUST_PACKAGE_MK: &str = "\
STUB_RUST_PACKAGE_MK:=$(lastword $(MAKEFILE_LIST))
RUST_INCLUDE_DIR?=$(dir $(STUB_RUST_PACKAGE_MK))
include $(RUST_INCLUDE_DIR)/rust-values.mk
STUB_RUST_LOADED+=$(STUB_RUST_PACKAGE_MK)

CARGO_PKG_VARS=CARGO_PROFILE_RELEASE_PANIC=unwind

# Only when the package has no install of its own: binaries to /usr/bin.
define RustBinPackage
  ifndef Package/$(1)/install
    define Package/$(1)/install
	$$(INSTALL_DIR) $$(1)/usr/bin
	$$(INSTALL_BIN) $$(PKG_INSTALL_DIR)/bin/* $$(1)/usr/bin/
    endef
  endif
endef
";

const RUST_VALUES_MK: &str = "RUST_ARCH_DEPENDS:=@(stub-rust-arches)\n";

/// A stub SDK in `top`, with a packages feed at `feeds/<packages>` holding lang/rust (unless
/// `packages` is None).
fn stub_sdk(top: &Path, packages: Option<&str>) {
    fs::write(top.join("rules.mk"), RULES_MK).unwrap();
    fs::create_dir_all(top.join("include")).unwrap();
    fs::write(top.join("include/package.mk"), PACKAGE_MK).unwrap();
    if let Some(feed) = packages {
        let rust = top.join("feeds").join(feed).join("lang/rust");
        fs::create_dir_all(&rust).unwrap();
        fs::write(rust.join("rust-package.mk"), RUST_PACKAGE_MK).unwrap();
        fs::write(rust.join("rust-values.mk"), RUST_VALUES_MK).unwrap();
    }
}

/// The src-link setup: `feeds/edgeproxy` links to this checkout's openwrt/, as
/// `./scripts/feeds update` makes it for `src-link edgeproxy <checkout>/openwrt`. Returns the
/// package directory as the SDK enters it.
fn src_link_feed(top: &Path) -> PathBuf {
    fs::create_dir_all(top.join("feeds")).unwrap();
    symlink(repo().join("openwrt"), top.join("feeds/edgeproxy")).unwrap();
    install_from_feed(top, "edgeproxy", "edgeproxy")
}

/// The package copied into a feed at `feeds/<feed>/net/edgeproxy`. Returns the package
/// directory as the SDK enters it.
fn copied_into(top: &Path, feed: &str) -> PathBuf {
    let dest = top.join("feeds").join(feed).join("net/edgeproxy");
    fs::create_dir_all(dest.join("files")).unwrap();
    let src = repo().join("openwrt/edgeproxy");
    fs::copy(src.join("Makefile"), dest.join("Makefile")).unwrap();
    for f in fs::read_dir(src.join("files")).unwrap() {
        let f = f.unwrap();
        fs::copy(f.path(), dest.join("files").join(f.file_name())).unwrap();
    }
    install_from_feed(top, feed, "net/edgeproxy")
}

/// `./scripts/feeds install`: package/feeds/<feed>/edgeproxy -> ../../../feeds/<feed>/<dir>.
fn install_from_feed(top: &Path, feed: &str, dir: &str) -> PathBuf {
    let link = top.join("package/feeds").join(feed).join("edgeproxy");
    fs::create_dir_all(link.parent().unwrap()).unwrap();
    symlink(Path::new("../../../feeds").join(feed).join(dir), &link).unwrap();
    link
}

/// `make -C <package> TOPDIR=<top> <args>` (as the SDK runs it).
fn make(top: &Path, pkg: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new("make");
    cmd.arg("--no-print-directory").arg("-C").arg(pkg).arg(format!("TOPDIR={}", top.display()));
    cmd.args(args).env_remove("EDGEPROXY_SRC").env_remove("MAKEFLAGS").env_remove("MFLAGS");
    cmd.output().unwrap_or_else(|e| {
        panic!("cannot run make: {e}: GNU make is needed (Debian: apt-get install make; tests/setup.sh)")
    })
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Run make, panic unless it succeeds, return its output.
fn make_ok(top: &Path, pkg: &Path, args: &[&str]) -> String {
    let o = make(top, pkg, args);
    assert!(o.status.success(), "make {args:?} in {} failed ({}):\n{}", pkg.display(), o.status, text(&o));
    text(&o)
}

/// `stub-info`'s `KEY=value` lines.
fn info(out: &str, key: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key} not printed:\n{out}"))
        .to_string()
}

/// What every setup must give: the stub's rust-package.mk loaded (the one at `rust_mk`), the
/// package's name, version, dependencies, user and cargo variables. make in `pkg` printed `out`.
fn check_info(out: &str, pkg: &Path, rust_mk: &Path) {
    let rust_mk = rust_mk.canonicalize().unwrap();
    // A relative path is make's, from the package directory.
    let resolve = |p: &str| {
        let p = pkg.canonicalize().unwrap().join(p);
        p.canonicalize().unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    let loaded = info(out, "RUST_STUB_LOADED");
    assert_eq!(loaded.split_whitespace().count(), 1, "rust-package.mk loaded once: {loaded}");
    assert_eq!(resolve(&loaded), rust_mk, "{out}");
    assert_eq!(resolve(&info(out, "RUST_MK")), rust_mk, "{out}");
    assert_eq!(info(out, "PKG_NAME"), "edgeproxy");
    assert_eq!(info(out, "PKG_VERSION"), cargo_version());
    assert_eq!(info(out, "PKG_BUILD_DEPENDS"), "rust/host");
    let deps = info(out, "DEPENDS");
    let deps: Vec<&str> = deps.split_whitespace().collect();
    // RUST_ARCH_DEPENDS came from the stub's rust-values.mk, found beside rust-package.mk.
    for d in ["@(stub-rust-arches)", "+nftables-json", "+kmod-nft-nat"] {
        assert!(deps.contains(&d), "{d} missing from DEPENDS {deps:?}");
    }
    assert_eq!(info(out, "USERID"), "edgeproxy=461:edgeproxy=461");
    // The package's panic=abort comes after the feed's default, so it wins.
    assert!(info(out, "CARGO_PKG_VARS").ends_with("CARGO_PROFILE_RELEASE_PANIC=abort"), "{out}");
}

/// Build/Prepare copies the crate; Package/edgeproxy/install installs the package's files.
fn check_prepare_and_install(top: &Path, pkg: &Path, extra: &[&str]) {
    let build = top.join("build_dir/edgeproxy");
    let build_arg = format!("PKG_BUILD_DIR={}", build.display());
    let mut args = vec!["stub-prepare", build_arg.as_str()];
    args.extend_from_slice(extra);
    make_ok(top, pkg, &args);
    for f in ["Cargo.toml", "Cargo.lock", "build.rs", "src/main.rs", "src/lib.rs"] {
        assert_eq!(
            fs::read(build.join(f)).unwrap_or_else(|e| panic!("{f} not prepared: {e}")),
            fs::read(repo().join(f)).unwrap(),
            "{f}"
        );
    }

    let inst = top.join("pkg-install");
    fs::create_dir_all(inst.join("bin")).unwrap();
    fs::write(inst.join("bin/edgeproxy"), "stub binary").unwrap();
    let ipkg = top.join("ipkg-edgeproxy");
    let inst_arg = format!("PKG_INSTALL_DIR={}", inst.display());
    let ipkg_arg = format!("STUB_IPKG={}", ipkg.display());
    let mut args = vec!["stub-install", inst_arg.as_str(), ipkg_arg.as_str()];
    args.extend_from_slice(extra);
    make_ok(top, pkg, &args);
    let files = repo().join("openwrt/edgeproxy/files");
    let want: [(&str, PathBuf, u32); 4] = [
        ("usr/sbin/edgeproxy", inst.join("bin/edgeproxy"), 0o755),
        ("etc/init.d/edgeproxy", files.join("edgeproxy.init"), 0o755),
        ("etc/config/edgeproxy", files.join("edgeproxy.config"), 0o600),
        ("etc/capabilities/edgeproxy.json", files.join("edgeproxy.capabilities"), 0o644),
    ];
    for (path, from, mode) in &want {
        let p = ipkg.join(path);
        assert_eq!(fs::read(&p).unwrap_or_else(|e| panic!("{path} not installed: {e}")), fs::read(from).unwrap());
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o7777, *mode, "{path}");
    }
    assert!(!ipkg.join("usr/bin").exists(), "the package's own install, not RustBinPackage's default");
}

#[test]
fn make_is_installed() {
    let o = Command::new("make").arg("--version").output().unwrap_or_else(|e| {
        panic!("cannot run make: {e}: GNU make is needed (Debian: apt-get install make; tests/setup.sh)")
    });
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("GNU Make"), "not GNU make: {}", text(&o));
}

#[test]
fn feed_makefile_builds_from_a_src_link_feed() {
    let top = TempDir::new("feed", "srclink");
    stub_sdk(top.path(), Some("packages"));
    let pkg = src_link_feed(top.path());
    let out = make_ok(top.path(), &pkg, &["stub-info"]);
    check_info(&out, &pkg, &top.path().join("feeds/packages/lang/rust/rust-package.mk"));
    // The crate is this checkout, two levels above the (real) package directory.
    let src = PathBuf::from(info(&out, "EDGEPROXY_SRC"));
    assert_eq!(src.canonicalize().unwrap(), repo().canonicalize().unwrap());
    check_prepare_and_install(top.path(), &pkg, &[]);
}

#[test]
fn feed_makefile_builds_copied_into_the_packages_feed_with_edgeproxy_src() {
    let top = TempDir::new("feed", "copied");
    stub_sdk(top.path(), Some("packages"));
    let pkg = copied_into(top.path(), "packages");
    let src = format!("EDGEPROXY_SRC={}", repo().display());
    let out = make_ok(top.path(), &pkg, &["stub-info", &src]);
    check_info(&out, &pkg, &top.path().join("feeds/packages/lang/rust/rust-package.mk"));
    assert_eq!(info(&out, "EDGEPROXY_SRC"), repo().display().to_string());
    check_prepare_and_install(top.path(), &pkg, &[&src]);
}

#[test]
fn feed_makefile_finds_rust_two_levels_up_in_a_feed_not_named_packages() {
    // No feeds/packages at all: only the feed the package sits in has lang/rust.
    let top = TempDir::new("feed", "otherfeed");
    stub_sdk(top.path(), Some("mypackages"));
    let pkg = copied_into(top.path(), "mypackages");
    let src = format!("EDGEPROXY_SRC={}", repo().display());
    let out = make_ok(top.path(), &pkg, &["stub-info", &src]);
    check_info(&out, &pkg, &top.path().join("feeds/mypackages/lang/rust/rust-package.mk"));
}

#[test]
fn feed_makefile_without_rust_package_mk_names_both_places() {
    let top = TempDir::new("feed", "norust");
    stub_sdk(top.path(), None);
    let pkg = src_link_feed(top.path());
    let o = make(top.path(), &pkg, &["stub-info"]);
    let out = text(&o);
    assert!(!o.status.success(), "make succeeded without rust-package.mk:\n{out}");
    assert!(out.contains("lang/rust/rust-package.mk not found"), "{out}");
    let topdir_path = format!("{}/feeds/packages/lang/rust/rust-package.mk", top.path().display());
    assert!(out.contains(&topdir_path), "the src-link place is named: {out}");
    let real_pkg = repo().join("openwrt/edgeproxy").canonicalize().unwrap();
    assert!(out.contains(&format!("{}/../../lang/rust/rust-package.mk", real_pkg.display())), "{out}");
    assert!(out.contains("./scripts/feeds update packages"), "{out}");
    // Not make's own "No such file or directory" for an include.
    assert!(!out.contains("No such file or directory"), "{out}");
}

#[test]
fn feed_makefile_copied_without_edgeproxy_src_says_so_but_scans() {
    let top = TempDir::new("feed", "nosrc");
    stub_sdk(top.path(), Some("packages"));
    let pkg = copied_into(top.path(), "packages");
    let o = make(top.path(), &pkg, &["stub-info"]);
    let out = text(&o);
    assert!(!o.status.success(), "make succeeded with no crate:\n{out}");
    assert!(out.contains("no crate at EDGEPROXY_SRC="), "{out}");
    assert!(out.contains("EDGEPROXY_SRC=/path/to/edgeproxy make package/edgeproxy/compile"), "{out}");
    // The feed scan (./scripts/feeds, menuconfig: DUMP=1) needs no crate.
    let out = make_ok(top.path(), &pkg, &["stub-info", "DUMP=1"]);
    check_info(&out, &pkg, &top.path().join("feeds/packages/lang/rust/rust-package.mk"));
    // A release tarball needs none either, and gets the SDK's own Build/Prepare.
    let out = make_ok(top.path(), &pkg, &["stub-prepare", "PKG_SOURCE=edgeproxy-0.1.0.tar.gz"]);
    assert!(out.contains("stub: the default Build/Prepare"), "{out}");
}
