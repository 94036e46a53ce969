//! Which broker instance writes a trail: `[audit] instance`, or the host name. The name goes
//! into every line of the trail and, through `{instance}`, into the trail's file name — so one
//! configuration (a Kubernetes ConfigMap shared by every pod) still gives each broker its own
//! trail and the store one chain per instance.

use crate::config::AuditConfig;

/// The placeholder in `[audit] file` replaced by the instance name.
pub const PLACEHOLDER: &str = "{instance}";

/// Fills in `audit.instance` (from the host name when unset) and puts it into `audit.file`.
pub fn resolve(audit: &mut AuditConfig) -> Result<(), String> {
    let instance = match audit.instance.take() {
        Some(configured) => configured,
        None => host_name().ok_or(
            "audit: the host name could not be read to name this instance; set [audit] instance",
        )?,
    };
    check(&instance).map_err(|why| format!("audit.instance {instance:?}: {why}"))?;
    if let Some(template) = audit.file.to_str()
        && template.contains(PLACEHOLDER)
    {
        audit.file = template.replace(PLACEHOLDER, &instance).into();
    }
    audit.instance = Some(instance);
    Ok(())
}

/// An instance name is a file-name part and a database key: short, plain characters.
pub fn check(instance: &str) -> Result<(), &'static str> {
    if instance.is_empty() || instance.len() > 128 {
        return Err("must be 1 to 128 characters");
    }
    if !instance
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err("may hold only letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

/// The kernel's host name (a pod's name in Kubernetes), else `$HOSTNAME`.
fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn audit(file: &str, instance: Option<&str>) -> AuditConfig {
        AuditConfig {
            file: file.into(),
            instance: instance.map(str::to_owned),
            ..AuditConfig::default()
        }
    }

    #[test]
    fn the_instance_names_the_trail_file() {
        let mut a = audit(
            "/var/lib/carerecord/audit-{instance}.jsonl",
            Some("broker-0"),
        );
        resolve(&mut a).expect("resolves");
        assert_eq!(
            a.file,
            std::path::Path::new("/var/lib/carerecord/audit-broker-0.jsonl")
        );
        assert_eq!(a.instance.as_deref(), Some("broker-0"));
    }

    #[test]
    fn without_an_instance_the_host_name_is_used_and_a_plain_file_is_kept() {
        let mut a = audit("audit.jsonl", None);
        resolve(&mut a).expect("resolves");
        let name = a.instance.expect("named");
        assert!(check(&name).is_ok(), "{name}");
        assert_eq!(a.file, std::path::Path::new("audit.jsonl"));
    }

    #[test]
    fn an_instance_that_would_escape_the_file_name_is_refused() {
        for bad in ["", "../etc", "a b", "x/y"] {
            let mut a = audit("audit-{instance}.jsonl", Some(bad));
            assert!(resolve(&mut a).is_err(), "{bad:?} accepted");
        }
    }
}
