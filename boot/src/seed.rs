//! What a node needs for its first contact — machine API URL, CA pin, enrollment token —
//! when it does not come on the kernel command line: `/etc/tether/agent.toml`, or cloud-init
//! NoCloud user-data that writes that same file.
//!
//! The user-data is a real `#cloud-config` with one `write_files` entry, so the same
//! document works for an image that runs cloud-init (which writes the file) and for Tether's
//! image, whose agent reads it without cloud-init. `tether-operator token create
//! --user-data` renders it; the agent parses it.
//!
//! NoCloud sources (cloud-init's `DataSourceNoCloud`): `ds=nocloud;s=<uri>/` on the kernel
//! command line or in the SMBIOS system serial number, or a vfat/iso9660 volume labelled
//! `cidata`/`CIDATA` holding `user-data` and `meta-data` (both required).

use serde::{Deserialize, Serialize};

use crate::cmdline::check_url;
use crate::error::{Error, Result};
use crate::pin::CaPin;
use crate::token::Token;

/// Where the agent's seed file lives on a node.
pub const AGENT_TOML_PATH: &str = "/etc/tether/agent.toml";

/// The first-contact inputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Seed {
    /// Machine API base URL.
    pub api: String,
    /// The machine API CA's pin.
    pub ca_pin: CaPin,
    /// Enrollment token.
    pub token: Token,
}

impl Seed {
    /// Checks the URL (the pin and token are checked by their types).
    pub fn new(api: &str, ca_pin: CaPin, token: Token) -> Result<Seed> {
        check_url("machine API URL", api)?;
        Ok(Seed {
            api: api.to_string(),
            ca_pin,
            token,
        })
    }

    /// `agent.toml` text.
    pub fn to_agent_toml(&self) -> String {
        format!(
            "# Tether agent seed: where to enroll and whom to trust.\napi = \"{}\"\nca_pin = \"{}\"\ntoken = \"{}\"\n",
            self.api, self.ca_pin, self.token
        )
    }

    /// Parses `agent.toml` text.
    pub fn from_agent_toml(text: &str) -> Result<Seed> {
        let s: Seed = toml::from_str(text)
            .map_err(|e| Error::invalid("agent.toml", "", e.message().to_string()))?;
        check_url("machine API URL", &s.api)?;
        Ok(s)
    }

    /// NoCloud user-data: a `#cloud-config` writing [`AGENT_TOML_PATH`] (mode 0600).
    pub fn to_user_data(&self) -> String {
        let mut out = String::from("#cloud-config\n# Tether: enroll this machine.\nwrite_files:\n");
        out.push_str(&format!(
            "- path: {AGENT_TOML_PATH}\n  owner: root:root\n  permissions: '0600'\n  content: |\n"
        ));
        for line in self.to_agent_toml().lines() {
            out.push_str("    ");
            out.push_str(line);
            out.push('\n');
        }
        out
    }

    /// Finds the seed in NoCloud user-data: the `write_files` entry for
    /// [`AGENT_TOML_PATH`] of a `#cloud-config` document.
    pub fn from_user_data(text: &str) -> Result<Seed> {
        let bad = |why: &str| Error::invalid("NoCloud user-data", "", why);
        if !text.starts_with("#cloud-config") {
            return Err(bad("is not a #cloud-config document"));
        }
        #[derive(Deserialize)]
        struct CloudConfig {
            #[serde(default)]
            write_files: Vec<WriteFile>,
        }
        #[derive(Deserialize)]
        struct WriteFile {
            path: String,
            #[serde(default)]
            content: String,
            #[serde(default)]
            encoding: Option<String>,
        }
        let doc: CloudConfig =
            serde_yaml::from_str(text).map_err(|e| bad(&format!("not YAML: {e}")))?;
        let file = doc
            .write_files
            .into_iter()
            .find(|f| f.path == AGENT_TOML_PATH)
            .ok_or_else(|| bad("writes no /etc/tether/agent.toml"))?;
        if let Some(enc) = file.encoding.filter(|e| e != "text/plain") {
            return Err(bad(&format!(
                "agent.toml has encoding {enc:?}; only plain text is read"
            )));
        }
        Seed::from_agent_toml(&file.content)
    }
}

/// The NoCloud `meta-data` fields the agent uses.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MetaData {
    /// Identifies one boot of one instance (cloud-init's first-boot key).
    pub instance_id: String,
    /// Requested host name (informational: the node name is the Machine name).
    #[serde(default)]
    pub local_hostname: Option<String>,
}

impl MetaData {
    /// Parses `meta-data` (YAML).
    pub fn parse(text: &str) -> Result<MetaData> {
        serde_yaml::from_str(text)
            .map_err(|e| Error::invalid("NoCloud meta-data", "", format!("{e}")))
    }
}

/// A `ds=nocloud;…` datasource: on the kernel command line or the SMBIOS serial number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoCloudSource {
    /// `s=` / `seedfrom=`: a base URI ending in `/` (`http(s)://` or `file://`).
    pub seed: Option<String>,
    /// `h=` / `local-hostname=`.
    pub hostname: Option<String>,
    /// `i=` / `instance-id=`.
    pub instance_id: Option<String>,
}

impl NoCloudSource {
    /// Parses the value of `ds=`; `Ok(None)` for another datasource (`ds=ec2`).
    pub fn parse(value: &str) -> Result<Option<NoCloudSource>> {
        let mut parts = value.split(';');
        match parts.next() {
            Some("nocloud" | "nocloud-net") => {}
            _ => return Ok(None),
        }
        let mut ds = NoCloudSource {
            seed: None,
            hostname: None,
            instance_id: None,
        };
        for part in parts.filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| Error::invalid("ds=nocloud", value, "parts must be key=value"))?;
            match k {
                "s" | "seedfrom" => ds.seed = Some(check_seed(v)?.to_string()),
                "h" | "local-hostname" => ds.hostname = Some(v.to_string()),
                "i" | "instance-id" => ds.instance_id = Some(v.to_string()),
                // cloud-init ignores keys it does not know; so do we.
                _ => {}
            }
        }
        Ok(Some(ds))
    }

    /// `nocloud;s=…;h=…;i=…`
    pub fn render(&self) -> String {
        let mut s = String::from("nocloud");
        for (k, v) in [
            ("s", &self.seed),
            ("h", &self.hostname),
            ("i", &self.instance_id),
        ] {
            if let Some(v) = v {
                s.push_str(&format!(";{k}={v}"));
            }
        }
        s
    }
}

fn check_seed(uri: &str) -> Result<&str> {
    if !uri.ends_with('/') {
        return Err(Error::invalid(
            "NoCloud seed URI",
            uri,
            "must end with / (user-data and meta-data are fetched below it)",
        ));
    }
    if let Some(path) = uri.strip_prefix("file://") {
        if path.starts_with('/') && !path.split('/').any(|p| p == "..") {
            return Ok(uri);
        }
        return Err(Error::invalid(
            "NoCloud seed URI",
            uri,
            "file:// needs an absolute path without ..",
        ));
    }
    check_url("NoCloud seed URI", uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed() -> Seed {
        Seed::new(
            "https://10.0.0.1:9443",
            format!("sha256:{}", "ab".repeat(32)).parse().unwrap(),
            "abcdef.0123456789abcdef".parse().unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn agent_toml_and_user_data_round_trip() {
        let s = seed();
        assert_eq!(Seed::from_agent_toml(&s.to_agent_toml()).unwrap(), s);
        let ud = s.to_user_data();
        assert!(ud.starts_with("#cloud-config\n"));
        assert_eq!(Seed::from_user_data(&ud).unwrap(), s);
        // What cloud-init itself would read: a write_files entry with the agent.toml text.
        let v: serde_yaml::Value = serde_yaml::from_str(&ud).unwrap();
        assert_eq!(v["write_files"][0]["path"], AGENT_TOML_PATH);
        assert_eq!(v["write_files"][0]["permissions"], "0600");
        assert_eq!(
            v["write_files"][0]["content"].as_str().unwrap(),
            s.to_agent_toml()
        );
    }

    #[test]
    fn bad_seeds() {
        let cases: &[(&str, &str)] = &[
            ("api = \"https://x\"\n", "missing field"),
            (
                "api = \"ftp://x\"\nca_pin = \"sha256:00\"\ntoken = \"abcdef.0123456789abcdef\"\n",
                "CA pin",
            ),
            ("api = 1", "invalid type"),
            ("x = 1", "unknown field"),
        ];
        for (text, want) in cases {
            let err = Seed::from_agent_toml(text).expect_err(text).to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
        let toml = seed()
            .to_agent_toml()
            .replace("https://10.0.0.1:9443", "ftp://x");
        assert!(Seed::from_agent_toml(&toml).is_err());
        for (ud, want) in [
            ("write_files: []", "#cloud-config"),
            ("#cloud-config\nwrite_files: []\n", "writes no"),
            ("#cloud-config\n: : :\n", "not YAML"),
            (
                "#cloud-config\nwrite_files:\n- path: /etc/tether/agent.toml\n  encoding: b64\n  content: eA==\n",
                "encoding",
            ),
        ] {
            let err = Seed::from_user_data(ud).expect_err(ud).to_string();
            assert!(err.contains(want), "{ud}: {err}");
        }
    }

    #[test]
    fn nocloud_sources() {
        let ds = NoCloudSource::parse("nocloud;s=http://10.0.0.1:8000/;h=n1;i=iid-1")
            .unwrap()
            .unwrap();
        assert_eq!(ds.seed.as_deref(), Some("http://10.0.0.1:8000/"));
        assert_eq!(ds.hostname.as_deref(), Some("n1"));
        assert_eq!(ds.instance_id.as_deref(), Some("iid-1"));
        assert_eq!(NoCloudSource::parse(&ds.render()).unwrap().unwrap(), ds);
        let ds = NoCloudSource::parse("nocloud-net;seedfrom=file:///var/seed/")
            .unwrap()
            .unwrap();
        assert_eq!(ds.seed.as_deref(), Some("file:///var/seed/"));
        assert_eq!(NoCloudSource::parse("nocloud").unwrap().unwrap().seed, None);
        assert_eq!(NoCloudSource::parse("ec2").unwrap(), None);
        for bad in [
            "nocloud;s=http://x",
            "nocloud;s=file://relative/",
            "nocloud;s=file:///a/../b/",
            "nocloud;s=gopher://x/",
            "nocloud;garbage",
        ] {
            assert!(NoCloudSource::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn meta_data() {
        let m = MetaData::parse("instance-id: iid-1\nlocal-hostname: n1\n").unwrap();
        assert_eq!(m.instance_id, "iid-1");
        assert!(MetaData::parse("local-hostname: n1\n").is_err());
    }
}
