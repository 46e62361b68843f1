//! The monitoring assets under `ops/`: the Grafana dashboard and the Prometheus alert rules only
//! query metrics the node exports, and the rules pass `promtool` (syntax and their unit tests).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `ferry_…` identifier in `text`.
fn ferry_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("ferry_") {
        let start = i + at;
        let preceded =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start + "ferry_".len();
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end].is_ascii_digit()
                || bytes[end] == b'_')
        {
            end += 1;
        }
        if !preceded {
            names.insert(text[start..end].to_owned());
        }
        i = end;
    }
    names
}

/// The metric names the node defines: string literals `"ferry_…"` in its sources.
fn defined_metrics() -> BTreeSet<String> {
    fn walk(dir: &Path, out: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).expect("read source dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("read source");
                for piece in text.split('"').skip(1).step_by(2) {
                    if piece.starts_with("ferry_")
                        && piece
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                    {
                        out.insert(piece.to_owned());
                    }
                }
            }
        }
    }
    let mut names = BTreeSet::new();
    walk(&root().join("src"), &mut names);
    walk(&root().join("shards/src"), &mut names);
    names
}

/// A histogram's series name back to its metric name.
fn metric_of(series: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| series.strip_suffix(suffix))
        .unwrap_or(series)
}

fn assert_known(what: &str, used: &BTreeSet<String>, defined: &BTreeSet<String>) {
    assert!(!used.is_empty(), "{what} uses no ferry metric");
    let unknown: Vec<&String> = used
        .iter()
        .filter(|s| !defined.contains(*s) && !defined.contains(metric_of(s)))
        .collect();
    assert!(
        unknown.is_empty(),
        "{what} queries metrics the node does not export: {unknown:?}"
    );
}

#[test]
fn the_grafana_dashboard_queries_only_exported_metrics() {
    let text = std::fs::read_to_string(root().join("ops/grafana/ferry.json")).expect("dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut used = BTreeSet::new();
    for panel in panels {
        let id = panel["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} is used twice");
        let grid = &panel["gridPos"];
        let (x, w) = (
            grid["x"].as_u64().expect("x"),
            grid["w"].as_u64().expect("w"),
        );
        assert!(
            x + w <= 24,
            "panel {:?} is wider than the grid",
            panel["title"]
        );
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array().expect("targets");
        assert!(
            !targets.is_empty(),
            "panel {:?} has no query",
            panel["title"]
        );
        for target in targets {
            let expr = target["expr"].as_str().expect("expr");
            let names = ferry_names(expr);
            assert!(
                !names.is_empty(),
                "panel {:?} queries no ferry metric: {expr}",
                panel["title"]
            );
            used.extend(names);
        }
    }
    let defined = defined_metrics();
    assert_known("ops/grafana/ferry.json", &used, &defined);
    // The slot map is on it.
    assert!(used.contains("ferry_slot_appends_total") && used.contains("ferry_slot_conversations"));
}

#[test]
fn the_alert_rules_query_only_exported_metrics() {
    let text =
        std::fs::read_to_string(root().join("ops/prometheus/ferry-alerts.yml")).expect("rules");
    let exprs: String = text
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("expr:"))
        .collect::<Vec<_>>()
        .join("\n");
    assert_known(
        "ops/prometheus/ferry-alerts.yml",
        &ferry_names(&exprs),
        &defined_metrics(),
    );
}

fn promtool() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("FERRY_TEST_PROMTOOL") {
        return Some(PathBuf::from(path));
    }
    let found = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    found.then(|| PathBuf::from("promtool"))
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let Some(promtool) = promtool() else {
        assert!(
            std::env::var_os("FERRY_REQUIRE_PROMTOOL").is_none(),
            "promtool is required (FERRY_REQUIRE_PROMTOOL) but not found"
        );
        eprintln!("SKIPPED: promtool not found (ops/test.sh installs it)");
        return;
    };
    let dir = root().join("ops/prometheus");
    for args in [
        &["check", "rules", "ferry-alerts.yml"][..],
        &["check", "config", "prometheus.yml"][..],
        &["test", "rules", "ferry-alerts.test.yml"][..],
    ] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn names_are_found_whole() {
    let names = ferry_names("rate(ferry_a_total{x=\"y\"}[1m]) / my_ferry_b + ferry_c_bucket");
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["ferry_a_total", "ferry_c_bucket"]
    );
    assert_eq!(metric_of("ferry_c_bucket"), "ferry_c");
}
