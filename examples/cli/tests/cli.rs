//! The CLI as other tools call it: exit codes and JSON output.

use std::process::Command;

fn ember(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(args)
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .output()
        .expect("run ember");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn info_json_describes_the_adapter() {
    let (ok, out, err) = ember(&["info", "--json", "--all"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(!v["adapter"]["name"].as_str().unwrap().is_empty());
    assert!(
        v["adapter"]["limits"]["maxStorageBufferBindingSize"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert!(v["capabilities"]["f16"].is_boolean());
    assert!(!v["adapters"].as_array().unwrap().is_empty());
}

#[test]
fn selfcheck_passes() {
    let (ok, out, err) = ember(&["selfcheck", "--json"]);
    assert!(ok, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["ok"] == true));
}

#[test]
fn bench_kernels_prints_json_with_the_device() {
    let (ok, out, err) = ember(&["bench-kernels", "--json", "--quick", "--variant", "auto"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["device"].is_string() && v["backend"].is_string());
    let results = v["results"].as_array().unwrap();
    assert!(results
        .iter()
        .any(|r| r["kernel"] == "matmul" && r["gflops"].as_f64().unwrap() > 0.0));
    assert!(results
        .iter()
        .any(|r| r["kernel"] == "qmatvec" && r["gb_s"].as_f64().unwrap() > 0.0));
}

#[test]
fn bad_environment_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["info"])
        .env("EMBER_BACKEND", "glide")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown backend") && err.contains("vulkan"),
        "{err}"
    );
}
