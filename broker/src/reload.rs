//! What SIGHUP can change in a running broker, and what it cannot.
//!
//! A reload swaps the sources, the directory, the routing and the per-source guards; everything
//! else (listen addresses, TLS, access policy, audit, cache, lookup caps) was wired in at start.
//! Ops editing the file expect every edit to take effect, so a reload names each changed key that
//! will not until a restart, rather than letting it sit unnoticed.

/// Whole top-level tables a reload applies.
const RELOADED_TABLES: &[&str] = &["sources", "directory", "routing"];
/// Single keys a reload applies, in tables that otherwise need a restart.
const RELOADED_KEYS: &[&str] = &[
    "budget.default_source_timeout_ms",
    "resilience.breaker_failures",
    "resilience.breaker_open_ms",
    "resilience.source_max_in_flight",
];

/// Dotted keys that differ between the configuration the broker started with and `edited`, and
/// that a reload does not apply. Either text failing to parse yields nothing: the reload itself
/// reports a bad file.
pub fn keys_needing_restart(running: &str, edited: &str) -> Vec<String> {
    let (Ok(running), Ok(edited)) = (
        running.parse::<toml::Table>(),
        edited.parse::<toml::Table>(),
    ) else {
        return Vec::new();
    };
    let mut changed = Vec::new();
    differing(&running, &edited, "", &mut changed);
    changed.retain(|key| {
        let top = key.split('.').next().unwrap_or(key);
        !RELOADED_TABLES.contains(&top) && !RELOADED_KEYS.contains(&key.as_str())
    });
    changed
}

/// Appends the dotted path of every leaf that differs (present in one side only, or unequal).
fn differing(a: &toml::Table, b: &toml::Table, prefix: &str, out: &mut Vec<String>) {
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    for key in keys {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match (a.get(key), b.get(key)) {
            (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
                differing(x, y, &path, out)
            }
            (x, y) if x != y => out.push(path),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUNNING: &str = r#"
[server]
listen = "127.0.0.1:50051"
plaintext = true
[cache]
ttl_secs = 60
[resilience]
breaker_failures = 5
drain_ms = 10000
[[sources]]
id = "gp"
"#;

    #[test]
    fn a_reload_names_edited_keys_that_need_a_restart() {
        let edited = RUNNING
            .replace("50051", "50052")
            .replace("ttl_secs = 60", "ttl_secs = 30\nmax_bytes = 1024")
            .replace("drain_ms = 10000", "drain_ms = 20000");
        assert_eq!(
            keys_needing_restart(RUNNING, &edited),
            [
                "cache.max_bytes",
                "cache.ttl_secs",
                "resilience.drain_ms",
                "server.listen"
            ]
        );
    }

    #[test]
    fn reloadable_edits_need_no_restart() {
        let edited = RUNNING
            .replace("breaker_failures = 5", "breaker_failures = 3")
            .replace("id = \"gp\"", "id = \"gp2\"")
            + "\n[routing]\nmode = \"located\"\n";
        assert!(keys_needing_restart(RUNNING, &edited).is_empty());
    }

    #[test]
    fn an_unparsable_edit_is_left_to_the_reload_to_report() {
        assert!(keys_needing_restart(RUNNING, "not toml [").is_empty());
    }
}
