//! `headcni install` against scratch CNI directories: idempotent, never touching other
//! plugins' files, and `--uninstall` removing exactly what it installed.

use serde_json::Value;
use std::fs;
use std::path::Path;
use std::process::Command;

struct Dirs {
    root: tempfile::TempDir,
}

impl Dirs {
    fn new() -> Self {
        let d = Dirs { root: tempfile::tempdir().unwrap() };
        fs::create_dir_all(d.bin()).unwrap();
        fs::create_dir_all(d.conf()).unwrap();
        // The node's own plugins and configs, which install must leave alone.
        for p in ["portmap", "bandwidth", "host-local"] {
            let src = Path::new("/usr/lib/cni").join(p);
            if src.exists() {
                fs::copy(&src, d.bin().join(p)).unwrap();
            }
        }
        fs::write(d.bin().join("flannel"), b"#!/bin/sh\n").unwrap();
        fs::write(d.conf().join("05-other.conflist"), b"{\"name\":\"other\",\"plugins\":[{\"type\":\"flannel\"}]}")
            .unwrap();
        d
    }
    fn bin(&self) -> std::path::PathBuf {
        self.root.path().join("bin")
    }
    fn conf(&self) -> std::path::PathBuf {
        self.root.path().join("net.d")
    }
    fn install(&self, extra: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_headcni"))
            .arg("install")
            .arg("--bin-dir")
            .arg(self.bin())
            .arg("--conf-dir")
            .arg(self.conf())
            .args(extra)
            .env_remove("CNI_COMMAND")
            .output()
            .unwrap()
    }
    fn mtime(&self, p: &Path) -> std::time::SystemTime {
        fs::symlink_metadata(p).unwrap().modified().unwrap()
    }
}

fn ok(out: std::process::Output) -> String {
    assert!(out.status.success(), "install failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn installs_idempotently_and_uninstalls_exactly_its_files() {
    if !Path::new("/usr/lib/cni/portmap").exists() {
        eprintln!("skipped: needs the standard plugins in /usr/lib/cni (containernetworking-plugins)");
        return;
    }
    let d = Dirs::new();
    ok(d.install(&["--strategy", "random"]));
    let bin = d.bin().join("headcni");
    assert_eq!(fs::read(&bin).unwrap(), fs::read(env!("CARGO_BIN_EXE_headcni")).unwrap());
    assert_eq!(fs::read_link(d.bin().join("headcni-ipam")).unwrap(), Path::new("headcni"));
    let conflist = d.conf().join("10-headcni.conflist");
    let v: Value = serde_json::from_str(&fs::read_to_string(&conflist).unwrap()).unwrap();
    assert_eq!(v["plugins"][0]["ipam"]["allocation_strategy"], "random");
    // Debian's portmap/bandwidth 1.1.1 stop at spec 1.0.0, so the conflist must too.
    assert!(!v["cniVersions"].as_array().unwrap().contains(&Value::from("1.1.0")), "{v}");

    let before = [d.mtime(&bin), d.mtime(&conflist), d.mtime(&d.bin().join("headcni-ipam"))];
    let log = ok(d.install(&["--strategy", "random"]));
    assert!(log.contains("unchanged"), "{log}");
    let after = [d.mtime(&bin), d.mtime(&conflist), d.mtime(&d.bin().join("headcni-ipam"))];
    assert_eq!(before, after, "an unchanged install must not rewrite anything");

    ok(d.install(&["--strategy", "dense"]));
    let v: Value = serde_json::from_str(&fs::read_to_string(&conflist).unwrap()).unwrap();
    assert_eq!(v["plugins"][0]["ipam"]["allocation_strategy"], "dense");

    ok(d.install(&["--uninstall"]));
    assert!(!bin.exists() && !conflist.exists() && fs::symlink_metadata(d.bin().join("headcni-ipam")).is_err());
    assert!(d.bin().join("flannel").exists() && d.bin().join("portmap").exists());
    assert!(d.conf().join("05-other.conflist").exists());
    // Uninstalling twice is fine.
    ok(d.install(&["--uninstall"]));
}

#[test]
fn refuses_to_overwrite_a_foreign_conflist_and_bad_flags() {
    let d = Dirs::new();
    let foreign = d.conf().join("10-headcni.conflist");
    fs::write(&foreign, b"{\"name\":\"x\",\"plugins\":[{\"type\":\"bridge\"}]}").unwrap();
    let out = d.install(&["--portmap", "false", "--bandwidth", "false"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not HeadCNI's"));
    assert!(fs::read_to_string(&foreign).unwrap().contains("bridge"));

    ok(d.install(&["--uninstall"]));
    assert!(foreign.exists(), "uninstall must not remove a conflist that is not ours");

    let out = d.install(&["--mtu", "100", "--portmap", "false", "--bandwidth", "false"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--mtu"));
}

#[test]
fn a_missing_chained_plugin_is_left_out_with_a_warning() {
    let d = Dirs::new();
    for p in ["portmap", "bandwidth"] {
        fs::write(d.bin().join(p), b"#!/nonexistent/interpreter\n").unwrap();
        fs::set_permissions(d.bin().join(p), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    fs::remove_file(d.bin().join("bandwidth")).unwrap();
    let log = ok(d.install(&[]));
    assert!(log.contains("bandwidth is missing") && log.contains("--bandwidth=false"), "{log}");
    let v: Value = serde_json::from_str(&fs::read_to_string(d.conf().join("10-headcni.conflist")).unwrap()).unwrap();
    let types: Vec<&str> = v["plugins"].as_array().unwrap().iter().map(|p| p["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["headcni", "portmap"], "{v}");
    // With neither plugin (a node whose plugins live elsewhere), headcni alone.
    fs::remove_file(d.bin().join("portmap")).unwrap();
    let log = ok(d.install(&[]));
    assert!(log.contains("portmap is missing") && log.contains("hostPort"), "{log}");
    let v: Value = serde_json::from_str(&fs::read_to_string(d.conf().join("10-headcni.conflist")).unwrap()).unwrap();
    assert_eq!(v["plugins"].as_array().unwrap().len(), 1, "{v}");
}

#[test]
fn dry_run_prints_and_touches_nothing() {
    let d = Dirs::new();
    let out = d.install(&["--dry-run", "--portmap", "false", "--bandwidth", "false", "--ipam", "host-local"]);
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["plugins"][0]["ipam"]["type"], "host-local");
    assert!(!d.bin().join("headcni").exists());
    assert!(!d.conf().join("10-headcni.conflist").exists());
}

#[test]
fn dry_run_makes_every_check_of_a_real_run() {
    // A node without the standard plugins: the conflist printed chains none of them.
    let d = Dirs::new();
    for p in ["portmap", "bandwidth"] {
        let _ = fs::remove_file(d.bin().join(p));
    }
    let out = d.install(&["--dry-run"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["plugins"].as_array().unwrap().len(), 1, "{v}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("portmap is missing") && err.contains("05-other.conflist sorts before"), "{err}");
    // A foreign file where the conflist goes fails the dry run as it fails a real run.
    fs::write(d.conf().join("10-headcni.conflist"), b"{\"name\":\"x\",\"plugins\":[{\"type\":\"bridge\"}]}").unwrap();
    let out = d.install(&["--dry-run"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not HeadCNI's"));
    assert!(out.stdout.is_empty());
    assert!(!d.bin().join("headcni").exists());
}

#[test]
fn an_earlier_conflist_is_warned_about_and_exclusive_sets_it_aside_until_uninstall() {
    let d = Dirs::new();
    let other = d.conf().join("05-other.conflist");
    let original = fs::read(&other).unwrap();
    let log = ok(d.install(&["--portmap=false", "--bandwidth=false"]));
    assert!(log.contains("05-other.conflist sorts before 10-headcni.conflist") && log.contains("--exclusive"), "{log}");
    assert!(other.exists(), "without --exclusive nothing else is touched");

    fs::write(d.conf().join("99-later.conf"), b"{\"name\":\"later\",\"type\":\"bridge\"}").unwrap();
    let out = d.install(&["--portmap=false", "--bandwidth=false", "--exclusive", "--dry-run"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("would set aside"));
    assert!(other.exists(), "a dry run moves nothing");

    let log = ok(d.install(&["--portmap=false", "--bandwidth=false", "--exclusive"]));
    assert!(!log.contains("sorts before"), "{log}");
    let aside = d.conf().join("05-other.conflist.headcni-aside");
    assert_eq!(fs::read(&aside).unwrap(), original);
    assert!(!other.exists() && !d.conf().join("99-later.conf").exists());
    let names: Vec<String> =
        fs::read_dir(d.conf()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(names.iter().filter(|n| n.ends_with(".conflist") || n.ends_with(".conf")).count(), 1, "{names:?}");

    ok(d.install(&["--uninstall"]));
    assert_eq!(fs::read(&other).unwrap(), original, "restored as it was");
    assert!(d.conf().join("99-later.conf").exists() && !aside.exists());
    assert!(!d.conf().join("10-headcni.conflist").exists());
}

#[test]
fn enable_ipv6_is_a_plain_flag_and_dense_pack_an_alias() {
    let d = Dirs::new();
    let out =
        d.install(&["--dry-run", "--portmap=false", "--bandwidth=false", "--enable-ipv6", "--strategy", "dense-pack"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["plugins"][0]["enable_ipv6"], true);
    assert_eq!(v["plugins"][0]["ipam"]["allocation_strategy"], "dense");
    let out = d.install(&[
        "--dry-run",
        "--portmap=false",
        "--bandwidth=false",
        "--enable-ipv6=false",
        "--strategy=dense_pack",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["plugins"][0].get("enable_ipv6").is_none());
}

#[test]
fn errors_have_one_style_and_the_documented_exit_code() {
    let d = Dirs::new();
    let out = d.install(&["--mtu", "100", "--portmap=false", "--bandwidth=false"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("headcni install: error: --mtu"), "{err}");
}

#[test]
fn a_chained_plugin_that_cannot_start_here_means_spec_1_0_0() {
    let d = Dirs::new();
    // What a distribution's dynamically linked plugin looks like from a FROM scratch image.
    for p in ["portmap", "bandwidth"] {
        fs::write(d.bin().join(p), b"#!/nonexistent/interpreter\n").unwrap();
        fs::set_permissions(d.bin().join(p), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let log = ok(d.install(&[]));
    assert!(log.contains("assuming up to 1.0.0"), "{log}");
    let v: Value = serde_json::from_str(&fs::read_to_string(d.conf().join("10-headcni.conflist")).unwrap()).unwrap();
    assert_eq!(v["cniVersion"], "1.0.0");
    assert_eq!(v["cniVersions"], serde_json::json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0"]));
}

#[test]
fn a_staged_conflist_waits_for_the_agent_and_uninstall_removes_both() {
    if !Path::new("/usr/lib/cni/portmap").exists() {
        eprintln!("skipped: needs the standard plugins in /usr/lib/cni (containernetworking-plugins)");
        return;
    }
    let d = Dirs::new();
    let stage = d.root.path().join("run/staged");
    ok(d.install(&["--stage-dir", stage.to_str().unwrap()]));
    let published = d.conf().join("10-headcni.conflist");
    let staged = stage.join("10-headcni.conflist");
    assert!(staged.is_file(), "the conflist is staged");
    assert!(!published.exists(), "nothing in the runtime's conf dir until the agent publishes it");
    assert!(d.bin().join("headcni").is_file(), "the binaries are installed at once");

    assert!(headcni::install::publish_conflist(&staged, &published).unwrap());
    assert_eq!(fs::read(&published).unwrap(), fs::read(&staged).unwrap());
    assert!(!headcni::install::publish_conflist(&staged, &published).unwrap(), "published once");
    // Another network's conflist under the same name is never overwritten.
    fs::write(&published, b"{\"name\":\"other\",\"plugins\":[{\"type\":\"flannel\"}]}").unwrap();
    assert!(headcni::install::publish_conflist(&staged, &published).is_err());
    fs::remove_file(&published).unwrap();
    headcni::install::publish_conflist(&staged, &published).unwrap();

    ok(d.install(&["--stage-dir", stage.to_str().unwrap(), "--uninstall"]));
    assert!(!published.exists() && !staged.exists() && !d.bin().join("headcni").exists());
    assert!(d.conf().join("05-other.conflist").exists() && d.bin().join("flannel").exists());

    let bad = d.install(&["--stage-dir", d.conf().to_str().unwrap()]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("--stage-dir"));
}
