// Records the target triple so that `edgeproxy --version` can name it.
fn main() {
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=EDGEPROXY_TARGET={target}");
    println!("cargo:rerun-if-changed=build.rs");
}
