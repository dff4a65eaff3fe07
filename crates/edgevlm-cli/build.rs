//! Build script of the CLI's tests: tells `tests/serve.rs` whether the client environment
//! (`scripts/setup-clients.sh`: the openai package, selenium, Debian's chromium) is here. Where it is
//! not, those tests are compiled as ignored, saying why; under `CI=true` they run and fail instead.

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(client_env_missing)");
    println!("cargo::rerun-if-env-changed=CI");
    println!("cargo::rerun-if-env-changed=EDGEVLM_CLIENT_PYTHON");
    println!("cargo::rerun-if-changed=build.rs");
    let python = std::env::var_os("EDGEVLM_CLIENT_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/edgevlm/venv-clients/bin/python")
        });
    // A missing file makes cargo run this script again on every build, which notices it arriving.
    println!("cargo::rerun-if-changed={}", python.display());
    println!("cargo::rerun-if-changed=/usr/bin/chromedriver");
    let present = python.is_file() && std::path::Path::new("/usr/bin/chromedriver").is_file();
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    if !present && !ci {
        println!("cargo::rustc-cfg=client_env_missing");
    }
}
