//! The command line as an operator meets it: suggestions for typos, the environment and the exit
//! codes in `--help`, completions and the man page generated from the same definition, one
//! error style, and the JSON log format.

use std::process::{Command, Output};

fn headcni(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_headcni"));
    cmd.args(args).env_remove("CNI_COMMAND").env_remove("HEADCNI_LOG_FORMAT").env_remove("HEADCNI_LOG_LEVEL");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn mistyped_commands_and_flags_get_a_suggestion_and_exit_2() {
    for (args, tip) in [
        (vec!["stauts"], "'status'"),
        (vec!["instal"], "'install'"),
        (vec!["status", "--jsn"], "'--json'"),
        (vec!["install", "--dry-rn"], "'--dry-run'"),
        (vec!["ipam", "stat"], "'stats'"),
    ] {
        let o = headcni(&args, &[]);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = stderr(&o);
        assert!(err.contains("tip: a similar") && err.contains(tip), "{args:?}: {err}");
    }
}

/// The paths of `cmd`'s subcommands at every depth (`["ipam", "stats"]`).
fn subcommand_paths(cmd: &clap::Command, above: &[String], out: &mut Vec<Vec<String>>) {
    for sub in cmd.get_subcommands() {
        let mut path = above.to_vec();
        path.push(sub.get_name().to_string());
        subcommand_paths(sub, &path, out);
        out.push(path);
    }
}

#[test]
fn help_names_the_log_environment_and_the_exit_codes() {
    // Every subcommand of the definition the binary parses with, so a new one is checked too.
    let mut paths = Vec::new();
    subcommand_paths(&headcni::cli::command(), &[], &mut paths);
    for name in ["version", "install", "agent", "controller", "status", "teardown", "ipam", "completion", "man"] {
        assert!(paths.iter().any(|p| p == &[name]), "{name} not among {paths:?}");
    }
    assert!(paths.iter().any(|p| p == &["ipam", "stats"]), "no ipam stats among {paths:?}");
    let mut all = vec![vec!["--help".to_string()]];
    all.extend(paths.into_iter().map(|mut p| {
        p.push("--help".into());
        p
    }));
    for args in all {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = headcni(&args, &[]);
        assert_eq!(o.status.code(), Some(0), "{args:?}");
        let out = stdout(&o);
        for needle in ["HEADCNI_LOG_LEVEL", "HEADCNI_LOG_FORMAT", "json", "Exit codes:", "2  unusable"] {
            assert!(out.contains(needle), "{args:?} lacks {needle}:\n{out}");
        }
    }
}

#[test]
fn completions_and_the_man_page_come_from_the_command_definition() {
    let o = headcni(&["completion", "bash"], &[]);
    assert!(o.status.success());
    let bash = stdout(&o);
    for needle in ["_headcni()", "status", "install", "--dry-run", "--exclusive", "teardown"] {
        assert!(bash.contains(needle), "bash completion lacks {needle}");
    }
    for shell in ["zsh", "fish"] {
        let o = headcni(&["completion", shell], &[]);
        assert!(o.status.success() && stdout(&o).contains("status"), "{shell}");
    }
    let o = headcni(&["man"], &[]);
    assert!(o.status.success());
    let man = stdout(&o);
    assert!(man.contains(".TH headcni 1"), "{}", &man[..200.min(man.len())]);
    for needle in ["headcni status", "headcni install", "\\-\\-exclusive", "\\-\\-cluster", "HEADCNI_LOG_FORMAT"] {
        assert!(man.contains(needle), "man page lacks {needle}");
    }
}

#[test]
fn every_command_ends_an_error_the_same_way() {
    for (args, code, start) in [
        (vec!["install", "--mtu", "7"], 2, "headcni install: error: --mtu"),
        (vec!["agent", "--pod-cidr", "10.0.0.1/8"], 2, "headcni agent: error: invalid configuration: --pod-cidr"),
        (vec!["status", "--proc-sys-dir", "relative"], 2, "headcni status: error: --proc-sys-dir"),
        (
            vec!["teardown", "--configmap", "x", "--daemonset", "kube-system/headcni"],
            2,
            "headcni teardown: error: --configmap",
        ),
        (
            vec!["ipam", "--data-dir", "/nonexistent/headcni-cli-test", "--network", "bad/name", "stats"],
            1,
            "headcni ipam: error: ",
        ),
    ] {
        let o = headcni(&args, &[]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(code), "{args:?}: {err}");
        let last = err.lines().last().unwrap_or_default();
        assert!(last.starts_with(start), "{args:?}: {err}");
    }
}

#[test]
fn the_json_log_format_is_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let conf = dir.path().join("net.d");
    let args = ["install", "--dry-run", "--bin-dir", bin.to_str().unwrap(), "--conf-dir", conf.to_str().unwrap()];
    let o = headcni(&args, &[("HEADCNI_LOG_FORMAT", "json")]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    let mut levels = Vec::new();
    for line in err.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(v["role"], "install");
        assert!(v["ts"].as_str().unwrap().ends_with('Z') && v["msg"].as_str().is_some(), "{line}");
        levels.push(v["level"].as_str().unwrap().to_string());
    }
    assert!(levels.contains(&"warn".to_string()) && levels.contains(&"info".to_string()), "{err}");
    // Text stays the default.
    let o = headcni(&args, &[]);
    assert!(stderr(&o).lines().all(|l| serde_json::from_str::<serde_json::Value>(l).is_err()));
}

#[test]
fn under_json_logs_the_error_that_ends_a_command_is_a_record_too() {
    for (args, code, role, msg) in [
        (vec!["install", "--mtu", "7"], 2, "install", "--mtu"),
        (vec!["agent", "--pod-cidr", "10.0.0.1/8"], 2, "agent", "invalid configuration: --pod-cidr"),
        (vec!["status", "--proc-sys-dir", "relative"], 2, "status", "--proc-sys-dir"),
    ] {
        // No log level silences it.
        for level in ["info", "off"] {
            let o = headcni(&args, &[("HEADCNI_LOG_FORMAT", "json"), ("HEADCNI_LOG_LEVEL", level)]);
            let err = stderr(&o);
            assert_eq!(o.status.code(), Some(code), "{args:?}: {err}");
            let records: Vec<serde_json::Value> =
                err.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{args:?}: {e}: {l}"))).collect();
            let last = records.last().unwrap_or_else(|| panic!("{args:?}: nothing on stderr"));
            assert_eq!(last["level"], "error", "{args:?}: {err}");
            assert_eq!(last["role"], role, "{args:?}: {err}");
            assert!(last["msg"].as_str().unwrap().starts_with(msg), "{args:?}: {err}");
            assert!(last["ts"].as_str().unwrap().ends_with('Z') && last["pid"].as_u64().is_some(), "{err}");
        }
    }
}
