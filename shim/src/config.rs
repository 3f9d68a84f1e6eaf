//! The shim's own configuration: a TOML file named by the runtime options containerd passes
//! with CreateTask (`ConfigPath`), else `/etc/tandem/tandem.toml` when it exists, else the
//! defaults. Unknown keys are rejected so that a typo does not silently fall back.
//!
//! Pod annotations under [`ANNOTATION_PREFIX`] are requests to reconfigure the runtime for one
//! pod. Pod specs are untrusted, so the handler's config decides which of them a pod may use
//! (`[annotations] allow`, glob patterns with a trailing `*`); every other one fails the pod at
//! Create with an error naming the annotation and the config file.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The file read when the runtime options name none.
pub const DEFAULT_PATH: &str = "/etc/tandem/tandem.toml";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {msg}")]
    Parse { path: PathBuf, msg: String },
    #[error("pod annotation {key}={value:?} is not allowed by the handler config {config} ([annotations] allow = {allow:?})")]
    AnnotationRefused {
        key: String,
        value: String,
        config: String,
        allow: Vec<String>,
    },
    #[error("pod annotation {key}: tandem knows no such annotation (known: {known:?})")]
    AnnotationUnknown { key: String, known: Vec<String> },
}

/// Annotations under this prefix address tandem itself.
pub const ANNOTATION_PREFIX: &str = "io.tandem.";

/// The per-pod annotations tandem honours (when the handler config allows them). None yet: the
/// mechanism is in place so that none is honoured by accident when the first one lands.
pub const KNOWN_ANNOTATIONS: &[&str] = &[];

/// How the pod's containers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Namespaced Linux containers on the host (the oci engine).
    Container,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mode::Container => f.write_str("container"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_mode")]
    pub mode: Mode,
    #[serde(default)]
    pub annotations: Annotations,
    /// Where the config was read from (for error messages); not a key of the file.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// `[annotations]`: which `io.tandem.*` pod annotations this handler lets pods use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Annotations {
    /// Exact keys, or prefixes ending in `*`. Empty (the default): no pod may reconfigure.
    #[serde(default)]
    pub allow: Vec<String>,
}

fn default_mode() -> Mode {
    Mode::Container
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: default_mode(),
            annotations: Annotations::default(),
            source: None,
        }
    }
}

impl Config {
    /// Parse TOML text; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, Error> {
        let mut c: Config = toml::from_str(text).map_err(|e| Error::Parse {
            path: path.to_path_buf(),
            msg: e.message().to_string()
                + &e.span()
                    .map(|s| {
                        let line = text[..s.start].matches('\n').count() + 1;
                        format!(" (line {line})")
                    })
                    .unwrap_or_default(),
        })?;
        c.source = Some(path.to_path_buf());
        Ok(c)
    }

    /// Refuse every `io.tandem.*` annotation the handler config does not allow, or that tandem
    /// does not know. Other annotations (Kubernetes', CRI's) are not ours to judge.
    pub fn check_annotations<'a>(
        &self,
        annotations: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Result<(), Error> {
        let mut keys: Vec<_> = annotations
            .into_iter()
            .filter(|(k, _)| k.starts_with(ANNOTATION_PREFIX))
            .collect();
        keys.sort();
        for (key, value) in keys {
            let allowed = self
                .annotations
                .allow
                .iter()
                .any(|p| match p.strip_suffix('*') {
                    Some(prefix) => key.starts_with(prefix),
                    None => key == p,
                });
            if !allowed {
                return Err(Error::AnnotationRefused {
                    key: key.clone(),
                    value: value.clone(),
                    config: self
                        .source
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "(defaults: no config file)".into()),
                    allow: self.annotations.allow.clone(),
                });
            }
            if !KNOWN_ANNOTATIONS.contains(&key.as_str()) {
                return Err(Error::AnnotationUnknown {
                    key: key.clone(),
                    known: KNOWN_ANNOTATIONS.iter().map(|s| s.to_string()).collect(),
                });
            }
        }
        Ok(())
    }

    /// Read `path` (which must exist), or the default file when it exists, or the defaults.
    pub fn load(path: Option<&Path>) -> Result<Config, Error> {
        Self::load_with_default(path, Path::new(DEFAULT_PATH))
    }

    fn load_with_default(path: Option<&Path>, default: &Path) -> Result<Config, Error> {
        let path = match path {
            Some(p) => p,
            None if default.exists() => default,
            None => return Ok(Config::default()),
        };
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("", Path::new("t.toml")).unwrap();
        assert_eq!(c.annotations, Annotations::default());
        assert_eq!(c.source.as_deref(), Some(Path::new("t.toml")));
        assert_eq!(c.mode, Mode::Container);
    }

    #[test]
    fn mode_container() {
        let c = Config::parse("mode = \"container\"\n", Path::new("t.toml")).unwrap();
        assert_eq!(c.mode, Mode::Container);
    }

    #[test]
    fn unknown_mode_names_value_and_file() {
        let e = Config::parse("mode = \"vmx\"\n", Path::new("/x/t.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/x/t.toml"), "{e}");
        assert!(e.contains("vmx"), "{e}");
    }

    #[test]
    fn unknown_key_is_rejected() {
        let e = Config::parse("mode = \"container\"\nfoo = 1\n", Path::new("t.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("foo"), "{e}");
        assert!(e.contains("line 2"), "{e}");
    }

    fn ann(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn annotations_refused_unless_allowed() {
        let c = Config::parse("mode = \"container\"\n", Path::new("/etc/t.toml")).unwrap();
        // Kubernetes' and CRI's own annotations are not ours to judge.
        let a = ann(&[("io.kubernetes.cri.sandbox-id", "x"), ("foo", "bar")]);
        c.check_annotations(a.iter().map(|(k, v)| (k, v))).unwrap();
        let a = ann(&[("io.tandem.mode", "vm")]);
        let e = c
            .check_annotations(a.iter().map(|(k, v)| (k, v)))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("io.tandem.mode") && e.contains("not allowed"),
            "{e}"
        );
        assert!(e.contains("/etc/t.toml"), "{e}");
    }

    #[test]
    fn allowed_annotations_must_still_be_known() {
        let c = Config::parse(
            "[annotations]\nallow = [\"io.tandem.*\"]\n",
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(c.annotations.allow, vec!["io.tandem.*".to_string()]);
        let a = ann(&[("io.tandem.bogus", "1")]);
        let e = c
            .check_annotations(a.iter().map(|(k, v)| (k, v)))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("io.tandem.bogus") && e.contains("no such"),
            "{e}"
        );
        let e = Config::parse("[annotations]\ndeny = []\n", Path::new("t.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("deny"), "{e}");
    }

    #[test]
    fn load_order() {
        let dir = tempfile::tempdir().unwrap();
        let missing_default = dir.path().join("none.toml");
        // no path, no default file: defaults
        assert_eq!(
            Config::load_with_default(None, &missing_default).unwrap(),
            Config::default()
        );
        // default file exists and is read
        let def = dir.path().join("default.toml");
        std::fs::write(&def, "bogus = true\n").unwrap();
        assert!(Config::load_with_default(None, &def).is_err());
        // an explicit path wins and must exist
        let p = dir.path().join("given.toml");
        std::fs::write(&p, "mode = \"container\"\n").unwrap();
        assert_eq!(
            Config::load_with_default(Some(&p), &def).unwrap().mode,
            Mode::Container
        );
        let e = Config::load_with_default(Some(&dir.path().join("nope.toml")), &def)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope.toml"), "{e}");
    }
}
