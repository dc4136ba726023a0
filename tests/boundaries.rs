//! The house rules of ARCHITECTURE.md, checked on the source text: which module may name which.
//! `just lint` and the lint stage of integration/test-all.sh run this test, so a change that
//! breaks a boundary fails the build instead of waiting for a review to notice.
//!
//! A rule names the files it governs and the paths or words they must not contain. Comment
//! lines are skipped (docs may speak of anything); grouped imports (`use crate::{a, b}`) count
//! as `crate::a` and `crate::b`. The Rust compiler enforces the rest: `Netns::run`, the one
//! way into a namespace, is private to `netlink`.

use std::path::{Path, PathBuf};

/// One boundary.
struct Rule {
    /// What the rule says, for the failure message.
    says: &'static str,
    /// Files governed: every `.rs` file under these paths (relative to the crate root).
    under: &'static [&'static str],
    /// ...except these (files or folders).
    except: &'static [&'static str],
    /// Paths or words that must not occur. A match must stand alone: `crate::agent` matches
    /// `crate::agent::x` but not `crate::agentx`.
    forbidden: &'static [&'static str],
}

/// Crates that speak netlink; only `netlink/` may use them.
const NETLINK_CRATES: &[&str] =
    &["rtnetlink", "netlink_packet_route", "netlink_packet_core", "netlink_sys", "netlink_proto"];

const RULES: &[Rule] = &[
    Rule {
        says: "cni/ is the protocol: no Linux networking, nothing of HeadCNI (its config keys, its other modules)",
        under: &["src/cni"],
        except: &[],
        forbidden: &[
            "crate::plugin",
            "crate::ipam",
            "crate::agent",
            "crate::clients",
            "crate::cli",
            "crate::netlink",
            "crate::nodefile",
            "crate::events",
            "crate::logging",
            "crate::install",
            "crate::fsutil",
            "rtnetlink",
            "rustix",
            "tokio",
            "log_file",
            "log_level",
            "HEADCNI_",
            "/proc/sys",
            "/run/headcni",
            "/var/lib/headcni",
        ],
    },
    Rule {
        says: "ipam's allocator is pure: no store, no kernel, no clock or randomness of its own",
        under: &["src/ipam/allocator.rs"],
        except: &[],
        forbidden: &[
            "crate::",
            "super::store",
            "super::entropy",
            "super::cli",
            "std::fs",
            "std::io",
            "std::time",
            "std::env",
            "std::process",
            "std::thread",
            "SystemTime",
            "Instant",
            "rustix",
            "getrandom",
            "tokio",
        ],
    },
    Rule {
        says: "plugin/ and agent/ never import each other (they meet in the node file and the event spool)",
        under: &["src/plugin"],
        except: &[],
        forbidden: &["crate::agent", "crate::cli", "crate::clients"],
    },
    Rule {
        says: "plugin/ and agent/ never import each other (they meet in the node file and the event spool)",
        under: &["src/agent"],
        except: &[],
        forbidden: &["crate::plugin", "crate::cli"],
    },
    Rule {
        says: "agent/ and controller/ never import each other (they meet in the Node's annotations, binding.rs)",
        under: &["src/agent"],
        except: &[],
        forbidden: &["crate::controller"],
    },
    Rule {
        says: "agent/ and controller/ never import each other (they meet in the Node's annotations, binding.rs)",
        under: &["src/controller"],
        except: &[],
        forbidden: &["crate::agent", "crate::plugin", "crate::cli", "crate::netlink", "crate::ipam"],
    },
    Rule {
        says: "binding.rs is where the agent and the controller meet: it knows neither",
        under: &["src/binding.rs"],
        except: &[],
        forbidden: &["crate::agent", "crate::controller", "crate::cli", "crate::netlink", "crate::plugin"],
    },
    Rule {
        says: "clients/ are shared by the roles and know none of them",
        under: &["src/clients"],
        except: &[],
        forbidden: &[
            "crate::agent",
            "crate::controller",
            "crate::plugin",
            "crate::ipam",
            "crate::cli",
            "crate::netlink",
            "crate::install",
        ],
    },
    Rule {
        says: "only netlink/ speaks netlink (rtnetlink, netlink-packet-*, netlink-sys)",
        under: &["src", "bench", "tests"],
        except: &["src/netlink", "tests/boundaries.rs"],
        forbidden: NETLINK_CRATES,
    },
    Rule {
        says: "only netlink/ enters a network namespace",
        under: &["src"],
        except: &["src/netlink"],
        forbidden: &["setns", "move_into_link_name_space", "LinkNameSpaceType", "unshare", "CLONE_NEWNET"],
    },
];

fn rust_files(root: &Path, under: &str, out: &mut Vec<PathBuf>) {
    let path = root.join(under);
    if path.is_file() {
        out.push(path);
        return;
    }
    let Ok(entries) = std::fs::read_dir(&path) else { return };
    let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(root, p.strip_prefix(root).unwrap().to_str().unwrap(), out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file, comments blanked (line numbers stay), grouped imports expanded.
fn code_lines(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text.lines().map(|l| without_comment(l).to_string()).collect();
    let joined = lines.join("\n");
    for prefix in ["crate::{", "super::{"] {
        let head = &prefix[..prefix.len() - 1];
        let mut from = 0;
        while let Some(at) = joined[from..].find(prefix) {
            let start = from + at + prefix.len();
            let line = joined[..start].matches('\n').count();
            for item in group_items(&joined[start..]) {
                lines[line].push(' ');
                lines[line].push_str(head);
                lines[line].push_str(&item);
            }
            from = start;
        }
    }
    lines
}

/// The top-level items of a `{a, b::{c, d}, e}` group, given the text after its `{`, across
/// lines (rustfmt breaks long groups).
fn group_items(after_brace: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut current = String::new();
    let mut depth = 0;
    for c in after_brace.chars() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    items.push(current);
    items.iter().map(|i| i.split_whitespace().collect::<String>()).filter(|i| !i.is_empty()).collect()
}

/// The line up to a `//` that is not inside a string literal.
fn without_comment(line: &str) -> &str {
    let bytes = line.as_bytes();
    let mut in_string = false;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if in_string => i += 1,
            b'"' => in_string = !in_string,
            b'/' if !in_string && bytes.get(i + 1) == Some(&b'/') => return &line[..i],
            _ => {}
        }
        i += 1;
    }
    line
}

fn is_word(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Whether `needle` occurs in `line` on its own: not inside a longer identifier.
fn occurs(line: &str, needle: &str) -> bool {
    let mut from = 0;
    while let Some(at) = line[from..].find(needle) {
        let start = from + at;
        let end = start + needle.len();
        let before = line[..start].chars().next_back();
        let after = line[end..].chars().next();
        let open_before = !needle.starts_with(is_word) || before.is_none_or(|c| !is_word(c));
        let open_after = !needle.ends_with(is_word) || after.is_none_or(|c| !is_word(c));
        if open_before && open_after {
            return true;
        }
        from = start + 1;
    }
    false
}

/// Every place where `text` (the file at `display`) breaks `rule`.
fn violations(rule: &Rule, display: &str, text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (n, line) in code_lines(text).iter().enumerate() {
        for needle in rule.forbidden {
            if occurs(line, needle) {
                out.push(format!("{display}:{}: {needle:?}: {}", n + 1, rule.says));
            }
        }
    }
    out
}

fn check(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for rule in RULES {
        let mut files = Vec::new();
        for under in rule.under {
            rust_files(root, under, &mut files);
        }
        if files.is_empty() {
            out.push(format!("rule {:?} governs no file: the layout changed, update the rule", rule.says));
        }
        for file in files {
            let rel = file.strip_prefix(root).unwrap().to_str().unwrap().to_string();
            if rule.except.iter().any(|e| rel == *e || rel.starts_with(&format!("{e}/"))) {
                continue;
            }
            let text = std::fs::read_to_string(&file).unwrap();
            out.extend(violations(rule, &rel, &text));
        }
    }
    out
}

#[test]
fn the_house_rules_hold() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let broken = check(root);
    assert!(broken.is_empty(), "boundaries broken:\n{}", broken.join("\n"));
}

#[test]
fn a_broken_rule_is_found() {
    let rule = &RULES[2];
    let text = "//! Docs may say crate::agent.\nuse crate::{cni, agent::config};\nfn f() { crate::agentx(); }\n";
    let found = violations(rule, "src/plugin/x.rs", text);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].starts_with("src/plugin/x.rs:2: \"crate::agent\""), "{found:?}");
    // A group rustfmt broke across lines, nested groups inside it.
    let text = "use crate::{\n    cni::{self, Request},\n    agent::{config, report},\n};\n";
    let found = violations(rule, "src/plugin/x.rs", text);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].starts_with("src/plugin/x.rs:1: \"crate::agent\""), "{found:?}");

    let allocator = RULES.iter().find(|r| r.under == ["src/ipam/allocator.rs"]).unwrap();
    let found =
        violations(allocator, "a.rs", "let t = std::time::Instant::now();\nlet n = rustix::rand::getrandom(&mut b);\n");
    assert_eq!(found.len(), 4, "{found:?}");
    assert!(violations(allocator, "a.rs", "let instant_x = 1; // Instant\n").is_empty());
}
