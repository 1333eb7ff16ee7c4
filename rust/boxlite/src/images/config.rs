//! The parts of an OCI image config that shape how commands run.
//!
//! Hand-written on purpose, rather than oci-spec's `ImageConfiguration`: that type requires
//! `architecture`, `os` and `rootfs` and takes only `{}` as an `ExposedPorts`/`Volumes`
//! value, and it keeps ports and labels in `HashMap`s (an order that changes from run to
//! run). Here every field may be missing or null, and ports and labels come out sorted.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Defaults that boxes made from the image inherit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub env: Vec<(String, String)>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub exposed_ports: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub architecture: String,
    pub os: String,
}

#[derive(Deserialize)]
struct RawImage {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    config: Option<RawConfig>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawConfig {
    env: Option<Vec<String>>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
    exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    labels: Option<BTreeMap<String, String>>,
}

impl ImageConfig {
    /// Reads the image config JSON (`application/vnd.oci.image.config.v1+json`).
    pub fn from_json(data: &[u8]) -> Result<Self, String> {
        let raw: RawImage =
            serde_json::from_slice(data).map_err(|e| format!("malformed image config: {e}"))?;
        let config = raw.config.unwrap_or_default();
        let env = config
            .env
            .unwrap_or_default()
            .into_iter()
            .filter_map(|entry| {
                entry
                    .split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
            })
            .filter(|(k, _)| !k.is_empty())
            .collect();
        Ok(Self {
            env,
            entrypoint: config.entrypoint.unwrap_or_default(),
            cmd: config.cmd.unwrap_or_default(),
            working_dir: config.working_dir.filter(|w| !w.is_empty()),
            user: config.user.filter(|u| !u.is_empty()),
            exposed_ports: config
                .exposed_ports
                .unwrap_or_default()
                .into_keys()
                .collect(),
            labels: config.labels.unwrap_or_default(),
            architecture: raw.architecture,
            os: raw.os,
        })
    }
}

/// `base` with `overrides` applied by name, in order; later entries win, first position kept.
pub(crate) fn merge_env(
    base: &[(String, String)],
    overrides: &[(String, String)],
) -> Vec<(String, String)> {
    let mut merged: Vec<(String, String)> = base.to_vec();
    for (key, value) in overrides {
        match merged.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value.clone(),
            None => merged.push((key.clone(), value.clone())),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_fields_that_matter() {
        let json = br#"{"architecture":"amd64","os":"linux","config":{
            "Env":["PATH=/bin","LANG=C.UTF-8","BROKEN"],"Cmd":["sh"],"Entrypoint":["/init"],
            "WorkingDir":"/srv","User":"app","ExposedPorts":{"80/tcp":{}},"Labels":{"a":"b"}}}"#;
        let c = ImageConfig::from_json(json).unwrap();
        assert_eq!(
            c.env,
            vec![
                ("PATH".into(), "/bin".into()),
                ("LANG".into(), "C.UTF-8".into())
            ]
        );
        assert_eq!(c.cmd, vec!["sh"]);
        assert_eq!(c.entrypoint, vec!["/init"]);
        assert_eq!(c.working_dir.as_deref(), Some("/srv"));
        assert_eq!(c.user.as_deref(), Some("app"));
        assert_eq!(c.exposed_ports, vec!["80/tcp"]);
        assert_eq!(c.labels.get("a").map(String::as_str), Some("b"));
    }

    #[test]
    fn a_config_without_config_section_is_empty() {
        let c = ImageConfig::from_json(br#"{"architecture":"amd64","os":"linux"}"#).unwrap();
        assert!(c.env.is_empty() && c.cmd.is_empty() && c.working_dir.is_none());
        assert!(ImageConfig::from_json(b"[").is_err());
    }

    #[test]
    fn later_env_wins_in_place() {
        let base = vec![
            ("PATH".to_string(), "/bin".to_string()),
            ("A".to_string(), "1".to_string()),
        ];
        let merged = merge_env(&base, &[("A".into(), "2".into()), ("B".into(), "3".into())]);
        assert_eq!(
            merged,
            vec![
                ("PATH".into(), "/bin".into()),
                ("A".into(), "2".into()),
                ("B".into(), "3".into())
            ]
        );
    }
}
