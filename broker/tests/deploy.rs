//! The deployment files agree with the broker they deploy: the ConfigMap's `broker.toml` is a
//! valid configuration, and the Deployment's ports, probes and termination grace match it.
//! (`deploy/kubernetes/validate.sh` checks the manifests against the Kubernetes schemas.)

use std::path::{Path, PathBuf};

use carerecord_broker::config::Config;

fn deploy(file: &str) -> (PathBuf, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
    (path, text)
}

/// The literal block under `  broker.toml: |`, dedented.
fn configmap_broker_toml() -> (PathBuf, String) {
    let (path, yaml) = deploy("kubernetes/configmap.yaml");
    let mut lines = yaml.lines().skip_while(|l| l.trim() != "broker.toml: |");
    assert!(lines.next().is_some(), "broker.toml in the ConfigMap");
    let body: Vec<&str> = lines
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect();
    (path, body.join("\n"))
}

/// The first integer after `key` in `text`.
fn number_after(text: &str, key: &str) -> u64 {
    let at = text.find(key).unwrap_or_else(|| panic!("{key} not found"));
    text[at + key.len()..]
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or_else(|_| panic!("no number after {key}"))
}

#[test]
fn the_configmap_holds_a_valid_broker_configuration() {
    let (path, toml) = configmap_broker_toml();
    let config = Config::parse(&toml, &path).unwrap_or_else(|e| panic!("{e}"));
    assert!(!config.server.plaintext, "TLS in production");
    assert!(config.server.tls.is_some());
    assert!(config.audit.fsync, "a durable trail in production");
    assert!(
        toml.contains(r#"file = "/var/lib/carerecord/audit/audit-{instance}.jsonl""#),
        "one trail per pod, named by the pod"
    );
    assert_eq!(
        config.metrics.listen.map(|a| a.port()),
        Some(9090),
        "the probes need the ops listener"
    );
}

#[test]
fn the_deployment_probes_and_drain_match_the_configuration() {
    let (path, toml) = configmap_broker_toml();
    let config = Config::parse(&toml, &path).unwrap_or_else(|e| panic!("{e}"));
    let (_, deployment) = deploy("kubernetes/deployment.yaml");
    assert_eq!(
        number_after(&deployment, "containerPort:"),
        u64::from(config.server.listen.port())
    );
    let ops_port = deployment
        .split("- name: ops")
        .nth(1)
        .map(|rest| number_after(rest, "containerPort:"));
    assert_eq!(
        ops_port,
        config.metrics.listen.map(|a| u64::from(a.port())),
        "the ops port is the metrics listener"
    );
    for probe in ["path: /readyz", "path: /livez"] {
        assert!(deployment.contains(probe), "{probe}");
    }
    // The shipper sidecar reads the broker's own configuration, so it ships that broker's trail.
    assert!(
        deployment.contains(
            r#"args: ["audit", "ship", "--config", "/etc/carerecord/broker.toml", "--follow""#
        ),
        "the audit shipper sidecar"
    );
    let grace = number_after(&deployment, "terminationGracePeriodSeconds:");
    let pause = number_after(&deployment, "command: [\"/bin/sleep\", \"");
    let drain = config.resilience.drain_ms.div_ceil(1000);
    assert!(
        grace > pause + drain,
        "terminationGracePeriodSeconds ({grace}) must cover the preStop pause ({pause}) and the drain ({drain})"
    );
}
